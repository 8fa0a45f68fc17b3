"""SGD on the active weights only: the optimizer step of a sparse layer touches its mask's positions.

At density d, torch's SGD reads and writes every weight, its gradient and its momentum, and the masks'
re-application (`Masks.apply`) then multiplies the weight and the momentum by the mask again: about six
passes over the dense tensors per step for a fraction d of useful work (~70 ms of a 0.64 s VGG-16 step at
0.99 on the 2-core host). Outside the mask the weight and its momentum are zero before the step and are
zero again after the re-application, whatever the gradient there (the masked-dense engine and the
dense-gradient steps before a growth update have one), so updating only the active positions and skipping
the re-application leaves the same tensors. The arithmetic is torch's own (`torch.optim.sgd.sgd` on the
gathered values, with the group's hyper-parameters and implementation choice), so every active weight and
momentum gets the bits the dense step gives it (tests/test_active_sgd.py compares them exactly).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.optim.sgd import sgd

from ndsnn_cli.kernels.layout import dense_memory_format, memory_order

# Above this density gathering and scattering cost more than the dense pass (benchmarks/optimizer_step.py:
# the crossover lies near 0.3-0.5 on the 2-core host).
MAX_DENSITY = 0.25


def supports(optimizer: torch.optim.Optimizer) -> bool:
    """torch's SGD in its plain or foreach implementation (the fused and differentiable ones are left whole)."""
    return isinstance(optimizer, torch.optim.SGD) and not any(
        group.get("fused") or group.get("differentiable") for group in optimizer.param_groups)


class ActiveWeightSGD:
    """Steps an SGD optimizer with its masked parameters (at density <= `max_density`) updated at their
    active positions only; `step()` returns the names so updated (their weights and momenta are still zero
    outside the mask: `SparseMethod.after_step` then need not re-apply those masks)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter],
                 masks: Mapping[str, torch.Tensor], max_density: float = MAX_DENSITY) -> None:
        if not supports(optimizer):
            raise ValueError(f"active-weight SGD needs torch.optim.SGD (not fused), got {type(optimizer).__name__}")
        self.optimizer, self.params, self.masks, self.max_density = optimizer, params, masks, max_density
        self._group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        # name -> (the mask tensor, its version, the parameter's strides, indices): the tensor itself is held,
        # so a mask replaced at an update (a new tensor, perhaps at the old one's address) is never mistaken
        self._indices: dict[str, tuple[torch.Tensor, int, tuple[int, ...], torch.Tensor | None]] = {}

    def active_indices(self, name: str) -> torch.Tensor | None:
        """Memory-order positions of the mask's active weights in the parameter's own layout, or None when
        the layer is above `max_density` (it takes the dense step). Cached per mask version (the masks
        are replaced at updates, or changed in place: `Tensor._version` counts that)."""
        mask, param = self.masks[name], self.params[name]
        cached = self._indices.get(name)
        if cached is not None and cached[0] is mask and cached[1] == mask._version and cached[2] == param.stride():
            return cached[3]
        indices = None
        if mask.numel() and int(mask.count_nonzero()) <= self.max_density * mask.numel():
            in_layout = torch.empty_like(param, dtype=torch.bool).copy_(mask)  # the parameter's strides
            indices = memory_order(in_layout).nonzero().squeeze(1)
        self._indices[name] = (mask, mask._version, param.stride(), indices)
        return indices

    def _takes(self, name: str) -> torch.Tensor | None:
        """The layer's active indices when its step can run on them: a dense (contiguous or channels-last)
        parameter of the optimizer with a dense gradient, and momentum, laid out as the parameter is."""
        param = self.params[name]
        grad = param.grad
        if grad is None or grad.is_sparse or id(param) not in self._group_of or dense_memory_format(param) is None:
            return None
        buffer = self.optimizer.state.get(param, {}).get("momentum_buffer")
        if grad.stride() != param.stride() or (buffer is not None and buffer.stride() != param.stride()):
            return None
        return self.active_indices(name)

    @torch.no_grad()
    def step(self) -> frozenset[str]:
        """One optimizer step; the names of the layers updated at their active positions only."""
        taken = {name: idx for name in self.params if (idx := self._takes(name)) is not None}
        grads = {name: self.params[name].grad for name in taken}
        for name in taken:  # torch's SGD skips a parameter without a gradient
            self.params[name].grad = None
        try:
            self.optimizer.step()
        finally:
            for name, grad in grads.items():
                self.params[name].grad = grad
        for group in self.optimizer.param_groups:
            names = [name for name in taken if self._group_of[id(self.params[name])] is group]
            if names:
                self._step_group(group, names, taken)
        return frozenset(taken)

    def _step_group(self, group: dict, names: list[str], indices: Mapping[str, torch.Tensor]) -> None:
        """torch's SGD update on the gathered active values of one parameter group, scattered back."""
        params = [self.params[name] for name in names]
        flat = [(memory_order(p), indices[name]) for p, name in zip(params, names, strict=True)]
        values = [p.index_select(0, idx) for p, idx in flat]
        grads = [memory_order(p.grad).index_select(0, idx) for p, (_, idx) in zip(params, flat, strict=True)]
        momentum = group["momentum"]
        buffers = [self.optimizer.state.get(p, {}).get("momentum_buffer") for p in params]
        active_buffers = [None if b is None else memory_order(b).index_select(0, idx)
                          for b, (_, idx) in zip(buffers, flat, strict=True)]
        sgd(values, grads, active_buffers, foreach=group["foreach"], weight_decay=group["weight_decay"],
            momentum=momentum, lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
            maximize=group["maximize"])
        for p, (p_flat, idx), value, buffer, active in zip(params, flat, values, buffers, active_buffers, strict=True):
            p_flat.index_copy_(0, idx, value)
            if momentum != 0:
                if buffer is None:  # torch's first step clones the gradient: zero outside once masked
                    buffer = torch.zeros_like(p)
                    self.optimizer.state[p]["momentum_buffer"] = buffer
                memory_order(buffer).index_copy_(0, idx, active)
