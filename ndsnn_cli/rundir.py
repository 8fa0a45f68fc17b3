"""The run directory: its layout, the lock one trainer holds on it, and its metrics log.

A run directory holds `recipe.toml`, `metrics.jsonl` (epoch and mask-update records, deterministic so
that a resumed run matches an uninterrupted one), `checkpoints/last.safetensors` and `summary.json`
(and `tb/` with `[train] loggers = ["jsonl", "tensorboard"]`: see loggers.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ndsnn_cli import limits as L
from ndsnn_cli.atomic import write_text
from ndsnn_cli.errors import UserError
from ndsnn_cli.formats.text import TextError, parse_json, read_text_file, show
from ndsnn_cli.loggers import METRICS
from ndsnn_cli.recipe import Recipe, load_recipe

RUN_CHECKPOINT = Path("checkpoints") / "last.safetensors"  # a run directory's latest checkpoint


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Refuse a second `ndsnn train` on the same run directory (an flock, released even on kill -9)."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"{run_dir}: another ndsnn process is training in this run directory") from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def prepare_run_dir(recipe: Recipe, run_dir: Path, resume: bool) -> None:
    existing = run_dir / "recipe.toml"
    if existing.exists():
        if not resume:
            raise UserError(f"{run_dir}: already holds a run; pass --resume to continue it or --out for a new one")
        previous = load_recipe(existing, str(existing))
        if previous.to_toml() != recipe.to_toml():
            raise UserError(f"{run_dir}: --resume with a recipe that differs from the run's recipe.toml")
        # Temp files of a write killed mid-way (atomic.write_bytes); we hold the lock, so no writer is live.
        for stale in [*run_dir.glob(".*.tmp"), *(run_dir / RUN_CHECKPOINT.parent).glob(".*.tmp")]:
            stale.unlink(missing_ok=True)
    else:
        write_text(existing, recipe.to_toml())


def truncate_metrics(path: Path, step: int, epoch: int) -> None:
    """Drop records written after the checkpoint (and a torn last line) so a resumed run's log is exact.

    An epoch record can carry the checkpoint's own step (a mid-epoch checkpoint on the epoch's last
    batch, killed before the epoch-end one): it is kept only if the checkpoint counts that epoch as done.
    """
    if not path.exists():
        return
    kept = []
    for line, record in read_metric_records(path):
        if record["step"] > step or (record["kind"] == "epoch" and record["epoch"] > epoch):
            break
        kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records, each checked (`read_metric_records`)."""
    return [record for _, record in read_metric_records(Path(run_dir) / METRICS)]


def read_metric_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """metrics.jsonl as (line, record) pairs, each record checked: a JSON object with a string `kind` and an
    integer `step` (and `epoch`, for epoch records) in bounds, read with the text bounds of `formats.text`.
    A last line cut short by a crash (no final newline, not JSON) is dropped; any other line that is not such
    a record is refused, naming its number: the log is what resume, cost and the reports trust."""
    if not path.exists():
        return []
    try:
        text = read_text_file(path, L.MAX_METRICS_BYTES)
    except TextError as exc:
        raise UserError(f"{path}: {exc}") from None
    lines = text.splitlines()
    pairs = []
    for number, line in enumerate(lines, 1):
        try:
            record = parse_json(line, L.MAX_METRICS_LINE_BYTES)
        except TextError as exc:
            if number == len(lines) and not text.endswith("\n") and str(exc).startswith("not valid JSON"):
                break  # torn: the last write of a killed process
            raise UserError(f"{path}: line {number}: {exc}") from None
        pairs.append((line, _metric_record(path, number, record)))
    return pairs


def _metric_record(path: Path, number: int, record: Any) -> dict[str, Any]:
    if not isinstance(record, dict) or not isinstance(record.get("kind"), str):
        raise UserError(f"{path}: line {number}: must be a record {{\"kind\": ..., \"step\": ...}} "
                        f"(got {show(record)})")
    keys = ("step", "epoch") if record["kind"] == "epoch" else ("step",)
    for key in keys:
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= L.MAX_STEPS:
            raise UserError(f"{path}: line {number} {key}: must be an integer in [0, {L.MAX_STEPS}] (got "
                            f"{show(value)})")
    return record


def default_run_dir(recipe: Recipe) -> Path:
    return Path(os.environ.get("NDSNN_RUNS", "runs")) / recipe.name
