"""A layer's sparse layout: its active weights ("taps") as index arrays, built once per mask update.

Taps are listed in row order (by output channel, then input channel, kh, kw: CSR with `rowptr`) and,
through the permutation `by_input`, in column order (by input channel: CSC with `colptr`) for the
transposed product of the input gradient. Values are not stored: they change every step and are
gathered from the weight at each forward (`values`), so only a mask update rebuilds a layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TapLayout:
    shape: tuple[int, int, int, int]     # (out, in, kh, kw); a linear weight is (out, in, 1, 1)
    index: tuple[torch.Tensor, ...]      # per weight dim, the taps' coordinates (row order), int64
    rowptr: np.ndarray                   # [out + 1], taps of output channel o: rowptr[o]:rowptr[o+1]
    tap_out: np.ndarray                  # int32 [nnz], row order
    tap_in: np.ndarray
    tap_kh: np.ndarray
    tap_kw: np.ndarray
    by_input: torch.Tensor               # int64 [nnz]: column order -> row order
    colptr: np.ndarray                   # [in + 1]
    col_out: np.ndarray                  # int32 [nnz], column order
    col_kh: np.ndarray
    col_kw: np.ndarray

    @property
    def nnz(self) -> int:
        return int(self.tap_out.shape[0])

    @property
    def density(self) -> float:
        return self.nnz / max(1, int(np.prod(self.shape)))

    def values(self, weight: torch.Tensor) -> torch.Tensor:
        """The active weights in row order, fp32 contiguous [nnz] (a gather: no dense copy)."""
        return weight.detach()[self.index].float().contiguous()


def _pointers(channel: torch.Tensor, count: int) -> np.ndarray:
    pointers = torch.zeros(count + 1, dtype=torch.int64)
    pointers[1:] = torch.bincount(channel, minlength=count).cumsum(0)
    return pointers.numpy()


def _int32(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.int32).numpy()


def build_layout(mask: torch.Tensor) -> TapLayout:
    """The layout of a conv ([out, in, kh, kw]) or linear ([out, in]) mask; positions, not `!= 0`."""
    mask = mask.detach().to("cpu", torch.bool)
    index = tuple(mask.nonzero().unbind(1))           # row-major order: sorted by output channel
    shape4 = tuple(mask.shape) + (1,) * (4 - mask.dim())
    coords = list(index) + [torch.zeros_like(index[0])] * (4 - mask.dim())
    out_ch, in_ch, kh, kw = coords
    by_input = torch.argsort(in_ch, stable=True)       # within an input channel, still by output channel
    return TapLayout(
        shape=shape4, index=index, rowptr=_pointers(out_ch, shape4[0]),
        tap_out=_int32(out_ch), tap_in=_int32(in_ch), tap_kh=_int32(kh), tap_kw=_int32(kw),
        by_input=by_input, colptr=_pointers(in_ch, shape4[1]),
        col_out=_int32(out_ch[by_input]), col_kh=_int32(kh[by_input]), col_kw=_int32(kw[by_input]),
    )
