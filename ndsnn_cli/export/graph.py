"""`network_graph(model)`: the one walker over a `SpikingNet`, building the op list of
`ndsnn_cli.formats.graph` (encoder ops, `RepeatTimesteps`, body ops; a BasicBlock becomes
`Residual(main, shortcut)` followed by its output LIF). ONNX, NIR, the C target and the CSR artefact
all export that one list, so the layer order and tensor names are decided here once.

The op types are re-exported, so `from ndsnn_cli.export import graph; graph.Conv2d` keeps working.
Import-light on purpose: the walker imports torch.nn modules only when called.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ndsnn_cli.errors import UserError
from ndsnn_cli.formats.graph import (
    LIF,
    OP_TYPES,
    BatchNorm,
    Conv2d,
    Flatten,
    GlobalAvgPool,
    GraphBackend,
    Linear,
    MaxPool2d,
    Op,
    RepeatTimesteps,
    Residual,
    Shape,
    WeightedOp,
    from_json,
    to_json,
    walk,
)

if TYPE_CHECKING:
    from torch import nn

__all__ = ["OP_TYPES", "BatchNorm", "Conv2d", "Flatten", "GlobalAvgPool", "GraphBackend", "LIF", "Linear", "MaxPool2d",
           "Op", "RepeatTimesteps", "Residual", "Shape", "WeightedOp", "from_json", "network_graph", "to_json", "walk"]


def network_graph(model: nn.Module, input_shape: Shape | None = None) -> list[Op]:
    """The op list of a SpikingNet: encoder, `RepeatTimesteps`, body. With `input_shape` ([C, H, W]),
    one forward of a zero image records every op's per-sample input and output shape."""
    shapes = _trace_shapes(model, input_shape) if input_shape is not None else {}
    walker = _Walker(shapes)
    return walker.ops(model.encoder, "encoder.") + [RepeatTimesteps()] + walker.ops(model.body, "body.")


def _trace_shapes(model: nn.Module, input_shape: Shape) -> dict[nn.Module, tuple[Shape, Shape]]:
    """Per-sample (input, output) shape of every leaf module, from one forward of a zero image."""
    import torch

    shapes: dict[nn.Module, tuple[Shape, Shape]] = {}

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        shapes[module] = (tuple(inputs[0].shape[1:]), tuple(output.shape[1:]))  # a hook's return would replace output

    hooks = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    for hook in hooks:
        hook.remove()
    return shapes


class _Walker:
    """Maps each module to its ops; the one place that knows the model's module types."""

    def __init__(self, shapes: dict[nn.Module, tuple[Shape, Shape]]) -> None:
        self.shapes = shapes

    def ops(self, module: nn.Module, prefix: str) -> list[Op]:
        """The op list of one module (recursing into Sequential and BasicBlock)."""
        from torch import nn

        from ndsnn_cli.snn.models import BasicBlock

        if isinstance(module, nn.Sequential):
            ops: list[Op] = []
            for child_name, child in module.named_children():
                ops += self.ops(child, f"{prefix}{child_name}.")
            return ops
        if isinstance(module, BasicBlock):
            main: list[Op] = []
            for child_name in ("conv1", "bn1", "lif1", "conv2", "bn2"):
                main += self.ops(getattr(module, child_name), f"{prefix}{child_name}.")
            shortcut = self.ops(module.shortcut, f"{prefix}shortcut.")
            residual = Residual(name=prefix.rstrip("."), main=tuple(main), shortcut=tuple(shortcut))
            return [residual] + self.ops(module.lif2, f"{prefix}lif2.")
        if isinstance(module, nn.Identity):
            return []
        in_shape, out_shape = self.shapes.get(module, (None, None))
        op = self.leaf(module, prefix.rstrip("."))
        return [dataclasses.replace(op, in_shape=in_shape, out_shape=out_shape)]

    @staticmethod
    def leaf(module: nn.Module, name: str) -> Op:
        from torch import nn

        from ndsnn_cli.snn.neuron import LIF as LIFModule

        if isinstance(module, nn.Conv2d):
            return Conv2d(name=name, weight=f"{name}.weight", bias=f"{name}.bias" if module.bias is not None else None,
                          stride=module.stride, padding=module.padding, dilation=module.dilation,
                          groups=module.groups)
        if isinstance(module, nn.Linear):
            return Linear(name=name, weight=f"{name}.weight", bias=f"{name}.bias" if module.bias is not None else None)
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            return BatchNorm(name=name, eps=module.eps)
        if isinstance(module, LIFModule):
            return LIF(name=name, tau=module.tau, v_threshold=module.v_threshold)
        if isinstance(module, nn.MaxPool2d):
            pair = nn.modules.utils._pair
            return MaxPool2d(name=name, kernel=pair(module.kernel_size), stride=pair(module.stride),
                             padding=pair(module.padding), ceil_mode=module.ceil_mode)
        if isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1)):
            return GlobalAvgPool(name=name)
        if isinstance(module, nn.Flatten):
            return Flatten(name=name)
        raise UserError(f"layer {name} ({type(module).__name__}) has no export op")
