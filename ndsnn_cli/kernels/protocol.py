"""What a sparse kernel implements: the interface `execution` calls, one class per kernel module.

Feature maps are batch-last `[C, H, W, N]` tensors (a linear layer's are `[F, 1, 1, N]`) on a device the
kernel's registry entry lists, fp32 (inputs may be uint8 spike maps); the layout is a `TapLayout` on the
same device. Results are written into buffers the caller allocated on the input's device, so a kernel
allocates nothing but the weight gradient's values.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ndsnn_cli.kernels.layout import TapLayout


@runtime_checkable
class SparseKernel(Protocol):
    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """`dst.copy_(src)` for `[C, P, N]` views of any strides (the layout transposes), cast to dst's dtype."""

    def forward(self, x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, layout: TapLayout,
                stride: int, pad: int, out: torch.Tensor) -> None:
        """out `[Co, Ho, Wo, N]` = bias + the sparse conv of x `[Ci, H, W, N]` at the taps' `values` (row order)."""

    def input_grad(self, grad_out: torch.Tensor, values: torch.Tensor, layout: TapLayout, stride: int, pad: int,
                   grad_in: torch.Tensor) -> None:
        """grad_in `[Ci, H, W, N]` = the transposed sparse conv of grad_out `[Co, Ho, Wo, N]`."""

    def weight_grad(self, grad_out: torch.Tensor, x: torch.Tensor, layout: TapLayout, stride: int,
                    pad: int) -> torch.Tensor:
        """The weight gradient at the taps only: fp32 `[nnz]`, row order."""
