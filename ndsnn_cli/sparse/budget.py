"""How many weights each sparse layer keeps: plain arithmetic on names and shapes, no torch.

The trainer (through `masks.layer_counts`) and `ndsnn cost` share these functions, and the cost
model starts instantly because nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

from ndsnn_cli.errors import UserError
from ndsnn_cli.sparse.schedules import SparseSchedule


def is_kept_dense(name: str, dense: Iterable[str]) -> bool:
    """A weight stays dense when a `[sparsity] dense` entry is its name or a prefix of it."""
    return any(name == d or name.startswith(d.rstrip(".") + ".") for d in dense)


def check_dense_entries(dense: Iterable[str], parameter_names: Iterable[str]) -> None:
    """Every `[sparsity] dense` entry must match some parameter (a typo would silently keep all sparse)."""
    names = sorted(parameter_names)
    for entry in dense:
        if not any(is_kept_dense(p, [entry]) for p in names):
            raise UserError(f"[sparsity] dense = '{entry}' matches no parameter of the model "
                            f"(e.g. {', '.join(names[:3])})")


def active_count(numel: int, density: float) -> int:
    return int(round(density * numel))


def erk_densities(shapes: Mapping[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel (RigL): density_l proportional to sum(shape)/prod(shape), capped at 1.

    Layers whose share would exceed 1 are made dense and the rest re-solved, so the overall number of
    active weights is `density` of the total.
    """
    numels = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: sum(shape) / numels[name] for name, shape in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = density * sum(numels.values()) - sum(numels[n] for n in dense)
        weighted = sum(raw[n] * numels[n] for n in shapes if n not in dense)
        if weighted == 0:
            break
        epsilon = budget / weighted
        over = {n for n in shapes if n not in dense and epsilon * raw[n] > 1}
        if not over:
            break
        dense |= over
    return {n: 1.0 if n in dense else min(1.0, max(0.0, epsilon * raw[n])) for n in shapes}


def shape_counts(shapes: Mapping[str, tuple[int, ...]], density: float, distribution: str) -> dict[str, int]:
    """Active weights per layer for an overall `density` split by shape alone (erk or uniform).

    The `global` split ranks trained weights, so it needs the weights: `masks.layer_counts`.
    """
    if distribution == "uniform":
        densities = {name: density for name in shapes}
    elif distribution == "erk":
        densities = erk_densities(shapes, density)
    else:
        raise ValueError(f"distribution {distribution!r} cannot be split by shape alone")
    return {name: active_count(math.prod(shape), densities[name]) for name, shape in shapes.items()}


def target_counts(schedule: SparseSchedule, step: int, current: dict[str, int],
                  counts_at: Callable[[float], dict[str, int]]) -> dict[str, int]:
    """Active weights per layer after the update at `step` (the trainer and `ndsnn cost` both use this).

    From the ramp's start on: the distribution's counts at s(step) (`counts_at(density)`), never above
    the current ones (a ramp only removes weights, so a rounding change never regrows a layer). After
    t1 this is a no-op once the final counts are reached, and it catches up if the update at t1 was
    postponed.
    """
    ramping = schedule.initial_sparsity != schedule.final_sparsity and schedule.ramp_start_step < step
    if not ramping:
        return dict(current)
    targets = counts_at(1 - schedule.sparsity(step))
    return {n: min(targets[n], current[n]) for n in targets}
