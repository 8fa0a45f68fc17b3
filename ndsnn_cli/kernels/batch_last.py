"""Activations that stay in the sparse kernels' batch-last layout between layers (`[train] sparse_layout`).

A sparse layer reads and writes `[C, H, W, N]` maps (N = T*B, the batch innermost); in the per-layer layout
each one transposes its input in and its result out, which measured ~70% of a large-map sparse layer's
time. Here a `BatchLast` map passes from a sparse layer through the fused BatchNorm + LIF
(`bn_lif.batch_norm_lif`), spike max-pooling, global average pooling, flatten, a BatchNorm alone and the
residual add to the next sparse layer without a transpose; it goes back to the dense layout only where a
module has no batch-last form here (a dense-planned layer, a LIF without BN, the classifier's output).

`step(modules, i, x)` is the one dispatch rule the models' sequential loop and residual block use; every
function takes and returns `BatchLast` maps and is differentiable (gradients flow in the same layout).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ndsnn_cli.kernels import execution
from ndsnn_cli.kernels.bn_lif import batch_norm_lif, default_implementation
from ndsnn_cli.kernels.execution import SparseLayer, memory_format_of
from ndsnn_cli.kernels.numba_pool import match_torch_threads
from ndsnn_cli.kernels.protocol import SparseKernel
from ndsnn_cli.snn.neuron import LIF, is_spikes, mark_spikes


@dataclass(frozen=True)
class BatchLast:
    """A map `[C, H, W, N]` (contiguous fp32) in the kernels' layout; `flat` when its dense form is `[N, C]`
    (a linear layer's input or output), `spikes` when it holds 0/1 only; `kernel` does the layout copies
    and `memory_format` is the dense form's (the model's: channels-last or contiguous)."""

    data: torch.Tensor
    spikes: bool
    flat: bool
    kernel: SparseKernel
    memory_format: torch.memory_format

    def replace(self, data: torch.Tensor, *, spikes: bool, flat: bool | None = None) -> BatchLast:
        return BatchLast(data, spikes, self.flat if flat is None else flat, self.kernel, self.memory_format)

    def dense(self) -> torch.Tensor:
        """The dense-layout map (`[N, C, H, W]` or `[N, C]`), differentiable; spike maps stay marked."""
        out = _FromBatchLast.apply(self.data, None if self.flat else self.memory_format, self.kernel)
        return mark_spikes(out) if self.spikes else out


class _FromBatchLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, data: torch.Tensor, fmt: torch.memory_format | None,  # type: ignore[override]
                kernel: SparseKernel) -> torch.Tensor:
        ctx.kernel = kernel
        return execution.from_batch_last(data, fmt, kernel)   # fmt None: [F, 1, 1, N] -> [N, F]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return execution.to_batch_last(grad.float(), ctx.kernel, spikes=False), None, None


class _ToBatchLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: SparseKernel) -> torch.Tensor:  # type: ignore[override]
        ctx.kernel, ctx.fmt = kernel, memory_format_of(x)
        return execution.to_batch_last(x.float(), kernel, spikes=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return execution.from_batch_last(grad.contiguous(), ctx.fmt, ctx.kernel), None


def sparse_layer(module: nn.Module) -> SparseLayer | None:
    """The module's plan while a batch-last `SparseExecution` runs (None otherwise)."""
    return module.__dict__.get(execution.SPARSE_LAYER_ATTR)


def runs_batch_last(module: nn.Module, x: torch.Tensor | BatchLast) -> bool:
    """The module is a sparse layer whose kernel takes this call (dense or batch-last input)."""
    layer = sparse_layer(module)
    return layer is not None and execution.batch_last_fits(layer, x.data if isinstance(x, BatchLast) else x)


def enter(x: torch.Tensor, kernel: SparseKernel) -> BatchLast:
    """A dense map as a `BatchLast` one (one transpose; gradients transposed back)."""
    fmt = memory_format_of(x)
    return BatchLast(_ToBatchLast.apply(x, kernel), is_spikes(x), fmt is None, kernel,
                     fmt or torch.contiguous_format)


def layer(module: nn.Module, x: torch.Tensor | BatchLast) -> BatchLast:
    """A conv/linear layer's result in the batch-last layout: its kernel when it takes the call, else its
    dense forward between two transposes (a dense-planned layer inside a batch-last stretch)."""
    plan = sparse_layer(module)
    if runs_batch_last(module, x):
        if isinstance(x, BatchLast):
            data = x.data.view(-1, 1, 1, x.data.shape[3]) if isinstance(module, nn.Linear) else x.data
            out = execution.sparse_forward_batch_last(plan, data, x.spikes)
            return x.replace(out, spikes=False, flat=isinstance(module, nn.Linear))
        out = execution.sparse_forward_batch_last(plan, x, None)
        fmt = memory_format_of(x)
        return BatchLast(out, False, isinstance(module, nn.Linear), plan.kernel, fmt or torch.contiguous_format)
    if not isinstance(x, BatchLast):
        raise ValueError("a dense input to a layer that cannot run batch-last: call the module")
    dense_in = x.dense()
    if isinstance(module, nn.Linear) and dense_in.dim() > 2:
        dense_in = dense_in.flatten(1)
    return enter(module(dense_in), x.kernel)


def bn_lif(bn: nn.modules.batchnorm._BatchNorm, lif: LIF, x: BatchLast,
           residual: BatchLast | None = None) -> BatchLast:
    """`lif(bn(x) + residual)` by the fused batch-last kernel; the LIF's forward hooks (spike-rate probes,
    recorders) see the spikes as a dense-layout view."""
    spikes = batch_norm_lif(x.data, bn, lif, residual.data if residual is not None else None)
    if lif._forward_hooks:
        dense_view = spikes.view(-1, spikes.shape[3]).t() if x.flat else spikes.permute(3, 0, 1, 2)
        lif._forward_hooks_on(x.data, mark_spikes(dense_view))
    return x.replace(spikes, spikes=True)


def batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: BatchLast) -> BatchLast:
    """BatchNorm alone (a shortcut's): the module on a `[1, C, H*W*N, 1]` view (`[1, C, H*W*N]` for
    BatchNorm1d), the same statistics as on `[N, C, H, W]` (per channel over every position and sample)
    and the same running-statistics update (the count, H*W*N, is the same)."""
    view = (1, x.data.shape[0], -1) if isinstance(bn, nn.BatchNorm1d) else (1, x.data.shape[0], -1, 1)
    out = bn(x.data.view(view))
    return x.replace(out.view(x.data.shape), spikes=False)


def _corners(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]


class _SpikeMaxPool2x2(torch.autograd.Function):
    """2x2 / stride-2 max-pooling of a batch-last spike map. The gradient goes to the first maximum of each
    window in row-major order, as torch's max_pool2d routes it. "numba" (`pool_numba`) saves that corner as
    one byte per output; "torch" (strided slices, the fallback) saves the input as one byte per element."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, impl: str) -> torch.Tensor:  # type: ignore[override]
        ctx.impl = impl
        if impl == "numba":
            from ndsnn_cli.kernels import pool_numba

            match_torch_threads()
            x = x.detach().contiguous()
            shape = (x.shape[0], x.shape[1] // 2, x.shape[2] // 2, x.shape[3])
            out = torch.empty(shape, dtype=x.dtype)
            corner = torch.empty(shape, dtype=torch.uint8)
            pool_numba.max_pool_forward(x.numpy(), out.numpy(), corner.numpy())
            ctx.save_for_backward(corner)
            ctx.input_shape = x.shape
            return out
        ctx.save_for_backward(x.to(torch.uint8))
        a00, a01, a10, a11 = _corners(x)
        return torch.maximum(torch.maximum(a00, a01), torch.maximum(a10, a11))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (saved,) = ctx.saved_tensors
        if ctx.impl == "numba":
            from ndsnn_cli.kernels import pool_numba

            match_torch_threads()
            grad = torch.empty(ctx.input_shape, dtype=torch.float32)
            pool_numba.max_pool_backward(grad_out.float().contiguous().numpy(), saved.numpy(), grad.numpy())
            return grad, None
        corners = _corners(saved)
        out = torch.maximum(torch.maximum(corners[0], corners[1]), torch.maximum(corners[2], corners[3]))
        grad = torch.zeros(saved.shape, dtype=grad_out.dtype, device=grad_out.device)
        free = torch.ones_like(out, dtype=torch.bool)
        for (dh, dw), corner in zip(((0, 0), (0, 1), (1, 0), (1, 1)), corners, strict=True):
            chosen = free & (corner == out)
            grad[:, dh::2, dw::2] = grad_out * chosen
            free &= ~chosen
        return grad, None


def max_pool_fits(pool: nn.Module, x: BatchLast) -> bool:
    """The 2x2 / stride-2 spike pooling the models use, on even map sides (ceil_mode then changes nothing)."""
    return (isinstance(pool, nn.MaxPool2d) and x.spikes and not x.flat and not pool.return_indices
            and pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2)) and pool.padding in (0, (0, 0))
            and pool.dilation in (1, (1, 1)) and x.data.shape[1] % 2 == 0 and x.data.shape[2] % 2 == 0)


def max_pool(x: BatchLast, impl: str | None = None) -> BatchLast:
    """`max_pool_fits` pooling; `impl` "numba" or "torch" (default: numba on the CPU where importable)."""
    if impl is None:
        on_numba = x.data.device.type == "cpu" and x.data.dtype == torch.float32
        impl = default_implementation() if on_numba else "torch"
    return x.replace(_SpikeMaxPool2x2.apply(x.data, impl), spikes=True)


def _global_average(module: nn.Module) -> bool:
    return isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1))


def _flattens(module: nn.Module) -> bool:
    return isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1


def takes_batch_last(modules: Sequence[nn.Module], i: int) -> bool:
    """Module i would consume a batch-last map (so a sparse layer before it should leave its result so):
    a BatchNorm (alone or before a LIF) or a block with a batch-last form (`forward_batch_last`)."""
    if i >= len(modules):
        return False
    module = modules[i]
    return isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d) or callable(getattr(module, "forward_batch_last", None))


def step(modules: Sequence[nn.Module], i: int, x: torch.Tensor | BatchLast) -> tuple[BatchLast, int] | None:
    """Run modules[i] (with modules[i + 1] when a BN + LIF pair) in the batch-last layout: (result, modules
    consumed), or None when it has no batch-last form for this input (the caller then runs it dense).
    A dense x enters the layout only at a sparse layer whose result the next module consumes batch-last, or
    at a block whose `forward_batch_last(x)` accepts it (returns a map, not None)."""
    module = modules[i]
    forward_batch_last = getattr(module, "forward_batch_last", None)
    if not isinstance(x, BatchLast):
        if runs_batch_last(module, x) and takes_batch_last(modules, i + 1):
            return layer(module, x), 1
        out = forward_batch_last(x) if callable(forward_batch_last) else None
        return (out, 1) if out is not None else None
    following = modules[i + 1] if i + 1 < len(modules) else None
    if runs_batch_last(module, x):
        return layer(module, x), 1
    if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
        if isinstance(following, LIF):
            return bn_lif(module, following, x), 2
        return batch_norm(module, x), 1
    if max_pool_fits(module, x):
        return max_pool(x), 1
    if _flattens(module) or isinstance(module, nn.Identity):
        return x.replace(x.data.reshape(-1, 1, 1, x.data.shape[3]) if _flattens(module) else x.data,
                         spikes=x.spikes, flat=x.flat or _flattens(module)), 1
    if _global_average(module) and not x.flat:
        return x.replace(x.data.mean((1, 2), keepdim=True), spikes=False), 1
    if callable(forward_batch_last):
        return forward_batch_last(x), 1
    return None
