"""The C target: a trained run as portable C99 (`static const` CSR arrays, static buffers, no heap).

`generate_sources` turns a BN-folded SpikingNet and its masks into the files of the output directory:
`ndsnn_model.h/.c` (this network's arrays, buffers and run function), `ndsnn_kernels.h/.c` (the same
sparse kernels for every model, copied from `c_templates/`), `main.c` and a `Makefile` (host demo).
The graph comes from `graph.network_graph`, as for every exporter: the encoder runs once on the
normalised image, then the body runs step by step for T steps (a LIF layer's membrane is the only
state kept across steps), and the per-step logits are summed.

A tensor between two ops is either analog (float) or a spike map (one byte per neuron, 0 or 1). A
conv/linear fed by spikes only adds the weights of inputs that fired; one fed by an analog tensor
(the encoder, or after average pooling) multiplies. Intermediate tensors share a few static slots,
reused once a tensor's last reader has run (`_Arena`), so RAM is the largest live set, not the sum.

`verify_sources` compiles the host demo with the system compiler and compares it with the reference
runtime (`runtime.SparseNetwork`) on the same images.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ndsnn_cli.errors import UserError
from ndsnn_cli.export import graph
from ndsnn_cli.export.csr import to_csr
from ndsnn_cli.export.exporters import ExportOptions, ExportResult, ExportVerificationError

DTYPES = ("fp32", "int8")
TEMPLATES = ("ndsnn_kernels.h", "ndsnn_kernels.c", "main.c", "Makefile")
CFLAGS = ("-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2")
# fp32: the C code and the reference runtime run the same folded fp32 weights in another summation
# order, so logits agree to float rounding, unless a membrane sits within rounding of the threshold
# and one spike flips. Criteria: >= 99.9% identical predictions and >= 99% of images with every
# logit within LOGIT_ATOL + LOGIT_RTOL * |logit|.
LOGIT_ATOL = 1e-3
LOGIT_RTOL = 1e-3
MIN_SAME_PREDICTIONS = 0.999
MIN_LOGITS_WITHIN = 0.99
# int8 is checked for its arithmetic and for its quantisation, apart:
# - arithmetic: against the reference runtime on the same int8 weights (scale * q, what `ndsnn run` reads
#   from an int8 CSR artefact), the fp32 criteria above;
# - quantisation: every stored weight within half a step of its fp32 value and each row's largest one at
#   +-127 (exact properties of the symmetric round-to-nearest quantiser), and, on labelled images, the
#   accuracy drop against the fp32 reference at most INT8_ACCURACY_POINTS beyond sampling noise:
#   drop <= 0.5 points + INT8_Z * sqrt(discordant) / N (a one-sided McNemar bound; discordant = images
#   that exactly one of the two gets right). A weakly trained model flips many near-tied images either
#   way, so its accuracy moves by a few images by chance; a broken int8 path loses far more than that.
INT8_ACCURACY_POINTS = 0.5
INT8_Z = 3.0
INT8_MAX_ERROR_STEPS = 0.5 + 1e-3  # |scale * q - w| / scale, with float32 rounding of w / scale
VALUES_PER_LINE = 8


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


class _Emitter:
    """Walks the op list and writes one kernel call per op (dispatch on `op.kind`, as the runtime does)."""

    def __init__(self, program: _Program) -> None:
        self.p = program

    def run(self, ops: list[graph.Op], x: _Tensor) -> _Tensor:
        for op in ops:
            x = getattr(self, f"_{op.kind}")(op, x)
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
    body_statements = program.statements
    if program.acc_entries:
        program.static_array("int32_t", "ndsnn_acc", program.acc_entries)
    program.static_array("float", "ndsnn_logits", num_classes)
    slots = [f"static float ndsnn_slot{i}[{size}];" for i, size in enumerate(program.arena.sizes)]
    program.ram_bytes += 4 * sum(program.arena.sizes)
    program.const_array("float", "ndsnn_mean", np.asarray(contract["mean"], dtype=np.float32))
    program.const_array("float", "ndsnn_std", np.asarray(contract["std"], dtype=np.float32))
    run = _run_function(program, image, logits, encoder_statements, body_statements, timesteps, shape, num_classes)
    model_c = "\n\n".join([_MODEL_C_HEAD, "\n".join(program.consts), "\n".join(slots + program.statics), run]) + "\n"
    header = _header(program, shape, timesteps, num_classes, dtype, description)
    files = {"ndsnn_model.h": header, "ndsnn_model.c": model_c}
    templates = resources.files("ndsnn_cli.export").joinpath("c_templates")
    files.update({name: templates.joinpath(name).read_text(encoding="utf-8") for name in TEMPLATES})
    return CSources(files, program.flash_bytes, program.ram_bytes, program.layers, dtype)


_MODEL_C_HEAD = """/* Generated by `ndsnn export --format c`: this network's weights, buffers and run function. */
#include "ndsnn_model.h"

#include "ndsnn_kernels.h\""""


def _run_function(program: _Program, image: _Tensor, logits: _Tensor, encoder: list[str], body: list[str],
                  timesteps: int, shape: tuple[int, ...], num_classes: int) -> str:
    """`run_normalised` (encoder once, body for each step, logits summed) and the two public entries."""
    zero = [f"ndsnn_zero({name}, {neurons});" for name, neurons in program.membranes]
    indent = "\n    "
    body_text = "\n        ".join(body + [f"ndsnn_accumulate({logits.expr}, sum, {num_classes});"])
    channels, plane = shape[0], math.prod(shape[1:])
    return f"""/* The image is normalised into the first slot; returns the predicted class. */
static int run_normalised(float *logits)
{{
    float *sum = logits != NULL ? logits : ndsnn_logits;
    int32_t step;
    {indent.join(encoder)}
    {indent.join(zero)}
    ndsnn_zero(sum, {num_classes});
    for (step = 0; step < NDSNN_TIMESTEPS; ++step) {{
        {body_text}
    }}
    return ndsnn_argmax(sum, {num_classes});
}}

int ndsnn_model_run(const float *image, float *logits)
{{
    ndsnn_normalize(image, ndsnn_mean, ndsnn_std, {channels}, {plane}, {image.expr});
    return run_normalised(logits);
}}

int ndsnn_model_run_u8(const uint8_t *image, float *logits)
{{
    ndsnn_normalize_u8(image, ndsnn_mean, ndsnn_std, {channels}, {plane}, {image.expr});
    return run_normalised(logits);
}}"""


def _header(program: _Program, shape: tuple[int, ...], timesteps: int, num_classes: int, dtype: str,
            description: str) -> str:
    nnz = sum(layer["nnz"] for layer in program.layers)
    numel = sum(math.prod(layer["shape"]) for layer in program.layers)
    table = "\n".join(f" *   {layer['name']:<28} {'x'.join(map(str, layer['shape'])):<14} {layer['nnz']:>9} "
                      f"weights ({layer['density']:.4f} dense), {layer['input']} input" for layer in program.layers)
    return f"""/* Generated by `ndsnn export --format c`. {description}
 * {len(program.layers)} weighted layers, {nnz:,} of {numel:,} weights stored ({dtype} values), T = {timesteps}.
{table}
 *
 * Flash (const data: CSR arrays, biases, scales, geometry): {program.flash_bytes:,} bytes (+ code).
 * RAM (static buffers: activations, membranes, accumulators): {program.ram_bytes:,} bytes. No heap.
 * Not reentrant: one inference at a time (the buffers are static).
 */
#ifndef NDSNN_MODEL_H
#define NDSNN_MODEL_H

#include <stdint.h>

#define NDSNN_INPUT_CHANNELS {shape[0]}
#define NDSNN_INPUT_HEIGHT {shape[1]}
#define NDSNN_INPUT_WIDTH {shape[2]}
#define NDSNN_INPUT_SIZE {math.prod(shape)}
#define NDSNN_NUM_CLASSES {num_classes}
#define NDSNN_TIMESTEPS {timesteps}
#define NDSNN_FLASH_BYTES {program.flash_bytes}
#define NDSNN_RAM_BYTES {program.ram_bytes}

/* image: float pixels in [0, 1], CHW ([C][H][W]); normalised inside with the training mean/std.
 * logits: NULL or NDSNN_NUM_CLASSES floats, the per-step logits summed over the T steps.
 * Returns the predicted class (argmax of the summed logits). */
int ndsnn_model_run(const float *image, float *logits);

/* The same for 8-bit pixels (0..255, i.e. pixel / 255 in [0, 1]), CHW. */
int ndsnn_model_run_u8(const uint8_t *image, float *logits);

#endif /* NDSNN_MODEL_H */
"""


# -- verification -------------------------------------------------------------------------------

def find_compiler() -> str | None:
    """$CC, else cc, gcc or clang on PATH; None when the machine has no C compiler."""
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return next((found for name in candidates if (found := shutil.which(name))), None)


def compile_demo(sources: CSources, directory: Path, compiler: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """Write the files into `directory` and build `demo` with the strict flags; a compiler error is a UserError."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in sources.files.items():
        (directory / name).write_text(text, encoding="utf-8")
    demo = directory / "demo"
    command = [compiler, *CFLAGS, *extra_flags, "-o", str(demo), "main.c", "ndsnn_model.c", "ndsnn_kernels.c"]
    done = subprocess.run(command, cwd=directory, capture_output=True, text=True, check=False)
    if done.returncode:
        raise UserError(f"C target: {' '.join(command)} failed: {done.stderr.strip()[:2000]}")
    return demo


def run_demo(demo: Path, images: torch.Tensor, env: dict[str, str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions [N], summed logits [N, classes]) of `demo -l` on float images [N, C, H, W]."""
    with tempfile.TemporaryDirectory(prefix="ndsnn-c-") as tmp:
        path = Path(tmp) / "images.f32"
        path.write_bytes(images.float().contiguous().numpy().astype("<f4").tobytes())
        done = subprocess.run([str(demo), "-l", str(path)], capture_output=True, text=True, check=False,
                              env={**os.environ, **(env or {})})
    if done.returncode:
        raise UserError(f"C target: the demo failed (exit {done.returncode}): {done.stderr.strip()[:2000]}")
    rows = [line.split() for line in done.stdout.splitlines()]
    predictions = torch.tensor([int(row[0]) for row in rows])
    logits = torch.tensor([[float(v) for v in row[1:]] for row in rows], dtype=torch.float32)
    return predictions, logits


def reference_network(model: Any, masks: dict[str, torch.Tensor], timesteps: int, contract: dict[str, Any],
                      dtype: str = "fp32") -> Any:
    """The reference runtime (`ndsnn run`) on the same folded weights, built from the packed CSR tensors
    and the header a CSR export writes (validated like any artefact; it normalises inside, per `contract`).
    `dtype` int8: the int8 artefact's weights (the same quantiser as the C target's), dequantised at load."""
    from safetensors.torch import load as load_safetensors

    from ndsnn_cli.export.csr import CSR_FORMAT, CSR_VERSION, pack
    from ndsnn_cli.export.runtime import SparseNetwork

    ops = graph.network_graph(model)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    last = [op for op in graph.walk(ops) if isinstance(op, graph.Linear | graph.Conv2d)][-1]
    channels, size = contract["shape"][0], contract["shape"][1]
    metadata = {"format": CSR_FORMAT, "version": CSR_VERSION, "dtype": dtype, "timesteps": timesteps,
                "graph": graph.to_json(ops), "input": contract,
                "dataset": {"num_classes": int(state[last.weight].shape[0]), "in_channels": channels,
                            "image_size": size}}
    return SparseNetwork(load_safetensors(pack(state, masks, metadata, dtype)), metadata)


def normalise(images: torch.Tensor, contract: dict[str, Any]) -> torch.Tensor:
    """(x - mean) / std per channel in float32: the same two roundings as the C code."""
    mean = torch.tensor(contract["mean"], dtype=torch.float32).reshape(1, -1, 1, 1)
    std = torch.tensor(contract["std"], dtype=torch.float32).reshape(1, -1, 1, 1)
    return (images.float() - mean) / std


def compare(c_out: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor],
            labels: torch.Tensor | None) -> dict[str, Any]:
    """Agreement of one image set: same predictions, max |logit diff|, images within tolerance, accuracies."""
    (c_pred, c_logits), (ref_pred, ref_logits) = c_out, reference
    diff = (c_logits - ref_logits).abs()
    within = (diff <= LOGIT_ATOL + LOGIT_RTOL * ref_logits.abs()).all(1)
    report = {"samples": len(c_pred), "same_predictions": int((c_pred == ref_pred).sum()),
              "max_abs_logit_diff": float(diff.max()) if diff.numel() else 0.0,
              "logits_within_tolerance": int(within.sum())}
    if labels is not None:
        report["accuracy_c"] = float((c_pred == labels).float().mean())
        report["accuracy_reference"] = float((ref_pred == labels).float().mean())
    return report


def compare_to_fp32(c_pred: torch.Tensor, fp32_pred: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """The int8 build's predictions against the fp32 reference's on labelled images: accuracies, the images
    exactly one of them gets right (discordant), and the accuracy drop allowed (INT8_ACCURACY_POINTS beyond
    INT8_Z standard errors of the drop, McNemar)."""
    c_right, fp32_right = c_pred == labels, fp32_pred == labels
    samples, discordant = len(labels), int((c_right != fp32_right).sum())
    return {"samples": samples, "same_predictions": int((c_pred == fp32_pred).sum()),
            "accuracy_c": float(c_right.float().mean()), "accuracy_fp32": float(fp32_right.float().mean()),
            "discordant": discordant,
            "allowed_drop": INT8_ACCURACY_POINTS / 100 + INT8_Z * math.sqrt(discordant) / max(samples, 1)}


def _arithmetic_agrees(entry: dict[str, Any]) -> bool:
    """>= 99.9% same predictions and >= 99% of images with every logit within tolerance."""
    return entry["same_predictions"] >= math.ceil(MIN_SAME_PREDICTIONS * entry["samples"]) and \
        entry["logits_within_tolerance"] >= math.ceil(MIN_LOGITS_WITHIN * entry["samples"])


def quantisation_sound(layers: list[dict[str, Any]]) -> bool:
    """Every int8 weight within INT8_MAX_ERROR_STEPS of its fp32 value; every nonzero row's peak at 127."""
    checks = [layer["quantisation"] for layer in layers if "quantisation" in layer]
    return all(q["max_error_steps"] <= INT8_MAX_ERROR_STEPS and q["rows_at_127"] == q["rows"] for q in checks)


def passes(report: dict[str, Any], dtype: str, layers: list[dict[str, Any]] | None = None) -> bool:
    """Every image set agrees with the reference runtime on the same weights (fp32 or int8) to rounding;
    int8 also: a sound quantiser (`layers`) and, on labelled sets, an accuracy drop against fp32 within
    `allowed_drop`."""
    if any(not _arithmetic_agrees(entry) or _int8_drop_too_large(entry) for entry in report.values()):
        return False
    return dtype != "int8" or quantisation_sound(layers or [])


def _int8_drop_too_large(entry: dict[str, Any]) -> bool:
    fp32 = entry.get("fp32_reference")
    return fp32 is not None and fp32["accuracy_fp32"] - fp32["accuracy_c"] > fp32["allowed_drop"]


def verify_sources(sources: CSources, model: Any, masks: dict[str, torch.Tensor], timesteps: int,
                   contract: dict[str, Any], images: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
                   compiler: str) -> dict[str, Any]:
    """Compile the demo, run it and the reference runtime on each image set ([0, 1] pixels, labels or None):
    the reference on the build's own weights (fp32, or int8 dequantised), and for int8 the fp32 one too."""
    nets = {dtype: reference_network(model, masks, timesteps, contract, dtype) for dtype in {"fp32", sources.dtype}}
    report: dict[str, Any] = {"compiler": compiler, "dtype": sources.dtype, "images": {}}
    with tempfile.TemporaryDirectory(prefix="ndsnn-c-build-") as tmp:
        demo = compile_demo(sources, Path(tmp), compiler)
        for label, (pixels, labels) in images.items():
            c_out = run_demo(demo, pixels)
            logits = {dtype: torch.cat([net(pixels[i:i + 64]).sum(0) for i in range(0, len(pixels), 64)])
                      for dtype, net in nets.items()}
            entry = compare(c_out, (logits[sources.dtype].argmax(-1), logits[sources.dtype]), labels)
            if sources.dtype == "int8" and labels is not None:
                entry["fp32_reference"] = compare_to_fp32(c_out[0], logits["fp32"].argmax(-1), labels)
            report["images"][label] = entry
    if sources.dtype == "int8":
        report["quantisation"] = {layer["name"]: layer["quantisation"] for layer in sources.layers}
    report["passed"] = passes(report["images"], sources.dtype, sources.layers)
    return report


def failure_reason(report: dict[str, Any]) -> str:
    """One line for a refused export: what was measured on which images, and what the user can do."""
    parts = []
    failed = {label: entry for label, entry in report["images"].items()
              if not _arithmetic_agrees(entry) or _int8_drop_too_large(entry)}
    for label, entry in failed.items():
        line = (f"{label} images ({entry['samples']}): {entry['same_predictions']} same predictions and "
                f"{entry['logits_within_tolerance']} logits within tolerance vs the {report['dtype']} reference "
                f"runtime (need {math.ceil(MIN_SAME_PREDICTIONS * entry['samples'])} and "
                f"{math.ceil(MIN_LOGITS_WITHIN * entry['samples'])})")
        if (fp32 := entry.get("fp32_reference")) is not None:
            line += (f", accuracy int8 C {fp32['accuracy_c']:.2%} vs fp32 reference {fp32['accuracy_fp32']:.2%} "
                     f"({fp32['discordant']} images decided differently; drop allowed "
                     f"{fp32['allowed_drop']:.2%})")
        parts.append(line)
    bad = [name for name, q in report.get("quantisation", {}).items()
           if q["max_error_steps"] > INT8_MAX_ERROR_STEPS or q["rows_at_127"] != q["rows"]]
    if bad:
        parts.append(f"int8 weights of {', '.join(bad)} off by more than half a step or not scaled to 127")
    bug = bad or not all(_arithmetic_agrees(entry) for entry in failed.values())
    advice = ("that is a bug in ndsnn's C target or int8 quantiser: please report it with the --json output" if bug
              else "int8 loses more accuracy than sampling noise explains: train the run further (small logit "
              "margins flip under int8), or export --dtype fp32")
    return "; ".join(parts) + f"; {advice}, or pass --no-verify to write it unchecked"


def verification_images(recipe: Any, contract: dict[str, Any], count: int) -> dict[str, tuple[torch.Tensor, Any]]:
    """The recipe's first `count` test images as [0, 1] pixels (with labels) when the data set is on this
    machine, plus 8 uniform random images."""
    shape = tuple(contract["shape"])
    generator = torch.Generator().manual_seed(0)
    images: dict[str, tuple[torch.Tensor, Any]] = {"random": (torch.rand(8, *shape, generator=generator), None)}
    try:
        from ndsnn_cli.data.loading import raw_test_set

        test = raw_test_set(recipe.replace(data={"train_limit": 1, "test_limit": count}).data)
    except UserError:
        return images  # data set not here: random images only (the report says which ran)
    pairs = [test[i] for i in range(min(count, len(test)))]
    images["test"] = (torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs]))
    return images


# -- export -------------------------------------------------------------------------------------

def export_c(source: str | Path, out: str | Path | None = None, *, dtype: str = "fp32", run_verify: bool = True,
             dense: bool = False, verify_images: int = 256) -> tuple[Path, dict[str, Any]]:
    """Checkpoint (or run dir) -> a directory of C sources, verified against the reference runtime when a
    compiler exists; raises ExportVerificationError (nothing written) on disagreement."""
    from ndsnn_cli.data import dataset_info, input_contract
    from ndsnn_cli.export.csr import default_output
    from ndsnn_cli.export.fold import fold_batchnorm, load_trained

    trained = load_trained(source)
    folded = fold_batchnorm(trained.model)
    recipe = trained.recipe
    contract = input_contract(recipe.data.dataset)
    info = dataset_info(recipe.data.dataset)
    description = f"{recipe.model.arch} on {info.name}, recipe sha256 {recipe.sha256()[:12]}"
    sources = generate_sources(folded, trained.masks, contract=contract, timesteps=recipe.model.timesteps,
                               num_classes=info.num_classes, dtype=dtype, dense=dense, description=description)
    report: dict[str, Any] = {"dtype": dtype, "dense": dense, "flash_bytes": sources.flash_bytes,
                              "ram_bytes": sources.ram_bytes, "layers": sources.layers}
    compiler = find_compiler() if run_verify else None
    if compiler is not None:
        images = verification_images(recipe, contract, verify_images)
        report["verify"] = verify_sources(sources, folded, trained.masks, recipe.model.timesteps, contract, images,
                                          compiler)
        if not report["verify"]["passed"]:
            raise ExportVerificationError("the C build differs from the reference runtime beyond tolerance", report,
                                          failure_reason(report["verify"]))
    target = Path(out) if out is not None else default_output(trained.path, "c").with_name("c")
    report["bytes"] = write_directory(target, sources.files)
    return target, report


def write_directory(target: Path, files: dict[str, str]) -> int:
    """Each file written atomically into `target` (created if needed); returns the total bytes."""
    from ndsnn_cli.atomic import write_text

    if target.exists() and not target.is_dir():
        raise UserError(f"{target}: the C target writes a directory, and this is a file")
    try:
        for name, text in files.items():
            write_text(target / name, text)
    except OSError as exc:
        raise UserError(f"{target}: cannot write output ({exc.strerror or exc})") from None
    return sum(len(text.encode("utf-8")) for text in files.values())


def export_result(source: str | Path, out: str | Path | None, options: ExportOptions) -> ExportResult:
    """`export_c` as the exporter registry's common result."""
    path, report = export_c(source, out, dtype=options.dtype, run_verify=options.verify)
    summary = [f"flash {report['flash_bytes']:,} bytes of const data (+ code), RAM {report['ram_bytes']:,} bytes "
               f"static, {options.dtype} values; build: make -C {path} && {path}/demo IMAGES.f32"]
    notes = []
    check = report.get("verify")
    if check is None:
        notes.append("verification skipped: " + ("--no-verify" if not options.verify else "no C compiler found"))
    else:
        for label, entry in check["images"].items():
            line = (f"verify {label}: {entry['same_predictions']}/{entry['samples']} same predictions as the "
                    f"{options.dtype} reference runtime, max |logit diff| {entry['max_abs_logit_diff']:.3g}")
            if "accuracy_c" in entry:
                line += f", accuracy C {entry['accuracy_c']:.2%} vs reference {entry['accuracy_reference']:.2%}"
            if (fp32 := entry.get("fp32_reference")) is not None:
                line += (f"; vs fp32: {fp32['same_predictions']}/{fp32['samples']} same predictions, accuracy "
                         f"{fp32['accuracy_fp32']:.2%}")
            summary.append(line)
    return ExportResult(path, "c", {k: v for k, v in report.items() if k != "layers"}, summary=summary, notes=notes)
