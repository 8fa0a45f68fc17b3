"""The C code generator: a BN-folded SpikingNet and its masks -> the text of the output directory's files.

`generate_sources` writes `ndsnn_model.h/.c` (this network's arrays, buffers and run function, rendered
from `templates/ndsnn_model.*`) beside the files that are the same for every model (`ndsnn_kernels.h/.c`,
the host demo `main.c` and its `Makefile`). The graph comes from `graph.network_graph`, as for every
exporter: the encoder runs once on the normalised image, then the body runs step by step for T steps (a
LIF layer's membrane is the only state kept across steps), and the per-step logits are summed.

A tensor between two ops is either analog (float) or a spike map (one byte per neuron, 0 or 1). A
conv/linear fed by spikes only adds the weights of inputs that fired; one fed by an analog tensor
(the encoder, or after average pooling) multiplies. Intermediate tensors share a few static slots,
reused once a tensor's last reader has run (`_Arena`), so RAM is the largest live set, not the sum.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
import torch

from ndsnn_cli.errors import UserError
from ndsnn_cli.export import graph
from ndsnn_cli.export.csr import to_csr

DTYPES = ("fp32", "int8")
# the strict flags of every host build (verification, the demo's Makefile, benchmarks): defined once, here
CFLAGS = ("-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2")
COPIED = ("ndsnn_kernels.h", "ndsnn_kernels.c", "main.c")  # the same text for every model
VALUES_PER_LINE = 8
_PLACEHOLDER = re.compile(r"@([A-Z0-9_]+)@")


def template_text(name: str) -> str:
    """A file of `templates/` as shipped in the package."""
    return resources.files("ndsnn_cli.export.c").joinpath("templates", name).read_text(encoding="utf-8")


def render(name: str, values: dict[str, Any]) -> str:
    """`templates/<name>` with every `@KEY@` replaced by `values[KEY]`; a placeholder without a value, or a
    value without its placeholder, is a programming error (KeyError / ValueError), never a silent blank."""
    text = template_text(name)
    found = set(_PLACEHOLDER.findall(text))
    if found != set(values):
        raise ValueError(f"template {name}: placeholders {sorted(found)} but values for {sorted(values)}")
    return _PLACEHOLDER.sub(lambda match: str(values[match.group(1)]), text)


@dataclass
class _Tensor:
    """One per-sample tensor of the generated program: a C pointer expression and where it lives."""

    expr: str
    spikes: bool
    numel: int
    slot: int | None = None
    refs: int = 1
    pinned: bool = False


class _Arena:
    """Static slots shared by tensors whose lifetimes do not overlap: the best-fitting free slot,
    grown when none is large enough. Sizes in floats (a spike map's bytes rounded up)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.busy: list[bool] = []

    def take(self, floats: int) -> int:
        free = [i for i, busy in enumerate(self.busy) if not busy]
        fitting = [i for i in free if self.sizes[i] >= floats]
        if fitting:
            slot = min(fitting, key=lambda i: self.sizes[i])
        elif free:
            slot = max(free, key=lambda i: self.sizes[i])
            self.sizes[slot] = floats
        else:
            self.sizes.append(floats)
            self.busy.append(False)
            slot = len(self.sizes) - 1
        self.busy[slot] = True
        return slot

    def give_back(self, slot: int) -> None:
        self.busy[slot] = False


@dataclass
class CSources:
    """The generated directory's files (name -> text) and what the model needs on a device."""

    files: dict[str, str]
    flash_bytes: int  # const data: CSR arrays, biases, scales, geometry, normalisation constants
    ram_bytes: int  # static buffers: activation slots, membranes, accumulators, logits
    layers: list[dict[str, Any]] = field(default_factory=list)
    dtype: str = "fp32"


class _Program:
    """Emits one network's C: const arrays, static buffers and the statements of the run function."""

    def __init__(self, weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], dtype: str,
                 dense: bool, indices: str = "auto") -> None:
        self.weights, self.masks, self.dtype, self.dense, self.indices = weights, masks, dtype, dense, indices
        self.arena = _Arena()
        self.consts: list[str] = []
        self.statics: list[str] = []
        self.statements: list[str] = []
        self.flash_bytes = 0
        self.ram_bytes = 0
        self.acc_entries = 0
        self.layers: list[dict[str, Any]] = []
        self.membranes: list[tuple[str, int]] = []  # (array, neurons): zeroed at the start of each image
        self.count = 0

    # -- tensors -------------------------------------------------------------------------------
    def new_tensor(self, numel: int, spikes: bool) -> _Tensor:
        slot = self.arena.take(math.ceil(numel / 4) if spikes else numel)
        expr = f"(uint8_t *)ndsnn_slot{slot}" if spikes else f"ndsnn_slot{slot}"
        return _Tensor(expr, spikes, numel, slot)

    def release(self, tensor: _Tensor) -> None:
        tensor.refs -= 1
        if tensor.refs == 0 and not tensor.pinned and tensor.slot is not None:
            self.arena.give_back(tensor.slot)

    def const_array(self, ctype: str, name: str, values: np.ndarray) -> str:
        """A `static const` array definition (flash), at least one element (C has no empty arrays)."""
        flat = values.reshape(-1)
        if ctype == "float":
            if not np.isfinite(flat).all():
                raise UserError(f"{name}: weights are not finite; cannot export to C")
            text = [f"{v:.8e}f" for v in flat.astype(np.float32).tolist()]
        else:
            text = [str(int(v)) for v in flat.tolist()]
        text = text or ["0"]
        lines = [", ".join(text[i:i + VALUES_PER_LINE]) for i in range(0, len(text), VALUES_PER_LINE)]
        body = ",\n    ".join(lines)
        self.consts.append(f"static const {ctype} {name}[{len(text)}] = {{\n    {body}\n}};")
        self.flash_bytes += len(text) * _CTYPE_BYTES[ctype]
        return name

    def static_array(self, ctype: str, name: str, entries: int) -> str:
        self.statics.append(f"static {ctype} {name}[{max(1, entries)}];")
        self.ram_bytes += max(1, entries) * _CTYPE_BYTES[ctype]
        return name

    def emit(self, line: str) -> None:
        self.statements.append(line)

    # -- weights -------------------------------------------------------------------------------
    def csr(self, op: graph.WeightedOp, label: str) -> tuple[str, dict[str, Any]]:
        """The op's weight as CSR arrays (mask positions; every position under `dense`), its struct's name."""
        weight = self.weights[op.weight].detach().float()
        rows = weight.shape[0]
        mask = self.masks.get(op.weight)
        keep = torch.ones_like(weight, dtype=torch.bool) if self.dense or mask is None else mask.bool()
        # the artefact's own encoder: same arrays, same index choice (plain or gap-coded), same int8 quantiser
        parts = to_csr(weight, keep, torch.int8 if self.dtype == "int8" else torch.float32, self.indices)
        row_ptr = parts["crow_indices"].numpy().astype(np.int64)
        fields = {"rows": str(rows), "row_ptr": self.const_array("int32_t", f"{label}_row_ptr", row_ptr)}
        if "col_gaps" in parts:
            index = "gaps-u8"
            fields["gaps"] = self.const_array("uint8_t", f"{label}_gaps", parts["col_gaps"].numpy())
        else:
            index = "int16_t" if parts["col_indices"].dtype == torch.int16 else "int32_t"
            fields["col16" if index == "int16_t" else "col32"] = self.const_array(
                index, f"{label}_col", parts["col_indices"].numpy())
        info: dict[str, Any] = {}
        if self.dtype == "int8":
            fields["qvalues"] = self.const_array("int8_t", f"{label}_q", parts["values"].numpy())
            fields["scales"] = self.const_array("float", f"{label}_scale", parts["scales"].numpy())
            info["quantisation"] = quantisation_check(weight.reshape(rows, -1)[keep.reshape(rows, -1)], parts)
        else:
            fields["values"] = self.const_array("float", f"{label}_values", parts["values"].numpy())
        if op.bias is not None:
            fields["bias"] = self.const_array("float", f"{label}_bias", self.weights[op.bias].detach().float().numpy())
        init = ", ".join(f".{key} = {value}" for key, value in fields.items())
        self.consts.append(f"static const ndsnn_csr {label} = {{{init}}};")
        info = {"name": op.weight, "shape": list(weight.shape), "nnz": int(keep.sum()),
                "density": float(keep.float().mean()), "index": index, **info}
        return label, info


def quantisation_check(values: torch.Tensor, parts: dict[str, torch.Tensor]) -> dict[str, Any]:
    """How the int8 parts represent the fp32 `values` (storage order): the largest |scale * q - w| in steps
    (scales), and how many rows with a nonzero weight reach |q| = 127 (all of them, for max|w| / 127)."""
    crow = parts["crow_indices"].numpy().astype(np.int64)
    row_of = np.repeat(np.arange(len(crow) - 1), np.diff(crow))
    q = parts["values"].numpy().astype(np.int64)
    scales = parts["scales"].numpy().astype(np.float64)[row_of]
    w = values.detach().double().numpy()
    error = float((np.abs(scales * q - w) / scales).max()) if len(q) else 0.0
    peak = np.zeros(len(crow) - 1, dtype=np.int64)
    np.maximum.at(peak, row_of, np.abs(q))
    nonzero = np.zeros(len(crow) - 1, dtype=bool)
    np.logical_or.at(nonzero, row_of, w != 0)
    return {"max_error_steps": error, "rows": int(nonzero.sum()), "rows_at_127": int((peak[nonzero] == 127).sum())}


_CTYPE_BYTES = {"float": 4, "int32_t": 4, "int16_t": 2, "int8_t": 1, "uint8_t": 1}


class _Emitter(graph.GraphBackend):
    """Walks the op list and writes one kernel call per op (dispatch on `op.kind`, as the runtime does)."""

    def __init__(self, program: _Program) -> None:
        self.p = program

    def run(self, ops: list[graph.Op], x: _Tensor) -> _Tensor:
        for op in ops:
            x = self.dispatch(op, x)
        return x

    def _label(self, op: graph.Op) -> str:
        self.p.count += 1
        return f"L{self.p.count}"

    def _conv2d(self, op: graph.Conv2d, x: _Tensor) -> _Tensor:
        if op.groups != 1:
            raise UserError(f"{op.name}: grouped convolution is not supported by the C target")
        (c_in, h_in, w_in), (c_out, h_out, w_out) = op.in_shape, op.out_shape
        label = self._label(op)
        csr, info = self.p.csr(op, label)
        weight_shape = self.p.weights[op.weight].shape
        geometry = (c_in, h_in, w_in, c_out, h_out, w_out, *weight_shape[2:], *op.stride, *op.padding, *op.dilation)
        self.p.consts.append(f"static const ndsnn_conv_geometry {label}_geometry = "
                             f"{{{', '.join(map(str, geometry))}}};")
        self.p.flash_bytes += 4 * len(geometry)
        out = self.p.new_tensor(c_out * h_out * w_out, spikes=False)
        if x.spikes:
            accumulator = "NULL"  # fp32 weights accumulate in the output plane
            if self.p.dtype == "int8":
                self.p.acc_entries, accumulator = max(self.p.acc_entries, h_out * w_out), "ndsnn_acc"
            self.p.emit(f"ndsnn_conv_spikes(&{csr}, &{label}_geometry, {x.expr}, {out.expr}, {accumulator});")
        else:
            self.p.emit(f"ndsnn_conv_analog(&{csr}, &{label}_geometry, {x.expr}, {out.expr});")
        self.p.layers.append({**info, "input": "spikes" if x.spikes else "analog"})
        self.p.release(x)
        return out

    def _linear(self, op: graph.Linear, x: _Tensor) -> _Tensor:
        csr, info = self.p.csr(op, self._label(op))
        out = self.p.new_tensor(int(self.p.weights[op.weight].shape[0]), spikes=False)
        kernel = "ndsnn_linear_spikes" if x.spikes else "ndsnn_linear_analog"
        self.p.emit(f"{kernel}(&{csr}, {x.expr}, {out.expr});")
        self.p.layers.append({**info, "input": "spikes" if x.spikes else "analog"})
        self.p.release(x)
        return out

    def _lif(self, op: graph.LIF, x: _Tensor) -> _Tensor:
        membrane = self.p.static_array("float", f"ndsnn_membrane{len(self.p.membranes)}", x.numel)
        self.p.membranes.append((membrane, x.numel))
        out = self.p.new_tensor(x.numel, spikes=True)
        self.p.emit(f"ndsnn_lif({x.expr}, {membrane}, {out.expr}, {x.numel}, {_float(op.tau)}, "
                    f"{_float(op.v_threshold)});")
        self.p.release(x)
        return out

    def _maxpool2d(self, op: graph.MaxPool2d, x: _Tensor) -> _Tensor:
        (channels, h_in, w_in), (_, h_out, w_out) = op.in_shape, op.out_shape
        label = f"P{self._label(op)}"
        geometry = (channels, h_in, w_in, h_out, w_out, *op.kernel, *op.stride, *op.padding)
        self.p.consts.append(f"static const ndsnn_pool_geometry {label} = {{{', '.join(map(str, geometry))}}};")
        self.p.flash_bytes += 4 * len(geometry)
        out = self.p.new_tensor(channels * h_out * w_out, spikes=x.spikes)
        kernel = "ndsnn_maxpool_spikes" if x.spikes else "ndsnn_maxpool_analog"
        self.p.emit(f"{kernel}(&{label}, {x.expr}, {out.expr});")
        self.p.release(x)
        return out

    def _global_avgpool(self, op: graph.GlobalAvgPool, x: _Tensor) -> _Tensor:
        channels, height, width = op.in_shape
        out = self.p.new_tensor(channels, spikes=False)
        kernel = "ndsnn_avgpool_spikes" if x.spikes else "ndsnn_avgpool_analog"
        self.p.emit(f"{kernel}({x.expr}, {channels}, {height * width}, {out.expr});")
        self.p.release(x)
        return out

    def _flatten(self, op: graph.Flatten, x: _Tensor) -> _Tensor:
        return x  # CHW is already the flattened order

    def _repeat_timesteps(self, op: graph.RepeatTimesteps, x: _Tensor) -> _Tensor:
        # generate_sources cuts the op list at the first repeat: encoder once, body per step; another is an error
        raise UserError("the C target runs the encoder once and the body per time step: the graph repeats the "
                        "time steps twice")

    def _batchnorm(self, op: graph.BatchNorm, x: _Tensor) -> _Tensor:
        raise UserError(f"{op.name}: a BatchNorm that follows no conv/linear cannot be folded for the C target")

    def _residual(self, op: graph.Residual, x: _Tensor) -> _Tensor:
        x.refs += 1  # read by both branches
        main = self.run(list(op.main), x)
        shortcut = self.run(list(op.shortcut), x)
        if main.spikes:
            raise UserError(f"{op.name}: a residual branch ending in spikes is not supported by the C target")
        kernel = "ndsnn_add_spikes" if shortcut.spikes else "ndsnn_add_analog"
        self.p.emit(f"{kernel}({main.expr}, {shortcut.expr}, {main.expr}, {main.numel});")
        self.p.release(shortcut)
        return main


def _float(value: float) -> str:
    return f"{float(np.float32(value)):.8e}f"


def generate_sources(model: Any, masks: dict[str, torch.Tensor], *, contract: dict[str, Any], timesteps: int,
                     num_classes: int, dtype: str = "fp32", dense: bool = False, indices: str = "auto",
                     description: str = "") -> CSources:
    """The C files of a BN-folded SpikingNet (`fold.fold_batchnorm`) and its masks.

    `contract` is `data.input_contract(dataset)`: the image shape and the normalisation done inside.
    `dense` stores every weight position (the dense baseline build of the same generator). `indices`:
    column indices plain ("plain"), gap-coded uint8 ("gaps") or whichever is smaller per layer ("auto").
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: the C target takes {' or '.join(DTYPES)}")
    if indices not in ("auto", "plain", "gaps"):  # the kernels walk rows: row pointers, not flat gaps
        raise UserError(f"indices {indices!r}: the C target takes auto, plain or gaps")
    shape = tuple(contract["shape"])
    ops = graph.network_graph(model, shape)
    cut = next(i for i, op in enumerate(ops) if isinstance(op, graph.RepeatTimesteps))
    program = _Program(model.state_dict(), masks, dtype, dense, indices)
    emitter = _Emitter(program)
    image = program.new_tensor(math.prod(shape), spikes=False)
    encoded = emitter.run(ops[:cut], image)
    encoded.pinned = True  # read by every time step
    encoder_statements, program.statements = program.statements, []
    logits = emitter.run(ops[cut + 1:], encoded)
    if logits.spikes or logits.numel != num_classes:
        raise UserError(f"the network's last op gives {logits.numel} values, not {num_classes} logits")
    if program.acc_entries:
        program.static_array("int32_t", "ndsnn_acc", program.acc_entries)
    program.static_array("float", "ndsnn_logits", num_classes)
    slots = [f"static float ndsnn_slot{i}[{size}];" for i, size in enumerate(program.arena.sizes)]
    program.ram_bytes += 4 * sum(program.arena.sizes)
    program.const_array("float", "ndsnn_mean", np.asarray(contract["mean"], dtype=np.float32))
    program.const_array("float", "ndsnn_std", np.asarray(contract["std"], dtype=np.float32))
    files = {
        "ndsnn_model.h": render("ndsnn_model.h", _header_values(program, shape, timesteps, num_classes, dtype,
                                                                 description)),
        "ndsnn_model.c": render("ndsnn_model.c", {
            "CONSTANTS": "\n".join(program.consts), "BUFFERS": "\n".join(slots + program.statics),
            "ENCODER": _indented(encoder_statements, 1),
            "RESET": _indented([f"ndsnn_zero({name}, {neurons});" for name, neurons in program.membranes], 1),
            "BODY": _indented(program.statements, 2), "LOGITS": logits.expr,
            "PLANE": math.prod(shape[1:]), "IMAGE": image.expr}),
        **{name: template_text(name) for name in COPIED},
        "Makefile": makefile(),
    }
    return CSources(files, program.flash_bytes, program.ram_bytes, program.layers, dtype)


def makefile(firmware_rules: str = "") -> str:
    """The directory's Makefile: the host demo with CFLAGS, and the target's firmware rules (if any)."""
    return render("Makefile", {"CFLAGS": " ".join(CFLAGS), "FIRMWARE_RULES": firmware_rules})


def _indented(statements: list[str], level: int) -> str:
    return "\n".join("    " * level + line for line in statements)


def _header_values(program: _Program, shape: tuple[int, ...], timesteps: int, num_classes: int, dtype: str,
                   description: str) -> dict[str, Any]:
    table = "\n".join(f" *   {layer['name']:<28} {'x'.join(map(str, layer['shape'])):<14} {layer['nnz']:>9} "
                      f"weights ({layer['density']:.4f} dense), {layer['input']} input" for layer in program.layers)
    return {"DESCRIPTION": description, "LAYER_COUNT": len(program.layers),
            "STORED": f"{sum(layer['nnz'] for layer in program.layers):,}",
            "WEIGHTS": f"{sum(math.prod(layer['shape']) for layer in program.layers):,}",
            "DTYPE": dtype, "TIMESTEPS": timesteps, "LAYER_TABLE": table,
            "FLASH_TEXT": f"{program.flash_bytes:,}", "RAM_TEXT": f"{program.ram_bytes:,}",
            "CHANNELS": shape[0], "HEIGHT": shape[1], "WIDTH": shape[2], "INPUT_SIZE": math.prod(shape),
            "NUM_CLASSES": num_classes, "FLASH_BYTES": program.flash_bytes, "RAM_BYTES": program.ram_bytes}
