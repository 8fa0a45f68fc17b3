"""Direct sparse convolution kernels for the CPU, JIT-compiled by numba (the optional `kernels` extra).

Feature maps are batch-innermost, `[C, H, W, N]` (DESIGN §4: the batch as the contiguous axis made the
direct kernel 6-11x faster than oneDNN at 99% sparsity, against 1.3-3.3x with the batch outer). Each
active weight ("tap": output channel o, input channel i, kernel offset kh, kw) adds its shifted input
plane, scaled by its value, into its output plane; nothing is unfolded (no im2col). A linear layer is
the same kernel on `[in, 1, 1, N]` maps. Inputs may be uint8 (spike maps, 0/1): numba compiles a
specialisation that reads 1 byte per input instead of 4.

Parallel over output channels (forward, weight gradient) or input channels (input gradient), so no two
threads write the same plane. The weight-gradient dot products may be reassociated (vectorised sums).

On maps at least `ROW_KERNEL_MIN_WIDTH` wide, the three run one output row at a time instead
(`conv_forward_rows`, `conv_input_grad_rows` at stride 1, `conv_weight_grad_rows`): four consecutive taps
share one pass over the row, which stays in L1, so each row element is loaded (and stored) once per four
taps rather than once per tap. In the forward and input gradient each element still receives its taps in
the same order with the same roundings: bit-identical to the per-plane kernels (tested); the weight
gradient sums row by row (another order, within fp32 rounding). On narrower maps the edge columns, where a
tap is out of range, are too large a share of the row and the per-plane kernels are faster (measured:
benchmarks/README.md).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ndsnn_cli.kernels.numba_pool import match_torch_threads


@njit(inline="always")
def _valid_range(size_out: int, size_in: int, offset: int, stride: int, pad: int) -> tuple[int, int]:
    """Output positions p with 0 <= p * stride + offset - pad < size_in."""
    lo = max(0, -((offset - pad) // stride))  # ceil((pad - offset) / stride)
    hi = min(size_out, (size_in - 1 + pad - offset) // stride + 1)
    return lo, max(lo, hi)


@njit(inline="always")
def _add_tap(out_plane, in_plane, w, kh, kw, stride, pad, to_output):  # pragma: no cover (JIT)
    """One tap's shifted product: to_output, out_plane [Ho, Wo, N] += w * in_plane [H, W, N] at the tap's
    offset (forward); else in_plane += w * out_plane shifted back (input gradient)."""
    h_out, w_out, batch = out_plane.shape
    h_in, w_in = in_plane.shape[0], in_plane.shape[1]
    h_lo, h_hi = _valid_range(h_out, h_in, kh, stride, pad)
    w_lo, w_hi = _valid_range(w_out, w_in, kw, stride, pad)
    for ho in range(h_lo, h_hi):
        hi = ho * stride + kh - pad
        for wo in range(w_lo, w_hi):
            wi = wo * stride + kw - pad
            if to_output:
                for n in range(batch):
                    out_plane[ho, wo, n] += w * in_plane[hi, wi, n]
            else:
                for n in range(batch):
                    in_plane[hi, wi, n] += w * out_plane[ho, wo, n]


@njit(parallel=True, cache=True)
def conv_forward(x, out, bias, rowptr, tap_in, tap_kh, tap_kw, values, stride, pad):  # pragma: no cover (JIT)
    """out[o] = bias[o] + sum over taps of o of value * shifted x[i]; x [Ci, H, W, N], out [Co, Ho, Wo, N]."""
    for o in prange(out.shape[0]):
        out[o] = bias[o]
        for k in range(rowptr[o], rowptr[o + 1]):
            _add_tap(out[o], x[tap_in[k]], values[k], tap_kh[k], tap_kw[k], stride, pad, True)


@njit(parallel=True, cache=True)
def conv_input_grad(grad_out, grad_in, colptr, tap_out, tap_kh, tap_kw, values, stride, pad):  # pragma: no cover
    """grad_in[i] = sum over taps of i of value * grad_out[o] shifted back (the transposed sparse weight)."""
    for i in prange(grad_in.shape[0]):
        grad_in[i] = 0.0
        for k in range(colptr[i], colptr[i + 1]):
            _add_tap(grad_out[tap_out[k]], grad_in[i], values[k], tap_kh[k], tap_kw[k], stride, pad, False)


ROW_KERNEL_MIN_WIDTH = 16
ROW_TAPS = 4


@njit(inline="always")
def _group_columns(width, src_width, shifts, count, stride):  # pragma: no cover (JIT)
    """[lo_all, hi_all): the row's columns where all of the group's taps are in range; [lo_any, hi_any): any."""
    lo_all, hi_all, lo_any, hi_any = 0, width, width, 0
    for t in range(count):
        lo, hi = _valid_range(width, src_width, shifts[t], stride, 0)
        lo_all, hi_all = max(lo_all, lo), min(hi_all, hi)
        lo_any, hi_any = min(lo_any, lo), max(hi_any, hi)
    return lo_all, max(hi_all, lo_all), lo_any, hi_any


@njit(inline="always")
def _add_taps_to_row(row, src, chans, rows, shifts, weights, count, stride):  # pragma: no cover (JIT)
    """row [Wr, N] += weights[t] * src[chans[t], rows[t], c * stride + shifts[t]] for the group's `count`
    taps, in their order, at every column c where the tap's source column is in range."""
    width, batch = row.shape
    src_width = src.shape[2]
    lo_all, hi_all, lo_any, hi_any = _group_columns(width, src_width, shifts, count, stride)
    for c in range(lo_any, hi_any):  # the edges, where some tap is out of range: tap by tap
        if lo_all <= c < hi_all:
            continue
        for t in range(count):
            column = c * stride + shifts[t]
            if 0 <= column < src_width:
                plane, w = src[chans[t], rows[t]], weights[t]
                for n in range(batch):
                    row[c, n] += w * plane[column, n]
    if count == ROW_TAPS:
        s0, s1, s2, s3 = src[chans[0], rows[0]], src[chans[1], rows[1]], src[chans[2], rows[2]], src[chans[3], rows[3]]
        w0, w1, w2, w3 = weights[0], weights[1], weights[2], weights[3]
        d0, d1, d2, d3 = shifts[0], shifts[1], shifts[2], shifts[3]
        for c in range(lo_all, hi_all):
            base = c * stride
            r, a0, a1, a2, a3 = row[c], s0[base + d0], s1[base + d1], s2[base + d2], s3[base + d3]
            for n in range(batch):
                r[n] = (((r[n] + w0 * a0[n]) + w1 * a1[n]) + w2 * a2[n]) + w3 * a3[n]
    else:
        for t in range(count):
            plane, w, shift = src[chans[t], rows[t]], weights[t], shifts[t]
            for c in range(lo_all, hi_all):
                r, a = row[c], plane[c * stride + shift]
                for n in range(batch):
                    r[n] += w * a[n]


@njit(parallel=True, cache=True)
def conv_forward_rows(x, out, bias, rowptr, tap_in, tap_kh, tap_kw, values, stride, pad):  # pragma: no cover
    """`conv_forward`, one output row (o, ho) per job, four taps per pass over it."""
    c_out, h_out = out.shape[0], out.shape[1]
    h_in = x.shape[1]
    for job in prange(c_out * h_out):
        o = job // h_out
        ho = job - o * h_out
        row = out[o, ho]
        row[:] = bias[o]
        chans, rows = np.empty(ROW_TAPS, np.int64), np.empty(ROW_TAPS, np.int64)
        shifts, weights = np.empty(ROW_TAPS, np.int64), np.empty(ROW_TAPS, values.dtype)
        count = 0
        for k in range(rowptr[o], rowptr[o + 1]):
            hi = ho * stride + tap_kh[k] - pad
            if 0 <= hi < h_in:
                chans[count], rows[count], shifts[count], weights[count] = tap_in[k], hi, tap_kw[k] - pad, values[k]
                count += 1
                if count == ROW_TAPS:
                    _add_taps_to_row(row, x, chans, rows, shifts, weights, count, stride)
                    count = 0
        if count:
            _add_taps_to_row(row, x, chans, rows, shifts, weights, count, stride)


@njit(parallel=True, cache=True)
def conv_input_grad_rows(grad_out, grad_in, colptr, tap_out, tap_kh, tap_kw, values, pad):  # pragma: no cover
    """`conv_input_grad` at stride 1, one input row (i, hi) per job, four taps per pass over it: grad_in[i, hi,
    wi] += value * grad_out[o, hi + pad - kh, wi + pad - kw]."""
    c_in, h_in = grad_in.shape[0], grad_in.shape[1]
    h_out = grad_out.shape[1]
    for job in prange(c_in * h_in):
        i = job // h_in
        hi = job - i * h_in
        row = grad_in[i, hi]
        row[:] = 0.0
        chans, rows = np.empty(ROW_TAPS, np.int64), np.empty(ROW_TAPS, np.int64)
        shifts, weights = np.empty(ROW_TAPS, np.int64), np.empty(ROW_TAPS, values.dtype)
        count = 0
        for k in range(colptr[i], colptr[i + 1]):
            ho = hi + pad - tap_kh[k]
            if 0 <= ho < h_out:
                chans[count], rows[count], shifts[count], weights[count] = tap_out[k], ho, pad - tap_kw[k], values[k]
                count += 1
                if count == ROW_TAPS:
                    _add_taps_to_row(row, grad_out, chans, rows, shifts, weights, count, 1)
                    count = 0
        if count:
            _add_taps_to_row(row, grad_out, chans, rows, shifts, weights, count, 1)


@njit(inline="always")
def _row_dots(gy, src, chans, rows, shifts, count, stride, grad_values, taps):  # pragma: no cover (JIT)
    """grad_values[taps[t]] += <gy [Wr, N], src[chans[t], rows[t]] at columns c * stride + shifts[t]> over the
    columns where the tap is in range, for the group's `count` taps: gy's row is read once per four taps."""
    width, batch = gy.shape
    src_width = src.shape[2]
    lo_all, hi_all, lo_any, hi_any = _group_columns(width, src_width, shifts, count, stride)
    for t in range(count):
        plane, shift = src[chans[t], rows[t]], shifts[t]
        acc = np.float32(0.0)
        for c in range(lo_any, hi_any):  # the edges
            column = c * stride + shift
            if (c < lo_all or c >= hi_all) and 0 <= column < src_width:
                for n in range(batch):
                    acc += gy[c, n] * plane[column, n]
        if count < ROW_TAPS:
            for c in range(lo_all, hi_all):
                a, g = plane[c * stride + shift], gy[c]
                for n in range(batch):
                    acc += g[n] * a[n]
        grad_values[taps[t]] += acc
    if count == ROW_TAPS:
        s0, s1, s2, s3 = src[chans[0], rows[0]], src[chans[1], rows[1]], src[chans[2], rows[2]], src[chans[3], rows[3]]
        d0, d1, d2, d3 = shifts[0], shifts[1], shifts[2], shifts[3]
        acc0 = acc1 = acc2 = acc3 = np.float32(0.0)
        for c in range(lo_all, hi_all):
            base = c * stride
            g, a0, a1, a2, a3 = gy[c], s0[base + d0], s1[base + d1], s2[base + d2], s3[base + d3]
            for n in range(batch):
                acc0 += g[n] * a0[n]
                acc1 += g[n] * a1[n]
                acc2 += g[n] * a2[n]
                acc3 += g[n] * a3[n]
        grad_values[taps[0]] += acc0
        grad_values[taps[1]] += acc1
        grad_values[taps[2]] += acc2
        grad_values[taps[3]] += acc3


@njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
def conv_weight_grad_rows(grad_out, x, grad_values, rowptr, tap_in, tap_kh, tap_kw, stride, pad):  # pragma: no cover
    """`conv_weight_grad` summed row by row of grad_out, four taps per pass over each row."""
    c_out, h_out = grad_out.shape[0], grad_out.shape[1]
    h_in = x.shape[1]
    for o in prange(c_out):
        chans, rows = np.empty(ROW_TAPS, np.int64), np.empty(ROW_TAPS, np.int64)
        shifts, taps = np.empty(ROW_TAPS, np.int64), np.empty(ROW_TAPS, np.int64)
        for k in range(rowptr[o], rowptr[o + 1]):
            grad_values[k] = 0.0
        for ho in range(h_out):
            gy = grad_out[o, ho]
            count = 0
            for k in range(rowptr[o], rowptr[o + 1]):
                hi = ho * stride + tap_kh[k] - pad
                if 0 <= hi < h_in:
                    chans[count], rows[count], shifts[count], taps[count] = tap_in[k], hi, tap_kw[k] - pad, k
                    count += 1
                    if count == ROW_TAPS:
                        _row_dots(gy, x, chans, rows, shifts, count, stride, grad_values, taps)
                        count = 0
            if count:
                _row_dots(gy, x, chans, rows, shifts, count, stride, grad_values, taps)


@njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
def conv_weight_grad(grad_out, x, grad_values, rowptr, tap_in, tap_kh, tap_kw, stride, pad):  # pragma: no cover
    """grad_values[k] = <grad_out[o], shifted x[i]> for every tap k only (sampled: the mask's positions)."""
    c_out, h_out, w_out, batch = grad_out.shape
    h_in, w_in = x.shape[1], x.shape[2]
    for o in prange(c_out):
        gy = grad_out[o]
        for k in range(rowptr[o], rowptr[o + 1]):
            src = x[tap_in[k]]
            kh, kw = tap_kh[k], tap_kw[k]
            h_lo, h_hi = _valid_range(h_out, h_in, kh, stride, pad)
            w_lo, w_hi = _valid_range(w_out, w_in, kw, stride, pad)
            acc = np.float32(0.0)
            for ho in range(h_lo, h_hi):
                hi = ho * stride + kh - pad
                for wo in range(w_lo, w_hi):
                    wi = wo * stride + kw - pad
                    for n in range(batch):
                        acc += gy[ho, wo, n] * src[hi, wi, n]
            grad_values[k] = acc


@njit(parallel=True, cache=True)
def tiled_copy(src, dst):  # pragma: no cover (JIT)
    """dst[c, p, n] = src[c, p, n] for [C, P, N] views of any strides, in 16 x 16 (c, n) tiles: the
    NHWC <-> [C, H, W, N] transposes, where torch's strided copy is ~10x slower than the kernels."""
    channels, positions, batch = dst.shape
    for p in prange(positions):
        for c0 in range(0, channels, 16):
            for n0 in range(0, batch, 16):
                for c in range(c0, min(c0 + 16, channels)):
                    for n in range(n0, min(n0 + 16, batch)):
                        dst[c, p, n] = src[c, p, n]


@njit(parallel=True, cache=True)
def swap_outer_axes(src, dst):  # pragma: no cover (JIT)
    """dst[b, p, a] = src[a, p, b] for C-contiguous src [A, P, B] and dst [B, P, A], with a cast to dst's
    dtype: NHWC <-> [C, H, W, N] ([N, P, C] <-> [C, P, N]), NCHW ([N, 1, CP]) and [N, F] ([N, 1, F]) alike.
    8 x 8 (a, b) tiles: measured 2-3x faster here than 16 or 32 (fewer pages per tile). Contiguous operands
    let numba drop `tiled_copy`'s stride arithmetic."""
    a_size, positions, b_size = src.shape
    a_tiles = (a_size + 7) // 8
    for job in prange(positions * a_tiles):
        p = job // a_tiles
        a0 = (job % a_tiles) * 8
        a1 = min(a0 + 8, a_size)
        for b0 in range(0, b_size, 8):
            for b in range(b0, min(b0 + 8, b_size)):
                for a in range(a0, a1):
                    dst[b, p, a] = src[a, p, b]


def _outer_swap_operands(src, dst):  # noqa: ANN001, ANN202
    """(s, d) C-contiguous with d[b, p, a] = s[a, p, b] equal to `dst[c, p, n] = src[c, p, n]` for the
    [C, P, N] views of a layout transpose, when one side is contiguous and the other a permuted
    contiguous tensor; else None."""
    channels, positions, batch = dst.shape
    flat = channels * positions
    if dst.is_contiguous():
        if src.permute(2, 1, 0).is_contiguous():          # src from NHWC / [N, F]
            return src.permute(2, 1, 0), dst
        if src.permute(2, 0, 1).is_contiguous():          # src from NCHW
            return src.permute(2, 0, 1).reshape(batch, 1, flat), dst.view(flat, 1, batch)
    if src.is_contiguous():
        if dst.permute(2, 1, 0).is_contiguous():          # into NHWC / [N, F]
            return src, dst.permute(2, 1, 0)
        if dst.permute(2, 0, 1).is_contiguous():          # into NCHW
            return src.view(flat, 1, batch), dst.permute(2, 0, 1).reshape(batch, 1, flat)
    return None


class NumbaKernel:
    """The registry's "numba" kernel (`protocol.SparseKernel`): CPU torch tensors in `[C, H, W, N]`, numba
    kernels on their memory (zero-copy numpy views, the layout's too). Constructing it sizes numba's
    thread pool to torch's thread count (`numba_pool.match_torch_threads`)."""

    def __init__(self) -> None:
        match_torch_threads()

    def copy(self, src, dst) -> None:  # noqa: ANN001
        """`dst.copy_(src)` for [C, P, N] views (a layout transpose), with a cast to dst's dtype."""
        src = src.detach()
        operands = _outer_swap_operands(src, dst)
        if operands is not None:
            swap_outer_axes(operands[0].numpy(), operands[1].numpy())
        else:
            tiled_copy(src.numpy(), dst.numpy())

    def forward(self, x, values, bias, layout, stride: int, pad: int, out) -> None:  # noqa: ANN001
        kernel = conv_forward_rows if out.shape[2] >= ROW_KERNEL_MIN_WIDTH else conv_forward
        kernel(x.numpy(), out.numpy(), bias.numpy(), layout.rowptr.numpy(), layout.tap_in.numpy(),
                     layout.tap_kh.numpy(), layout.tap_kw.numpy(), values.numpy(), stride, pad)

    def input_grad(self, grad_out, values, layout, stride: int, pad: int, grad_in) -> None:  # noqa: ANN001
        col_values = values[layout.by_input].contiguous()
        operands = (grad_out.numpy(), grad_in.numpy(), layout.colptr.numpy(), layout.col_out.numpy(),
                    layout.col_kh.numpy(), layout.col_kw.numpy(), col_values.numpy())
        if stride == 1 and grad_in.shape[2] >= ROW_KERNEL_MIN_WIDTH:
            conv_input_grad_rows(*operands, pad)
        else:
            conv_input_grad(*operands, stride, pad)

    def weight_grad(self, grad_out, x, layout, stride: int, pad: int):  # noqa: ANN001, ANN201
        import torch

        grad_values = torch.empty(layout.nnz, dtype=torch.float32)
        kernel = conv_weight_grad_rows if grad_out.shape[2] >= ROW_KERNEL_MIN_WIDTH else conv_weight_grad
        kernel(grad_out.numpy(), x.numpy(), grad_values.numpy(), layout.rowptr.numpy(),
                         layout.tap_in.numpy(), layout.tap_kh.numpy(), layout.tap_kw.numpy(), stride, pad)
        return grad_values
