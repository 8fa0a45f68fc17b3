"""Metric loggers: where a run's numbers go, named in `[train] loggers` (registry below).

`jsonl` is the run's record and the source of truth: `metrics.jsonl` (epoch, mask-update, mask-init and
dead-layer records, deterministic, cut back to the checkpoint on resume) is what `cost RUN`, the reports
and resume read. Every other logger is a view of the same records for the tools researchers already watch
runs in, plus per-step scalars (loss, lr) that are too many for the record. Only rank 0 logs (DDP).

This module stays light (no torch, no tensorboard at import): the recipe takes its names from it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from ndsnn_cli.atomic import append_line
from ndsnn_cli.errors import UserError

METRICS = "metrics.jsonl"
TB_DIR = "tb"  # TensorBoard event files: <run_dir>/tb/ (`tensorboard --logdir runs/` finds every run)


class MetricLogger:
    """One destination for a run's metrics; the default ignores everything."""

    def log_record(self, record: dict[str, Any]) -> None:
        """A metrics.jsonl record: {"kind": "epoch" | "mask_update" | "mask_init" | "dead_layers", "step": ...}."""

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Per-step values (train/loss, train/lr) at the recipe's `log_every_steps`."""

    def log_text(self, tag: str, text: str, step: int) -> None: ...

    def close(self) -> None: ...


LOGGERS: dict[str, type[MetricLogger]] = {}
NEEDS: dict[str, str] = {}  # logger -> the optional package it imports (installed by the ndsnn extra of its name)


def register(name: str, needs: str = "") -> Callable[[type[MetricLogger]], type[MetricLogger]]:
    """Class decorator: `[train] loggers` accepts `name`; `needs` is the package an optional logger imports."""

    def add(cls: type[MetricLogger]) -> type[MetricLogger]:
        LOGGERS[name] = cls
        if needs:
            NEEDS[name] = needs
        return cls

    return add


@register("jsonl")
class JsonlLogger(MetricLogger):
    """metrics.jsonl: one JSON record per line (the trainer truncates it to the checkpoint before opening)."""

    def __init__(self, run_dir: Path, start_step: int) -> None:
        self.path = run_dir / METRICS

    def log_record(self, record: dict[str, Any]) -> None:
        append_line(self.path, json.dumps(record))


@register("tensorboard", needs="tensorboard")
class TensorBoardLogger(MetricLogger):
    """TensorBoard event files in <run_dir>/tb/, written with torch's SummaryWriter (as torchtune's logger).

    The x axis is the optimizer step everywhere, so epoch, mask-update and per-step curves line up. A
    resumed run starts a new event file with a `purge_step` just after the checkpoint's step: TensorBoard then
    hides what the killed process logged after the checkpoint, as metrics.jsonl's truncation drops it.
    """

    def __init__(self, run_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # events at steps > start_step came from a killed process: TensorBoard hides them (step start_step is done)
        self.writer = SummaryWriter(str(run_dir / TB_DIR), purge_step=start_step + 1 if start_step else None)

    def log_record(self, record: dict[str, Any]) -> None:
        for tag, value in record_scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])
        if record["kind"] == "dead_layers":
            self.log_text("warnings/dead_layers", json.dumps(record["layers"], indent=2), record["step"])
        if record["kind"] == "epoch":
            self.writer.flush()  # live at each epoch, not only every flush_secs

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        # TensorBoard renders text as Markdown: indent four spaces to show it verbatim (a code block)
        self.writer.add_text(tag, "".join(f"    {line}\n" for line in text.splitlines()), step)

    def close(self) -> None:
        self.writer.close()


def record_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of one metrics.jsonl record, by tag (a pure function of the record)."""
    kind = record["kind"]
    if kind == "epoch":
        scalars = {f"epoch/{key}": record[key] for key in ("train_loss", "train_accuracy", "test_loss",
                                                           "test_accuracy", "sparsity", "lr")}
        scalars.update({f"density/{name}": d for name, d in record.get("layer_density", {}).items()})
        scalars.update({f"spike_rate/{name}": r for name, r in record.get("spike_rates", {}).items()})
        return scalars
    if kind == "mask_update":
        scalars = {"mask/target_sparsity": record["target_sparsity"], "mask/sparsity": record["sparsity"],
                   "mask/drop_fraction": record["drop_fraction"], "mask/dropped": record["dropped"],
                   "mask/grown": record["grown"]}
        for name, layer in record["layers"].items():
            scalars[f"mask_dropped/{name}"] = layer["dropped"]
            scalars[f"mask_grown/{name}"] = layer["grown"]
        return scalars
    return {}


LOGGER_NAMES = tuple(LOGGERS)


def check_available(names: Sequence[str]) -> None:
    """A one-line UserError naming the package and the extra when a named logger cannot be imported."""
    for name in names:
        package = NEEDS.get(name)
        if package and find_spec(package) is None:
            raise UserError(f'[train] loggers: "{name}" needs the {package} package, which is not installed: '
                            f"pip install 'ndsnn[{name}]' (or pip install {package})")


class Loggers:
    """The run's loggers as one (rank 0 holds them all, other ranks none); closed by the trainer."""

    def __init__(self, loggers: Sequence[MetricLogger] = ()) -> None:
        self.loggers = list(loggers)

    @classmethod
    def open(cls, names: Sequence[str], run_dir: Path, start_step: int) -> Loggers:
        check_available(names)
        return cls([LOGGERS[name](run_dir, start_step) for name in names])

    def log_record(self, record: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_record(record)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_scalars(scalars, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        for logger in self.loggers:
            logger.log_text(tag, text, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
