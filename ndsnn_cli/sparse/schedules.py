"""Pure functions of the training step: each method's schedule, sparsity ramp, drop fraction,
update steps, LTH rounds.

The trainer and the cost model both call these, so the FLOPs reported by `ndsnn cost` follow exactly
the schedule that training runs. No torch here: `ndsnn cost` starts instantly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ndsnn_cli.recipe import Recipe, sparse_epochs
from ndsnn_cli.sparse import METHODS


@dataclass(frozen=True)
class SparseSchedule:
    """A drop-and-grow schedule in optimizer steps; every method except LTH is one of these."""

    initial_sparsity: float
    final_sparsity: float
    ramp_start_step: int
    ramp_end_step: int
    update_end_step: int
    update_every_steps: int
    drop_fraction: float
    drop_fraction_min: float
    grow: str  # "gradient" | "random" | "none"

    def sparsity(self, step: int) -> float:
        return sparsity_at(step, self.initial_sparsity, self.final_sparsity, self.ramp_start_step, self.ramp_end_step)

    def drop_fraction_at(self, step: int) -> float:
        if self.grow == "none":
            return 0.0
        return drop_fraction_at(step, self.drop_fraction, self.drop_fraction_min, self.update_end_step)

    def is_update_step(self, step: int) -> bool:
        return is_update_step(step, self.update_every_steps, self.update_end_step) or step == self._ramp_end_update()

    def update_steps(self) -> list[int]:
        """Every step at which the mask changes (after that step's optimizer update)."""
        steps = list(range(self.update_every_steps, self.update_end_step, self.update_every_steps))
        extra = self._ramp_end_update()
        return sorted({*steps, extra}) if extra else steps

    def _ramp_end_update(self) -> int | None:
        """A ramp also updates at t1 itself, so `final` is reached even when dT does not divide t1."""
        ramps = self.initial_sparsity != self.final_sparsity and self.ramp_end_step > max(0, self.ramp_start_step)
        return self.ramp_end_step if ramps else None


def sparsity_at(step: int, initial: float, final: float, ramp_start_step: int, ramp_end_step: int) -> float:
    """Cubic ramp (Zhu & Gupta): s(t) = s_f + (s_i - s_f) * (1 - (t - t0)/(t1 - t0))**3, clamped to [t0, t1]."""
    if step <= ramp_start_step:
        return initial
    if step >= ramp_end_step:
        return final
    progress = (step - ramp_start_step) / (ramp_end_step - ramp_start_step)
    return final + (initial - final) * (1 - progress) ** 3


def drop_fraction_at(step: int, initial: float, minimum: float, end_step: int) -> float:
    """Cosine decay d(t) = d_min + (d0 - d_min) * (1 + cos(pi * t / t_end)) / 2; d_min after t_end."""
    if end_step <= 0 or step >= end_step:
        return minimum
    return minimum + (initial - minimum) * (1 + math.cos(math.pi * step / end_step)) / 2


def is_update_step(step: int, every_steps: int, end_step: int) -> bool:
    """Masks change after step t when t is a positive multiple of dT strictly before t_end."""
    return 0 < step < end_step and step % every_steps == 0


def lth_round_epochs(round_epochs: int, rewind_epoch: int, rounds: int) -> list[int]:
    """Epochs of each LTH round: the dense round trains them all; later rounds start from the weights
    rewound to `rewind_epoch` and train the rest (LTH-SNN: `end_iter - rewinding_epoch`)."""
    return [round_epochs] + [round_epochs - rewind_epoch] * (rounds - 1)


def lth_round_sparsities(final: float, prune_rate: float) -> list[float]:
    """Sparsity of each LTH round: 0 (dense), then 1-(1-p)^r, the last one clamped to `final`."""
    sparsities = [0.0]
    while sparsities[-1] < final - 1e-12:
        sparsities.append(min(final, 1 - (1 - sparsities[-1]) * (1 - prune_rate)))
    return sparsities


def _fixed(sparsity: float, grow: str, every: int, end: int, d0: float, d_min: float) -> SparseSchedule:
    return SparseSchedule(sparsity, sparsity, 0, 0, end, every, d0, d_min, grow)


def static_schedule(sparsity: float) -> SparseSchedule:
    """A mask that never changes (static method, and each LTH round)."""
    return _fixed(sparsity, "none", 1, 0, 0.0, 0.0)



# ---------------------------------------------------------------------------------------------
# Each method as a schedule (DESIGN §4)

ScheduleBuilder = Callable[["Recipe", int], SparseSchedule | None]
# The registry of methods, one schedule per name of `sparse.METHODS` (recipe choices, prune-compare and
# `ndsnn cost` take the names from there; tests/test_registries.py checks that the two agree).
METHOD_SCHEDULES: dict[str, ScheduleBuilder] = {}


def register_schedule(name: str) -> Callable[[ScheduleBuilder], ScheduleBuilder]:
    if name not in METHODS:
        raise ValueError(f"schedule {name!r} is not a method of ndsnn_cli.sparse.METHODS")

    def add(builder: ScheduleBuilder) -> ScheduleBuilder:
        METHOD_SCHEDULES[name] = builder
        return builder
    return add


def _steps(recipe: Recipe, steps_per_epoch: int) -> tuple[int, int, int]:
    t0, t1, t_end = (round(epoch * steps_per_epoch) for epoch in sparse_epochs(recipe))
    # Short runs can round t0 and t1 onto one step; the ramp still needs one step to happen.
    return t0, max(t1, t0 + 1), max(t_end, t0 + 1)


@register_schedule("dense")
def _dense(recipe: Recipe, steps_per_epoch: int) -> SparseSchedule | None:
    return None


@register_schedule("static")
def _static(recipe: Recipe, steps_per_epoch: int) -> SparseSchedule:
    return static_schedule(recipe.sparsity.final)


@register_schedule("set")
def _set(recipe: Recipe, steps_per_epoch: int) -> SparseSchedule:
    sp = recipe.sparsity
    return _fixed(sp.final, "random", sp.update_every_steps, _steps(recipe, steps_per_epoch)[2],
                  sp.drop_fraction, sp.drop_fraction_min)


@register_schedule("rigl")
def _rigl(recipe: Recipe, steps_per_epoch: int) -> SparseSchedule:
    sp = recipe.sparsity
    return _fixed(sp.final, sp.grow, sp.update_every_steps, _steps(recipe, steps_per_epoch)[2],
                  sp.drop_fraction, sp.drop_fraction_min)


@register_schedule("gmp")
def _gmp(recipe: Recipe, steps_per_epoch: int) -> SparseSchedule:
    sp = recipe.sparsity
    t0, t1, t_end = _steps(recipe, steps_per_epoch)
    return SparseSchedule(0.0, sp.final, t0, t1, max(t1 + 1, t_end), sp.update_every_steps, 0.0, 0.0, "none")


@register_schedule("ndsnn")
def _ndsnn(recipe: Recipe, steps_per_epoch: int) -> SparseSchedule:
    sp = recipe.sparsity
    t0, t1, t_end = _steps(recipe, steps_per_epoch)
    return SparseSchedule(sp.initial, sp.final, t0, t1, t_end, sp.update_every_steps,
                          sp.drop_fraction, sp.drop_fraction_min, sp.grow)


@register_schedule("lth")
def _lth(recipe: Recipe, steps_per_epoch: int) -> SparseSchedule | None:
    """Within one LTH round the mask is static; the rounds themselves are driven by the trainer."""
    return None


def method_schedule(recipe: Recipe, steps_per_epoch: int) -> SparseSchedule | None:
    """The recipe's method as a schedule in optimizer steps (None: dense, no masks)."""
    return METHOD_SCHEDULES[recipe.sparsity.method](recipe, steps_per_epoch)
