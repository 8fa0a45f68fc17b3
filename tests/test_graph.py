"""The network graph: one walker, typed ops, and an artefact JSON form that reads back to the same ops."""

from __future__ import annotations

import pytest

from ndsnn_cli.errors import UserError
from ndsnn_cli.export import graph
from ndsnn_cli.snn.models import NeuronConfig, create_model


@pytest.mark.parametrize(("arch", "size", "channels"), [("mlp", 28, 1), ("scnn", 28, 1), ("resnet19", 16, 3)])
def test_graph_json_reads_back_to_the_same_ops_with_traced_shapes(arch: str, size: int, channels: int) -> None:
    model = create_model(arch, num_classes=10, in_channels=channels, image_size=size,
                         neuron=NeuronConfig(timesteps=2)).eval()
    ops = graph.network_graph(model, input_shape=(channels, size, size))
    raw = graph.to_json(ops)
    assert graph.to_json(graph.from_json(raw)) == raw
    assert [op.kind for op in graph.from_json(raw)] == [op.kind for op in ops]
    weighted = [op for op in graph.walk(ops) if isinstance(op, graph.WeightedOp)]
    params = dict(model.named_parameters())
    assert all(params[name].shape for op in weighted for name in op.tensor_names)
    assert all(op.in_shape is not None and op.out_shape is not None for op in graph.walk(ops)
               if not isinstance(op, graph.RepeatTimesteps | graph.Residual))


def test_unknown_op_kind_is_a_user_error_naming_the_known_ones() -> None:
    with pytest.raises(UserError, match="'softmax' is not supported .* conv2d, linear, batchnorm, lif"):
        graph.from_json([{"op": "softmax"}])


def graph_backends() -> dict[str, type]:
    """Every consumer of the op list that dispatches on op kinds (ONNX traces the torch model instead)."""
    from ndsnn_cli.export.c.generate import _Emitter
    from ndsnn_cli.export.nir import _Builder
    from ndsnn_cli.export.runtime import SparseNetwork
    from ndsnn_cli.validate import _ShapeWalker

    return {"runtime": SparseNetwork, "c": _Emitter, "nir": _Builder, "validator": _ShapeWalker}


def test_the_backend_base_has_one_handler_per_op_kind() -> None:
    handlers = {name.removeprefix("_") for name in vars(graph.GraphBackend)
                if name.startswith("_") and not name.startswith("__") and name not in ("_unhandled",)}
    assert handlers == set(graph.OP_TYPES)


@pytest.mark.parametrize("kind", sorted(graph.OP_TYPES))
@pytest.mark.parametrize("backend", sorted(graph_backends()))
def test_every_backend_handles_every_op_kind(backend: str, kind: str) -> None:
    """A new op kind (or a removed handler) fails here for the backend that lacks it, not in a user's export."""
    cls = graph_backends()[backend]
    assert issubclass(cls, graph.GraphBackend)
    assert getattr(cls, f"_{kind}") is not getattr(graph.GraphBackend, f"_{kind}"), f"{cls.__name__} lacks _{kind}"


def test_a_backend_without_a_handler_fails_the_coverage_check() -> None:
    """The coverage check can fail: a backend with one handler removed is caught."""

    class Partial(graph_backends()["runtime"]):  # type: ignore[misc, valid-type]
        _flatten = graph.GraphBackend._flatten

    assert Partial._flatten is graph.GraphBackend._flatten
    with pytest.raises(NotImplementedError, match="has no handler for graph op 'flatten'"):
        Partial.dispatch(object.__new__(Partial), graph.Flatten(), None)
