"""NIR export: the BN-folded network as a Neuromorphic Intermediate Representation graph (`nir` package).

Mapping (see docs/nir.md): Conv2d -> `nir.Conv2d`, Linear -> `nir.Affine` (BN folded first, so every
weight is the folded PyTorch weight bit for bit), LIF -> `nir.LIF` with one value per neuron,
Flatten -> `nir.Flatten`, global average pooling -> `nir.AvgPool2d` over the whole map, a residual
sum -> two edges into the block's output LIF (NIR sums a node's inputs), max-pooling of spikes ->
`nir.SumPool2d` + a memoryless gate `nir.LIF` (NIR's `Threshold` is imported by neither snnTorch nor
SpikingJelly). Max-pooling of analog values has no NIR equivalent and is refused.

LIF: our discrete neuron is `H = V + (X - V) / tau_d`. NIR's is `tau dv/dt = (v_leak - v) + r I`;
its forward-Euler step of length `dt` seconds is `v + dt/tau (v_leak - v + r I)`, identical to ours
with `tau = tau_d * dt`, `r = 1`, `v_leak = 0`, `v_reset = 0` (hard reset). The readers simulate at
`dt = 1e-4 s` (snnTorch hard-codes it, SpikingJelly defaults to it), hence DEFAULT_DT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ndsnn_cli import limits as L
from ndsnn_cli.errors import UserError
from ndsnn_cli.export import graph
from ndsnn_cli.export.exporters import ExportOptions, ExportResult
from ndsnn_cli.export.fold import resolve_checkpoint
from ndsnn_cli.export.source import default_output, load_source, write_checked

NIR_FORMAT_VERSION = 2  # graph metadata `version`; 1 (no `version` key): tau in steps, dt = 1
GZIP_LEVEL = 4  # h5py's default level, stated: NIR datasets are written gzip-compressed
DEFAULT_DT = 1e-4  # seconds per simulation step: snnTorch's fixed and SpikingJelly's default `dt`
# The gate after a sum-pool of spikes: tau_d = 2 (SpikingJelly needs tau/dt > 1) and threshold 1/4, so
# that with integer input k >= 0 the charge is k/2 from a membrane that is always 0: spike iff k >= 1.
GATE_TAU_STEPS = 2.0
GATE_THRESHOLD = 0.25


def import_nir() -> Any:
    try:
        import nir
    except ImportError:
        raise UserError("--format nir needs the `nir` package (pip install 'nir>=1.0')") from None
    return nir


class _Builder(graph.GraphBackend):
    """Emits NIR nodes and edges for the graph's ops, in execution order."""

    def __init__(self, nir: Any, state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], dt: float) -> None:
        self.nir, self.state, self.masks, self.dt = nir, state, masks, dt
        self.nodes: dict[str, Any] = {}
        self.edges: list[tuple[str, str]] = []
        self.spiking = False  # whether the values fed on are spikes (0/1): a max-pool needs them

    def add(self, name: str, node: Any, sources: list[str]) -> list[str]:
        self.nodes[name] = node
        self.edges += [(source, name) for source in sources]
        return [name]

    def sparsity(self, weight_name: str) -> dict[str, Any]:
        mask = self.masks.get(weight_name)
        if mask is None:
            return {"sparse": 0}
        nnz = int(mask.sum())
        return {"sparse": 1, "nnz": nnz, "numel": mask.numel(), "sparsity": 1 - nnz / mask.numel()}

    def emit(self, ops: Sequence[graph.Op], sources: list[str]) -> list[str]:
        """The ops' nodes fed by `sources`; returns the names that feed whatever comes next."""
        for op in ops:
            sources = self.dispatch(op, sources)
            if not isinstance(op, graph.Flatten | graph.RepeatTimesteps):  # those keep spikes spikes
                self.spiking = isinstance(op, graph.LIF | graph.MaxPool2d)
        return sources

    def _weight_and_bias(self, op: graph.WeightedOp) -> tuple[np.ndarray, np.ndarray]:
        weight = self.state[op.weight].numpy()
        bias = self.state[op.bias].numpy() if op.bias else np.zeros(weight.shape[0], dtype=weight.dtype)
        return weight, bias

    def _conv2d(self, op: graph.Conv2d, sources: list[str]) -> list[str]:
        weight, bias = self._weight_and_bias(op)
        node = self.nir.Conv2d(input_shape=op.in_shape[1:], weight=weight, stride=op.stride, padding=op.padding,
                               dilation=op.dilation, groups=op.groups, bias=bias, metadata=self.sparsity(op.weight))
        return self.add(op.name, node, sources)

    def _linear(self, op: graph.Linear, sources: list[str]) -> list[str]:
        weight, bias = self._weight_and_bias(op)
        return self.add(op.name, self.nir.Affine(weight=weight, bias=bias, metadata=self.sparsity(op.weight)), sources)

    def _lif_node(self, shape: graph.Shape, tau_steps: float, v_threshold: float, metadata: dict[str, Any]) -> Any:
        """NIR LIF whose forward-Euler step of `dt` seconds is our discrete neuron with `tau_steps`."""
        def full(value: float) -> np.ndarray:
            return np.full(shape, value, dtype=np.float32)  # float32: snnTorch keeps the arrays' dtype
        return self.nir.LIF(tau=full(tau_steps * self.dt), r=full(1.0), v_leak=full(0.0),
                            v_threshold=full(v_threshold), v_reset=full(0.0), metadata=metadata)

    def _lif(self, op: graph.LIF, sources: list[str]) -> list[str]:
        return self.add(op.name, self._lif_node(op.out_shape, op.tau, op.v_threshold, {"tau_steps": op.tau}), sources)

    def _flatten(self, op: graph.Flatten, sources: list[str]) -> list[str]:
        return self.add(op.name, self.nir.Flatten(input_type={"input": np.array(op.in_shape)}, start_dim=0), sources)

    def _global_avgpool(self, op: graph.GlobalAvgPool, sources: list[str]) -> list[str]:
        size = np.array(op.in_shape[1:])
        node = self.nir.AvgPool2d(kernel_size=size, stride=size, padding=np.array([0, 0]))
        return self.add(op.name, node, sources)  # keeps the [C, 1, 1] map, as the Flatten after it expects

    def _repeat_timesteps(self, op: graph.RepeatTimesteps, sources: list[str]) -> list[str]:
        # Direct encoding: the encoder is stateless, so feeding the image at every one of the T steps
        # reproduces "encoder once, repeat over T".
        return sources

    def _residual(self, op: graph.Residual, sources: list[str]) -> list[str]:
        return self.emit(op.main, sources) + self.emit(op.shortcut, sources)  # NIR sums a node's inputs

    def _maxpool2d(self, op: graph.MaxPool2d, sources: list[str]) -> list[str]:
        """Max-pool of spikes = spike iff the window's sum >= 1: `SumPool2d`, then a gate LIF that fires
        at any input >= 1 and never keeps charge (module constants GATE_*)."""
        if not self.spiking:
            raise UserError(f"layer {op.name} (MaxPool2d) pools analog values: NIR has no max-pooling "
                            "primitive, so this model cannot be exported to NIR (use --format onnx or csr)")
        floor_shape = tuple((size + 2 * pad - kernel) // stride + 1
                            for size, pad, kernel, stride in zip(op.in_shape[1:], op.padding, op.kernel, op.stride,
                                                                 strict=True))
        if any(op.padding) or floor_shape != op.out_shape[1:]:
            raise UserError(f"layer {op.name} (MaxPool2d): padding or ceil_mode on a {op.in_shape[1]}x"
                            f"{op.in_shape[2]} map has no NIR sum-pool equivalent (use --format onnx or csr)")
        pool = self.nir.SumPool2d(kernel_size=np.array(op.kernel), stride=np.array(op.stride),
                                  padding=np.array([0, 0]))
        sources = self.add(op.name, pool, sources)
        gate = self._lif_node(op.out_shape, GATE_TAU_STEPS, GATE_THRESHOLD,
                              {"ndsnn_role": "max-pool gate: spike iff the pooled spike count >= 1"})
        return self.add(f"{op.name}.gate", gate, sources)

    def _batchnorm(self, op: graph.BatchNorm, sources: list[str]) -> list[str]:
        module_type = "BatchNorm2d" if len(op.in_shape) == 3 else "BatchNorm1d"  # input [C, H, W] or [C(, L)]
        raise UserError(f"layer {op.name} ({module_type}) follows no conv/linear: cannot fold it for NIR")


def check_dt(dt: float) -> float:
    """The simulation step in seconds, in [MIN_DT, MAX_DT] (1 ns to 1 s): a step of 1e308 s writes infinite
    time constants, one of 1e-320 s ones that float32 stores as 0. Else a UserError (exit 2)."""
    if not (isinstance(dt, int | float) and math.isfinite(dt) and L.MIN_DT <= dt <= L.MAX_DT):
        raise UserError(f"--dt {dt:g}: the simulation step must be between {L.MIN_DT:g} and {L.MAX_DT:g} seconds "
                        "(e.g. 1e-4)")
    return float(dt)


def build_graph(source: str | Path, dt: float = DEFAULT_DT) -> tuple[Any, dict[str, Any]]:
    """(nir.NIRGraph of the checkpoint's BN-folded model with time constants in seconds for steps of
    `dt` seconds, graph metadata)."""
    dt = check_dt(dt)
    nir = import_nir()
    loaded = load_source(source)
    folded, recipe, info, contract = loaded.folded, loaded.recipe, loaded.info, loaded.contract
    in_shape = (info.in_channels, info.image_size, info.image_size)
    ops = graph.network_graph(folded, input_shape=in_shape)
    builder = _Builder(nir, folded.state_dict(), loaded.masks, dt)
    builder.add("input", nir.Input(input_type={"input": np.array(in_shape)}), [])
    sources = builder.emit(ops, ["input"])
    builder.add("output", nir.Output(output_type={"output": np.array([info.num_classes])}), sources)
    numel = sum(m.numel() for m in loaded.masks.values())
    nnz = sum(int(m.sum()) for m in loaded.masks.values())
    metadata = {
        "format": "ndsnn-nir", "version": NIR_FORMAT_VERSION, "arch": recipe.model.arch,
        "timesteps": recipe.model.timesteps, "dt": dt,
        "input": "the same analog image at every one of the T steps (direct encoding), pixels in [0, 1] "
                 "normalised per channel as (x - input_mean) / input_std",
        "input_mean": list(contract["mean"]), "input_std": list(contract["std"]),
        "readout": "sum of the output over the T steps; prediction = argmax",
        "neuron": "discrete LIF h = v + (x - v)/tau_steps with tau_steps = tau/dt (forward Euler of NIR LIF "
                  "with steps of dt seconds), spike h >= v_threshold, hard reset to v_reset",
        "bn_folded": 1, "sparsity": 1 - nnz / numel if numel else 0.0, "nnz": nnz, "numel": numel,
        "recipe": recipe.to_toml(), "recipe_sha256": recipe.sha256(),
    }
    try:
        nir_graph = nir.NIRGraph(nodes=builder.nodes, edges=builder.edges, metadata=metadata)
    except ValueError as exc:  # NIR's type check: a shape that does not line up between two nodes
        raise UserError(f"{loaded.path}: NIR graph does not type-check ({str(exc).splitlines()[0]})") from None
    return nir_graph, metadata


def export_nir(source: str | Path, out: str | Path | None = None,
               dt: float = DEFAULT_DT) -> tuple[Path, dict[str, Any]]:
    """Checkpoint (or run dir) -> .nir file (gzip-compressed HDF5), written atomically; returns (path,
    graph metadata)."""
    import io

    nir = import_nir()
    nir_graph, metadata = build_graph(source, dt)
    buffer = io.BytesIO()
    nir.write(buffer, nir_graph, compression="gzip", compression_opts=GZIP_LEVEL)
    target = Path(out) if out is not None else default_output(resolve_checkpoint(source), "nir")
    return write_checked(target, buffer.getvalue()), {**metadata, "nodes": len(nir_graph.nodes)}


def export_result(source: str | Path, out: str | Path | None, options: ExportOptions) -> ExportResult:
    """`export_nir` as the exporter registry's common result (reads `options.dt`)."""
    path, meta = export_nir(source, out, DEFAULT_DT if options.dt is None else options.dt)
    size_bytes = path.stat().st_size
    details = {"bytes": size_bytes, "nodes": meta["nodes"], "dt": meta["dt"], "sparsity": meta["sparsity"],
               "nnz": meta["nnz"], "recipe_sha256": meta["recipe_sha256"]}
    summary = [f"{meta['nodes']} NIR nodes, sparsity {meta['sparsity']:.4f} (weights stored dense, gzip level "
               f"{GZIP_LEVEL}: {size_bytes / 1e6:.2f} MB)",
               f"time constants in seconds for dt = {meta['dt']:g} s (snnTorch's fixed and SpikingJelly's "
               "default step)"]
    return ExportResult(path, "nir", details, summary=summary)
