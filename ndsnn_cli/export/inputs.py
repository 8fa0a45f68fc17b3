"""Images for a deployed model, read as a device has them (DESIGN §6, input contract): PNG/JPEG files, or
a .npy / .pt tensor of float pixels in [0, 1] or uint8, NCHW (one image may drop the batch axis).

The model normalises inside (ONNX ops; the CSR runtime applies the artefact's `input`), so nothing
here applies a mean or std; it only brings pixels to float [0, 1] and checks them against the contract.

Input files are untrusted and small files can claim large contents, so each is bounded before it is
decoded: an image's header (width, height) is read and compared with the contract before any pixel is
(a 630-byte JPEG may claim 65500 x 65500 pixels); a .npy header's shape and dtype must match the contract
and the file's size; a .pt file must be torch.save's zip of stored (uncompressed) entries, and its tensors
dense and contiguous (a stride-0 tensor of 4 bytes may claim 12 GB).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ndsnn_cli import limits as L
from ndsnn_cli.errors import UserError
from ndsnn_cli.formats.text import is_regular_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TENSOR_SUFFIXES = (".npy", ".pt")
PIXEL_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)


def read_images(path: Path, contract: dict[str, Any],
                num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images [B, C, H, W] float in [0, 1], labels or None) from one file; every mismatch with the
    contract (shape, range, dtype; labels in [0, num_classes) when given) is a one-line UserError."""
    if not path.exists():
        raise UserError(f"{path}: input file not found")
    if not is_regular_file(path):
        raise UserError(f"{path}: input must be a regular file")
    suffix = path.suffix.lower()
    limit = L.MAX_IMAGE_FILE_BYTES if suffix in IMAGE_SUFFIXES else L.MAX_TENSOR_FILE_BYTES
    if path.stat().st_size > limit:
        raise UserError(f"{path}: {path.stat().st_size:,} bytes: more than the {limit:,} an input file may have")
    if suffix in IMAGE_SUFFIXES:
        images, labels = _decode_image(path, contract["shape"]), None
    elif suffix == ".npy":
        images, labels = _read_npy(path, contract["shape"]), None
    elif suffix == ".pt":
        images, labels = _read_pt(path)
    else:
        raise UserError(f"{path}: input must be {', '.join(IMAGE_SUFFIXES + TENSOR_SUFFIXES)}")
    return _to_contract(path, images, contract), _check_labels(path, labels, images.shape[0], num_classes)


def _decode_image(path: Path, shape: list[int]) -> torch.Tensor:
    """uint8 [C, H, W]. The header is read first (Pillow opens lazily) and its size compared with the contract;
    only then are the pixels decoded, by torchvision (libpng/libjpeg refuse data that ends early, which
    Pillow fills with zeros), with the libraries' own messages on stderr dropped: the refusal is one line."""
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image, read_file

    channels, height, width = shape
    mode = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}.get(channels)
    if mode is None:
        raise UserError(f"{path}: the model takes {channels}-channel images; give them as a .npy or .pt tensor")
    bomb_limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # Pillow's own pixel bound warns or raises; the exact size check below decides
        with Image.open(path, formats=["PNG", "JPEG"]) as image:
            size = image.size
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ... on a broken header
        raise UserError(f"{path}: not a readable image ({_reason(exc)})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = bomb_limit
    if size != (width, height):
        raise UserError(f"{path}: image of {size[0]} x {size[1]} pixels (its header) must be {width} x {height}, "
                        "the model's input")
    try:
        with _native_stderr_dropped():
            pixels = decode_image(read_file(str(path)), mode=mode)
    except RuntimeError as exc:
        raise UserError(f"{path}: not a readable image ({_reason(exc)})") from None
    if list(pixels.shape) != [channels, height, width]:  # a file whose header and data disagree
        raise UserError(f"{path}: decoded {list(pixels.shape)}, not the {[channels, height, width]} its header says")
    return pixels


def _reason(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__


@contextlib.contextmanager
def _native_stderr_dropped() -> Iterator[None]:
    """File descriptor 2 points at /dev/null meanwhile: C libraries (libpng) print there, not via sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _read_npy(path: Path, shape: list[int]) -> torch.Tensor:
    """The header (shape, dtype) is read first and must match the contract and the file's size."""
    import numpy as np

    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(version,
                                                                             np.lib.format.read_array_header_2_0)
            dims, fortran, dtype = read_header(handle)
            offset = handle.tell()
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise UserError(f"{path}: not a readable .npy array ({type(exc).__name__})") from None
    if dtype not in (np.uint8, np.float16, np.float32, np.float64):
        raise UserError(f"{path}: dtype {dtype} must be uint8 or float pixels in [0, 1]")
    _check_image_shape(path, list(dims), shape)
    if math.prod(dims) * dtype.itemsize != path.stat().st_size - offset:
        raise UserError(f"{path}: header claims shape {list(dims)} of {dtype} ({math.prod(dims) * dtype.itemsize:,} "
                        f"bytes), but the file holds {path.stat().st_size - offset:,}")
    array = np.load(path, allow_pickle=False)
    return torch.from_numpy(np.ascontiguousarray(array))


def _read_pt(path: Path) -> tuple[Any, Any]:
    _check_pt_zip(path)
    try:
        with warnings.catch_warnings():  # e.g. "validating sparse tensor invariants": the checks below decide
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of many kinds
        raise UserError(f"{path}: not a readable tensor file ({type(exc).__name__})") from None
    if isinstance(obj, dict):
        if "images" not in obj:
            raise UserError(f"{path}: dict input needs an 'images' key")
        images, labels = obj["images"], obj.get("labels")
    else:
        images, labels = obj, None
    for what, tensor in (("images", images), ("labels", labels)):
        if isinstance(tensor, torch.Tensor):
            _check_dense(path, what, tensor)
    return images, labels


def _check_pt_zip(path: Path) -> None:
    """torch.save's format: a zip whose entries are stored, not compressed, so no entry holds more bytes
    than the file; the legacy (pre-1.6) format is refused, its storages declare their own sizes."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise UserError(f"{path}: not a readable tensor file (a .pt input is torch.save's zip format)") from None
    if any(e.compress_type != zipfile.ZIP_STORED for e in entries) or \
            sum(e.file_size for e in entries) > path.stat().st_size:
        raise UserError(f"{path}: compressed or oversized entries: torch.save stores its tensors uncompressed")


def _check_dense(path: Path, what: str, tensor: torch.Tensor) -> None:
    """A plain tensor whose elements each have their own memory: strided, contiguous, within its storage."""
    if tensor.layout != torch.strided or not tensor.is_contiguous() or \
            tensor.untyped_storage().nbytes() < tensor.numel() * tensor.element_size():
        raise UserError(f"{path}: {what} must be a dense, contiguous tensor (layout {tensor.layout}, strides "
                        f"{list(tensor.stride()) if tensor.layout == torch.strided else '-'}); save "
                        "tensor.contiguous()")


def _check_image_shape(path: Path, dims: list[int], expected: list[int]) -> None:
    if len(dims) not in (3, 4) or dims[-3:] != list(expected) or (len(dims) == 4 and dims[0] > L.MAX_SAMPLES):
        raise UserError(f"{path}: images of shape {dims} must be [B, {', '.join(map(str, expected))}] (NCHW)")


def _to_contract(path: Path, images: Any, contract: dict[str, Any]) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise UserError(f"{path}: images must be a tensor, not {type(images).__name__}")
    if images.dtype not in PIXEL_DTYPES:
        raise UserError(f"{path}: dtype {images.dtype} must be uint8 or float pixels in [0, 1]")
    _check_image_shape(path, list(images.shape), list(contract["shape"]))
    if images.dim() == 3:
        images = images.unsqueeze(0)  # one image
    if images.dtype == torch.uint8:
        return images.float() / 255
    images = images.float()
    low, high = contract["range"]
    if images.numel() and not (bool(torch.isfinite(images).all()) and low <= float(images.min())
                               and float(images.max()) <= high):
        raise UserError(f"{path}: pixels must be in [{low:g}, {high:g}] (found {float(images.min()):.3g}.."
                        f"{float(images.max()):.3g}); give raw pixels: the model normalises inside")
    return images


def _check_labels(path: Path, labels: Any, count: int, num_classes: int | None) -> torch.Tensor | None:
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor) or labels.shape != (count,) or labels.is_floating_point() or \
            labels.is_complex() or labels.dtype == torch.bool:
        raise UserError(f"{path}: labels must be an integer tensor of shape [{count}]")
    labels = labels.to(torch.int64)
    if num_classes is not None and count and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
        raise UserError(f"{path}: labels must be class indices in [0, {num_classes}) (found {int(labels.min())}.."
                        f"{int(labels.max())})")
    return labels
