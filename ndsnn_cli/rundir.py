"""The run directory: its layout, the lock one trainer holds on it, and its metrics log.

A run directory holds `recipe.toml`, `metrics.jsonl` (epoch and mask-update records, deterministic so
that a resumed run matches an uninterrupted one), `checkpoints/last.safetensors` and `summary.json`
(and `tb/` with `[train] loggers = ["jsonl", "tensorboard"]`: see loggers.py).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ndsnn_cli.atomic import write_text
from ndsnn_cli.errors import UserError
from ndsnn_cli.loggers import METRICS
from ndsnn_cli.recipe import Recipe, parse_recipe

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
        previous = parse_recipe(existing.read_text(), str(existing))
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
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if record["step"] > step or (record["kind"] == "epoch" and record["epoch"] > epoch):
            break
        kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def default_run_dir(recipe: Recipe) -> Path:
    return Path(os.environ.get("NDSNN_RUNS", "runs")) / recipe.name
