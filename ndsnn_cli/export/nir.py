"""NIR export: the BN-folded network as a Neuromorphic Intermediate Representation graph (`nir` package).

Mapping (see docs/nir.md): Conv2d -> `nir.Conv2d`, Linear -> `nir.Affine` (BN folded first, so every
weight is the folded PyTorch weight bit for bit), LIF -> `nir.LIF` with one value per neuron,
Flatten -> `nir.Flatten`, global average pooling -> `nir.AvgPool2d` over the whole map, a residual
sum -> two edges into the block's output LIF (NIR sums a node's inputs). Max-pooling has no NIR
primitive and is refused.

LIF: our discrete neuron is `H = V + (X - V) / tau_d`. NIR's is `tau dv/dt = (v_leak - v) + r I`;
its forward-Euler step with step `dt` is `v + dt/tau (v_leak - v + r I)`, identical to ours with
`dt = 1` (one simulation step), `tau = tau_d`, `r = 1`, `v_leak = 0`, `v_reset = 0` (hard reset).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ndsnn_cli.errors import UserError
from ndsnn_cli.export import graph
from ndsnn_cli.export.csr import default_output
from ndsnn_cli.export.exporters import ExportOptions, ExportResult
from ndsnn_cli.export.fold import fold_batchnorm, load_trained

DT = 1.0  # NIR's time unit: one simulation step of the discrete neuron


def _import_nir() -> Any:
    try:
        import nir
    except ImportError:
        raise UserError("--format nir needs the `nir` package (pip install 'nir>=1.0')") from None
    return nir


class _Builder:
    """Emits NIR nodes and edges for the graph's ops, in execution order."""

    def __init__(self, nir: Any, state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
        self.nir, self.state, self.masks = nir, state, masks
        self.nodes: dict[str, Any] = {}
        self.edges: list[tuple[str, str]] = []

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
            sources = getattr(self, f"_{op.kind}")(op, sources)
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

    def _lif(self, op: graph.LIF, sources: list[str]) -> list[str]:
        def full(value: float) -> np.ndarray:
            return np.full(op.out_shape, value, dtype=np.float32)
        node = self.nir.LIF(tau=full(op.tau * DT), r=full(1.0), v_leak=full(0.0), v_threshold=full(op.v_threshold),
                            v_reset=full(0.0))
        return self.add(op.name, node, sources)

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
        raise UserError(f"layer {op.name} (MaxPool2d): NIR has no max-pooling primitive, so this model "
                        "cannot be exported to NIR (mlp and resnet19 can; use --format onnx or csr)")

    def _batchnorm(self, op: graph.BatchNorm, sources: list[str]) -> list[str]:
        module_type = "BatchNorm2d" if len(op.in_shape) == 3 else "BatchNorm1d"  # input [C, H, W] or [C(, L)]
        raise UserError(f"layer {op.name} ({module_type}) follows no conv/linear: cannot fold it for NIR")


def build_graph(source: str | Path) -> tuple[Any, dict[str, Any]]:
    """(nir.NIRGraph of the checkpoint's BN-folded model, graph metadata)."""
    nir = _import_nir()
    trained = load_trained(source)
    folded = fold_batchnorm(trained.model)
    from ndsnn_cli.data import dataset_info

    recipe = trained.recipe
    info = dataset_info(recipe.data.dataset)
    in_shape = (info.in_channels, info.image_size, info.image_size)
    ops = graph.network_graph(folded, input_shape=in_shape)
    builder = _Builder(nir, folded.state_dict(), trained.masks)
    builder.add("input", nir.Input(input_type={"input": np.array(in_shape)}), [])
    sources = builder.emit(ops, ["input"])
    builder.add("output", nir.Output(output_type={"output": np.array([info.num_classes])}), sources)
    numel = sum(m.numel() for m in trained.masks.values())
    nnz = sum(int(m.sum()) for m in trained.masks.values())
    metadata = {
        "format": "ndsnn-nir", "arch": recipe.model.arch, "timesteps": recipe.model.timesteps, "dt": DT,
        "input": "the same analog image at every one of the T steps (direct encoding)",
        "readout": "sum of the output over the T steps; prediction = argmax",
        "neuron": "discrete LIF h = v + (x - v)/tau (forward Euler of NIR LIF, dt=1), spike h >= v_threshold, "
                  "hard reset to v_reset",
        "bn_folded": 1, "sparsity": 1 - nnz / numel if numel else 0.0, "nnz": nnz, "numel": numel,
        "recipe": recipe.to_toml(), "recipe_sha256": recipe.sha256(),
    }
    try:
        nir_graph = nir.NIRGraph(nodes=builder.nodes, edges=builder.edges, metadata=metadata)
    except ValueError as exc:  # NIR's type check: a shape that does not line up between two nodes
        raise UserError(f"{trained.path}: NIR graph does not type-check ({str(exc).splitlines()[0]})") from None
    return nir_graph, metadata


def export_nir(source: str | Path, out: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Checkpoint (or run dir) -> .nir file (HDF5), written atomically; returns (path, graph metadata)."""
    import io

    from ndsnn_cli.export.csr import write_checked
    from ndsnn_cli.export.fold import resolve_checkpoint

    nir = _import_nir()
    nir_graph, metadata = build_graph(source)
    buffer = io.BytesIO()
    nir.write(buffer, nir_graph)
    target = Path(out) if out is not None else default_output(resolve_checkpoint(source), "nir")
    return write_checked(target, buffer.getvalue()), {**metadata, "nodes": len(nir_graph.nodes)}


def export_result(source: str | Path, out: str | Path | None, options: ExportOptions) -> ExportResult:
    """`export_nir` as the exporter registry's common result (NIR takes no options)."""
    path, meta = export_nir(source, out)
    details = {"bytes": path.stat().st_size, "nodes": meta["nodes"], "sparsity": meta["sparsity"],
               "nnz": meta["nnz"], "recipe_sha256": meta["recipe_sha256"]}
    summary = f"{meta['nodes']} NIR nodes, sparsity {meta['sparsity']:.4f} (weights stored dense)"
    return ExportResult(path, "nir", details, summary=[summary])
