"""The `ndsnn-csr` artefact: sparse weights as CSR arrays in a safetensors file, everything else plain.

Per sparse parameter P (its 2-D view `[out, in*kh*kw]`): `P.crow_indices` (int32, int64 if nnz does
not fit), the column indices, `P.values`, `P.shape` (int64, the original shape). Positions come from
the checkpoint's mask, so a grown weight that is exactly zero is kept.

Positions are stored one of three ways, whichever is smallest for that parameter: `P.crow_indices` with
`P.col_indices` (int16 when cols < 32768, else int32; the arrays then go unchanged into
`scipy.sparse.csr_matrix((values, col, crow), shape)` or `torch.sparse_csr_tensor`) or with `P.col_gaps`
(version 3), a uint8 stream of within-row gaps decoded sequentially (`encode_gaps`): per stored weight,
the gap `col - prev - 1` (prev = -1 at the start of each row) written as n bytes 255 ("add 255, read on")
and one byte 0..254; or `P.flat_gaps` alone (version 4): the same code over the row-major positions
`row * cols + col` of the whole matrix (prev = -1 once), so no row pointers are stored at all.
`decoded(parts)` gives the plain arrays.

Values are fp32, fp16, bf16, or int8 with `P.scales` (one per output row: `scale = max|w| / 127` rounded to
bfloat16, `q = round(w / scale)`, clipped to ±127; `quantise_rows`, shared with the C target), stored as
bf16 (version 4; fp32 before, still read). Readers dequantise once (`w = scale * q`).

This module imports no training code: the runtime reads artefacts through it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ndsnn_cli import limits as L
from ndsnn_cli.checkpoint import read_safetensors, save_safetensors_canonical
from ndsnn_cli.errors import UserError
from ndsnn_cli.export.exporters import ExportOptions, ExportResult
from ndsnn_cli.formats.csr import (
    COL_INT16_BELOW,
    CSR_FORMAT,
    CSR_VERSION,
    GAP_ESCAPE,
    INDEX_ENCODINGS,
    JSON_KEYS,
    VALUE_DTYPES,
    dense_dtype,
    flat_positions,
    gap_columns,
    split_parameters,
)
from ndsnn_cli.formats.text import TextError, parse_json
from ndsnn_cli.validate import check_artefact


def to_csr(weight: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype,
           indices: str = "auto") -> dict[str, torch.Tensor]:
    """CSR arrays of `weight`'s 2-D view at the mask's positions (not at weight != 0). `dtype` int8 adds
    per-row `scales`; `indices` is "plain" (col_indices), "gaps" (col_gaps), "auto" (the smaller of the
    two, with crow_indices) or "flat" (flat_gaps alone)."""
    if indices not in INDEX_ENCODINGS:
        raise UserError(f"indices {indices!r}: must be one of {', '.join(INDEX_ENCODINGS)}")
    rows = weight.shape[0]
    mask2d = mask.reshape(rows, -1).to(torch.bool)
    cols = mask2d.shape[1]
    nnz = int(mask2d.sum())
    index_dtype = torch.int32 if nnz < 2**31 else torch.int64
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = mask2d.sum(1).cumsum(0)
    col = mask2d.nonzero()[:, 1]  # row-major order: sorted by row, then column
    if indices == "flat":
        flat = col + torch.repeat_interleave(torch.arange(rows), crow[1:] - crow[:-1]) * cols
        parts = {"flat_gaps": encode_gaps(torch.tensor([0, nnz]), flat)}
    else:
        parts = {"crow_indices": crow.to(index_dtype)}
        plain = col.to(torch.int16 if cols < COL_INT16_BELOW else torch.int32)
        gaps = encode_gaps(crow, col) if indices != "plain" else None
        if gaps is not None and (indices == "gaps" or gaps.nbytes < plain.nbytes):
            parts["col_gaps"] = gaps
        else:
            parts["col_indices"] = plain
    values = weight.detach().reshape(rows, -1)[mask2d]
    if dtype == torch.int8:
        scales, quantised = quantise_rows(values.float().numpy(), crow.numpy())
        parts["values"], parts["scales"] = torch.from_numpy(quantised), torch.from_numpy(scales)
    else:
        parts["values"] = values.to(dtype).contiguous()
    parts["shape"] = torch.tensor(list(weight.shape), dtype=torch.int64)
    return parts


def encode_gaps(crow: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """The uint8 gap stream of sorted CSR columns: per entry, gap = col - prev - 1 (prev = -1 at each row
    start) as gap // 255 bytes 255 and one byte gap % 255. A C loop decodes it with one pointer."""
    crow, col = crow.to(torch.int64), col.to(torch.int64)
    prev = torch.cat([torch.tensor([-1]), col[:-1]]) if col.numel() else col
    starts = crow[:-1][crow[1:] > crow[:-1]]  # first entry of every non-empty row
    prev[starts] = -1
    gap = col - prev - 1
    lengths = gap // GAP_ESCAPE + 1  # escape bytes + the final byte
    stream = torch.full((int(lengths.sum()),), GAP_ESCAPE, dtype=torch.uint8)
    stream[lengths.cumsum(0) - 1] = (gap % GAP_ESCAPE).to(torch.uint8)
    return stream


def quantise_rows(values: np.ndarray, row_ptr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output row: scale = max|w| / 127 rounded to the nearest bfloat16 (1 for an empty or
    all-zero row), q = round(w / scale). The one quantiser of every target (CSR artefact and C). bfloat16
    keeps fp32's range and 8 significant bits: a scale costs 2 bytes, the row's step is at most 2^-8 off
    max|w| / 127, so its largest weight still quantises to +-127 (127 (1 +- 2^-8) rounds to 127) and every
    weight stays within half a step."""
    rows = len(row_ptr) - 1
    peaks = np.zeros(rows, dtype=np.float32)
    for row in range(rows):
        part = values[row_ptr[row]:row_ptr[row + 1]]
        peaks[row] = np.abs(part).max() if len(part) else 0.0
    scales = torch.from_numpy(peaks / np.float32(127.0)).to(torch.bfloat16).float().numpy()
    scales[peaks == 0] = 1.0
    quantised = np.zeros(len(values), dtype=np.int8)
    for row in range(rows):
        part = values[row_ptr[row]:row_ptr[row + 1]]
        if peaks[row] > 0:
            quantised[row_ptr[row]:row_ptr[row + 1]] = np.clip(np.rint(part / scales[row]), -127, 127)
    return scales, quantised


def decoded(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain CSR arrays of validated parts: crow and col as int64, values as float32 (int8 dequantised once:
    scale * q), shape. Only for parts `check_csr` accepted: the gap streams are trusted here."""
    if "flat_gaps" in parts:
        rows, cols = int(parts["shape"][0]), math.prod(int(s) for s in parts["shape"][1:])
        flat = flat_positions(parts["flat_gaps"])
        crow = torch.zeros(rows + 1, dtype=torch.int64)
        crow[1:] = torch.bincount(flat // cols, minlength=rows).cumsum(0)
        col = flat % cols
    else:
        crow = parts["crow_indices"].to(torch.int64)
        col = gap_columns(parts["col_gaps"], crow) if "col_gaps" in parts else parts["col_indices"].to(torch.int64)
    counts = crow[1:] - crow[:-1]
    values = parts["values"].float()
    if "scales" in parts:
        values = values * torch.repeat_interleave(parts["scales"].float(), counts)
    return {"crow_indices": crow, "col_indices": col, "values": values, "shape": parts["shape"]}


def from_csr(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense tensor (original shape) of one parameter's CSR arrays (int8 dequantised to float32)."""
    shape = [int(s) for s in parts["shape"]]
    rows = shape[0]
    cols = math.prod(shape[1:])
    plain = decoded(parts) if {"col_gaps", "flat_gaps", "scales"} & set(parts) else parts
    crow = plain["crow_indices"].to(torch.int64)
    dense = torch.zeros(rows, cols, dtype=plain["values"].dtype)
    row_of = torch.repeat_interleave(torch.arange(rows), crow[1:] - crow[:-1])
    dense[row_of, plain["col_indices"].to(torch.int64)] = plain["values"]
    return dense.reshape(shape)


def pack(state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], metadata: dict[str, Any],
         dtype: str = "fp32", indices: str = "auto") -> bytes:
    """The artefact's bytes: masked params as CSR, other floating tensors cast to `dtype` (fp32 for int8),
    all else as is."""
    target, plain_target = VALUE_DTYPES[dtype], dense_dtype(dtype)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name in masks:
            parts = _artefact_parts(tensor, masks[name], target, indices)
            tensors.update({f"{name}.{part}": t.to(torch.bfloat16) if part == "scales" else t
                            for part, t in parts.items()})  # scales are bf16 values (quantise_rows): lossless
        else:
            tensors[name] = (tensor.to(plain_target) if tensor.is_floating_point() else tensor).contiguous()
    header = {"format": CSR_FORMAT, "dtype": dtype, **metadata, "version": CSR_VERSION}
    strings = {k: json.dumps(v) if k in JSON_KEYS else str(v) for k, v in header.items()}
    return save_safetensors_canonical(tensors, strings)


def _artefact_parts(weight: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype,
                    indices: str) -> dict[str, torch.Tensor]:
    """`to_csr`'s parts for the artefact: for "auto", the smaller of the row-wise choice and flat gaps."""
    if indices != "auto":
        return to_csr(weight, mask, dtype, indices)
    candidates = [to_csr(weight, mask, dtype, "auto"), to_csr(weight, mask, dtype, "flat")]
    return min(candidates, key=lambda parts: sum(t.nbytes for t in parts.values()))


def load_raw(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The artefact's tensors as stored (CSR parts separate) and its decoded metadata, validated
    (`ndsnn_cli.validate.check_artefact`) before any caller sees them."""
    tensors, strings = read_safetensors(path, "artefact")
    if strings.get("format") != CSR_FORMAT:
        raise UserError(f"{path}: not an {CSR_FORMAT} artefact (format is {strings.get('format')!r})")
    try:
        metadata = {k: parse_json(v, L.MAX_HEADER_BYTES) if k in JSON_KEYS else v for k, v in strings.items()}
    except TextError as exc:
        raise UserError(f"{path}: corrupt artefact metadata ({exc})") from None
    check_artefact(path, tensors, metadata)
    if "input" not in metadata:
        metadata["input"] = _v1_input_contract(path, metadata["dataset"])
    return tensors, metadata


def _v1_input_contract(path: str | Path, dataset: dict[str, Any]) -> dict[str, Any]:
    """Version 1 did not state the input contract: the catalog's, for its data set, is what training applied."""
    from ndsnn_cli.data import DATASETS, input_contract

    if dataset.get("name") not in DATASETS:
        raise UserError(f"{path}: dataset.name: {dataset.get('name')!r:.40} is unknown, and a version-1 artefact "
                        "states no input contract")
    return input_contract(dataset["name"])


def split_csr(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(sparse params: name -> CSR parts, plain tensors)."""
    return split_parameters(tensors)


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict with every sparse param rebuilt dense, metadata): the exact stored tensors."""
    tensors, metadata = load_raw(path)
    sparse, plain = split_csr(tensors)
    state = dict(plain)
    for name, parts in sparse.items():
        state[name] = from_csr(parts)
    return state, metadata


def export_csr(source: str | Path, out: str | Path | None = None, *, dtype: str = "fp32",
               fold_bn: bool = False, indices: str = "auto") -> tuple[Path, dict[str, Any]]:
    """Checkpoint (or run dir) -> artefact file; returns (path, metadata). `indices` as in `to_csr`."""
    from ndsnn_cli.export.source import load_source, write_checked

    if dtype not in VALUE_DTYPES:
        raise UserError(f"--dtype {dtype}: unknown (known: {', '.join(VALUE_DTYPES)})")
    loaded = load_source(source)
    model = loaded.model(fold_bn=fold_bn)
    metadata = loaded.header(model, bn_folded=fold_bn)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    data = pack(state, loaded.masks, metadata, dtype, indices)
    return write_checked(loaded.output(out, "csr.safetensors"), data), {"format": CSR_FORMAT, "dtype": dtype,
                                                                         **metadata}


def export_result(source: str | Path, out: str | Path | None, options: ExportOptions) -> ExportResult:
    """`export_csr` as the exporter registry's common result."""
    path, meta = export_csr(source, out, dtype=options.dtype, fold_bn=options.fold_bn)
    sparsity, nnz = meta["sparsity"]["sparsity"], meta["sparsity"]["nnz"]
    details = {"bytes": path.stat().st_size, "dtype": options.dtype, "bn_folded": options.fold_bn,
               "sparsity": sparsity, "nnz": nnz, "recipe_sha256": meta["recipe_sha256"]}
    notes = []
    if options.dtype == "int8" and not meta["sparsity"]["layers"]:  # int8 is a value dtype of CSR parameters
        notes.append("int8 applies to sparse (masked) parameters; this run has none, so every tensor stays fp32")
    return ExportResult(path, meta["format"], details, notes=notes,
                        summary=[f"sparsity {sparsity:.4f}, {nnz:,} stored weights, values {options.dtype}"])
