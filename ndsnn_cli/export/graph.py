"""The network as one ordered list of typed ops: the single graph every exporter and runtime consumes.

`network_graph(model)` is the only walker over a `SpikingNet`: encoder ops (run once on the image),
`RepeatTimesteps`, then body ops on the `[T*B, ...]` batch. A BasicBlock becomes `Residual(main,
shortcut)` followed by its output LIF. CSR artefacts store the list as JSON (`graph` metadata,
`to_json`); the runtime reads it back with `from_json`. ONNX, NIR, the runtime (and the C target,
the artefact validator) read the same ops, so the layer order and tensor names are decided here once.

Import-light on purpose: the runtime loads this without torch.nn modules or the training code; the
walker imports them only when called.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, dataclass_transform

from ndsnn_cli.errors import UserError

if TYPE_CHECKING:
    from torch import nn

Shape = tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class Op:
    """One step of the network. `name` is the module path ("body.3.conv1"); shapes are per sample
    (no batch axis) and known only when the graph was traced with an input shape."""

    kind: ClassVar[str]
    json_fields: ClassVar[tuple[str, ...]] = ()  # stored in the artefact, in this order (format v1)
    name: str = ""
    in_shape: Shape | None = field(default=None, compare=False)
    out_shape: Shape | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The artefact's `graph` entry: kind and `json_fields` (tuples as lists; no name or shapes)."""
        values = {key: getattr(self, key) for key in self.json_fields}
        return {"op": self.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Op:
        return cls(**{key: tuple(raw[key]) if isinstance(raw[key], list) else raw[key] for key in cls.json_fields})


OP_TYPES: dict[str, type[Op]] = {}
OpT = TypeVar("OpT", bound=Op)


@dataclass_transform(kw_only_default=True, frozen_default=True)
def _op(kind: str) -> Callable[[type[OpT]], type[OpT]]:
    """Class decorator: a frozen, keyword-only dataclass registered in OP_TYPES under `kind`."""
    def add(op_type: type[OpT]) -> type[OpT]:
        op_type = dataclass(frozen=True, kw_only=True)(op_type)
        op_type.kind = kind
        OP_TYPES[kind] = op_type
        return op_type
    return add


@dataclass(frozen=True, kw_only=True)
class WeightedOp(Op):
    """An op with a stored weight (dense or CSR in an artefact) and an optional bias tensor."""

    weight: str
    bias: str | None = None

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return (self.weight, self.bias) if self.bias else (self.weight,)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Op:
        raw = {"bias": None, **raw}  # an artefact may leave out a null bias
        return dataclasses.replace(super().from_json(raw), name=raw["weight"].removesuffix(".weight"))


@_op("conv2d")
class Conv2d(WeightedOp):
    json_fields = ("weight", "bias", "stride", "padding", "dilation", "groups")
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int = 1


@_op("linear")
class Linear(WeightedOp):
    json_fields = ("weight", "bias")


@_op("batchnorm")
class BatchNorm(Op):
    """An unfolded BatchNorm (eval statistics); its tensors are `<name>.running_mean` etc."""

    json_fields = ("prefix", "eps")  # stored as written by to_json (the op's name is its tensors' prefix)
    eps: float

    def to_json(self) -> dict[str, Any]:
        return {"op": self.kind, "prefix": self.name, "eps": self.eps}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Op:
        return cls(name=raw["prefix"], eps=raw["eps"])


@_op("lif")
class LIF(Op):
    """Multi-step LIF over T: `h = v + (x - v) / tau`, spike `h >= v_threshold`, hard reset to 0."""

    json_fields = ("tau", "v_threshold")
    tau: float
    v_threshold: float


@_op("maxpool2d")
class MaxPool2d(Op):
    json_fields = ("kernel", "stride", "padding", "ceil_mode")
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    ceil_mode: bool = False


@_op("global_avgpool")
class GlobalAvgPool(Op):
    """Average over the whole map."""

    output_size: ClassVar[tuple[int, int]] = (1, 1)  # keeps the [C, 1, 1] map


@_op("flatten")
class Flatten(Op):
    start_dim: ClassVar[int] = 1  # [N, C, H, W] -> [N, C*H*W]: the batch axis stays


@_op("repeat_timesteps")
class RepeatTimesteps(Op):
    """Direct encoding: the encoder's output `[B, ...]` repeated over T into `[T*B, ...]`."""


@_op("residual")
class Residual(Op):
    """`main(x) + shortcut(x)`; an empty shortcut is the identity."""

    main: tuple[Op, ...]
    shortcut: tuple[Op, ...]

    def to_json(self) -> dict[str, Any]:
        return {"op": self.kind, "main": to_json(self.main), "shortcut": to_json(self.shortcut)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Op:
        return cls(main=tuple(from_json(raw["main"])), shortcut=tuple(from_json(raw["shortcut"])))


def to_json(ops: Sequence[Op]) -> list[dict[str, Any]]:
    return [op.to_json() for op in ops]


def from_json(raw: list[dict[str, Any]]) -> list[Op]:
    """Typed ops of an artefact's `graph` metadata; an op kind this version does not know is a UserError."""
    ops = []
    for entry in raw:
        if entry["op"] not in OP_TYPES:
            raise UserError(f"artefact op {entry['op']!r} is not supported by this runtime "
                            f"(known: {', '.join(OP_TYPES)})")
        ops.append(OP_TYPES[entry["op"]].from_json(entry))
    return ops


def walk(ops: Sequence[Op]) -> Iterator[Op]:
    """Every op in execution order, a residual before its branches (main, then shortcut)."""
    for op in ops:
        yield op
        if isinstance(op, Residual):
            yield from walk(op.main)
            yield from walk(op.shortcut)


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
