"""Multi-step leaky integrate-and-fire neurons with surrogate gradients (LTH-SNN / SpikingJelly semantics).

Charge `H[t] = V[t-1] + (X[t] - V[t-1]) / tau`, spike `S[t] = Heaviside(H[t] - v_th)`, hard reset to 0
with the reset detached: `V[t] = H[t] * (1 - S[t])`. Inputs arrive as one `[T*B, ...]` batch (convs
and BN run on that batch); only the neuron loops over T.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _atan_grad_(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """In place: d/dx of arctan(pi/2 alpha x) / pi + 1/2 (SpikingJelly's ATan) = (alpha/2) / (1 + (pi/2 alpha x)^2)."""
    return x.mul_(math.pi / 2 * alpha).square_().add_(1).reciprocal_().mul_(alpha / 2)


def _sigmoid_grad_(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """In place: d/dx of sigmoid(alpha * x) = alpha * s * (1 - s)."""
    return x.mul_(alpha).sigmoid_().addcmul_(x, x, value=-1).mul_(alpha)


# In-place forms avoid fresh [T*B, ...] buffers in backward (each one costs page faults on CPU).
SURROGATES = {"atan": _atan_grad_, "sigmoid": _sigmoid_grad_}


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


class _FusedLIF(torch.autograd.Function):
    """The same neuron with a hand-written BPTT that stores only the charge H (one tensor).

    The reference loop keeps ~4 tensors per time step for autograd; here backward recomputes the
    spikes from H (S = H >= v_th) and runs the recurrence dL/dH[t] = dL/dS[t] sg'(H[t] - v_th)
    + dL/dV[t] (1 - S[t]), dL/dV[t-1] = dL/dH[t] (1 - 1/tau), dL/dX[t] = dL/dH[t] / tau.
    """

    @staticmethod
    def forward(ctx, x_seq: torch.Tensor, tau: float, v_threshold: float, surrogate: str,  # type: ignore[override]
                alpha: float) -> torch.Tensor:
        h_seq = torch.empty_like(x_seq)
        v = torch.zeros_like(x_seq[0])
        for t in range(x_seq.shape[0]):
            h = h_seq[t]
            # Same arithmetic as the reference, v + (x - v) / tau, written in place.
            torch.sub(x_seq[t], v, out=h)
            h.div_(tau).add_(v)
            torch.mul(h, h < v_threshold, out=v)
        ctx.save_for_backward(h_seq)
        ctx.tau, ctx.v_threshold, ctx.surrogate, ctx.alpha = tau, v_threshold, surrogate, alpha
        return (h_seq >= v_threshold).to(x_seq.dtype)

    @staticmethod
    def backward(ctx, grad_spikes: torch.Tensor):  # type: ignore[override]
        (h_seq,) = ctx.saved_tensors
        tau, v_th = ctx.tau, ctx.v_threshold
        # All time steps at once: grad_h starts as dL/dS * sg'(H - v_th), then the recurrence adds
        # the membrane path from the step after, which survives only where no spike reset it.
        grad_h = SURROGATES[ctx.surrogate](h_seq - v_th, ctx.alpha).mul_(grad_spikes)
        decay = 1 - 1 / tau
        for t in range(h_seq.shape[0] - 2, -1, -1):
            grad_h[t].addcmul_(grad_h[t + 1], h_seq[t] < v_th, value=decay)
        return grad_h.div_(tau), None, None, None, None


class LIF(nn.Module):
    """Multi-step LIF on a `[T*B, ...]` batch; returns spikes of the same shape and dtype."""

    def __init__(self, timesteps: int, tau: float = 4.0 / 3.0, v_threshold: float = 1.0,
                 surrogate: str = "atan", alpha: float = 2.0, backend: str = "fused") -> None:
        super().__init__()
        if surrogate not in SURROGATES:
            raise ValueError(f"unknown surrogate {surrogate!r} (known: {', '.join(SURROGATES)})")
        self.timesteps, self.tau, self.v_threshold = timesteps, tau, v_threshold
        self.surrogate, self.alpha, self.backend = surrogate, alpha, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_seq = x.reshape(self.timesteps, x.shape[0] // self.timesteps, *x.shape[1:])
        if self.backend == "fused":
            out = _FusedLIF.apply(x_seq, self.tau, self.v_threshold, self.surrogate, self.alpha)
        else:
            out = lif_reference(x_seq, self.tau, self.v_threshold, self.surrogate, self.alpha)
        return out.reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"T={self.timesteps}, tau={self.tau:.4g}, v_threshold={self.v_threshold}, "
                f"surrogate={self.surrogate}(alpha={self.alpha}), backend={self.backend}")
