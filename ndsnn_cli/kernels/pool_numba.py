"""2x2 / stride-2 max-pooling of batch-last spike maps for the CPU, JIT-compiled by numba (the `kernels` extra).

Maps are `[C, H, W, N]`, N innermost. The forward keeps, per output, which corner of its window held the
first maximum in row-major order (torch's max_pool2d rule; ties are the rule for 0/1 maps) as one byte:
a quarter of the input's size, which backward reads to route each gradient to that corner. Parallel over
channels; the innermost loops run over the N contiguous samples with selects, no branches.
"""

from __future__ import annotations

from numba import njit, prange


@njit(parallel=True, cache=True)
def max_pool_forward(x, out, corner):  # pragma: no cover (JIT)
    """out[c, i, j] = max of x[c, 2i:2i+2, 2j:2j+2]; corner = 0..3, the first maximum's (row-major)."""
    channels, h_out, w_out, batch = out.shape
    for c in prange(channels):
        for i in range(h_out):
            for j in range(w_out):
                for n in range(batch):
                    best = x[c, 2 * i, 2 * j, n]
                    k = 0
                    v = x[c, 2 * i, 2 * j + 1, n]
                    k = 1 if v > best else k
                    best = v if v > best else best
                    v = x[c, 2 * i + 1, 2 * j, n]
                    k = 2 if v > best else k
                    best = v if v > best else best
                    v = x[c, 2 * i + 1, 2 * j + 1, n]
                    k = 3 if v > best else k
                    best = v if v > best else best
                    out[c, i, j, n] = best
                    corner[c, i, j, n] = k


@njit(parallel=True, cache=True)
def max_pool_backward(grad_out, corner, grad_in):  # pragma: no cover (JIT)
    """grad_in at each window's recorded corner = grad_out, 0 at the other three (every element written)."""
    channels, h_out, w_out, batch = grad_out.shape
    for c in prange(channels):
        for i in range(h_out):
            for j in range(w_out):
                for n in range(batch):
                    g = grad_out[c, i, j, n]
                    k = corner[c, i, j, n]
                    grad_in[c, 2 * i, 2 * j, n] = g if k == 0 else 0.0
                    grad_in[c, 2 * i, 2 * j + 1, n] = g if k == 1 else 0.0
                    grad_in[c, 2 * i + 1, 2 * j, n] = g if k == 2 else 0.0
                    grad_in[c, 2 * i + 1, 2 * j + 1, n] = g if k == 3 else 0.0
