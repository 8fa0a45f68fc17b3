"""The LTH driver (iterative magnitude pruning with late rewinding, LTH-SNN): round 0 trains dense and
saves the weights to rewind to; each later round prunes by global magnitude, rewinds and retrains.
Every round is one `trainer.train_once` in its own `round_XX/` folder of the run directory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ndsnn_cli.atomic import write_bytes, write_json
from ndsnn_cli.checkpoint import load_checkpoint
from ndsnn_cli.recipe import Recipe
from ndsnn_cli.rundir import RUN_CHECKPOINT
from ndsnn_cli.sparse.budget import active_count
from ndsnn_cli.sparse.masks import global_magnitude_masks
from ndsnn_cli.sparse.schedules import lth_round_epochs, lth_round_sparsities
from ndsnn_cli.trainer import TIME_PHASES, TRAIN_PHASES, RoundStart, TrainCallbacks, train_once
from ndsnn_cli.validate import check_run_summary, read_json_file


def prune_global_magnitude(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None,
                           sparsity: float) -> dict[str, torch.Tensor]:
    """LTH pruning: keep the largest |w| across all sparse layers so that `sparsity` of them are zero."""
    total = sum(w.numel() for w in weights.values())
    return global_magnitude_masks(weights, masks, active_count(total, 1 - sparsity))


def train_lth(recipe: Recipe, run_dir: Path, resume: bool, callbacks: TrainCallbacks,
              datasets: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Iterative magnitude pruning with late rewinding: dense round 0, then prune, rewind, retrain."""
    sp = recipe.sparsity
    sparsities = lth_round_sparsities(sp.final, sp.prune_rate)
    epochs = sp.round_epochs or recipe.train.epochs
    round_epochs = lth_round_epochs(epochs, sp.rewind_epoch, len(sparsities))
    rewind_path = run_dir / "rewind.safetensors"
    rounds: list[dict[str, Any]] = []
    split = dict.fromkeys(TIME_PHASES, 0.0)  # summed over the rounds (each round's own is in its summary.json)
    masks: dict[str, torch.Tensor] | None = None
    started = time.perf_counter()
    for index, sparsity in enumerate(sparsities):
        round_dir = run_dir / f"round_{index:02d}"
        callbacks.on_round_start(index, len(sparsities), sparsity)
        done = round_dir / "summary.json"
        if resume and done.exists():
            summary = check_run_summary(done, read_json_file(done))  # a round's summary.json, read back on resume
        else:
            round_dir.mkdir(parents=True, exist_ok=True)
            round_resume = resume and (round_dir / RUN_CHECKPOINT).exists()
            if index == 0:
                start = RoundStart(epochs=epochs, rewind=(sp.rewind_epoch, rewind_path))
            else:
                start = RoundStart(epochs=round_epochs[index], initial_state=load_checkpoint(rewind_path).model_state,
                                   initial_masks=masks)
            summary = train_once(recipe, round_dir, resume=round_resume, callbacks=callbacks, start=start,
                                 datasets=datasets)
        for phase, seconds in summary.get("time_split", {}).items():
            split[phase] = split.get(phase, 0.0) + seconds
        rounds.append({"round": index, "target_sparsity": sparsity, "sparsity": summary["sparsity"]["sparsity"],
                       "test_accuracy": summary["test_accuracy"], "epochs": round_epochs[index]})
        if index + 1 < len(sparsities):
            final = load_checkpoint(round_dir / RUN_CHECKPOINT)
            names = list(summary["sparsity"]["layers"])
            weights = {n: final.model_state[n] for n in names}
            previous = {n: final.masks[n] for n in names} if final.masks else None
            masks = prune_global_magnitude(weights, previous, sparsities[index + 1])
    summary = dict(summary)
    summary.update({"method": "lth", "rounds": rounds, "round_epochs": epochs,
                    "total_epochs": sum(round_epochs), "wall_time_s": time.perf_counter() - started,
                    "time_split": split, "train_wall_s": sum(split[p] for p in TRAIN_PHASES)})
    # The final round's checkpoint is the run's: `ndsnn export/inspect/cost RUN` find it where they look.
    write_bytes(run_dir / RUN_CHECKPOINT, (run_dir / f"round_{len(sparsities) - 1:02d}" / RUN_CHECKPOINT).read_bytes())
    write_json(run_dir / "summary.json", summary)
    return summary
