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
from collections.abc import Mapping
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
    GAP_ESCAPE,
    GAPS_SINCE_VERSION,
    INT8_MAX,
    VALUE_DTYPES,
    dense_dtype,
    gap_columns,
    split_parameters,
)


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


def _finite(path: str | Path, name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        _fail(path, name, "holds NaN or inf")


# -------------------------------------------------------------------------------------------- CSR


def check_csr(path: str | Path, name: str, parts: Mapping[str, torch.Tensor], value_dtype: torch.dtype) -> list[int]:
    """The CSR invariants of one parameter; returns its original shape. The named checks run in an order
    where each reads only what the previous ones made safe: presence, shape, dtypes and lengths before
    indexing, index ranges before use."""
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
    """int8 values: in [-127, 127], with one finite positive fp32 scale per row; other dtypes: no scales."""
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
    if scales.dtype != torch.float32 or scales.numel() != rows:
        _fail(path, f"{name}.scales", f"must be float32 of length rows = {rows} (got {scales.dtype}, "
                                      f"{scales.numel()})")
    if not bool((torch.isfinite(scales) & (scales > 0)).all()):
        _fail(path, f"{name}.scales", "must be finite and > 0")


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
    shapes = {name: check_csr(path, name, parts, value_dtype) for name, parts in sparse.items()}
    for name, tensor in plain.items():
        _finite(path, name, tensor)
        shapes[name] = list(tensor.shape)
    if "graph" in metadata:
        check_graph(path, metadata, shapes, dense={name: t.dtype for name, t in plain.items()})


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


# ------------------------------------------------------------------------------------------ graph

_FIELD_RULES: dict[str, Any] = {
    "weight": str, "bias": (str, type(None)), "prefix": str, "ceil_mode": bool,
    "stride": ("pair", 1), "padding": ("pair", 0), "dilation": ("pair", 1), "kernel": ("pair", 1),
    "groups": ("int", 1), "tau": "positive", "v_threshold": "number", "eps": "positive",
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
                dense: dict[str, torch.dtype]) -> None:
    """Walk the graph from the input shape: each op's tensors exist with the shapes the op needs, and
    the network ends in `num_classes` logits. The runtime then meets no shape it did not expect."""
    ops = parse_graph(path, metadata["graph"])
    at_top = sum(isinstance(op, graph.RepeatTimesteps) for op in ops)
    if at_top != 1 or sum(isinstance(op, graph.RepeatTimesteps) for op in graph.walk(ops)) != 1:
        _fail(path, "graph", "must hold exactly one repeat_timesteps op, at the top level")
    dataset = metadata["dataset"]
    walker = _ShapeWalker(path, shapes, dense, dense_dtype(metadata["dtype"]))
    out = walker.run(ops, (dataset["in_channels"], dataset["image_size"], dataset["image_size"]), "graph")
    if out != (dataset["num_classes"],):
        _fail(path, "graph", f"ends in shape {list(out)}, not [{dataset['num_classes']}] logits (dataset.num_classes)")


class _ShapeWalker:
    """Per-sample shapes through the ops (no batch axis), checking each op's tensors on the way."""

    def __init__(self, path: str | Path, shapes: dict[str, list[int]], dense: dict[str, torch.dtype],
                 value_dtype: torch.dtype) -> None:
        self.path, self.shapes, self.dense, self.value_dtype = path, shapes, dense, value_dtype

    def run(self, ops: list[graph.Op] | tuple[graph.Op, ...], x: tuple[int, ...], where: str) -> tuple[int, ...]:
        for index, op in enumerate(ops):
            x = getattr(self, f"_{op.kind}")(op, x, f"{where}[{index}] {op.kind}")
            if math.prod(x) > L.MAX_TENSOR_NUMEL:
                _fail(self.path, where, f"activation of shape {list(x)} exceeds {L.MAX_TENSOR_NUMEL:,} elements")
        return x

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
        size = []
        for i in range(2):
            span = x[i + 1] + 2 * op.padding[i] - op.kernel[i]
            size.append((-(-span // op.stride[i]) if op.ceil_mode else span // op.stride[i]) + 1)
        if min(size) < 1 or min(x[1:]) + 2 * min(op.padding) < min(op.kernel):
            _fail(self.path, where, f"kernel {list(op.kernel)} does not fit the {list(x[1:])} map")
        return x[0], size[0], size[1]

    def _global_avgpool(self, op: graph.GlobalAvgPool, x: tuple[int, ...], where: str) -> tuple[int, ...]:
        self.need(x, 3, where)
        return x[0], 1, 1

    def _flatten(self, op: graph.Flatten, x: tuple[int, ...], where: str) -> tuple[int, ...]:
        return (math.prod(x),)

    def _repeat_timesteps(self, op: graph.RepeatTimesteps, x: tuple[int, ...], where: str) -> tuple[int, ...]:
        return x

    def _residual(self, op: graph.Residual, x: tuple[int, ...], where: str) -> tuple[int, ...]:
        main = self.run(op.main, x, f"{where}.main")
        shortcut = self.run(op.shortcut, x, f"{where}.shortcut")
        if main != shortcut:
            _fail(self.path, where, f"main branch gives {list(main)}, shortcut {list(shortcut)}: they must agree")
        return main


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


def _checkpoint_weights_and_masks(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Finite weights; every mask over a weight of its shape, bool or uint8 0/1."""
    model = {k.removeprefix(ckpt_format.MODEL): v for k, v in tensors.items() if k.startswith(ckpt_format.MODEL)}
    for name, tensor in model.items():
        _finite(path, f"{ckpt_format.MODEL}{name}", tensor)
    for key, mask in tensors.items():
        if not key.startswith(ckpt_format.MASK):
            continue
        name = key.removeprefix(ckpt_format.MASK)
        if name not in model or model[name].shape != mask.shape:
            _fail(path, key, "matches no model weight of its shape")
        if mask.dtype not in (torch.bool, torch.uint8) or (mask.dtype == torch.uint8 and bool((mask > 1).any())):
            _fail(path, key, f"must be bool or uint8 0/1 (got {mask.dtype})")


def _checkpoint_state_keys(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Optimizer entries named optim::<index>::<state>; RNG states 1-D uint8."""
    for key, tensor in tensors.items():
        if key.startswith(ckpt_format.OPTIM) and not ckpt_format.OPTIM_KEY.fullmatch(key):
            _fail(path, key, "optimizer entries are named optim::<parameter index>::<state name>")
        is_rng = key.startswith((ckpt_format.RNG, ckpt_format.METHOD_GENERATOR))
        if is_rng and (tensor.dtype != torch.uint8 or tensor.dim() != 1):
            _fail(path, key, f"an RNG state must be a 1-D uint8 tensor (got {tensor.dtype}, {list(tensor.shape)})")


def _checkpoint_optimizer_meta(path: str | Path, optimizer: Any) -> None:
    optimizer = _dict(path, "optimizer", optimizer)
    if not isinstance(optimizer.get("param_groups"), list) or not isinstance(optimizer.get("scalars"), dict):
        _fail(path, "optimizer", "must hold param_groups (a list) and scalars (an object)")
    for key in optimizer["scalars"]:
        if not ckpt_format.OPTIM_SCALAR_KEY.fullmatch(key):
            _fail(path, f"optimizer.scalars.{key:.40}", "keys are <parameter index>::<state name>")


def check_checkpoint_fits(path: str | Path, tensors: Mapping[str, torch.Tensor], model: torch.nn.Module,
                          *, resume_meta: dict[str, Any] | None = None) -> None:
    """The checkpoint's weights are exactly the model's (names and shapes); for a resume (`resume_meta`:
    the checkpoint's metadata) also the training state, the optimizer buffers (per parameter, each the
    parameter's shape or a scalar) and the RNG state sizes."""
    _fits_model_tensors(path, tensors, model)
    if resume_meta is not None:
        _fits_resume_state(path, tensors, model, resume_meta)


def _fits_model_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], model: torch.nn.Module) -> None:
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    stored = {k.removeprefix(ckpt_format.MODEL): list(v.shape) for k, v in tensors.items()
              if k.startswith(ckpt_format.MODEL)}
    for name in sorted(expected.keys() | stored.keys()):
        if name not in stored:
            _fail(path, f"{ckpt_format.MODEL}{name}", "missing (the recipe's model has it)")
        if name not in expected:
            _fail(path, f"{ckpt_format.MODEL}{name}", "is not a tensor of the recipe's model")
        if stored[name] != expected[name]:
            _fail(path, f"{ckpt_format.MODEL}{name}", f"shape {stored[name]} must be the model's {expected[name]}")


def _fits_resume_state(path: str | Path, tensors: Mapping[str, torch.Tensor], model: torch.nn.Module,
                       meta: dict[str, Any]) -> None:
    for key in (*_META_INTS, "loss_sum", "best_accuracy", "optimizer"):
        if key not in meta:
            _fail(path, key, "missing (a resumable checkpoint records the training state)")
    params = [list(p.shape) for p in model.parameters()]
    for key, tensor in tensors.items():
        match = ckpt_format.OPTIM_KEY.fullmatch(key)
        if match:
            index = int(match.group(1))
            if index >= len(params):
                _fail(path, key, f"parameter index {index} is beyond the model's {len(params)} parameters")
            if tensor.numel() > 1 and list(tensor.shape) != params[index]:
                _fail(path, key, f"shape {list(tensor.shape)} must be its parameter's {params[index]}")
    sizes = {ckpt_format.RNG_TORCH: torch.get_rng_state().numel(),
             ckpt_format.METHOD_GENERATOR: torch.Generator().get_state().numel()}
    for key, size in sizes.items():
        if key in tensors and tensors[key].numel() != size:
            _fail(path, key, f"holds {tensors[key].numel()} bytes; a torch RNG state has {size}")
    if ckpt_format.RNG_TORCH not in tensors:
        _fail(path, ckpt_format.RNG_TORCH, "missing (a resumable checkpoint stores the RNG state)")


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
        _number(path, f"spike_rates.{name}", rate)
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
