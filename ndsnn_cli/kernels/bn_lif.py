"""BatchNorm + an optional residual + the LIF neuron, fused, on batch-last maps (the sparse kernels' layout).

`batch_norm_lif(x, bn, lif)` is `lif(bn(x_dense) [+ residual])` for x in `[C, H, W, N]` (or `[C, P, N]`)
with N = T*B, time outermost inside N (`n = t*B + b`: the dense `[T*B, C, H, W]` batch permuted, as
`execution.to_batch_last` lays it out), returning the spikes in the same layout, so that consecutive
sparse layers need not transpose around BN and the neuron. Training uses the batch statistics and
updates the running ones as `nn.BatchNorm2d` does (momentum, or the cumulative average when momentum is
None; unbiased variance); evaluation uses the running statistics.

Like `neuron._BatchNormLIF`, the autograd node saves only BN's input (and the residual, and two [C]
vectors): backward rebuilds H from it. Two implementations of one arithmetic: "numba"
(`bn_lif_numba`, parallel over channels; also rebuilds H one position at a time, so backward allocates
no activation-sized buffer beyond the gradients it returns) and "torch" (same layout, torch ops; the
fallback without numba, and the reference twin in tests).
"""

from __future__ import annotations

import importlib.util
from functools import partial

import torch
from torch import nn

from ndsnn_cli.kernels.layout import dense_memory_format, memory_order
from ndsnn_cli.kernels.numba_pool import match_torch_threads
from ndsnn_cli.snn import SURROGATE_NAMES
from ndsnn_cli.snn.neuron import LIF, _charge_, _charge_backward, is_spikes, mark_spikes

BN_LIF_IMPLEMENTATIONS = ("numba", "torch")


def default_implementation() -> str:
    """numba where it is importable (no import is done), else the torch fallback."""
    return "numba" if importlib.util.find_spec("numba") is not None else "torch"


def _as_cpn(x: torch.Tensor) -> torch.Tensor:
    """A contiguous [C, P, N] view of a batch-last [C, H, W, N] or [C, P, N] map."""
    return x.contiguous().view(x.shape[0], -1, x.shape[-1])


def _time_major(t: torch.Tensor, timesteps: int) -> torch.Tensor:
    """[C, P, T*B] -> a [T, C, P, B] view, the `x_seq[t]` indexing `neuron._charge_` loops over."""
    channels, positions, total = t.shape
    return t.view(channels, positions, timesteps, total // timesteps).permute(2, 0, 1, 3)


# ---------------------------------------------------------------------------------------------
# torch implementation: the same layout, torch ops (neuron's loops on strided [T, C, P, B] views)

def _torch_charges(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, residual: torch.Tensor | None,
                   lif: LIF) -> torch.Tensor:
    """H of LIF(x * scale + shift [+ residual]) as a new [C, P, N] tensor (torch's BN transform, then
    `_charge_` in place)."""
    z = torch.addcmul(shift.view(-1, 1, 1), x, scale.view(-1, 1, 1))  # (C, P, N)
    if residual is not None:
        z.add_(residual)
    _charge_(_time_major(z, lif.timesteps), lif.tau, lif.v_threshold)
    return z


def _torch_forward(x, weight, bias, residual, mean, var, training: bool, eps: float, lif: LIF):  # noqa: ANN001, ANN202
    """(spikes, mean, biased var, invstd); mean/var are computed when training, else taken as given."""
    if training:
        var, mean = torch.var_mean(x, dim=(1, 2), unbiased=False)
    invstd = (var.float() + eps).rsqrt()
    scale = weight * invstd
    shift = bias - mean.float() * scale
    h = _torch_charges(x, scale, shift, residual, lif)
    return h.ge_(lif.v_threshold).float(), mean, var, invstd


def _torch_backward(x, weight, bias, residual, grad_spikes, mean, invstd, training: bool, lif: LIF):  # noqa: ANN001, ANN202
    """(dL/dx, dL/dZ = dL/dresidual, dL/dweight, dL/dbias) on the [C, P, N] layout."""
    scale = weight * invstd
    shift = bias - mean * scale
    h = _torch_charges(x, scale, shift, residual, lif)
    _charge_backward(_time_major(h, lif.timesteps), _time_major(grad_spikes, lif.timesteps), lif.tau,
                     lif.v_threshold, lif.surrogate, lif.alpha, overwrite_h=True)
    grad_z = h                                                  # (C, P, N), dL/dZ written over H
    xhat = (x - mean.view(-1, 1, 1)) * invstd.view(-1, 1, 1)
    grad_b = grad_z.sum((1, 2))
    grad_w = (grad_z * xhat).sum((1, 2))
    if training:
        count = x.shape[1] * x.shape[2]
        xhat.mul_((grad_w / count).view(-1, 1, 1)).add_((grad_b / count).view(-1, 1, 1))
        grad_x = (grad_z - xhat).mul_(scale.view(-1, 1, 1))
    else:
        grad_x = grad_z * scale.view(-1, 1, 1)
    return grad_x, grad_z, grad_w, grad_b


# ---------------------------------------------------------------------------------------------
# numba implementation

def _numba_residual(residual: torch.Tensor | None):  # noqa: ANN202
    import numpy as np

    return (residual.detach().numpy(), True) if residual is not None else (np.empty((0, 0, 0), np.float32), False)


def _numba_forward(x, weight, bias, residual, mean, var, training: bool, eps: float, lif: LIF,  # noqa: ANN001, ANN202
                   channels_last: bool = False):
    """`bn_lif_numba.bn_lif_forward` on [C, P, N] maps, or (`channels_last`) `bn_lif_forward_channels_last`
    on [T, Q, C] ones, whose time axis is x's first (no `timesteps` argument)."""
    from ndsnn_cli.kernels import bn_lif_numba as nb

    match_torch_threads()
    channels = x.shape[-1] if channels_last else x.shape[0]
    if training:
        mean = torch.empty(channels, dtype=torch.float64)
        var = torch.empty(channels, dtype=torch.float64)
    else:
        mean, var = mean.double().contiguous(), var.double().contiguous()
    invstd = torch.empty(channels, dtype=torch.float32)
    out = torch.empty_like(x)
    res, has_res = _numba_residual(residual)
    kernel, timesteps = (nb.bn_lif_forward_channels_last, ()) if channels_last else (nb.bn_lif_forward,
                                                                                     (lif.timesteps,))
    kernel(x.detach().numpy(), res, has_res, weight.detach().numpy(), bias.detach().numpy(), mean.numpy(),
           invstd.numpy(), var.numpy(), training, eps, lif.tau, lif.v_threshold, *timesteps, out.numpy())
    return out, mean, var, invstd


def _numba_backward(x, weight, bias, residual, grad_spikes, mean, invstd, training: bool, lif: LIF,  # noqa: ANN001, ANN202
                    channels_last: bool = False):
    """`bn_lif_numba.bn_lif_backward`, or its channels-last twin (as `_numba_forward`)."""
    from ndsnn_cli.kernels import bn_lif_numba as nb

    match_torch_threads()
    channels = x.shape[-1] if channels_last else x.shape[0]
    grad_x = torch.empty_like(x)
    want_res = residual is not None
    grad_res = torch.empty_like(x) if want_res else None
    grad_w = torch.empty(channels, dtype=torch.float32)
    grad_b = torch.empty(channels, dtype=torch.float32)
    res, has_res = _numba_residual(residual)
    kernel, timesteps = (nb.bn_lif_backward_channels_last, ()) if channels_last else (nb.bn_lif_backward,
                                                                                      (lif.timesteps,))
    kernel(x.detach().numpy(), res, has_res, grad_spikes.detach().numpy(), weight.detach().numpy(),
           bias.detach().numpy(), mean.detach().numpy(), invstd.numpy(), training, lif.tau, lif.v_threshold,
           SURROGATE_NAMES.index(lif.surrogate), lif.alpha, *timesteps, grad_x.numpy(),
           grad_res.numpy() if want_res else res, want_res, grad_w.numpy(), grad_b.numpy())
    return grad_x, grad_res, grad_w, grad_b


CHANNELS_LAST = "numba-channels-last"  # `[T, Q, C]` maps: the dense layout's own memory
_IMPLEMENTATIONS = {"numba": (_numba_forward, _numba_backward), "torch": (_torch_forward, _torch_backward),
                    CHANNELS_LAST: (partial(_numba_forward, channels_last=True),
                                    partial(_numba_backward, channels_last=True))}


class _BatchNormLIFBatchLast(torch.autograd.Function):
    """Spikes of LIF(BN(x) [+ residual]) on [C, P, N] (on [T, Q, C] for `CHANNELS_LAST`), and
    (non-differentiable, for the running-statistics update; empty in evaluation) the batch mean and biased
    variance. Saves x, the residual and [C] vectors."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,  # type: ignore[override]
                residual: torch.Tensor | None, mean: torch.Tensor | None, var: torch.Tensor | None,
                training: bool, eps: float, lif: LIF, impl: str):
        forward, _ = _IMPLEMENTATIONS[impl]
        spikes, mean, var, invstd = forward(x, weight, bias, residual, mean, var, training, eps, lif)
        ctx.save_for_backward(x, weight, bias, residual, mean.float(), invstd)
        ctx.training, ctx.lif, ctx.impl = training, lif, impl
        if not training:
            mean = var = x.new_empty(0)
        ctx.mark_non_differentiable(mean, var)
        return spikes, mean, var

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor, grad_mean: torch.Tensor, grad_var: torch.Tensor):  # type: ignore[override]
        x, weight, bias, residual, save_mean, invstd = ctx.saved_tensors
        _, backward = _IMPLEMENTATIONS[ctx.impl]
        grad_x, grad_z, grad_w, grad_b = backward(x, weight, bias, residual, grad_spikes.float().contiguous(),
                                                  save_mean, invstd, ctx.training, ctx.lif)
        need = ctx.needs_input_grad
        return (grad_x if need[0] else None, grad_w if need[1] else None, grad_b if need[2] else None,
                grad_z if need[3] else None, None, None, None, None, None, None)


def _update_running_stats(bn: nn.modules.batchnorm._BatchNorm, mean: torch.Tensor, var: torch.Tensor,
                          count: int) -> None:
    """`nn.BatchNorm2d`'s update: factor = momentum (or 1 / batches seen when None), unbiased variance."""
    bn.num_batches_tracked.add_(1)
    factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    unbiased = var.double() * (count / max(1, count - 1))
    with torch.no_grad():
        bn.running_mean.copy_(bn.running_mean.double() * (1 - factor) + mean.double() * factor)
        bn.running_var.copy_(bn.running_var.double() * (1 - factor) + unbiased * factor)


def batch_norm_lif(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm, lif: LIF,
                   residual: torch.Tensor | None = None, impl: str | None = None) -> torch.Tensor:
    """Spikes of `lif(bn(x) + residual)` for batch-last x `[C, H, W, T*B]` (or `[C, P, T*B]`), same shape.

    The dense equivalent: `lif(bn(x.permute(3, 0, 1, 2)) + residual.permute(3, 0, 1, 2))`, the result
    permuted back. `impl` is "numba" or "torch" (default: `default_implementation()`). CPU fp32 only.
    LIF forward hooks do not run here (they expect the dense layout)."""
    impl = impl or default_implementation()
    if impl not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown BN+LIF implementation {impl!r} (known: {', '.join(BN_LIF_IMPLEMENTATIONS)})")
    x3 = _as_cpn(x.float())
    res3 = _as_cpn(residual.float()) if residual is not None else None
    channels = x3.shape[0]
    weight = bn.weight if bn.weight is not None else torch.ones(channels)
    bias = bn.bias if bn.bias is not None else torch.zeros(channels)
    training = bn.training or bn.running_mean is None       # batch statistics, as nn.BatchNorm2d decides
    running = (None, None) if training else (bn.running_mean, bn.running_var)
    spikes, mean, var = _BatchNormLIFBatchLast.apply(x3, weight, bias, res3, *running, training, bn.eps, lif, impl)
    if bn.training and bn.track_running_stats and bn.running_mean is not None:
        _update_running_stats(bn, mean, var, x3.shape[1] * x3.shape[2])
    return mark_spikes(spikes.view(x.shape))


def _as_tqc(y: torch.Tensor, timesteps: int) -> torch.Tensor:
    """A dense `[T*B, C, H, W]` / `[T*B, C]` batch as `[T, Q, C]`: a view when channels-last / contiguous."""
    channels = y.shape[1]
    return (y.permute(0, 2, 3, 1) if y.dim() == 4 else y).reshape(timesteps, -1, channels)


def channels_last_fits(lif: LIF, y: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm,
                       residual: torch.Tensor | None) -> bool:
    """`after_batch_norm` runs the numba channels-last kernel: a training batch (the LIF's fused backend, BN
    updating momentum-averaged running statistics, autograd on), fp32 on the CPU without autocast, in a
    layout that is `[T, Q, C]` without a copy (channels-last 4-D, contiguous 2-D), numba importable."""
    return (lif.backend == "fused" and bn.training and torch.is_grad_enabled() and bn.track_running_stats
            and bn.running_mean is not None and bn.momentum is not None and y.device.type == "cpu"
            and y.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and (y.is_contiguous(memory_format=torch.channels_last) if y.dim() == 4 else y.dim() == 2
                 and y.is_contiguous())
            and (residual is None or (residual.shape == y.shape and residual.dtype == y.dtype))
            and y.shape[0] % lif.timesteps == 0 and default_implementation() == "numba")


def after_batch_norm(lif: LIF, y: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm,
                     residual: torch.Tensor | None = None) -> torch.Tensor:
    """`lif.after_batch_norm(y, bn, residual)`, the models' BN + LIF of a dense-layout batch: on the numba
    kernel in the batch's own channels-last memory when `channels_last_fits` (one pass for the statistics,
    one for BN + the recurrence over T; backward rebuilds H per position), else the LIF's torch path. Same
    arithmetic for H and the gradients; the statistics are summed in another order (float64 lanes), which
    may flip a spike whose H lands within rounding of the threshold. The LIF's forward hooks see the spikes."""
    if not channels_last_fits(lif, y, bn, residual):
        return lif.after_batch_norm(y, bn, residual)
    x3 = _as_tqc(y, lif.timesteps)
    res3 = _as_tqc(residual, lif.timesteps) if residual is not None else None
    if res3 is not None and is_spikes(residual):  # an identity shortcut's spikes: saved as 1 byte
        mark_spikes(res3)
    channels = x3.shape[2]
    weight = bn.weight if bn.weight is not None else torch.ones(channels)
    bias = bn.bias if bn.bias is not None else torch.zeros(channels)
    spikes, mean, var = _BatchNormLIFBatchLast.apply(x3, weight, bias, res3, None, None, True, bn.eps, lif,
                                                     CHANNELS_LAST)
    _update_running_stats(bn, mean, var, x3.shape[0] * x3.shape[1])
    if y.dim() == 4:
        n, _, height, width = y.shape
        spikes = spikes.view(n, height, width, channels).permute(0, 3, 1, 2)
    return lif._forward_hooks_on(y, mark_spikes(spikes.view(y.shape)))


# ---------------------------------------------------------------------------------------------
# The LIF on a repeated input (the encoder's output at every step), numba

def _repeated_spikes(x: torch.Tensor, lif: LIF, fmt: torch.memory_format) -> torch.Tensor:
    """The `[T*B, ...]` spikes of `bn_lif_numba.repeated_lif_forward`, in x's memory format."""
    from ndsnn_cli.kernels import bn_lif_numba as nb

    match_torch_threads()
    # the [T*B, ...] batch in x's memory format: its memory is T copies of x's layout
    out = torch.empty((lif.timesteps * x.shape[0], *x.shape[1:]), dtype=x.dtype, memory_format=fmt)
    nb.repeated_lif_forward(memory_order(x.detach()).numpy(), lif.tau, lif.v_threshold,
                            memory_order(out).view(lif.timesteps, -1).numpy())
    return out


class _RepeatedInputLIFNumba(torch.autograd.Function):
    """`neuron._RepeatedInputLIF` on the numba kernels: saves the `[B, ...]` input only, rebuilds H per
    block in backward, and sums the T steps' input gradients in torch's order."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lif: LIF, fmt: torch.memory_format) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x.detach())
        ctx.lif, ctx.fmt = lif, fmt
        return _repeated_spikes(x, lif, fmt)

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor):  # type: ignore[override]
        from ndsnn_cli.kernels import bn_lif_numba as nb

        (x,) = ctx.saved_tensors
        lif = ctx.lif
        match_torch_threads()
        grad = grad_spikes.float().contiguous(memory_format=ctx.fmt)
        grad_x = torch.empty_like(x)                   # x's own (dense) memory format
        nb.repeated_lif_backward(memory_order(x).numpy(), memory_order(grad).view(lif.timesteps, -1).numpy(),
                                 lif.tau, lif.v_threshold, SURROGATE_NAMES.index(lif.surrogate), lif.alpha,
                                 memory_order(grad_x).numpy())
        return grad_x, None, None


def repeated_input_fits(lif: LIF, x: torch.Tensor) -> bool:
    """`repeated_input` runs the numba kernel: the fused backend, fp32 on the CPU without autocast, x dense in
    its memory format, numba importable."""
    return (lif.backend == "fused" and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and dense_memory_format(x) is not None
            and default_implementation() == "numba")


def repeated_input(lif: LIF, x: torch.Tensor) -> torch.Tensor:
    """`lif.repeated(x)`: the LIF driven by the once-run encoder's `[B, ...]` output at every step, as
    `[T*B, ...]` spikes in x's memory format; on the numba kernel when `repeated_input_fits` (training and
    evaluation: the same spikes, the input gradient summed over T in torch's order), else the LIF's torch
    path. The LIF's forward hooks see what `lif.repeated` gives them (x while training, else x repeated)."""
    if not repeated_input_fits(lif, x):
        return lif.repeated(x)
    fmt = dense_memory_format(x)
    if torch.is_grad_enabled():
        return lif._forward_hooks_on(x, mark_spikes(_RepeatedInputLIFNumba.apply(x, lif, fmt)))
    spikes = mark_spikes(_repeated_spikes(x, lif, fmt))
    if not lif._forward_hooks:
        return spikes
    # as `lif.repeated` outside training: a module call on the repeated `[T*B, ...]` input
    return lif._forward_hooks_on(x.unsqueeze(0).expand(lif.timesteps, *x.shape).reshape(-1, *x.shape[1:]), spikes)
