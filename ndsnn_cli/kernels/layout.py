"""A layer's sparse layout: its active weights ("taps") as index tensors, built once per mask update.

Taps are listed in row order (by output channel, then input channel, kh, kw: CSR with `rowptr`) and,
through the permutation `by_input`, in column order (by input channel: CSC with `colptr`) for the
transposed product of the input gradient. Values are not stored: they change every step and are
gathered from the weight at each forward (`values`), so only a mask update rebuilds a layout. All
fields are torch tensors on the mask's device (the layer's), so a kernel for any device reads them
in place (the numba kernel takes zero-copy numpy views of the CPU ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def dense_memory_format(t: torch.Tensor) -> torch.memory_format | None:
    """t's memory format when its memory is dense in it (contiguous, or channels-last 4-D), else None."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def memory_order(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's values in memory order, as a 1-D view: one index then addresses the same element
    of tensors laid out alike (a weight, its gradient and its momentum; a map and its T-fold batch)."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


@dataclass(frozen=True)
class TapLayout:
    shape: tuple[int, int, int, int]     # (out, in, kh, kw); a linear weight is (out, in, 1, 1)
    index: tuple[torch.Tensor, ...]      # per weight dim, the taps' coordinates (row order), int64
    rowptr: torch.Tensor                 # int64 [out + 1], taps of output channel o: rowptr[o]:rowptr[o+1]
    tap_out: torch.Tensor                # int32 [nnz], row order
    tap_in: torch.Tensor
    tap_kh: torch.Tensor
    tap_kw: torch.Tensor
    by_input: torch.Tensor               # int64 [nnz]: column order -> row order
    colptr: torch.Tensor                 # int64 [in + 1]
    col_out: torch.Tensor                # int32 [nnz], column order
    col_kh: torch.Tensor
    col_kw: torch.Tensor

    @property
    def nnz(self) -> int:
        return int(self.tap_out.shape[0])

    @property
    def density(self) -> float:
        return self.nnz / max(1, math.prod(self.shape))

    @property
    def device(self) -> torch.device:
        return self.tap_out.device

    def values(self, weight: torch.Tensor) -> torch.Tensor:
        """The active weights in row order, fp32 contiguous [nnz] (a gather: no dense copy)."""
        return weight.detach()[self.index].float().contiguous()


def _pointers(channel: torch.Tensor, count: int) -> torch.Tensor:
    pointers = torch.zeros(count + 1, dtype=torch.int64, device=channel.device)
    pointers[1:] = torch.bincount(channel, minlength=count).cumsum(0)
    return pointers


def build_layout(mask: torch.Tensor) -> TapLayout:
    """The layout of a conv ([out, in, kh, kw]) or linear ([out, in]) mask, on the mask's device;
    positions, not `!= 0`."""
    mask = mask.detach().to(torch.bool)
    index = tuple(mask.nonzero().unbind(1))           # row-major order: sorted by output channel
    shape4 = tuple(mask.shape) + (1,) * (4 - mask.dim())
    coords = list(index) + [torch.zeros_like(index[0])] * (4 - mask.dim())
    out_ch, in_ch, kh, kw = coords
    by_input = torch.argsort(in_ch, stable=True)       # within an input channel, still by output channel
    i32 = torch.int32
    return TapLayout(
        shape=shape4, index=index, rowptr=_pointers(out_ch, shape4[0]),
        tap_out=out_ch.to(i32), tap_in=in_ch.to(i32), tap_kh=kh.to(i32), tap_kw=kw.to(i32),
        by_input=by_input, colptr=_pointers(in_ch, shape4[1]),
        col_out=out_ch[by_input].to(i32), col_kh=kh[by_input].to(i32), col_kw=kw[by_input].to(i32),
    )
