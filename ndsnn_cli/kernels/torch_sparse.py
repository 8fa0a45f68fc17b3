"""The always-available sparse kernel, in plain torch: one CSR product per kernel offset.

A conv is the sum over kernel offsets (kh, kw) of a sparse [out, in] matrix times the input shifted by
that offset, so each offset is one `torch.sparse.mm` on `[C, H*W*N]` slices of the batch-last map, the
input gradient is the transposed product, and the weight gradient `torch.sparse.sampled_addmm` at the
offset's taps. Same interface and layout as the numba kernel; slower than dense (the slices are
copies), so `choose` picks it only for `sparse_kernels = "on"` without numba, and tests use it as a
second reference.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ndsnn_cli.kernels.layout import TapLayout


def _offsets(layout: TapLayout):  # noqa: ANN202
    """Per kernel offset: (kh, kw, row-order tap ids, their CSR crow and col indices)."""
    out_ch, in_ch = layout.tap_out.long(), layout.tap_in.long()
    kh, kw = layout.tap_kh.long(), layout.tap_kw.long()
    for a in range(layout.shape[2]):
        for b in range(layout.shape[3]):
            taps = ((kh == a) & (kw == b)).nonzero().flatten()
            if taps.numel():
                crow = torch.zeros(layout.shape[0] + 1, dtype=torch.int64, device=layout.device)
                crow[1:] = torch.bincount(out_ch[taps], minlength=layout.shape[0]).cumsum(0)
                yield a, b, taps, crow, in_ch[taps]


def _window(padded: torch.Tensor, a: int, b: int, stride: int, h_out: int, w_out: int) -> torch.Tensor:
    """The [C, Ho, Wo, N] view of a padded batch-last map that kernel offset (a, b) reads."""
    return padded[:, a:a + stride * (h_out - 1) + 1:stride, b:b + stride * (w_out - 1) + 1:stride, :]


class TorchSparseKernel:
    """The registry's "torch-sparse" kernel (`protocol.SparseKernel`), on any device torch.sparse runs on."""

    def copy(self, src, dst) -> None:  # noqa: ANN001
        dst.copy_(src)

    def forward(self, x, values, bias, layout, stride: int, pad: int, out) -> None:  # noqa: ANN001
        c_out, h_out, w_out, _ = out.shape
        padded = F.pad(x.float(), (0, 0, pad, pad, pad, pad))  # [Ci, H + 2p, W + 2p, N]
        out.copy_(bias.view(-1, 1, 1, 1).expand_as(out))
        flat = out.view(c_out, -1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            for a, b, taps, crow, col in _offsets(layout):
                weight = torch.sparse_csr_tensor(crow, col, values[taps], (c_out, layout.shape[1]))
                flat += torch.sparse.mm(weight, _window(padded, a, b, stride, h_out, w_out).reshape(x.shape[0], -1))

    def input_grad(self, grad_out, values, layout, stride: int, pad: int, grad_in) -> None:  # noqa: ANN001
        c_in, h_in, w_in, batch = grad_in.shape
        c_out, h_out, w_out, _ = grad_out.shape
        padded = grad_in.new_zeros(c_in, h_in + 2 * pad, w_in + 2 * pad, batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for a, b, taps, crow, col in _offsets(layout):
                weight = torch.sparse_csr_tensor(crow, col, values[taps], (c_out, c_in))
                part = torch.sparse.mm(weight.t(), grad_out.reshape(c_out, -1))
                _window(padded, a, b, stride, h_out, w_out).add_(part.view(c_in, h_out, w_out, batch))
        grad_in.copy_(padded[:, pad:pad + h_in, pad:pad + w_in, :])

    def weight_grad(self, grad_out, x, layout, stride: int, pad: int) -> torch.Tensor:  # noqa: ANN001
        c_out, h_out, w_out, _ = grad_out.shape
        padded = F.pad(x.float(), (0, 0, pad, pad, pad, pad))
        grad_values = torch.zeros(layout.nnz, dtype=torch.float32, device=grad_out.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for a, b, taps, crow, col in _offsets(layout):
                zeros = torch.zeros(taps.numel(), device=taps.device)
                pattern = torch.sparse_csr_tensor(crow, col, zeros, (c_out, layout.shape[1]))
                window = _window(padded, a, b, stride, h_out, w_out).reshape(x.shape[0], -1)
                sampled = torch.sparse.sampled_addmm(pattern, grad_out.reshape(c_out, -1), window.t())
                grad_values[taps] = sampled.values()
        return grad_values
