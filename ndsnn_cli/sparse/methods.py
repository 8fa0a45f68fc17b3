"""Sparse training methods behind one interface: `setup`, then `after_step` after every optimizer step.

dense, static, SET, RigL, GMP and NDSNN are all one drop-and-grow engine with different schedules
(DESIGN §4); LTH (iterative magnitude pruning with rewinding) is a driver around whole trainings,
in `ndsnn_cli.train`, that uses a static mask per round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ndsnn_cli.recipe import Recipe, sparse_epochs
from ndsnn_cli.sparse.masks import (
    Masks,
    active_count,
    global_magnitude_masks,
    layer_counts,
    random_mask,
    sparse_parameter_names,
)
from ndsnn_cli.sparse.schedules import SparseSchedule


@dataclass(frozen=True)
class MaskUpdate:
    """What one mask update did, overall (per-layer counts in `layers`)."""

    step: int
    target_sparsity: float
    sparsity: float
    drop_fraction: float
    dropped: int
    grown: int
    layers: dict[str, dict[str, int]]

    def to_record(self) -> dict[str, object]:
        return {"kind": "mask_update", **asdict(self)}


@dataclass(frozen=True)
class LayerChange:
    mask: torch.Tensor
    grown: torch.Tensor
    dropped: int


def drop_and_grow(weight: torch.Tensor, mask: torch.Tensor, target_active: int, drop_fraction: float,
                  grow_scores: torch.Tensor | None) -> LayerChange:
    """One layer's update: keep the largest |w| of the active weights, then grow at the best scores.

    With k active and k' = target_active: g = ceil(d * k') weights grow and k - k' + g are dropped,
    so the layer ends with exactly k' active weights. `grow_scores=None` means no growth (GMP).
    Regrowing a just-dropped position is allowed (as in RigL); it restarts from zero.
    """
    active = int(mask.sum())
    grow_count = math.ceil(drop_fraction * target_active) if grow_scores is not None else 0
    remain = max(0, min(active, target_active - grow_count))
    grow_count = target_active - remain
    flat_w = weight.detach().abs().flatten().float().masked_fill(~mask.flatten(), -1.0)
    keep = torch.zeros_like(mask.flatten())
    if remain:
        keep[torch.topk(flat_w, remain, sorted=False).indices] = True
    grown = torch.zeros_like(keep)
    if grow_count:
        if grow_scores is None:
            raise ValueError("growth requested without scores")
        scores = grow_scores.flatten().float().masked_fill(keep, -math.inf)
        grown[torch.topk(scores, grow_count, sorted=False).indices] = True
    new_mask = (keep | grown).reshape(mask.shape)
    return LayerChange(new_mask, grown.reshape(mask.shape), active - remain)


def target_counts(schedule: SparseSchedule, step: int, current: dict[str, int],
                  weights: Mapping[str, torch.Tensor], distribution: str,
                  masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Active weights per layer after the update at `step` (the trainer and `ndsnn cost` both use this).

    From the ramp's start on: the distribution's counts at s(step), never above the current ones (a
    ramp only removes weights, so a rounding change never regrows a layer). After t1 this is a no-op
    once the final counts are reached, and it catches up if the update at t1 was postponed.
    """
    ramping = schedule.initial_sparsity != schedule.final_sparsity and schedule.ramp_start_step < step
    if not ramping:
        return dict(current)
    targets = layer_counts(weights, 1 - schedule.sparsity(step), distribution, masks)
    return {n: min(targets[n], current[n]) for n in targets}


class SparseMethod:
    """The drop-and-grow engine; `schedule=None` is dense training (no masks)."""

    def __init__(self, name: str, schedule: SparseSchedule | None, distribution: str = "erk",
                 dense: tuple[str, ...] = (), seed: int = 0) -> None:
        self.name, self.schedule, self.distribution, self.dense = name, schedule, distribution, dense
        self.generator = torch.Generator().manual_seed(seed + 7919)
        self.masks: Masks | None = None
        self.pending_update = False  # an update step whose gradients were not finite (AMP skipped it)

    def setup(self, model: nn.Module, initial_masks: dict[str, torch.Tensor] | None = None) -> None:
        """Create the initial masks (random with exact per-layer counts) and zero the inactive weights."""
        if self.schedule is None:
            return
        names = sparse_parameter_names(model, self.dense)
        params = dict(model.named_parameters())
        weights = {name: params[name] for name in names}
        if initial_masks is None:
            density = 1 - self.schedule.initial_sparsity
            if self.distribution == "global":
                total = sum(w.numel() for w in weights.values())
                initial_masks = global_magnitude_masks(weights, None, active_count(total, density))
            else:
                counts = layer_counts(weights, density, self.distribution)
                initial_masks = {n: random_mask(w.shape, counts[n], self.generator, w.device)
                                 for n, w in weights.items()}
        self.masks = Masks(weights, initial_masks)
        self.masks.apply()

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> MaskUpdate | None:
        """Re-apply the masks; on an update step, drop and grow first. `step` counts optimizer steps."""
        if self.masks is None:
            return None
        update = None
        if self.schedule.is_update_step(step) or self.pending_update:
            if self._gradients_finite():
                update = self._update(step, optimizer)
                self.pending_update = False
            else:  # postponed to the next step with usable gradients
                self.pending_update = True
        self.masks.apply(optimizer)
        return update

    def _gradients_finite(self) -> bool:
        """An AMP step skipped for inf/NaN gradients leaves them unusable: postpone the update."""
        if self.schedule.grow != "gradient":
            return True
        return all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in self.masks.params.values())

    @torch.no_grad()
    def _update(self, step: int, optimizer: torch.optim.Optimizer) -> MaskUpdate:
        schedule, masks = self.schedule, self.masks
        target_sparsity = schedule.sparsity(step)
        drop_fraction = schedule.drop_fraction_at(step)
        targets = target_counts(schedule, step, masks.nnz(), masks.params, self.distribution, masks.masks)
        layers, dropped_total, grown_total = {}, 0, 0
        for name, param in masks.params.items():
            if schedule.grow == "gradient":
                scores = param.grad.abs()
            elif schedule.grow == "random":
                scores = torch.rand(param.shape, generator=self.generator).to(param.device)
            else:
                scores = None
            change = drop_and_grow(param, masks.masks[name], targets[name], drop_fraction, scores)
            masks.masks[name] = change.mask
            param.masked_fill_(change.grown, 0.0)
            state = optimizer.state.get(param, {})
            for buffer in state.values():
                if isinstance(buffer, torch.Tensor) and buffer.shape == param.shape:
                    buffer.masked_fill_(change.grown, 0.0)
            grown = int(change.grown.sum())
            layers[name] = {"active": targets[name], "dropped": change.dropped, "grown": grown}
            dropped_total += change.dropped
            grown_total += grown
        return MaskUpdate(step, target_sparsity, masks.sparsity(), drop_fraction, dropped_total, grown_total, layers)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
        tensors = {} if self.masks is None else {f"mask::{n}": m.cpu() for n, m in self.masks.masks.items()}
        tensors["method::generator"] = self.generator.get_state()
        tensors["method::pending_update"] = torch.tensor([self.pending_update], dtype=torch.bool)
        return tensors, {"method": self.name}

    def load_state_dict(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        masks = {k.removeprefix("mask::"): v for k, v in tensors.items() if k.startswith("mask::")}
        if self.schedule is not None:
            self.setup(model, initial_masks=masks)
        self.generator.set_state(tensors["method::generator"])
        self.pending_update = bool(tensors.get("method::pending_update", torch.tensor([False])).item())


def _fixed(sparsity: float, grow: str, every: int, end: int, d0: float, d_min: float) -> SparseSchedule:
    return SparseSchedule(sparsity, sparsity, 0, 0, end, every, d0, d_min, grow)


def static_schedule(sparsity: float) -> SparseSchedule:
    """A mask that never changes (static method, and each LTH round)."""
    return _fixed(sparsity, "none", 1, 0, 0.0, 0.0)


ScheduleBuilder = Callable[[Recipe, int], SparseSchedule | None]
METHOD_SCHEDULES: dict[str, ScheduleBuilder] = {}


def register_method(name: str) -> Callable[[ScheduleBuilder], ScheduleBuilder]:
    def add(builder: ScheduleBuilder) -> ScheduleBuilder:
        METHOD_SCHEDULES[name] = builder
        return builder
    return add


def _steps(recipe: Recipe, steps_per_epoch: int) -> tuple[int, int, int]:
    t0, t1, t_end = (round(epoch * steps_per_epoch) for epoch in sparse_epochs(recipe))
    # Short runs can round t0 and t1 onto one step; the ramp still needs one step to happen.
    return t0, max(t1, t0 + 1), max(t_end, t0 + 1)


@register_method("dense")
def _dense(recipe: Recipe, steps_per_epoch: int) -> SparseSchedule | None:
    return None


@register_method("static")
def _static(recipe: Recipe, steps_per_epoch: int) -> SparseSchedule:
    return static_schedule(recipe.sparsity.final)


@register_method("lth")
def _lth(recipe: Recipe, steps_per_epoch: int) -> SparseSchedule | None:
    """Within one LTH round the mask is static; the rounds themselves are driven by the trainer."""
    return None


@register_method("set")
def _set(recipe: Recipe, steps_per_epoch: int) -> SparseSchedule:
    sp = recipe.sparsity
    return _fixed(sp.final, "random", sp.update_every_steps, _steps(recipe, steps_per_epoch)[2],
                  sp.drop_fraction, sp.drop_fraction_min)


@register_method("rigl")
def _rigl(recipe: Recipe, steps_per_epoch: int) -> SparseSchedule:
    sp = recipe.sparsity
    return _fixed(sp.final, sp.grow, sp.update_every_steps, _steps(recipe, steps_per_epoch)[2],
                  sp.drop_fraction, sp.drop_fraction_min)


@register_method("gmp")
def _gmp(recipe: Recipe, steps_per_epoch: int) -> SparseSchedule:
    sp = recipe.sparsity
    t0, t1, t_end = _steps(recipe, steps_per_epoch)
    return SparseSchedule(0.0, sp.final, t0, t1, max(t1 + 1, t_end), sp.update_every_steps, 0.0, 0.0, "none")


@register_method("ndsnn")
def _ndsnn(recipe: Recipe, steps_per_epoch: int) -> SparseSchedule:
    sp = recipe.sparsity
    t0, t1, t_end = _steps(recipe, steps_per_epoch)
    return SparseSchedule(sp.initial, sp.final, t0, t1, t_end, sp.update_every_steps,
                          sp.drop_fraction, sp.drop_fraction_min, sp.grow)


def build_method(recipe: Recipe, steps_per_epoch: int) -> SparseMethod:
    sp = recipe.sparsity
    schedule = METHOD_SCHEDULES[sp.method](recipe, steps_per_epoch)
    return SparseMethod(sp.method, schedule, sp.distribution, tuple(sp.dense), recipe.seed)
