"""Images for a deployed model, read as a device has them (DESIGN §6, input contract): PNG/JPEG files, or
a .npy / .pt tensor of float pixels in [0, 1] or uint8, NCHW (one image may drop the batch axis).

The model normalises inside (ONNX ops; the CSR runtime applies the artefact's `input`), so nothing
here applies a mean or std; it only brings pixels to float [0, 1] and checks them against the contract.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ndsnn_cli.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TENSOR_SUFFIXES = (".npy", ".pt")


def read_images(path: Path, contract: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images [B, C, H, W] float in [0, 1], labels or None) from one file; every mismatch with the
    contract (shape, range, dtype) is a one-line UserError."""
    if not path.is_file():
        raise UserError(f"{path}: input file not found")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        images, labels = _decode_image(path, contract["shape"][0]), None
    elif suffix == ".npy":
        images, labels = _read_npy(path), None
    elif suffix == ".pt":
        images, labels = _read_pt(path)
    else:
        raise UserError(f"{path}: input must be {', '.join(IMAGE_SUFFIXES + TENSOR_SUFFIXES)}")
    return _to_contract(path, images, contract), _check_labels(path, labels, images.shape[0])


def _decode_image(path: Path, channels: int) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image, read_file

    mode = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}.get(channels)
    if mode is None:
        raise UserError(f"{path}: the model takes {channels}-channel images; give them as a .npy or .pt tensor")
    try:
        return decode_image(read_file(str(path)), mode=mode)  # uint8 [C, H, W]
    except RuntimeError as exc:
        raise UserError(f"{path}: not a readable image ({str(exc).splitlines()[0][:80]})") from None


def _read_npy(path: Path) -> torch.Tensor:
    import numpy as np

    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"{path}: not a readable .npy array ({type(exc).__name__})") from None
    if array.dtype not in (np.uint8, np.float16, np.float32, np.float64):
        raise UserError(f"{path}: dtype {array.dtype} must be uint8 or float pixels in [0, 1]")
    return torch.from_numpy(np.ascontiguousarray(array))


def _read_pt(path: Path) -> tuple[Any, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of many kinds
        raise UserError(f"{path}: not a readable tensor file ({type(exc).__name__})") from None
    if isinstance(obj, dict):
        if "images" not in obj:
            raise UserError(f"{path}: dict input needs an 'images' key")
        return obj["images"], obj.get("labels")
    return obj, None


def _to_contract(path: Path, images: Any, contract: dict[str, Any]) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise UserError(f"{path}: images must be a tensor, not {type(images).__name__}")
    if images.dim() == 3:
        images = images.unsqueeze(0)  # one image
    expected = list(contract["shape"])
    if images.dim() != 4 or list(images.shape[1:]) != expected:
        raise UserError(f"{path}: images of shape {list(images.shape)} must be [B, {', '.join(map(str, expected))}] "
                        f"({contract['layout']})")
    if images.dtype == torch.uint8:
        return images.float() / 255
    if not images.is_floating_point():
        raise UserError(f"{path}: dtype {images.dtype} must be uint8 or float pixels in [0, 1]")
    images = images.float()
    low, high = contract["range"]
    if images.numel() and not (bool(torch.isfinite(images).all()) and low <= float(images.min())
                               and float(images.max()) <= high):
        raise UserError(f"{path}: pixels must be in [{low:g}, {high:g}] (found {float(images.min()):.3g}.."
                        f"{float(images.max()):.3g}); give raw pixels: the model normalises inside")
    return images


def _check_labels(path: Path, labels: Any, count: int) -> torch.Tensor | None:
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor) or labels.shape != (count,) or labels.is_floating_point():
        raise UserError(f"{path}: labels must be an integer tensor of shape [{count}]")
    return labels.to(torch.int64)
