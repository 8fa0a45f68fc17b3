"""`train(recipe, run_dir)`: the one entry point that trains a recipe into a run directory.

It checks the inputs before the run directory is touched, takes the directory's lock, and hands the
work to the trainer loop (trainer.py) or, for `method = "lth"`, to the LTH driver (lth.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from ndsnn_cli import distributed
from ndsnn_cli.data.loading import build_datasets, for_training
from ndsnn_cli.errors import UserError
from ndsnn_cli.loggers import check_available
from ndsnn_cli.lth import train_lth
from ndsnn_cli.recipe import Recipe
from ndsnn_cli.rundir import prepare_run_dir, run_lock
from ndsnn_cli.trainer import TrainCallbacks, resolve_device, train_once


def train(recipe: Recipe, run_dir: str | Path, *, resume: bool = False,
          callbacks: TrainCallbacks | None = None) -> dict[str, Any]:
    """Train one recipe into `run_dir`; returns the summary (also written to summary.json)."""
    run_dir = Path(run_dir)
    callbacks = callbacks or TrainCallbacks()
    datasets = _check_inputs(recipe)
    distributed.init_from_env(recipe.train.device)
    try:
        if distributed.active() and recipe.sparsity.method == "lth":
            raise UserError('[sparsity] method = "lth" does not support multi-process training; use one process')
        with contextlib.ExitStack() as stack:
            def claim() -> None:  # rank 0 only: it alone writes the run directory
                stack.enter_context(run_lock(run_dir))
                prepare_run_dir(recipe, run_dir, resume)

            distributed.on_main(claim)
            if recipe.sparsity.method == "lth":
                return train_lth(recipe, run_dir, resume, callbacks, datasets)
            return train_once(recipe, run_dir, resume=resume, callbacks=callbacks, datasets=datasets)
    finally:
        distributed.shutdown()


def _check_inputs(recipe: Recipe) -> tuple[Any, Any]:
    """Device, model and data problems surface before the run dir is touched, naming the recipe file."""
    from ndsnn_cli.snn.models import MODELS

    try:
        resolve_device(recipe.train.device)
        check_available(recipe.train.loggers)
        if recipe.model.arch not in MODELS:
            raise UserError(f"[model] arch = {recipe.model.arch!r} is not a known model "
                            f"(known: {', '.join(sorted(MODELS))})")
        return for_training(recipe.data, build_datasets(recipe.data))  # decoded once, for every LTH round too
    except UserError as exc:
        if str(exc).startswith(f"{recipe.source}:"):
            raise
        raise UserError(f"{recipe.source}: {exc}") from None
