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
