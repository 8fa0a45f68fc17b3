"""BatchNorm + LIF on batch-last maps for the CPU, JIT-compiled by numba (the optional `kernels` extra).

Maps are `[C, P, N]` (P = H*W) with N = T*B, time outermost inside N (`n = t*B + b`, the `[T*B, ...]` batch
of the dense layout, which `execution.to_batch_last` keeps as the innermost axis). Parallel over channels:
one thread owns a channel's statistics, its normalisation, its neurons' recurrences over T and its BN
backward, so every sum runs in one fixed order whatever the thread count (bit-reproducible), and the
innermost loops run over the B contiguous samples of one position and step.

Arithmetic mirrors `snn.neuron`: `H = (Z - V) / tau + V` (`Z / tau` at t = 0), spike `H >= v_th`, hard
reset; the same surrogates in the same order of operations. No `fastmath` on the forward: `contract`
(fma) or `arcp` (x / tau as x * (1/tau)) would move H by an ulp against the dense path and flip spikes
at the threshold. Statistics accumulate per lane in float64.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

ATAN, SIGMOID = 0, 1  # surrogate ids, in `snn.SURROGATE_NAMES` order


@njit(inline="always")
def _channel_stats(xc):  # pragma: no cover (JIT)
    """Mean and biased variance of one channel's [P, N] plane, two passes, float64 per-lane sums."""
    positions, batch = xc.shape
    acc = np.zeros(batch, dtype=np.float64)
    for p in range(positions):
        for n in range(batch):
            acc[n] += xc[p, n]
    mean = acc.sum() / (positions * batch)
    acc[:] = 0.0
    for p in range(positions):
        for n in range(batch):
            d = xc[p, n] - mean
            acc[n] += d * d
    return mean, acc.sum() / (positions * batch)


@njit(parallel=True, cache=True)
def bn_lif_forward(x, residual, has_residual, weight, bias, mean, invstd, var, training, eps, tau,
                   v_threshold, timesteps, out):  # pragma: no cover (JIT)
    """out[c] = spikes of LIF(BN(x[c]) (+ residual[c])) over T, for x, residual, out `[C, P, T*B]`.

    training: mean/var (float64 [C], biased) are computed here and invstd (float32 [C]) written; else
    mean/var are the running statistics given and invstd is derived from them. out may be uint8 or float.
    """
    channels, positions, batch_total = x.shape
    batch = batch_total // timesteps
    tau32, v_th = np.float32(tau), np.float32(v_threshold)  # as torch casts a scalar operand
    for c in prange(channels):
        if training:
            m, v2 = _channel_stats(x[c])
            mean[c], var[c] = m, v2
        inv = np.float32(1.0 / math.sqrt(var[c] + eps))
        invstd[c] = inv
        scale = np.float32(weight[c] * inv)                 # torch: alpha = invstd * w, beta = b - mean * alpha
        shift = np.float32(bias[c] - np.float32(mean[c]) * scale)
        v = np.empty(batch, dtype=np.float32)
        for p in range(positions):
            xr, spikes = x[c, p], out[c, p]
            for t in range(timesteps):
                o = t * batch
                for b in range(batch):
                    z = xr[o + b] * scale + shift
                    if has_residual:
                        z = z + residual[c, p, o + b]
                    h = z / tau32 if t == 0 else (z - v[b]) / tau32 + v[b]
                    fired = h >= v_th
                    spikes[o + b] = fired
                    v[b] = np.float32(0.0) if fired else h


@njit(inline="always")
def _surrogate(u, surrogate, alpha):  # pragma: no cover (JIT)
    """The surrogate derivative at u = H - v_th, in `snn.neuron`'s order of operations."""
    if surrogate == ATAN:
        q = u * np.float32(math.pi / 2 * alpha)
        return np.float32(1.0) / (q * q + np.float32(1.0)) * np.float32(alpha / 2)
    s = np.float32(1.0) / (np.float32(1.0) + np.exp(-(u * np.float32(alpha))))
    return (s - s * s) * np.float32(alpha)


@njit(inline="always")
def _position_grad(xr, res, has_residual, gs, scale, shift, tau32, v_th, decay, surrogate, alpha, timesteps,
                   h, v):  # pragma: no cover (JIT)
    """dL/dH of one position's [T*B] neurons into h: H rebuilt as in the forward, then BPTT back over T."""
    batch = v.shape[0]
    for t in range(timesteps):
        o = t * batch
        for b in range(batch):
            z = xr[o + b] * scale + shift
            if has_residual:
                z = z + res[o + b]
            hh = z / tau32 if t == 0 else (z - v[b]) / tau32 + v[b]
            h[o + b] = hh
            v[b] = np.float32(0.0) if hh >= v_th else hh
    for t in range(timesteps - 1, -1, -1):  # dL/dH[t], kept in H[t]'s slot once it is read
        o = t * batch
        for b in range(batch):
            hh = h[o + b]
            g = _surrogate(hh - v_th, surrogate, alpha) * gs[o + b]
            if t + 1 < timesteps and hh < v_th:
                g = g + decay * h[o + batch + b]
            h[o + b] = g


@njit(parallel=True, cache=True)
def bn_lif_backward(x, residual, has_residual, grad_spikes, weight, bias, mean, invstd, training, tau,
                    v_threshold, surrogate, alpha, timesteps, grad_x, grad_res, want_res, grad_w, grad_b):
    # pragma: no cover (JIT)
    """dL/dx (grad_x), dL/dresidual (grad_res when want_res), dL/dweight and dL/dbias ([C], float32).

    Per channel: rebuild H one position at a time (a [T*B] scratch), run the BPTT recurrence back over T,
    write dL/dZ into grad_x while summing BN's two reductions, then BN's backward in place (training:
    through the batch statistics; evaluation: the fixed scale only).
    """
    channels, positions, batch_total = x.shape
    batch = batch_total // timesteps
    decay = np.float32(1.0 - 1.0 / tau)
    tau32, v_th = np.float32(tau), np.float32(v_threshold)
    for c in prange(channels):
        inv = invstd[c]
        mu = np.float32(mean[c])
        scale = np.float32(weight[c] * inv)
        shift = np.float32(bias[c] - mu * scale)
        h = np.empty(batch_total, dtype=np.float32)
        v = np.empty(batch, dtype=np.float32)
        sum_dy = np.zeros(batch_total, dtype=np.float64)
        sum_dy_xhat = np.zeros(batch_total, dtype=np.float64)
        for p in range(positions):
            xr, gz = x[c, p], grad_x[c, p]
            _position_grad(xr, residual[c, p] if has_residual else xr, has_residual, grad_spikes[c, p], scale,
                           shift, tau32, v_th, decay, surrogate, alpha, timesteps, h, v)
            for n in range(batch_total):
                dz = h[n] / tau32
                gz[n] = dz
                sum_dy[n] += dz
                sum_dy_xhat[n] += dz * ((xr[n] - mu) * inv)
            if want_res:
                grad_res[c, p] = gz
        dy_total, dy_xhat_total = sum_dy.sum(), sum_dy_xhat.sum()
        grad_w[c], grad_b[c] = dy_xhat_total, dy_total
        count = positions * batch_total
        mean_dy = np.float32(dy_total / count) if training else np.float32(0.0)
        mean_dy_xhat = np.float32(dy_xhat_total / count) if training else np.float32(0.0)
        for p in range(positions):
            xr, gz = x[c, p], grad_x[c, p]
            for n in range(batch_total):
                xhat = (xr[n] - mu) * inv
                gz[n] = (gz[n] - mean_dy - xhat * mean_dy_xhat) * scale


# Channels-last maps: `[T, Q, C]`, the dense training layout's own memory (a channels-last `[T*B, C, H, W]`
# batch is `[T, B*H*W, C]`; a `[T*B, F]` one `[T, B, F]`), so no transpose. Parallel over CHUNKS fixed slices
# of Q (not over threads): each slice sums its channels in float64 lanes, and the slices' sums are added in
# slice order, so the statistics are bit-reproducible whatever the thread count. Innermost loops run over
# the C contiguous channels of one position and step.
CHUNKS = 64


@njit(inline="always")
def _chunk(index, chunks, total):  # pragma: no cover (JIT)
    return index * total // chunks, (index + 1) * total // chunks


@njit(inline="always")
def _slice_sums(x, center, squared, part):  # pragma: no cover (JIT)
    """part[j, c] += the sum over slice j of Q (and over T) of x[..., c], or of (x - center[c])^2."""
    timesteps, q_total, channels = x.shape
    chunks = part.shape[0]
    for j in prange(chunks):
        lo, hi = _chunk(j, chunks, q_total)
        for t in range(timesteps):
            for q in range(lo, hi):
                for c in range(channels):
                    if squared:
                        d = x[t, q, c] - center[c]
                        part[j, c] += d * d
                    else:
                        part[j, c] += x[t, q, c]


@njit(inline="always")
def _slices_total(part, count, out):  # pragma: no cover (JIT)
    """out[c] = (sum of part[:, c] in slice order) / count."""
    for c in range(part.shape[1]):
        total = 0.0
        for j in range(part.shape[0]):
            total += part[j, c]
        out[c] = total / count


@njit(inline="always")
def _channels_last_stats(x, mean, var):  # pragma: no cover (JIT)
    """Per-channel mean and biased variance of `[T, Q, C]` into float64 mean / var, two passes."""
    timesteps, q_total, channels = x.shape
    part = np.zeros((min(CHUNKS, q_total), channels), dtype=np.float64)
    _slice_sums(x, mean, False, part)
    _slices_total(part, timesteps * q_total, mean)
    part[:] = 0.0
    _slice_sums(x, mean, True, part)
    _slices_total(part, timesteps * q_total, var)


@njit(parallel=True, cache=True)
def bn_lif_forward_channels_last(x, residual, has_residual, weight, bias, mean, invstd, var, training, eps, tau,
                                 v_threshold, out):  # pragma: no cover (JIT)
    """`bn_lif_forward` on channels-last `[T, Q, C]` maps (x, residual, out)."""
    timesteps, q_total, channels = x.shape
    if training:
        _channels_last_stats(x, mean, var)
    tau32, v_th = np.float32(tau), np.float32(v_threshold)
    scale = np.empty(channels, dtype=np.float32)
    shift = np.empty(channels, dtype=np.float32)
    for c in range(channels):
        inv = np.float32(1.0 / math.sqrt(var[c] + eps))
        invstd[c] = inv
        scale[c] = np.float32(weight[c] * inv)
        shift[c] = np.float32(bias[c] - np.float32(mean[c]) * scale[c])
    chunks = min(CHUNKS, q_total)
    for j in prange(chunks):
        lo, hi = _chunk(j, chunks, q_total)
        v = np.empty(channels, dtype=np.float32)
        for q in range(lo, hi):
            for t in range(timesteps):
                for c in range(channels):
                    z = x[t, q, c] * scale[c] + shift[c]
                    if has_residual:
                        z = z + residual[t, q, c]
                    h = z / tau32 if t == 0 else (z - v[c]) / tau32 + v[c]
                    fired = h >= v_th
                    out[t, q, c] = fired
                    v[c] = np.float32(0.0) if fired else h


@njit(inline="always")
def _position_grad_channels_last(x, residual, has_residual, grad_spikes, q, scale, shift, tau32, v_th, decay,
                                 surrogate, alpha, h, v):  # pragma: no cover (JIT)
    """`_position_grad` for position q of `[T, Q, C]` maps: dL/dH of its [T, C] neurons into h.

    The H rebuild repeats the forward's recurrence on purpose: the forward writes spikes without an H
    scratch, and one shared inline helper over strided views cost 1.25-1.4x in backward (measured)."""
    timesteps, _, channels = x.shape
    for t in range(timesteps):
        for c in range(channels):
            z = x[t, q, c] * scale[c] + shift[c]
            if has_residual:
                z = z + residual[t, q, c]
            hh = z / tau32 if t == 0 else (z - v[c]) / tau32 + v[c]
            h[t, c] = hh
            v[c] = np.float32(0.0) if hh >= v_th else hh
    for t in range(timesteps - 1, -1, -1):  # dL/dH[t], kept in H[t]'s slot once it is read
        for c in range(channels):
            hh = h[t, c]
            g = _surrogate(hh - v_th, surrogate, alpha) * grad_spikes[t, q, c]
            if t + 1 < timesteps and hh < v_th:
                g = g + decay * h[t + 1, c]
            h[t, c] = g


@njit(parallel=True, cache=True)
def bn_lif_backward_channels_last(x, residual, has_residual, grad_spikes, weight, bias, mean, invstd, training,
                                  tau, v_threshold, surrogate, alpha, grad_x, grad_res, want_res, grad_w, grad_b):
    # pragma: no cover (JIT)
    """`bn_lif_backward` on channels-last `[T, Q, C]` maps: per position, H rebuilt over T ([T, C] scratch),
    BPTT back, dL/dZ written and BN's two reductions summed per slice; then BN's backward in place."""
    timesteps, q_total, channels = x.shape
    decay = np.float32(1.0 - 1.0 / tau)
    tau32, v_th = np.float32(tau), np.float32(v_threshold)
    mu = np.empty(channels, dtype=np.float32)
    scale = np.empty(channels, dtype=np.float32)
    shift = np.empty(channels, dtype=np.float32)
    for c in range(channels):
        mu[c] = np.float32(mean[c])
        scale[c] = np.float32(weight[c] * invstd[c])
        shift[c] = np.float32(bias[c] - mu[c] * scale[c])
    chunks = min(CHUNKS, q_total)
    part_dy = np.zeros((chunks, channels), dtype=np.float64)
    part_dy_xhat = np.zeros((chunks, channels), dtype=np.float64)
    for j in prange(chunks):
        lo, hi = _chunk(j, chunks, q_total)
        h = np.empty((timesteps, channels), dtype=np.float32)
        v = np.empty(channels, dtype=np.float32)
        for q in range(lo, hi):
            _position_grad_channels_last(x, residual, has_residual, grad_spikes, q, scale, shift, tau32, v_th,
                                         decay, surrogate, alpha, h, v)
            for t in range(timesteps):
                for c in range(channels):
                    dz = h[t, c] / tau32
                    grad_x[t, q, c] = dz
                    if want_res:
                        grad_res[t, q, c] = dz
                    part_dy[j, c] += dz
                    part_dy_xhat[j, c] += dz * ((x[t, q, c] - mu[c]) * invstd[c])
    dy = np.empty(channels, dtype=np.float64)
    dy_xhat = np.empty(channels, dtype=np.float64)
    _slices_total(part_dy, 1.0, dy)
    _slices_total(part_dy_xhat, 1.0, dy_xhat)
    count = timesteps * q_total if training else math.inf    # evaluation: BN's scale only, no mean terms
    mean_dy = np.empty(channels, dtype=np.float32)
    mean_dy_xhat = np.empty(channels, dtype=np.float32)
    for c in range(channels):
        grad_w[c], grad_b[c] = dy_xhat[c], dy[c]
        mean_dy[c], mean_dy_xhat[c] = dy[c] / count, dy_xhat[c] / count
    for j in prange(chunks):
        lo, hi = _chunk(j, chunks, q_total)
        for t in range(timesteps):
            for q in range(lo, hi):
                for c in range(channels):
                    xhat = (x[t, q, c] - mu[c]) * invstd[c]
                    grad_x[t, q, c] = (grad_x[t, q, c] - mean_dy[c] - xhat * mean_dy_xhat[c]) * scale[c]


# The LIF driven by one input at every step (the once-run encoder's output, `neuron.LIF.repeated`): x is the
# `[B, ...]` input in memory order (M values, any dense layout), the spikes `[T, M]` (the `[T*B, ...]` batch in
# the same layout). Parallel over CHUNKS fixed slices of M, innermost loops over a slice's values.
REPEATED_BLOCK = 256  # values per backward block: its [T, block] scratch stays in L1/L2


@njit(parallel=True, cache=True)
def repeated_lif_forward(x, tau, v_threshold, out):  # pragma: no cover (JIT)
    """out[t, m] = the spike at step t of a LIF whose input is x[m] at every step."""
    timesteps, total = out.shape
    tau32, v_th = np.float32(tau), np.float32(v_threshold)
    chunks = min(CHUNKS, total)
    for j in prange(chunks):
        lo, hi = _chunk(j, chunks, total)
        v = np.empty(hi - lo, dtype=np.float32)
        for t in range(timesteps):
            for m in range(lo, hi):
                z = x[m]
                h = z / tau32 if t == 0 else (z - v[m - lo]) / tau32 + v[m - lo]
                fired = h >= v_th
                out[t, m] = fired
                v[m - lo] = np.float32(0.0) if fired else h


@njit(parallel=True, cache=True)
def repeated_lif_backward(x, grad_spikes, tau, v_threshold, surrogate, alpha, grad_x):  # pragma: no cover (JIT)
    """grad_x[m] = sum over t (ascending, as torch sums dim 0) of dL/dX[t, m] = dL/dH[t, m] / tau, with H
    rebuilt per block of values and the BPTT recurrence of `_position_grad`; grad_spikes is `[T, M]`."""
    timesteps, total = grad_spikes.shape
    decay = np.float32(1.0 - 1.0 / tau)
    tau32, v_th = np.float32(tau), np.float32(v_threshold)
    chunks = min(CHUNKS, total)
    for j in prange(chunks):
        lo, hi = _chunk(j, chunks, total)
        h = np.empty((timesteps, REPEATED_BLOCK), dtype=np.float32)
        v = np.empty(REPEATED_BLOCK, dtype=np.float32)
        for start in range(lo, hi, REPEATED_BLOCK):
            size = min(REPEATED_BLOCK, hi - start)
            for t in range(timesteps):
                for k in range(size):
                    z = x[start + k]
                    hh = z / tau32 if t == 0 else (z - v[k]) / tau32 + v[k]
                    h[t, k] = hh
                    v[k] = np.float32(0.0) if hh >= v_th else hh
            for t in range(timesteps - 1, -1, -1):  # dL/dH[t], kept in H[t]'s slot once it is read
                for k in range(size):
                    hh = h[t, k]
                    g = _surrogate(hh - v_th, surrogate, alpha) * grad_spikes[t, start + k]
                    if t + 1 < timesteps and hh < v_th:
                        g = g + decay * h[t + 1, k]
                    h[t, k] = g
            for k in range(size):
                acc = np.float32(0.0)
                for t in range(timesteps):
                    acc = acc + h[t, k] / tau32
                grad_x[start + k] = acc
