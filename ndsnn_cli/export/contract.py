"""The input contract's normalisation, computed in one place for every target (DESIGN §6): a deployed
model takes float pixels in [0, 1], NCHW, and applies the training normalisation `(x - mean) / std` per
channel itself: the reference runtime and the C verification call `normalise`, the ONNX graph holds
`normalisation`'s two tensors as its Sub/Div constants, and the C code is generated from the same numbers.

torch only (no training code): the reference runtime imports it.
"""

from __future__ import annotations

from typing import Any

import torch


def normalisation(contract: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) as float32 [1, C, 1, 1] tensors from a contract's per-channel lists."""
    mean = torch.tensor(contract["mean"], dtype=torch.float32).reshape(1, -1, 1, 1)
    std = torch.tensor(contract["std"], dtype=torch.float32).reshape(1, -1, 1, 1)
    return mean, std


def normalise(images: torch.Tensor, contract: dict[str, Any]) -> torch.Tensor:
    """Pixels in [0, 1] -> the model's input: subtract, then divide, in float32 (the two roundings of
    torchvision's `Normalize` in training, of the ONNX graph's Sub/Div and of the C code)."""
    mean, std = normalisation(contract)
    return (images.float() - mean) / std
