"""The masks themselves: which weights of a model are sparse, and bool tensors that keep them so.

A layer at density d over n weights has exactly round(d * n) active weights (the counts come from
`budget`, or from one global magnitude ranking). Masks are applied to the weights and to the
optimizer's per-weight state after every step (except layers stepped on their active weights only,
`active_sgd`, which stay zero outside the mask without it).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping

import torch
from torch import nn

from ndsnn_cli.sparse.budget import active_count, check_dense_entries, is_kept_dense, shape_counts


def sparse_parameter_names(model: nn.Module, dense: Iterable[str] = ()) -> list[str]:
    """Every conv and linear weight, except names (or name prefixes) listed as dense."""
    dense = list(dense)
    check_dense_entries(dense, (name for name, _ in model.named_parameters()))
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear | nn.Conv1d):
            name = f"{module_name}.weight" if module_name else "weight"
            if not is_kept_dense(name, dense):
                names.append(name)
    return names


def global_magnitude_masks(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None,
                           total_active: int) -> dict[str, torch.Tensor]:
    """Keep the `total_active` largest |w| (among active ones) across all layers in one ranking."""
    scores = []
    for name, w in weights.items():
        s = w.detach().abs().float().flatten()
        if masks is not None:
            s = s.masked_fill(~masks[name].flatten(), -1.0)
        scores.append(s)
    flat = torch.cat(scores)
    total_active = min(total_active, flat.numel())
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if total_active > 0:
        keep[torch.topk(flat, total_active, sorted=False).indices] = True
    kept, offset = {}, 0
    for name, w in weights.items():
        kept[name] = keep[offset:offset + w.numel()].reshape(w.shape).to(w.device)
        offset += w.numel()
    return kept


def global_magnitude_counts(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None,
                            total_active: int) -> dict[str, int]:
    """Per-layer active counts of `global_magnitude_masks`."""
    return {name: int(m.count_nonzero()) for name, m in global_magnitude_masks(weights, masks, total_active).items()}


def layer_counts(weights: Mapping[str, torch.Tensor], density: float, distribution: str,
                 masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Active weights per layer for an overall `density` under a distribution (erk, uniform, global)."""
    if distribution == "global":
        total = sum(w.numel() for w in weights.values())
        return global_magnitude_counts(weights, masks, active_count(total, density))
    return shape_counts({name: tuple(w.shape) for name, w in weights.items()}, density, distribution)


def random_mask(shape: torch.Size | tuple[int, ...], count: int, generator: torch.Generator,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """A bool mask with exactly `count` True entries at uniformly random positions."""
    numel = math.prod(shape)
    # int32 halves the transient memory and gives the same permutation as the default int64
    order = torch.randperm(numel, generator=generator, dtype=torch.int32 if numel < 2**31 else torch.int64)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[order[:count]] = True
    return mask.reshape(shape).to(device)


def magnitude_mask(weight: torch.Tensor, count: int) -> torch.Tensor:
    """Keep the `count` largest |w|."""
    flat = weight.detach().abs().flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if count > 0:
        mask[torch.topk(flat, count, sorted=False).indices] = True
    return mask.reshape(weight.shape)


@torch.no_grad()
def scale_to_active_fan_in(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Sparse-aware initialisation (Evci et al., AAAI 2022): multiply each output neuron's weights by
    sqrt(fan_in / active_fan_in), so its input current has the variance dense initialisation gives.

    Without it a layer keeping 1% of its inputs gets ~10x smaller currents and its LIF neurons may never
    reach threshold. A neuron with no active input uses the layer's mean active fan-in (its weights are
    masked anyway); a layer with no active weight is left as it is.
    """
    rows = mask.reshape(mask.shape[0], -1)  # (out, in * kh * kw)
    fan_in = rows.shape[1]
    active = rows.sum(1).to(torch.float64)  # active fan-in per output neuron
    if not bool(active.any()):
        return
    active = torch.where(active > 0, active, active.sum() / int((active > 0).sum()))
    factor = (fan_in / active).sqrt().to(weight.dtype)
    weight.mul_(factor.view(-1, *[1] * (weight.dim() - 1)))


def per_weight_state(optimizer: torch.optim.Optimizer | None, param: torch.Tensor) -> list[torch.Tensor]:
    """The optimizer buffers that hold one value per weight of `param` (SGD's momentum_buffer, Adam's
    exp_avg, exp_avg_sq, max_exp_avg_sq, ...): they follow the mask like the weight does. One rule for
    every optimizer: a state tensor shaped like the parameter (scalars such as Adam's `step` are not)."""
    if optimizer is None:
        return []
    state = optimizer.state.get(param, {})
    return [buffer for buffer in state.values() if isinstance(buffer, torch.Tensor) and buffer.shape == param.shape]


class Masks:
    """Bool masks for the sparse parameters of one model."""

    def __init__(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor]) -> None:
        self.params = dict(params)
        self.masks = {name: masks[name].to(device=params[name].device, dtype=torch.bool) for name in params}

    @classmethod
    def for_model(cls, model: nn.Module, names: Iterable[str], masks: Mapping[str, torch.Tensor]) -> Masks:
        params = dict(model.named_parameters())
        return cls({name: params[name] for name in names}, masks)

    @torch.no_grad()
    def apply(self, optimizer: torch.optim.Optimizer | None = None, skip: Collection[str] = ()) -> None:
        """Zero weights (and their optimizer state) outside the masks; `skip` names layers known to be zero
        there already (stepped on their active weights only: `active_sgd`)."""
        for name, param in self.params.items():
            if name in skip:
                continue
            mask = self.masks[name]
            param.mul_(mask)
            for buffer in per_weight_state(optimizer, param):
                buffer.mul_(mask)

    def nnz(self) -> dict[str, int]:
        return {name: int(mask.count_nonzero()) for name, mask in self.masks.items()}

    def report(self) -> dict[str, object]:
        """Realised per-layer and global sparsity (exact counts)."""
        layers = {}
        total = active = 0
        for name, mask in self.masks.items():
            nnz, numel = int(mask.count_nonzero()), mask.numel()
            layers[name] = {"shape": list(mask.shape), "numel": numel, "nnz": nnz, "sparsity": 1 - nnz / numel}
            total, active = total + numel, active + nnz
        return {"layers": layers, "numel": total, "nnz": active, "sparsity": 1 - active / total if total else 0.0}

    def layer_densities(self) -> dict[str, float]:
        """Active fraction of each sparse layer (1 - its sparsity)."""
        return {name: int(mask.count_nonzero()) / mask.numel() for name, mask in self.masks.items()}

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return 1 - sum(int(m.count_nonzero()) for m in self.masks.values()) / total if total else 0.0
