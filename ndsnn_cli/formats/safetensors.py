"""The safetensors container (checkpoints and CSR artefacts): its header read and checked before any data.

Layout: 8 bytes little-endian N, N bytes of JSON header (`{tensor: {dtype, shape, data_offsets}, ...,
"__metadata__": {str: str}}`), then the data. `read_header` reads the 8 bytes and the header only,
bounded by `limits.MAX_HEADER_BYTES`, and checks that the header's tensors tile the data exactly to the
end of the file, so a 3 GB file whose first 8 bytes are garbage, or whose header describes less data than
the file holds, is refused after reading a few bytes, not after reading it whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ndsnn_cli import limits as L
from ndsnn_cli.formats.text import TextError, parse_json, regular_file_size

MAX_DIMS = 8


@dataclass(frozen=True)
class Header:
    tensors: dict[str, dict[str, Any]]  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict[str, str]  # `__metadata__`: strings only
    data_bytes: int  # what follows the header
    file_bytes: int


def read_header(path: str | os.PathLike[str]) -> Header:
    """The checked header of a safetensors file; a `TextError` naming the broken rule otherwise."""
    size = regular_file_size(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise TextError(f"{len(head)} bytes: shorter than the 8-byte header length")
        length = int.from_bytes(head, "little")
        if length > L.MAX_HEADER_BYTES:
            raise TextError(f"a header of {length:,} bytes exceeds the {L.MAX_HEADER_BYTES:,} a header may have")
        if not 2 <= length <= size - 8:
            raise TextError(f"header length {length:,} runs past the end of the file ({size:,} bytes)")
        text = handle.read(length)
    try:
        raw = parse_json(text, L.MAX_HEADER_BYTES)
    except TextError as exc:
        raise TextError(f"header: {exc}") from None
    tensors, metadata = _check_entries(raw, size - 8 - length)
    return Header(tensors, metadata, size - 8 - length, size)


def _check_entries(raw: Any, data_bytes: int) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    if not isinstance(raw, dict):
        raise TextError("header: not a JSON object")
    metadata = raw.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise TextError("header: __metadata__ must map names to strings")
    tensors = {k: v for k, v in raw.items() if k != "__metadata__"}
    end = 0
    for name, entry in tensors.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and _is_shape(entry.get("shape"))
                and _is_span(entry.get("data_offsets"))):
            raise TextError(f"header: tensor {name!r:.60} needs a dtype, a shape of at most {MAX_DIMS} sizes "
                            "and data_offsets [begin, end]")
        end = max(end, entry["data_offsets"][1])
    if end != data_bytes:
        raise TextError(f"the header's tensors end at byte {end:,} of the data, but the file holds {data_bytes:,}")
    return tensors, metadata


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and len(value) <= MAX_DIMS and all(
        isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= L.MAX_SAFETENSORS_BYTES for s in value)


def _is_span(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                for v in value) and 0 <= value[0] <= value[1])


def format_of(path: Path) -> str | None:
    """The `format` entry of a file's `__metadata__` (None when it has none), from the header alone."""
    return read_header(path).metadata.get("format")
