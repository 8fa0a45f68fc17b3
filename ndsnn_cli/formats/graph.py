"""The network as one ordered list of typed ops: the graph description every exporter, runtime and the
artefact validator read (a file format: CSR artefacts store it as JSON, `graph` metadata).

Encoder ops (run once on the image), `RepeatTimesteps`, then body ops on the `[T*B, ...]` batch; a
BasicBlock is `Residual(main, shortcut)` followed by its output LIF. `to_json` / `from_json` are the
stored form; `export.graph.network_graph(model)` builds the list from a `SpikingNet`.

Import-free on purpose (no torch): the validator and the runtime stand on it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, dataclass_transform

from ndsnn_cli.errors import UserError

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


class GraphBackend:
    """What every consumer of the op list is: one handler per op kind, `_<kind>(op, x, *context)`.

    The reference runtime, the C code generator, the NIR builder and the validator's shape walker subclass
    it and dispatch through `dispatch`; each overrides every handler below, so an op kind one of them lacks
    fails `tests/test_graph.py` (OP_TYPES x backends), not a user's export. A backend that refuses an op on
    purpose overrides its handler with a one-line UserError naming why.
    """

    def dispatch(self, op: Op, x: Any, *context: Any) -> Any:
        return getattr(self, f"_{op.kind}")(op, x, *context)

    def _unhandled(self, op: Op) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no handler for graph op {op.kind!r}")

    def _conv2d(self, op: Conv2d, x: Any, *context: Any) -> Any:
        return self._unhandled(op)

    def _linear(self, op: Linear, x: Any, *context: Any) -> Any:
        return self._unhandled(op)

    def _batchnorm(self, op: BatchNorm, x: Any, *context: Any) -> Any:
        return self._unhandled(op)

    def _lif(self, op: LIF, x: Any, *context: Any) -> Any:
        return self._unhandled(op)

    def _maxpool2d(self, op: MaxPool2d, x: Any, *context: Any) -> Any:
        return self._unhandled(op)

    def _global_avgpool(self, op: GlobalAvgPool, x: Any, *context: Any) -> Any:
        return self._unhandled(op)

    def _flatten(self, op: Flatten, x: Any, *context: Any) -> Any:
        return self._unhandled(op)

    def _repeat_timesteps(self, op: RepeatTimesteps, x: Any, *context: Any) -> Any:
        return self._unhandled(op)

    def _residual(self, op: Residual, x: Any, *context: Any) -> Any:
        return self._unhandled(op)
