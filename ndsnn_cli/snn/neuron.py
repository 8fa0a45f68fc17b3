"""Multi-step leaky integrate-and-fire neurons with surrogate gradients (LTH-SNN / SpikingJelly semantics).

Charge `H[t] = V[t-1] + (X[t] - V[t-1]) / tau`, spike `S[t] = Heaviside(H[t] - v_th)`, hard reset to 0
with the reset detached: `V[t] = H[t] * (1 - S[t])`. Inputs arrive as one `[T*B, ...]` batch (convs
and BN run on that batch); only the neuron loops over T.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ndsnn_cli.snn import LIF_BACKENDS, SURROGATE_NAMES


def _atan_grad_(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """In place: d/dx of arctan(pi/2 alpha x) / pi + 1/2 (SpikingJelly's ATan) = (alpha/2) / (1 + (pi/2 alpha x)^2)."""
    return x.mul_(math.pi / 2 * alpha).square_().add_(1).reciprocal_().mul_(alpha / 2)


def _sigmoid_grad_(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """In place: d/dx of sigmoid(alpha * x) = alpha * s * (1 - s)."""
    return x.mul_(alpha).sigmoid_().addcmul_(x, x, value=-1).mul_(alpha)


# In-place forms avoid fresh [T*B, ...] buffers in backward (each one costs page faults on CPU).
SURROGATES = dict(zip(SURROGATE_NAMES, (_atan_grad_, _sigmoid_grad_), strict=True))


def surrogate_grad(x: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
    """The surrogate derivative at x (x is not modified)."""
    return SURROGATES[surrogate](x.clone(), alpha)


class _Spike(torch.autograd.Function):
    """Heaviside forward, surrogate derivative backward (used by the reference loop)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.surrogate, ctx.alpha = surrogate, alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad_out * surrogate_grad(x, ctx.surrogate, ctx.alpha), None, None


def spike(x: torch.Tensor, surrogate: str = "atan", alpha: float = 2.0) -> torch.Tensor:
    return _Spike.apply(x, surrogate, alpha)


def lif_reference(x_seq: torch.Tensor, tau: float, v_threshold: float, surrogate: str, alpha: float) -> torch.Tensor:
    """The plain loop over T: autograd through every op. x_seq is [T, B, ...]."""
    v = torch.zeros_like(x_seq[0])
    spikes = []
    for x in x_seq:
        h = v + (x - v) / tau
        s = spike(h - v_threshold, surrogate, alpha)
        v = h * (1 - s.detach())
        spikes.append(s)
    return torch.stack(spikes)


def _charge_(x_seq: torch.Tensor, tau: float, v_threshold: float) -> torch.Tensor:
    """In place: input currents X[t] -> charges H[t] (the recurrence above); returns x_seq.

    Same arithmetic as the reference, v + (x - v) / tau, so spikes are bit-identical: the first step
    (V = 0) is exactly x / tau, and the reset H - H S is exactly H (1 - S). Only arithmetic kernels
    with `out=` run per step (a comparison into a bool tensor and a `where` cost twice as much here).
    """
    v = torch.empty_like(x_seq[0])
    spiked = torch.empty_like(x_seq[0])  # one step's S as 0/1 in x's dtype
    for t in range(x_seq.shape[0]):
        h = x_seq[t]
        if t:
            h.sub_(v).div_(tau).add_(v)
        else:
            h.div_(tau)
        torch.ge(h, v_threshold, out=spiked)
        torch.addcmul(h, h, spiked, value=-1, out=v)  # hard reset: V = H (1 - S)
    return x_seq


def _charge_backward(h_seq: torch.Tensor, grad_spikes: torch.Tensor, tau: float, v_threshold: float,
                     surrogate: str, alpha: float, *, overwrite_h: bool = False) -> torch.Tensor:
    """dL/dX from the charges H, from the last step back: dL/dH[t] = dL/dS[t] sg'(H[t] - v_th)
    + dL/dH[t+1] (1 - 1/tau) [H[t] < v_th], and dL/dX[t] = dL/dH[t] / tau.

    `overwrite_h` computes the result in H's own memory (for a recomputed H that nothing else needs).
    """
    grad_h = h_seq if overwrite_h else torch.empty_like(h_seq)
    not_reset = torch.empty_like(h_seq[0])  # one step's [H < v_th] as 0/1 in H's dtype (no casts later)
    decay = 1 - 1 / tau
    sg_ = SURROGATES[surrogate]
    for t in range(h_seq.shape[0] - 1, -1, -1):
        torch.lt(h_seq[t], v_threshold, out=not_reset)
        g = grad_h[t]
        if overwrite_h:
            g.sub_(v_threshold)
        else:
            torch.sub(h_seq[t], v_threshold, out=g)
        sg_(g, alpha).mul_(grad_spikes[t])
        if t + 1 < h_seq.shape[0]:
            g.addcmul_(grad_h[t + 1], not_reset, value=decay)
    return grad_h.div_(tau)


class _FusedLIF(torch.autograd.Function):
    """The same neuron with a hand-written BPTT that stores only the charge H (one tensor).

    The reference loop keeps ~4 tensors per time step for autograd; here backward recomputes the
    spikes' reset masks from H and runs the recurrence of `_charge_backward`.
    """

    @staticmethod
    def forward(ctx, x_seq: torch.Tensor, tau: float, v_threshold: float, surrogate: str,  # type: ignore[override]
                alpha: float) -> torch.Tensor:
        h_seq = _charge_(x_seq.clone(), tau, v_threshold)
        ctx.save_for_backward(h_seq)
        ctx.tau, ctx.v_threshold, ctx.surrogate, ctx.alpha = tau, v_threshold, surrogate, alpha
        return (h_seq >= v_threshold).to(x_seq.dtype)

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor):  # type: ignore[override]
        (h_seq,) = ctx.saved_tensors
        return _charge_backward(h_seq, grad_spikes, ctx.tau, ctx.v_threshold, ctx.surrogate, ctx.alpha), \
            None, None, None, None


class _BatchNormLIF(torch.autograd.Function):
    """Training-mode BatchNorm, an optional residual, then the LIF neuron, saving only BN's input.

    Unfused, BN keeps its input and the LIF keeps H: two full tensors per layer. Backward here reruns
    BN's forward kernel on the saved input (bit-identical output, without touching the running
    statistics), rebuilds H from it, then runs the LIF and BN backward passes.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,  # type: ignore[override]
                residual: torch.Tensor | None, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                momentum: float, eps: float, lif: LIF) -> torch.Tensor:
        x, save_mean, save_invstd = torch.native_batch_norm(y, weight, bias, running_mean, running_var, True,
                                                            momentum, eps)
        if residual is not None:
            x.add_(residual)
        h_seq = _charge_(x.view(lif.timesteps, -1, *x.shape[1:]), lif.tau, lif.v_threshold)
        ctx.save_for_backward(y, weight, bias, residual, save_mean, save_invstd)
        ctx.eps, ctx.lif = eps, lif
        return h_seq.ge_(lif.v_threshold).view(y.shape)  # the spikes, written over H

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor):  # type: ignore[override]
        y, weight, bias, residual, save_mean, save_invstd = ctx.saved_tensors
        lif = ctx.lif
        x, _, _ = torch.native_batch_norm(y, weight, bias, None, None, True, 0.0, ctx.eps)
        if residual is not None:
            x.add_(residual)
        h_seq = _charge_(x.view(lif.timesteps, -1, *x.shape[1:]), lif.tau, lif.v_threshold)
        grad_x = _charge_backward(h_seq, grad_spikes.reshape(h_seq.shape), lif.tau, lif.v_threshold, lif.surrogate,
                                  lif.alpha, overwrite_h=True).view(y.shape)
        del x, h_seq
        need = ctx.needs_input_grad
        grad_y, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_x, y, weight, None, None, save_mean, save_invstd, True, ctx.eps,
            [need[0], need[1] and weight is not None, need[2] and bias is not None])
        return grad_y, grad_w, grad_b, (grad_x if need[3] else None), None, None, None, None, None


def repeat_over_time(x: torch.Tensor, timesteps: int) -> torch.Tensor:
    """`[B, ...]` -> a new `[T, B, ...]` tensor holding x at every step, in x's memory format (a
    channels-last image batch stays channels-last, so the convolutions after it keep that layout)."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    out = torch.empty((timesteps * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    out = out.view(timesteps, *x.shape)
    return out.copy_(x.unsqueeze(0).expand_as(out))


class _RepeatedInputLIF(torch.autograd.Function):
    """The LIF driven by the same current at every time step (the once-run encoder's output).

    Saves only that [B, ...] input, 1/T of what the unfused neuron keeps, and rebuilds H from it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, lif: LIF) -> torch.Tensor:  # type: ignore[override]
        h_seq = _charge_(repeat_over_time(x, lif.timesteps), lif.tau, lif.v_threshold)
        ctx.save_for_backward(x)
        ctx.lif = lif
        return h_seq.ge_(lif.v_threshold).view(-1, *x.shape[1:])  # the spikes, written over H

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        lif = ctx.lif
        h_seq = _charge_(repeat_over_time(x, lif.timesteps), lif.tau, lif.v_threshold)
        grad = _charge_backward(h_seq, grad_spikes.reshape(h_seq.shape), lif.tau, lif.v_threshold, lif.surrogate,
                                lif.alpha, overwrite_h=True)
        return grad.sum(0), None


class _SpikeMaxPool2d(torch.autograd.Function):
    """Max-pooling of spikes that saves only its (1-byte) input and finds the argmax again in backward,
    instead of keeping int64 indices (2 bytes per input element)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pool: nn.MaxPool2d) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.pool = pool
        return F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        p = ctx.pool
        _, indices = F.max_pool2d(x, p.kernel_size, p.stride, p.padding, p.dilation, p.ceil_mode, return_indices=True)
        grad = torch.ops.aten.max_pool2d_with_indices_backward(
            grad_out, x, _pair(p.kernel_size), _pair(p.stride or p.kernel_size), _pair(p.padding), _pair(p.dilation),
            p.ceil_mode, indices)
        return grad, None


def spike_max_pool2d(x: torch.Tensor, pool: nn.MaxPool2d) -> torch.Tensor:
    """`pool(x)` for a spike map; the memory-lean autograd while training, the module otherwise."""
    if not (torch.is_grad_enabled() and x.requires_grad) or pool.return_indices:
        return mark_spikes(pool(x))
    return mark_spikes(_SpikeMaxPool2d.apply(x, pool))


class LIF(nn.Module):
    """Multi-step LIF on a `[T*B, ...]` batch; returns spikes of the same shape and dtype."""

    def __init__(self, timesteps: int, tau: float = 4.0 / 3.0, v_threshold: float = 1.0,
                 surrogate: str = "atan", alpha: float = 2.0, backend: str = "fused") -> None:
        super().__init__()
        if surrogate not in SURROGATES:
            raise ValueError(f"unknown surrogate {surrogate!r} (known: {', '.join(SURROGATES)})")
        if backend not in LIF_BACKENDS:  # an unknown name used to run the reference loop silently
            raise ValueError(f"unknown LIF backend {backend!r} (known: {', '.join(LIF_BACKENDS)})")
        self.timesteps, self.tau, self.v_threshold = timesteps, tau, v_threshold
        self.surrogate, self.alpha, self.backend = surrogate, alpha, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_seq = x.reshape(self.timesteps, x.shape[0] // self.timesteps, *x.shape[1:])
        if self.backend == "fused":
            out = _FusedLIF.apply(x_seq, self.tau, self.v_threshold, self.surrogate, self.alpha)
        else:
            out = lif_reference(x_seq, self.tau, self.v_threshold, self.surrogate, self.alpha)
        return mark_spikes(out.reshape(x.shape))

    def after_batch_norm(self, y: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm,
                         residual: torch.Tensor | None = None) -> torch.Tensor:
        """`self(bn(y) + residual)`; fused into one autograd node (saving only y) when training with
        the fused backend. The fused path then runs this LIF's forward hooks with the spikes (and y
        as the input); BN's hooks do not run."""
        fusable = (self.backend == "fused" and bn.training and torch.is_grad_enabled()
                   and bn.track_running_stats and bn.running_mean is not None and bn.momentum is not None)
        if not fusable:
            x = bn(y)
            return self(x if residual is None else x + residual)
        bn.num_batches_tracked.add_(1)
        out = _BatchNormLIF.apply(y, bn.weight, bn.bias, residual, bn.running_mean, bn.running_var,
                                  bn.momentum, bn.eps, self)
        return self._forward_hooks_on(y, mark_spikes(out))

    def repeated(self, x: torch.Tensor) -> torch.Tensor:
        """`self(x repeated T times)` for the once-run encoder's [B, ...] output -> [T*B, ...] spikes."""
        if self.backend != "fused" or not torch.is_grad_enabled():
            return self(x.unsqueeze(0).expand(self.timesteps, *x.shape).reshape(-1, *x.shape[1:]))
        return self._forward_hooks_on(x, mark_spikes(_RepeatedInputLIF.apply(x, self)))

    def _forward_hooks_on(self, inputs: torch.Tensor, spikes: torch.Tensor) -> torch.Tensor:
        """The module's forward hooks, as a call would run them (recorders and spike-rate probes see the
        spikes of the fused paths too)."""
        for hook_id, hook in self._forward_hooks.items():
            if hook_id in self._forward_hooks_with_kwargs:
                result = hook(self, (inputs,), {}, spikes)
            else:
                result = hook(self, (inputs,), spikes)
            if result is not None:
                spikes = result
        return spikes

    def extra_repr(self) -> str:
        return (f"T={self.timesteps}, tau={self.tau:.4g}, v_threshold={self.v_threshold}, "
                f"surrogate={self.surrogate}(alpha={self.alpha}), backend={self.backend}")


# ---------------------------------------------------------------------------------------------
# Spikes saved for backward as 1 byte

SpikeKey = tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype, torch.device]
_spike_registries: list[dict[SpikeKey, tuple[weakref.ref[torch.Tensor], int, list[torch.Tensor]]]] = []


def _key(t: torch.Tensor) -> SpikeKey:
    """Autograd packs a `detach()`ed alias of a saved input: same memory and geometry, new tensor object."""
    return t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device


def mark_spikes(t: torch.Tensor) -> torch.Tensor:
    """Declare that `t` holds only 0 and 1 (spikes): inside `saving_spikes_as_bool` autograd saves it as bool."""
    if _spike_registries and not is_spikes(t):
        _spike_registries[-1][_key(t)] = (weakref.ref(t), t._version, [])
    return t


def is_spikes(t: torch.Tensor) -> bool:
    """Whether `t` (or an alias with the same memory and shape) was declared by `mark_spikes` in the
    active `saving_spikes_as_bool` context (outside one, nothing is)."""
    if not _spike_registries:
        return False
    entry = _spike_registries[-1].get(_key(t))
    return entry is not None and entry[0]() is not None and entry[1] == t._version


class saving_spikes_as_bool(torch.autograd.graph.saved_tensors_hooks):  # noqa: N801 (a context manager)
    """While active, autograd stores every tensor declared by `mark_spikes` as 1 byte instead of 4 (or 2).

    A spike map is saved by the next conv (for its weight gradient), a max-pool or a residual sum,
    sometimes by several of them: each is packed once and shared. Backward gets the exact float
    values back (0 and 1 convert losslessly), one layer at a time.
    """

    def __init__(self) -> None:
        registry: dict[SpikeKey, tuple[weakref.ref[torch.Tensor], int, list[torch.Tensor]]] = {}
        self.registry = registry

        def pack(t: torch.Tensor) -> object:
            if not is_spikes(t):  # includes a new tensor in freed memory, and a modified one
                return t
            bits = registry[_key(t)][2]
            if not bits:
                bits.append(t.detach().to(torch.bool))
            return bits[0], t.dtype

        def unpack(saved: object) -> torch.Tensor:
            if isinstance(saved, tuple):
                bits, dtype = saved
                return bits.view(torch.uint8).to(dtype)  # 0/1 bytes: ~4x faster than a bool -> float cast
            return saved  # type: ignore[return-value]

        super().__init__(pack, unpack)

    def __enter__(self) -> None:
        _spike_registries.append(self.registry)
        super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        _spike_registries.remove(self.registry)
