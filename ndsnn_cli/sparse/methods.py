"""Sparse training methods behind one interface: `setup`, then `after_step` after every optimizer step.

dense, static, SET, RigL, GMP and NDSNN are all one drop-and-grow engine with different schedules
(DESIGN §4); LTH (iterative magnitude pruning with rewinding) is a driver around whole trainings,
in `ndsnn_cli.train`, that uses a static mask per round.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ndsnn_cli.recipe import Recipe
from ndsnn_cli.sparse.budget import active_count, target_counts
from ndsnn_cli.sparse.masks import Masks, global_magnitude_masks, layer_counts, random_mask, sparse_parameter_names
from ndsnn_cli.sparse.schedules import SparseSchedule, method_schedule


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
        targets = target_counts(schedule, step, masks.nnz(),
                                lambda density: layer_counts(masks.params, density, self.distribution, masks.masks))
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


def build_method(recipe: Recipe, steps_per_epoch: int) -> SparseMethod:
    sp = recipe.sparsity
    schedule = method_schedule(recipe, steps_per_epoch)
    return SparseMethod(sp.method, schedule, sp.distribution, tuple(sp.dense), recipe.seed)
