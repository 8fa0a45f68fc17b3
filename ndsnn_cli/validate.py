"""One validator for every file ndsnn reads: checkpoints, CSR artefacts and a run's summary.json.

Files travel (networks, other people's hands, flaky storage), and torch's sparse kernels trust their
indices: a non-monotone `crow_indices` segfaults, a column beyond the width reads out of bounds. So
every reader (`csr.load_raw`, `checkpoint.load_checkpoint`, `cost.run_cost`) runs these checks on the
decoded tensors before anything else touches them. A violation is a `UserError` naming the file, the
tensor (or metadata key) and the rule: one line, exit 2.

Rules are listed in docs/reliability.md with the tests that prove them (tests/test_validate.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from ndsnn_cli import limits as L
from ndsnn_cli.errors import UserError
from ndsnn_cli.formats import checkpoint as ckpt_format
from ndsnn_cli.formats import graph
from ndsnn_cli.formats.csr import (
    COL_INT16_BELOW,
    CROW_DTYPES,
    CSR_FORMAT,
    CSR_PARTS,
    CSR_VERSION,
    FLAT_SINCE_VERSION,
    GAP_ESCAPE,
    GAPS_SINCE_VERSION,
    INT8_MAX,
    VALUE_DTYPES,
    dense_dtype,
    flat_positions,
    gap_columns,
    split_parameters,
)
from ndsnn_cli.formats.text import TextError, parse_json, read_text_file


class InvalidFile(UserError):
    """A file that breaks a rule of its format; the message is `<file>: <tensor or key>: <rule>`."""


def _fail(path: str | Path, where: str, rule: str) -> NoReturn:
    raise InvalidFile(f"{path}: {where}: {rule}")


# ------------------------------------------------------------------------------------------ values


def _int(path: str | Path, key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(path, key, f"must be an integer (got {type(value).__name__})")
    if not lo <= value <= hi:
        _fail(path, key, f"= {value} must be in [{lo}, {hi}]")
    return value


def _number(path: str | Path, key: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        _fail(path, key, f"must be a finite number (got {value!r:.40})")
    if positive and value <= 0:
        _fail(path, key, f"= {value} must be > 0")
    return float(value)


def _dict(path: str | Path, key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        _fail(path, key, f"must be a JSON object (got {type(value).__name__})")
    return value


def _pair(path: str | Path, key: str, value: Any, lo: int) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        _fail(path, key, "must be a list of two integers")
    return _int(path, key, value[0], lo, L.MAX_KERNEL), _int(path, key, value[1], lo, L.MAX_KERNEL)


REAL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what a weight may be stored as


def _finite(path: str | Path, name: str, tensor: torch.Tensor) -> None:
    """Finite values; a floating or complex dtype beyond the four real ones (float8, complex) is refused
    first: torch cannot test float8 for NaN, and a complex weight would silently lose its imaginary part."""
    if (tensor.is_floating_point() or tensor.is_complex()) and tensor.dtype not in REAL_FLOATS:
        _fail(path, name, f"dtype {tensor.dtype} is not one ndsnn reads (float16, bfloat16, float32, float64)")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        _fail(path, name, "holds NaN or inf")


def _variance(path: str | Path, name: str, tensor: torch.Tensor) -> None:
    """A BatchNorm's running variance is >= 0: a negative one gives NaN (or a silently wrong scale) at eval."""
    if name.endswith(".running_var") and tensor.is_floating_point() and bool((tensor < 0).any()):
        _fail(path, name, f"holds a negative variance ({float(tensor.min()):.3g})")


# -------------------------------------------------------------------------------------------- CSR


def check_csr(path: str | Path, name: str, parts: Mapping[str, torch.Tensor], value_dtype: torch.dtype) -> list[int]:
    """The CSR invariants of one parameter; returns its original shape. The named checks run in an order
    where each reads only what the previous ones made safe: presence, shape, dtypes and lengths before
    indexing, index ranges before use. Flat gaps are checked encoded, then as the row pointers and columns
    they decode to."""
    if "flat_gaps" in parts:
        parts = _unflattened(path, name, parts)
    gapped = _csr_parts_present(path, name, parts)
    shape = _csr_shape(path, name, parts["shape"])
    rows, cols = shape[0], math.prod(shape[1:])
    _csr_dtypes(path, name, parts, cols, value_dtype)
    crow64 = _csr_row_pointers(path, name, parts["crow_indices"], parts["values"], rows, shape)
    if gapped:
        col64 = _check_gaps(path, f"{name}.col_gaps", parts["col_gaps"], crow64, cols)
    else:
        col64 = _csr_plain_columns(path, name, parts["col_indices"], crow64, parts["values"])
    _csr_columns_in_rows(path, f"{name}.{'col_gaps' if gapped else 'col_indices'}", col64, crow64, rows, cols)
    _finite(path, f"{name}.values", parts["values"])
    _check_scales(path, name, parts, rows, value_dtype)
    return shape


def _csr_parts_present(path: str | Path, name: str, parts: Mapping[str, torch.Tensor]) -> bool:
    """crow_indices, values, shape and exactly one of col_indices / col_gaps; returns whether gap-coded."""
    for part in ("crow_indices", "values", "shape"):
        if part not in parts:
            _fail(path, f"{name}.{part}", "missing (a CSR parameter has crow_indices, col_indices or col_gaps, "
                                          "values, shape)")
    if ("col_indices" in parts) == ("col_gaps" in parts):
        _fail(path, f"{name}.col_indices", "a CSR parameter has exactly one of col_indices and col_gaps")
    return "col_gaps" in parts


def _csr_shape(path: str | Path, name: str, shape_t: torch.Tensor) -> list[int]:
    """int64, 2 to 5 positive sizes, at most `MAX_TENSOR_NUMEL` elements when rebuilt dense."""
    if shape_t.dtype != torch.int64 or shape_t.dim() != 1 or not 2 <= shape_t.numel() <= 5:
        _fail(path, f"{name}.shape", f"must be int64 of length 2 to 5 (got {shape_t.dtype}, {list(shape_t.shape)})")
    shape = [int(s) for s in shape_t]
    if min(shape) < 1:
        _fail(path, f"{name}.shape", f"= {shape}: every size must be positive")
    rows, cols = shape[0], math.prod(shape[1:])
    if rows * cols > L.MAX_TENSOR_NUMEL:
        _fail(path, f"{name}.shape", f"= {shape}: {rows * cols:,} elements exceed {L.MAX_TENSOR_NUMEL:,}")
    return shape


def _csr_dtypes(path: str | Path, name: str, parts: Mapping[str, torch.Tensor], cols: int,
                value_dtype: torch.dtype) -> None:
    """Every part 1-D; crow int32/int64; columns int16/int32 by width (uint8 gaps); values the file's dtype."""
    for part, tensor in parts.items():
        if part in CSR_PARTS and part != "shape" and tensor.dim() != 1:
            _fail(path, f"{name}.{part}", f"must be 1-D (got shape {list(tensor.shape)})")
    if parts["crow_indices"].dtype not in CROW_DTYPES:
        _fail(path, f"{name}.crow_indices", f"dtype {parts['crow_indices'].dtype} must be int32 or int64")
    gapped = "col_gaps" in parts
    col = parts["col_gaps" if gapped else "col_indices"]
    col_dtype = torch.uint8 if gapped else torch.int16 if cols < COL_INT16_BELOW else torch.int32
    if col.dtype != col_dtype:
        _fail(path, f"{name}.{'col_gaps' if gapped else 'col_indices'}",
              f"dtype {col.dtype} must be {col_dtype} for {cols} columns")
    if parts["values"].dtype != value_dtype:
        _fail(path, f"{name}.values", f"dtype {parts['values'].dtype} must be the artefact's dtype {value_dtype}")


def _csr_row_pointers(path: str | Path, name: str, crow: torch.Tensor, values: torch.Tensor, rows: int,
                      shape: list[int]) -> torch.Tensor:
    """rows + 1 pointers from 0, non-decreasing, ending at len(values); returns them as int64."""
    where = f"{name}.crow_indices"
    if crow.numel() != rows + 1:
        _fail(path, where, f"length {crow.numel()} must be rows + 1 = {rows + 1} (shape {shape})")
    crow64 = crow.to(torch.int64)
    if int(crow64[0]) != 0:
        _fail(path, where, f"crow[0] = {int(crow64[0])} must be 0")
    counts = crow64[1:] - crow64[:-1]
    if bool((counts < 0).any()):
        row = int((counts < 0).nonzero()[0])
        _fail(path, where, f"must be non-decreasing (crow[{row + 1}] < crow[{row}])")
    if not int(crow64[-1]) == values.numel():
        _fail(path, where, f"crow[-1] = {int(crow64[-1])} must equal len(values) = {values.numel()}")
    return crow64


def _csr_plain_columns(path: str | Path, name: str, col: torch.Tensor, crow: torch.Tensor,
                       values: torch.Tensor) -> torch.Tensor:
    """One column index per stored value; returns them as int64."""
    if col.numel() != values.numel():
        _fail(path, f"{name}.crow_indices", f"crow[-1] = {int(crow[-1])} must equal len(col_indices) = "
                                            f"{col.numel()} and len(values) = {values.numel()}")
    return col.to(torch.int64)


def _csr_columns_in_rows(path: str | Path, where: str, col64: torch.Tensor, crow: torch.Tensor, rows: int,
                         cols: int) -> None:
    """0 <= col < cols, strictly increasing within each row (so no duplicates)."""
    if col64.numel() and (int(col64.min()) < 0 or int(col64.max()) >= cols):
        _fail(path, where, f"must be in [0, {cols}) (found {int(col64.min())}..{int(col64.max())})")
    row_of = torch.repeat_interleave(torch.arange(rows), crow[1:] - crow[:-1])
    same_row = row_of[1:] == row_of[:-1]
    if bool((same_row & (col64[1:] <= col64[:-1])).any()):
        row = int(row_of[1:][same_row & (col64[1:] <= col64[:-1])][0])
        _fail(path, where, f"must be strictly increasing within each row (row {row})")


def _unflattened(path: str | Path, name: str, parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `flat_gaps` parameter checked as its decoder reads it (uint8, nothing row-wise beside it, no escape
    open at the end, one final byte per stored value, the last position inside rows x cols), then returned as
    the crow_indices and col_indices it decodes to, for the row-wise checks that follow."""
    where = f"{name}.flat_gaps"
    stray = next((part for part in ("crow_indices", "col_indices", "col_gaps") if part in parts), None)
    if stray:
        _fail(path, f"{name}.{stray}", "a parameter with flat_gaps has no crow_indices, col_indices or col_gaps")
    for part in ("values", "shape"):
        if part not in parts:
            _fail(path, f"{name}.{part}", "missing (a flat_gaps parameter has flat_gaps, values, shape)")
    gaps, values = parts["flat_gaps"], parts["values"]
    if gaps.dtype != torch.uint8 or gaps.dim() != 1 or values.dim() != 1:
        _fail(path, where, f"must be 1-D uint8 beside 1-D values (got {gaps.dtype} {list(gaps.shape)}, values "
                           f"{list(values.shape)})")
    shape = _csr_shape(path, name, parts["shape"])
    rows, cols = shape[0], math.prod(shape[1:])
    if gaps.numel() and int(gaps[-1]) == GAP_ESCAPE:
        _fail(path, where, f"ends inside an escape (last byte {GAP_ESCAPE}: the gap is truncated)")
    if int((gaps != GAP_ESCAPE).sum()) != values.numel():
        _fail(path, where, f"encodes {int((gaps != GAP_ESCAPE).sum())} gaps ({gaps.numel()} bytes), but "
                           f"{values.numel()} values are stored")
    flat = flat_positions(gaps)
    if flat.numel() and int(flat[-1]) >= rows * cols:
        _fail(path, where, f"runs past the {rows} x {cols} matrix (to position {int(flat[-1])})")
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(flat // cols, minlength=rows).cumsum(0)
    col = (flat % cols).to(torch.int16 if cols < COL_INT16_BELOW else torch.int32)
    return {**{k: v for k, v in parts.items() if k != "flat_gaps"}, "crow_indices": crow, "col_indices": col}


def _check_gaps(path: str | Path, where: str, gaps: torch.Tensor, crow: torch.Tensor, cols: int) -> torch.Tensor:
    """The gap stream read as its C decoder reads it: no escape left open at the end, one final byte per
    stored weight (crow[-1] of them), every row's last column inside the row. Returns the columns."""
    if gaps.numel() and int(gaps[-1]) == GAP_ESCAPE:
        _fail(path, where, f"ends inside an escape (last byte {GAP_ESCAPE}: the gap is truncated)")
    entries = int((gaps != GAP_ESCAPE).sum())
    if entries != int(crow[-1]):
        _fail(path, where, f"encodes {entries} gaps ({gaps.numel()} bytes), but crow[-1] = {int(crow[-1])} "
                           "weights are stored")
    columns = gap_columns(gaps, crow)
    beyond = columns >= cols
    if bool(beyond.any()):
        row = int(torch.searchsorted(crow, int(beyond.nonzero()[0]), right=True)) - 1
        _fail(path, where, f"gaps of row {row} run past the row's {cols} columns (to column {int(columns.max())})")
    return columns


def _check_scales(path: str | Path, name: str, parts: Mapping[str, torch.Tensor], rows: int,
                  value_dtype: torch.dtype) -> None:
    """int8 values: in [-127, 127], with one finite positive fp32 (bf16 from version 4) scale per row; other
    dtypes: no scales."""
    if value_dtype != torch.int8:
        if "scales" in parts:
            _fail(path, f"{name}.scales", "only int8 artefacts have scales")
        return
    values = parts["values"]
    if values.numel() and int(values.to(torch.int16).abs().max()) > INT8_MAX:
        _fail(path, f"{name}.values", f"int8 values must be in [-{INT8_MAX}, {INT8_MAX}] (symmetric); found -128")
    if "scales" not in parts:
        _fail(path, f"{name}.scales", "missing (int8 values need one scale per output row)")
    scales = parts["scales"]
    if scales.dtype not in (torch.float32, torch.bfloat16) or scales.numel() != rows:
        _fail(path, f"{name}.scales", f"must be float32 of length rows = {rows} (or bfloat16, version 4; got "
                                      f"{scales.dtype}, {scales.numel()})")
    if not bool((torch.isfinite(scales) & (scales > 0)).all()):
        _fail(path, f"{name}.scales", "must be finite and > 0")
    scales = scales.float()
    if not bool(torch.isfinite(scales * INT8_MAX).all()):  # w = scale * q with |q| <= 127, in float32
        _fail(path, f"{name}.scales", f"= {float(scales.max()):.3g}: scale x {INT8_MAX} overflows float32, so the "
                                      "dequantised weights would be infinite")


# --------------------------------------------------------------------------------------- artefact


def check_artefact(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Everything a reader of an `ndsnn-csr` artefact relies on: typed, bounded metadata, the CSR
    invariants of every sparse parameter, finite dense tensors, and a graph whose ops fit the tensors."""
    check_artefact_metadata(path, metadata)
    value_dtype = VALUE_DTYPES[metadata["dtype"]]
    sparse, plain = split_parameters(tensors)
    if metadata["version"] < GAPS_SINCE_VERSION:
        newer = "int8 values" if metadata["dtype"] == "int8" else next(
            (f"{name}.col_gaps" for name, parts in sparse.items() if "col_gaps" in parts), None)
        if newer:
            _fail(path, "version", f"{metadata['version']} has no {newer} (version {GAPS_SINCE_VERSION} and later)")
    if metadata["version"] < FLAT_SINCE_VERSION:
        _no_version_4_parts(path, metadata["version"], sparse)
    shapes = {name: check_csr(path, name, parts, value_dtype) for name, parts in sparse.items()}
    plain_dtype = dense_dtype(metadata["dtype"])
    for name, tensor in plain.items():
        if tensor.dtype != plain_dtype:  # biases, BN and neuron tensors: the file's dense dtype (fp32 for int8)
            _fail(path, name, f"dtype {tensor.dtype} must be the artefact's dtype {plain_dtype}")
        _finite(path, name, tensor)
        _variance(path, name, tensor)
        shapes[name] = list(tensor.shape)
    if "graph" in metadata:
        check_graph(path, metadata, shapes, dense={name: t.dtype for name, t in plain.items()})


def _no_version_4_parts(path: str | Path, version: int, sparse: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    newer = next((f"{name}.{part}" for name, parts in sparse.items() for part in ("flat_gaps", "scales")
                  if part in parts and (part == "flat_gaps" or parts[part].dtype == torch.bfloat16)), None)
    if newer:
        _fail(path, "version", f"{version} has no {newer} as stored (version {FLAT_SINCE_VERSION} and later)")


def sample_elements(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, Any]) -> int:
    """The per-image peak (elements, all T steps) of the largest tensor the runtime builds for an artefact that
    `check_artefact` accepted: its graph walked again, without the CSR checks."""
    sparse, plain = split_parameters(tensors)
    shapes = {name: [int(s) for s in parts["shape"]] for name, parts in sparse.items()}
    shapes.update({name: list(t.shape) for name, t in plain.items()})
    return check_graph(path, metadata, shapes, dense={name: t.dtype for name, t in plain.items()})


def check_artefact_metadata(path: str | Path, metadata: dict[str, Any]) -> None:
    """Typed, bounded metadata: what sizes a reader allocates comes from here or from the tensors."""
    if metadata.get("format") != CSR_FORMAT:
        _fail(path, "format", f"is {metadata.get('format')!r}, not {CSR_FORMAT!r}")
    version = _int(path, "version", metadata.get("version"), 1, 10**6)
    if version > CSR_VERSION:
        _fail(path, "version", f"{CSR_FORMAT} version {version} is newer than this ndsnn ({CSR_VERSION})")
    if metadata.get("dtype") not in VALUE_DTYPES:
        _fail(path, "dtype", f"= {metadata.get('dtype')!r:.40} must be one of {', '.join(VALUE_DTYPES)}")
    _int(path, "timesteps", metadata.get("timesteps"), 1, L.MAX_TIMESTEPS)
    dataset = _dict(path, "dataset", metadata.get("dataset"))
    _int(path, "dataset.num_classes", dataset.get("num_classes"), 1, L.MAX_CLASSES)
    channels = _int(path, "dataset.in_channels", dataset.get("in_channels"), 1, L.MAX_CHANNELS)
    size = _int(path, "dataset.image_size", dataset.get("image_size"), 1, L.MAX_IMAGE_SIZE)
    if "input" in metadata or version >= 2:
        check_input_contract(path, metadata.get("input"), [channels, size, size])
    for key, kind in (("recipe", str), ("recipe_sha256", str), ("bn_folded", bool)):
        if key in metadata and not isinstance(metadata[key], kind):
            _fail(path, key, f"must be a {kind.__name__}")
    _recipe_text(path, metadata.get("recipe", ""))
    if "sparsity" in metadata:
        overall = _dict(path, "sparsity", metadata["sparsity"]).get("sparsity", 0.0)
        if not 0 <= _number(path, "sparsity.sparsity", overall) <= 1:
            _fail(path, "sparsity.sparsity", f"= {overall} must be in [0, 1]")


def check_input_contract(path: str | Path, contract: Any, shape: list[int]) -> None:
    """`input = {layout: NCHW, range: [0, 1], shape: [C, H, W], mean: [C], std: [C] > 0}` (DESIGN §6)."""
    contract = _dict(path, "input", contract)
    if contract.get("layout") != "NCHW":
        _fail(path, "input.layout", f"= {contract.get('layout')!r:.40} must be \"NCHW\"")
    if contract.get("range") != [0.0, 1.0]:
        _fail(path, "input.range", f"= {contract.get('range')!r:.40} must be [0, 1]")
    if contract.get("shape") != shape:
        _fail(path, "input.shape", f"= {contract.get('shape')!r:.60} must be [in_channels, image_size, image_size] "
                                   f"= {shape}")
    for key in ("mean", "std"):
        values = contract.get(key)
        if not isinstance(values, list) or len(values) != shape[0]:
            _fail(path, f"input.{key}", f"must be a list of {shape[0]} numbers (one per channel)")
        for value in values:
            _number(path, f"input.{key}", value, positive=key == "std")
            low, high = (1 / L.MAX_INPUT_SCALE, L.MAX_INPUT_SCALE) if key == "std" else (-L.MAX_INPUT_SCALE,
                                                                                            L.MAX_INPUT_SCALE)
            if not low <= value <= high:  # (x - mean) / std of a pixel in [0, 1] stays a sane float32
                _fail(path, f"input.{key}", f"= {value:.3g} must be in [{low:g}, {high:g}]")


def _recipe_text(path: str | Path, text: str) -> None:
    """An embedded recipe is read (inspect, export, run --dataset-test): as long as a recipe file may be."""
    if len(text) > L.MAX_RECIPE_BYTES:
        _fail(path, "recipe", f"{len(text):,} characters: more than the {L.MAX_RECIPE_BYTES:,} a recipe may have")


# ------------------------------------------------------------------------------------------ graph

_FIELD_RULES: dict[str, Any] = {
    "weight": str, "bias": (str, type(None)), "prefix": str, "ceil_mode": bool,
    "stride": ("pair", 1), "padding": ("pair", 0), "dilation": ("pair", 1), "kernel": ("pair", 1),
    "groups": ("int", 1), "tau": "positive", "v_threshold": "positive", "eps": "positive",
}
_MAX_NESTING = 16


def parse_graph(path: str | Path, raw: Any, depth: int = 0) -> list[graph.Op]:
    """Typed ops of the `graph` metadata; every field checked before `graph.from_json` reads it."""
    if not isinstance(raw, list) or len(raw) > L.MAX_GRAPH_OPS or depth > _MAX_NESTING:
        _fail(path, "graph", f"must be a list of at most {L.MAX_GRAPH_OPS} ops, nested at most {_MAX_NESTING} deep")
    ops: list[graph.Op] = []
    for index, entry in enumerate(raw):
        where = f"graph[{index}]"
        entry = _dict(path, where, entry)
        kind = entry.get("op")
        if kind not in graph.OP_TYPES:
            _fail(path, f"{where}.op", f"{kind!r:.40} is not an op this runtime knows ({', '.join(graph.OP_TYPES)})")
        if kind == "residual":
            ops.append(graph.Residual(main=tuple(parse_graph(path, entry.get("main"), depth + 1)),
                                      shortcut=tuple(parse_graph(path, entry.get("shortcut"), depth + 1))))
            continue
        keys = graph.OP_TYPES[kind].json_fields
        for key in keys:
            if key not in entry and key != "bias":
                _fail(path, f"{where}.{key}", f"missing ({kind} needs {', '.join(keys)})")
            _check_field(path, f"{where}.{key}", key, entry.get(key))
        ops.append(graph.OP_TYPES[kind].from_json(entry))
    return ops


def _check_field(path: str | Path, where: str, key: str, value: Any) -> None:
    rule = _FIELD_RULES[key]
    if isinstance(rule, tuple) and rule[0] == "pair":
        _pair(path, where, value, rule[1])
    elif isinstance(rule, tuple) and rule[0] == "int":
        _int(path, where, value, rule[1], L.MAX_CHANNELS)
    elif rule in ("positive", "number"):
        _number(path, where, value, positive=rule == "positive")
    elif not isinstance(value, rule):
        _fail(path, where, f"has the wrong type ({type(value).__name__})")


def check_graph(path: str | Path, metadata: dict[str, Any], shapes: dict[str, list[int]],
                dense: dict[str, torch.dtype]) -> int:
    """Walk the graph from the input shape with the runtime's own shape rules: each op's tensors exist with
    the shapes the op needs, no neuron runs before the T steps exist, every tensor the runtime builds for one
    image stays within `MAX_SAMPLE_ELEMENTS`, and the network ends in `num_classes` logits. Returns that
    per-image peak (elements, over all T steps), by which `run` sizes its batches."""
    ops = parse_graph(path, metadata["graph"])
    at_top = [isinstance(op, graph.RepeatTimesteps) for op in ops]
    if sum(at_top) != 1 or sum(isinstance(op, graph.RepeatTimesteps) for op in graph.walk(ops)) != 1:
        _fail(path, "graph", "must hold exactly one repeat_timesteps op, at the top level")
    encoder = ops[:at_top.index(True)]
    if any(isinstance(op, graph.LIF) for op in graph.walk(encoder)):  # it would read B images as T x B/T
        _fail(path, "graph", "a lif op before repeat_timesteps: neurons run over the T steps, which the encoder "
                             "has not made yet")
    dataset = metadata["dataset"]
    walker = _ShapeWalker(path, shapes, dense, dense_dtype(metadata["dtype"]), metadata["timesteps"])
    out = walker.run(ops, (dataset["in_channels"], dataset["image_size"], dataset["image_size"]), "graph")
    if out != (dataset["num_classes"],):
        _fail(path, "graph", f"ends in shape {list(out)}, not [{dataset['num_classes']}] logits (dataset.num_classes)")
    return walker.peak


class _ShapeWalker(graph.GraphBackend):
    """Per-sample shapes through the ops (no batch axis), checking each op's tensors on the way."""

    def __init__(self, path: str | Path, shapes: dict[str, list[int]], dense: dict[str, torch.dtype],
                 value_dtype: torch.dtype, timesteps: int) -> None:
        self.path, self.shapes, self.dense, self.value_dtype = path, shapes, dense, value_dtype
        self.timesteps, self.steps, self.peak = timesteps, 1, 1  # steps: 1 in the encoder, T after repeat

    def run(self, ops: list[graph.Op] | tuple[graph.Op, ...], x: tuple[int, ...], where: str) -> tuple[int, ...]:
        for index, op in enumerate(ops):
            x = self.dispatch(op, x, f"{where}[{index}] {op.kind}")
            self.built(math.prod(x), f"{where}[{index}] {op.kind}", f"an activation of shape {list(x)}")
        return x

    def built(self, elements: int, where: str, what: str) -> None:
        """The runtime builds a tensor of `elements` per image per step: bounded, and the peak recorded."""
        total = elements * self.steps
        if total > L.MAX_SAMPLE_ELEMENTS:
            _fail(self.path, where, f"{what} over {self.steps} step(s) is {total:,} elements per image, more than "
                                    f"{L.MAX_SAMPLE_ELEMENTS:,}")
        self.peak = max(self.peak, total)

    def tensor(self, name: str, where: str, *, dense: bool = True) -> list[int]:
        if name not in self.shapes:
            _fail(self.path, name, f"missing (needed by {where})")
        if dense and name not in self.dense:
            _fail(self.path, name, f"must be a dense tensor (read by {where})")
        if name in self.dense and self.dense[name] != self.value_dtype:
            _fail(self.path, name, f"dtype {self.dense[name]} must be the artefact's dtype {self.value_dtype}")
        return self.shapes[name]

    def need(self, x: tuple[int, ...], rank: int, where: str) -> None:
        if len(x) != rank:
            _fail(self.path, where, f"gets an input of shape {list(x)}, needs {rank} dimensions")

    def _bias(self, op: graph.WeightedOp, out: int, where: str) -> None:
        if op.bias is not None and self.tensor(op.bias, where) != [out]:
            _fail(self.path, op.bias, f"shape {self.shapes[op.bias]} must be [{out}] (the {where} outputs)")

    def _conv2d(self, op: graph.Conv2d, x: tuple[int, ...], where: str) -> tuple[int, ...]:
        self.need(x, 3, where)
        weight = self.tensor(op.weight, where, dense=False)
        if len(weight) != 4 or weight[1] * op.groups != x[0] or weight[0] % op.groups:
            _fail(self.path, op.weight, f"shape {weight} does not fit {where} on {x[0]} input channels "
                                        f"(groups {op.groups})")
        self._bias(op, weight[0], where)
        size = [(x[i + 1] + 2 * op.padding[i] - op.dilation[i] * (weight[i + 2] - 1) - 1) // op.stride[i] + 1
                for i in range(2)]
        if min(size) < 1:
            _fail(self.path, op.weight, f"kernel {weight[2:]} does not fit the {list(x[1:])} map of {where}")
        patches = x[0] * weight[2] * weight[3] * size[0] * size[1]  # a sparse conv's im2col matrix
        self.built(patches, where, f"the patch matrix [{x[0] * weight[2] * weight[3]}, {size[0] * size[1]}]")
        return weight[0], size[0], size[1]

    def _linear(self, op: graph.Linear, x: tuple[int, ...], where: str) -> tuple[int, ...]:
        self.need(x, 1, where)
        weight = self.tensor(op.weight, where, dense=False)
        if len(weight) != 2 or weight[1] != x[0]:
            _fail(self.path, op.weight, f"shape {weight} does not fit {where} on {x[0]} input features")
        self._bias(op, weight[0], where)
        return (weight[0],)

    def _batchnorm(self, op: graph.BatchNorm, x: tuple[int, ...], where: str) -> tuple[int, ...]:
        for suffix, required in (("running_mean", True), ("running_var", True), ("weight", False), ("bias", False)):
            name = f"{op.name}.{suffix}"
            if (required or name in self.shapes) and self.tensor(name, where) != [x[0]]:
                _fail(self.path, name, f"shape {self.shapes[name]} must be [{x[0]}] (channels into {where})")
        return x

    def _lif(self, op: graph.LIF, x: tuple[int, ...], where: str) -> tuple[int, ...]:
        return x

    def _maxpool2d(self, op: graph.MaxPool2d, x: tuple[int, ...], where: str) -> tuple[int, ...]:
        self.need(x, 3, where)
        if any(2 * p > k for p, k in zip(op.padding, op.kernel, strict=True)):
            _fail(self.path, where, f"padding {list(op.padding)} must be at most half the kernel {list(op.kernel)}")
        size = [_pooled_size(x[i + 1], op.kernel[i], op.stride[i], op.padding[i], op.ceil_mode) for i in range(2)]
        if min(size) < 1 or min(x[1:]) + 2 * min(op.padding) < min(op.kernel):
            _fail(self.path, where, f"kernel {list(op.kernel)} does not fit the {list(x[1:])} map")
        return x[0], size[0], size[1]

    def _global_avgpool(self, op: graph.GlobalAvgPool, x: tuple[int, ...], where: str) -> tuple[int, ...]:
        self.need(x, 3, where)
        return x[0], 1, 1

    def _flatten(self, op: graph.Flatten, x: tuple[int, ...], where: str) -> tuple[int, ...]:
        return (math.prod(x),)

    def _repeat_timesteps(self, op: graph.RepeatTimesteps, x: tuple[int, ...], where: str) -> tuple[int, ...]:
        self.steps = self.timesteps
        return x

    def _residual(self, op: graph.Residual, x: tuple[int, ...], where: str) -> tuple[int, ...]:
        main = self.run(op.main, x, f"{where}.main")
        shortcut = self.run(op.shortcut, x, f"{where}.shortcut")
        if main != shortcut:
            _fail(self.path, where, f"main branch gives {list(main)}, shortcut {list(shortcut)}: they must agree")
        return main


def _pooled_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """torch's max-pool output size: with `ceil_mode` a last window that would start in the right padding is
    dropped (at::pooling_output_shape), so the ceiling alone overcounts by one there."""
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


# ------------------------------------------------------------------------------------- checkpoint

_META_INTS = {"step": L.MAX_STEPS, "epoch": L.MAX_EPOCHS, "batch_in_epoch": L.MAX_STEPS,
              "correct": L.MAX_STEPS * L.MAX_BATCH_SIZE, "seen": L.MAX_STEPS * L.MAX_BATCH_SIZE}


def check_checkpoint(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: Any) -> None:
    """A checkpoint's own consistency: its format and version, bounded counters, masks over existing
    weights (0/1, same shape), finite weights, well-formed optimizer and RNG entries. Whether it fits a
    recipe's model is `check_checkpoint_fits`."""
    check_checkpoint_format(path, meta)
    _checkpoint_counters(path, meta)
    _checkpoint_weights_and_masks(path, tensors)
    _checkpoint_state_keys(path, tensors)
    if "optimizer" in meta:
        _checkpoint_optimizer_meta(path, meta["optimizer"])


def check_checkpoint_format(path: str | Path, meta: Any) -> None:
    """The one check of a checkpoint's format name and version (a missing version reads as 0)."""
    if not isinstance(meta, dict) or meta.get("format") != ckpt_format.FORMAT:
        shown = meta.get("format") if isinstance(meta, dict) else None
        raise InvalidFile(f"{path}: not an ndsnn checkpoint (format is {shown!r:.40}, "
                          f"expected {ckpt_format.FORMAT!r})")
    version = meta.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        _fail(path, "version", "must be an integer")
    if version > ckpt_format.VERSION:
        raise InvalidFile(f"{path}: checkpoint version {version} is newer than this ndsnn ({ckpt_format.VERSION})")


def _checkpoint_counters(path: str | Path, meta: dict[str, Any]) -> None:
    for key, hi in _META_INTS.items():
        if key in meta:
            _int(path, key, meta[key], 0, hi)
    for key in ("loss_sum", "best_accuracy"):
        if key in meta:
            _number(path, key, meta[key])
    if "recipe" in meta and not isinstance(meta["recipe"], str):
        _fail(path, "recipe", "must be the recipe's TOML text")
    _recipe_text(path, meta.get("recipe", ""))


def _checkpoint_weights_and_masks(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Model tensors of a real floating dtype (int64 counters), finite, BN variances >= 0; every mask over
    a weight of its shape with 2 to 5 dims (a conv or linear weight: what a CSR artefact can store), bool
    or uint8 0/1."""
    model = {k.removeprefix(ckpt_format.MODEL): v for k, v in tensors.items() if k.startswith(ckpt_format.MODEL)}
    for name, tensor in model.items():
        counter = name.endswith("num_batches_tracked") and tensor.dtype == torch.int64
        if tensor.dtype not in REAL_FLOATS and not counter:
            _fail(path, f"{ckpt_format.MODEL}{name}", f"dtype {tensor.dtype} is not one a model tensor has "
                                                      "(float16, bfloat16, float32, float64)")
        _finite(path, f"{ckpt_format.MODEL}{name}", tensor)
        _variance(path, f"{ckpt_format.MODEL}{name}", tensor)
    for key, mask in tensors.items():
        if not key.startswith(ckpt_format.MASK):
            continue
        name = key.removeprefix(ckpt_format.MASK)
        if name not in model or model[name].shape != mask.shape:
            _fail(path, key, "matches no model weight of its shape")
        if not 2 <= mask.dim() <= 5:
            _fail(path, key, f"masks a tensor of {mask.dim()} dimension(s): only conv and linear weights (2 to 5) "
                             "are sparse")
        if mask.dtype not in (torch.bool, torch.uint8) or (mask.dtype == torch.uint8 and bool((mask > 1).any())):
            _fail(path, key, f"must be bool or uint8 0/1 (got {mask.dtype})")


def _checkpoint_state_keys(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Optimizer entries named optim::<index>::<state>, real floating; RNG states rng::torch or
    rng::cuda::<device>, 1-D uint8."""
    for key, tensor in tensors.items():
        if key.startswith(ckpt_format.OPTIM):
            if not ckpt_format.OPTIM_KEY.fullmatch(key):
                _fail(path, key, "optimizer entries are named optim::<parameter index>::<state name>")
            if tensor.dtype not in REAL_FLOATS:
                _fail(path, key, f"dtype {tensor.dtype}: optimizer state is float16, bfloat16, float32 or float64")
            _finite(path, key, tensor)
        if key.startswith(ckpt_format.RNG) and not ckpt_format.RNG_KEY.fullmatch(key):
            _fail(path, key, "RNG entries are rng::torch and rng::cuda::<device index>")
        is_rng = key.startswith((ckpt_format.RNG, ckpt_format.METHOD_GENERATOR))
        if is_rng and (tensor.dtype != torch.uint8 or tensor.dim() != 1):
            _fail(path, key, f"an RNG state must be a 1-D uint8 tensor (got {tensor.dtype}, {list(tensor.shape)})")
        if key == ckpt_format.PENDING_UPDATE and (tensor.dtype != torch.bool or tensor.numel() != 1):
            _fail(path, key, f"must be one bool (got {tensor.dtype}, {list(tensor.shape)})")


def _checkpoint_optimizer_meta(path: str | Path, optimizer: Any) -> None:
    optimizer = _dict(path, "optimizer", optimizer)
    if not isinstance(optimizer.get("param_groups"), list) or not isinstance(optimizer.get("scalars"), dict):
        _fail(path, "optimizer", "must hold param_groups (a list) and scalars (an object)")
    for key in optimizer["scalars"]:
        if not ckpt_format.OPTIM_SCALAR_KEY.fullmatch(key):
            _fail(path, f"optimizer.scalars.{key:.40}", "keys are <parameter index>::<state name>")


def check_checkpoint_fits(path: str | Path, tensors: Mapping[str, torch.Tensor], model: torch.nn.Module,
                          *, resume_meta: dict[str, Any] | None = None,
                          optimizer: torch.optim.Optimizer | None = None,
                          mask_names: Sequence[str] | None = None) -> None:
    """The checkpoint's weights are exactly the model's (names, shapes, dtypes) and its masks are over
    parameters; for a resume (`resume_meta`: the checkpoint's metadata) also the training state, the RNG
    states, and, given the `optimizer` it feeds and the `mask_names` the method keeps, every optimizer
    group and buffer against that optimizer and exactly those masks."""
    _fits_model_tensors(path, tensors, model)
    if resume_meta is None:
        return
    _fits_resume_state(path, tensors, resume_meta)
    if optimizer is not None:
        _fits_optimizer(path, tensors, resume_meta["optimizer"], optimizer)
    else:
        _fits_optimizer_buffers(path, tensors, [p for p in model.parameters()])
    if mask_names is not None:
        _fits_masks(path, tensors, mask_names)


def _fits_model_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
    expected = model.state_dict()
    stored = {k.removeprefix(ckpt_format.MODEL): v for k, v in tensors.items() if k.startswith(ckpt_format.MODEL)}
    for name in sorted(expected.keys() | stored.keys()):
        where = f"{ckpt_format.MODEL}{name}"
        if name not in stored:
            _fail(path, where, "missing (the recipe's model has it)")
        if name not in expected:
            _fail(path, where, "is not a tensor of the recipe's model")
        if list(stored[name].shape) != list(expected[name].shape):
            _fail(path, where, f"shape {list(stored[name].shape)} must be the model's {list(expected[name].shape)}")
        if stored[name].dtype != expected[name].dtype:  # load_state_dict would cast silently (uint64 -> 9.2e18)
            _fail(path, where, f"dtype {stored[name].dtype} must be the model's {expected[name].dtype}")
    params = dict(model.named_parameters())
    for key in tensors:
        if key.startswith(ckpt_format.MASK) and key.removeprefix(ckpt_format.MASK) not in params:
            _fail(path, key, "masks a buffer, not a parameter of the model")


def _fits_resume_state(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: dict[str, Any]) -> None:
    for key in (*_META_INTS, "loss_sum", "best_accuracy", "optimizer"):
        if key not in meta:
            _fail(path, key, "missing (a resumable checkpoint records the training state)")
    sizes = {ckpt_format.RNG_TORCH: torch.get_rng_state().numel(),
             ckpt_format.METHOD_GENERATOR: torch.Generator().get_state().numel()}
    for key, size in sizes.items():
        if key in tensors and tensors[key].numel() != size:
            _fail(path, key, f"holds {tensors[key].numel()} bytes; a torch RNG state has {size}")
    for key in sizes:
        if key not in tensors:
            _fail(path, key, "missing (a resumable checkpoint stores the RNG state)")
    if "scaler" in meta and meta["scaler"] is not None:
        for name, value in _dict(path, "scaler", meta["scaler"]).items():
            _number(path, f"scaler.{name:.40}", value)


def _fits_optimizer(path: str | Path, tensors: Mapping[str, torch.Tensor], stored: dict[str, Any],
                    optimizer: torch.optim.Optimizer) -> None:
    """param_groups as the recipe's optimizer has them (same groups, parameters, keys and kinds of value),
    then every buffer against the parameter it belongs to."""
    own = optimizer.state_dict()["param_groups"]
    groups = stored["param_groups"]
    if len(groups) != len(own):
        _fail(path, "optimizer.param_groups", f"holds {len(groups)} group(s); the recipe's optimizer has {len(own)}")
    for index, (group, expected) in enumerate(zip(groups, own, strict=True)):
        where = f"optimizer.param_groups[{index}]"
        group = _dict(path, where, group)
        if sorted(group) != sorted(expected):
            _fail(path, where, f"keys {sorted(group)!r:.120} must be the optimizer's {sorted(expected)}")
        if group["params"] != expected["params"]:
            _fail(path, f"{where}.params", f"must be {expected['params']!r:.60} (the recipe's optimizer)")
        for key, value in expected.items():
            if key != "params":
                _same_kind(path, f"{where}.{key}", group[key], value)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    _fits_optimizer_buffers(path, tensors, params)
    for key, value in stored["scalars"].items():
        index = int(key.split("::")[0])
        if index >= len(params):
            _fail(path, f"optimizer.scalars.{key:.40}", f"parameter index {index} is beyond the optimizer's "
                                                        f"{len(params)} parameters")
        _number(path, f"optimizer.scalars.{key:.40}", value)


def _same_kind(path: str | Path, where: str, value: Any, expected: Any) -> None:
    """A hyper-parameter read back from JSON: the kind the optimizer's own value has (tuples as lists)."""
    if isinstance(expected, bool) or expected is None or isinstance(expected, str):
        if type(value) is not type(expected):
            _fail(path, where, f"= {value!r:.40} must be {type(expected).__name__} like the optimizer's")
    elif isinstance(expected, int | float):
        _number(path, where, value)
    elif isinstance(expected, tuple | list):
        if not isinstance(value, list) or len(value) != len(expected):
            _fail(path, where, f"must be a list of {len(expected)} like the optimizer's")
        for item, own in zip(value, expected, strict=True):
            _same_kind(path, where, item, own)


def _fits_optimizer_buffers(path: str | Path, tensors: Mapping[str, torch.Tensor],
                            params: Sequence[torch.Tensor]) -> None:
    """optim::<i>::<state>: `step` is one number, every other buffer has its parameter's shape and dtype."""
    for key, tensor in tensors.items():
        match = ckpt_format.OPTIM_KEY.fullmatch(key)
        if not match:
            continue
        index, state = int(match.group(1)), match.group(2)
        if index >= len(params):
            _fail(path, key, f"parameter index {index} is beyond the model's {len(params)} parameters")
        param = params[index]
        if state == "step":
            if tensor.numel() != 1:
                _fail(path, key, f"shape {list(tensor.shape)}: a step count is one number")
        elif list(tensor.shape) != list(param.shape):
            _fail(path, key, f"shape {list(tensor.shape)} must be its parameter's {list(param.shape)}")
        elif tensor.dtype != param.dtype:
            _fail(path, key, f"dtype {tensor.dtype} must be its parameter's {param.dtype}")


def _fits_masks(path: str | Path, tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> None:
    """Exactly one mask per parameter the recipe's method keeps sparse."""
    stored = {k.removeprefix(ckpt_format.MASK) for k in tensors if k.startswith(ckpt_format.MASK)}
    for name in sorted(set(names) - stored):
        _fail(path, f"{ckpt_format.MASK}{name}", "missing (the recipe's method keeps this parameter sparse)")
    for name in sorted(stored - set(names)):
        _fail(path, f"{ckpt_format.MASK}{name}", "the recipe's method keeps no mask for this tensor")


# ----------------------------------------------------------------------------------------- run dir


def check_summary(path: str | Path, summary: Any) -> dict[str, Any]:
    """summary.json as `cost RUN` reads it: bounded epochs/steps, per-layer integer nnz."""
    summary = _dict(path, "summary", summary)
    _int(path, "epochs", summary.get("epochs"), 1, L.MAX_EPOCHS)
    _int(path, "steps", summary.get("steps"), 0, L.MAX_STEPS)
    layers = _dict(path, "sparsity.layers", _dict(path, "sparsity", summary.get("sparsity")).get("layers"))
    for name, layer in layers.items():
        _int(path, f"sparsity.layers.{name}.nnz", _dict(path, f"sparsity.layers.{name}", layer).get("nnz"),
             0, L.MAX_TENSOR_NUMEL)
    rates = _dict(path, "spike_rates", summary.get("spike_rates", {}))
    for name, rate in rates.items():
        if not 0 <= _number(path, f"spike_rates.{name:.60}", rate) <= 1:  # a rate is spikes per neuron per step
            _fail(path, f"spike_rates.{name:.60}", f"= {rate:.3g} must be in [0, 1]")
    return summary


def read_json_file(path: str | Path) -> Any:
    """A run's JSON file (summary.json), bounded in size, nesting and integer length."""
    try:
        return parse_json(read_text_file(path, L.MAX_JSON_FILE_BYTES))
    except TextError as exc:
        raise InvalidFile(f"{path}: not a readable JSON file ({exc})") from None


def check_run_summary(path: str | Path, summary: Any) -> dict[str, Any]:
    """summary.json as `prune-compare` aggregates it and an LTH round reads it back: accuracy and sparsity in
    [0, 1], a finite wall time (and training time and time split, where recorded), per-layer sparsity as an
    object."""
    summary = _dict(path, "summary", summary)
    for key in ("test_accuracy", "wall_time_s"):
        if not 0 <= _number(path, key, summary.get(key)) <= (1 if key == "test_accuracy" else math.inf):
            _fail(path, key, f"= {summary[key]:.3g} is out of range")
    sparsity = _dict(path, "sparsity", summary.get("sparsity"))
    if not 0 <= _number(path, "sparsity.sparsity", sparsity.get("sparsity")) <= 1:
        _fail(path, "sparsity.sparsity", f"= {sparsity['sparsity']:.3g} must be in [0, 1]")
    _dict(path, "sparsity.layers", sparsity.get("layers"))
    if "train_wall_s" in summary and not 0 <= _number(path, "train_wall_s", summary["train_wall_s"]) < math.inf:
        _fail(path, "train_wall_s", f"= {summary['train_wall_s']:.3g} is out of range")
    for phase, seconds in _dict(path, "time_split", summary.get("time_split", {})).items():
        if not 0 <= _number(path, f"time_split.{phase}", seconds) < math.inf:
            _fail(path, f"time_split.{phase}", f"= {seconds:.3g} is out of range")
    return summary


def check_mask_records(path: str | Path, records: list[Any], steps: int) -> list[dict[str, Any]]:
    """metrics.jsonl's mask records as `cost RUN` reads them: a step within the run, per-layer counts."""
    for index, record in enumerate(records):
        if not isinstance(record, dict) or record.get("kind") not in ("mask_init", "mask_update"):
            continue
        where = f"record {index + 1} ({record['kind']})"
        _int(path, f"{where} step", record.get("step"), 0, steps)
        for name, layer in _dict(path, f"{where} layers", record.get("layers")).items():
            count = layer if record["kind"] == "mask_init" else _dict(path, f"{where} {name}", layer).get("active")
            _int(path, f"{where} {name}", count, 0, L.MAX_TENSOR_NUMEL)
    return records
