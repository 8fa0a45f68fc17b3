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

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ndsnn_cli.errors import UserError
from ndsnn_cli.export.csr import default_output
from ndsnn_cli.export.fold import fold_batchnorm, load_trained
from ndsnn_cli.snn.models import BasicBlock, SpikingNet
from ndsnn_cli.snn.neuron import LIF

DT = 1.0  # NIR's time unit: one simulation step of the discrete neuron


def _import_nir() -> Any:
    try:
        import nir
    except ImportError:
        raise UserError("--format nir needs the `nir` package (pip install 'nir>=1.0')") from None
    return nir


def _shapes(model: SpikingNet, in_shape: tuple[int, ...]) -> dict[nn.Module, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per-sample (input, output) shape of every leaf module, from one forward of a zero image."""
    shapes: dict[nn.Module, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        shapes[module] = (tuple(inputs[0].shape[1:]), tuple(output.shape[1:]))  # a hook's return would replace output

    hooks = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(torch.zeros(1, *in_shape))
    for hook in hooks:
        hook.remove()
    return shapes


class _Builder:
    """Walks the folded model in execution order and emits NIR nodes and edges."""

    def __init__(self, nir: Any, shapes: dict, masks: dict[str, torch.Tensor]) -> None:
        self.nir, self.shapes, self.masks = nir, shapes, masks
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

    def emit(self, module: nn.Module, name: str, sources: list[str]) -> list[str]:
        nir = self.nir
        if isinstance(module, nn.Sequential):
            for child_name, child in module.named_children():
                sources = self.emit(child, f"{name}.{child_name}", sources)
            return sources
        if isinstance(module, BasicBlock):
            main = sources
            for child in ("conv1", "bn1", "lif1", "conv2", "bn2"):
                main = self.emit(getattr(module, child), f"{name}.{child}", main)
            shortcut = self.emit(module.shortcut, f"{name}.shortcut", sources)
            return self.emit(module.lif2, f"{name}.lif2", main + shortcut)  # NIR sums a node's inputs
        if isinstance(module, nn.Identity):
            return sources
        in_shape, out_shape = self.shapes[module]
        if isinstance(module, nn.Conv2d):
            weight = module.weight.detach().numpy()
            bias = (module.bias.detach().numpy() if module.bias is not None
                    else np.zeros(weight.shape[0], dtype=weight.dtype))
            node = nir.Conv2d(input_shape=in_shape[1:], weight=weight, stride=module.stride, padding=module.padding,
                              dilation=module.dilation, groups=module.groups, bias=bias,
                              metadata=self.sparsity(f"{name}.weight"))
            return self.add(name, node, sources)
        if isinstance(module, nn.Linear):
            weight = module.weight.detach().numpy()
            bias = (module.bias.detach().numpy() if module.bias is not None
                    else np.zeros(weight.shape[0], dtype=weight.dtype))
            return self.add(name, nir.Affine(weight=weight, bias=bias, metadata=self.sparsity(f"{name}.weight")),
                            sources)
        if isinstance(module, LIF):
            def full(value: float) -> np.ndarray:
                return np.full(out_shape, value, dtype=np.float32)
            node = nir.LIF(tau=full(module.tau * DT), r=full(1.0), v_leak=full(0.0),
                           v_threshold=full(module.v_threshold), v_reset=full(0.0))
            return self.add(name, node, sources)
        if isinstance(module, nn.Flatten):
            return self.add(name, nir.Flatten(input_type={"input": np.array(in_shape)}, start_dim=0), sources)
        if isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1)):
            size = np.array(in_shape[1:])
            node = nir.AvgPool2d(kernel_size=size, stride=size, padding=np.array([0, 0]))
            return self.add(name, node, sources)  # keeps the [C, 1, 1] map, as the Flatten after it expects
        if isinstance(module, nn.MaxPool2d):
            raise UserError(f"layer {name} (MaxPool2d): NIR has no max-pooling primitive, so this model "
                            "cannot be exported to NIR (mlp and resnet19 can; use --format onnx or csr)")
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            raise UserError(f"layer {name} ({type(module).__name__}) follows no conv/linear: cannot fold it for NIR")
        raise UserError(f"layer {name} ({type(module).__name__}) has no NIR mapping")


def build_graph(source: str | Path) -> tuple[Any, dict[str, Any]]:
    """(nir.NIRGraph of the checkpoint's BN-folded model, graph metadata)."""
    nir = _import_nir()
    trained = load_trained(source)
    folded = fold_batchnorm(trained.model)
    from ndsnn_cli.data import dataset_info

    recipe = trained.recipe
    info = dataset_info(recipe.data.dataset)
    in_shape = (info.in_channels, info.image_size, info.image_size)
    builder = _Builder(nir, _shapes(folded, in_shape), trained.masks)
    builder.add("input", nir.Input(input_type={"input": np.array(in_shape)}), [])
    # Direct encoding: the encoder is stateless, so feeding the image at every one of the T steps
    # reproduces "encoder once, repeat over T".
    sources = builder.emit(folded.encoder, "encoder", ["input"])
    sources = builder.emit(folded.body, "body", sources)
    builder.add("output", nir.Output(output_type={"output": np.array([info.num_classes])}), sources)
    numel = sum(m.numel() for m in trained.masks.values())
    nnz = sum(int(m.sum()) for m in trained.masks.values())
    toml = recipe.to_toml()
    metadata = {
        "format": "ndsnn-nir", "arch": recipe.model.arch, "timesteps": recipe.model.timesteps, "dt": DT,
        "input": "the same analog image at every one of the T steps (direct encoding)",
        "readout": "sum of the output over the T steps; prediction = argmax",
        "neuron": "discrete LIF h = v + (x - v)/tau (forward Euler of NIR LIF, dt=1), spike h >= v_threshold, "
                  "hard reset to v_reset",
        "bn_folded": 1, "sparsity": 1 - nnz / numel if numel else 0.0, "nnz": nnz, "numel": numel,
        "recipe": toml, "recipe_sha256": hashlib.sha256(toml.encode()).hexdigest(),
    }
    try:
        graph = nir.NIRGraph(nodes=builder.nodes, edges=builder.edges, metadata=metadata)
    except ValueError as exc:  # NIR's type check: a shape that does not line up between two nodes
        raise UserError(f"{trained.path}: NIR graph does not type-check ({str(exc).splitlines()[0]})") from None
    return graph, metadata


def export_nir(source: str | Path, out: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Checkpoint (or run dir) -> .nir file (HDF5), written atomically; returns (path, graph metadata)."""
    import io

    from ndsnn_cli.export.csr import write_checked
    from ndsnn_cli.export.fold import resolve_checkpoint

    nir = _import_nir()
    graph, metadata = build_graph(source)
    buffer = io.BytesIO()
    nir.write(buffer, graph)
    target = Path(out) if out is not None else default_output(resolve_checkpoint(source), "nir")
    return write_checked(target, buffer.getvalue()), {**metadata, "nodes": len(graph.nodes)}
