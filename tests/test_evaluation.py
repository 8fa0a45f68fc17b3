"""Evaluation on the CPU scores an evaluation batch in model calls of at most CPU_EVAL_SAMPLES samples, with the
results of one call per batch."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_run_recipe

from ndsnn_cli import evaluation
from ndsnn_cli.snn.models import NeuronConfig, create_model


def test_an_evaluation_batch_is_scored_in_cache_sized_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = create_model("scnn", num_classes=10, in_channels=1, image_size=28, neuron=NeuronConfig(timesteps=4))
    model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():  # a few training batches, so the running statistics are not the initial ones
        for _ in range(3):
            model(torch.rand(16, 1, 28, 28) * 2)
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(150, 1, 28, 28, generator=generator) * 2
    test_set = torch.utils.data.TensorDataset(images, torch.randint(0, 10, (150,), generator=generator))
    recipe = tiny_run_recipe(data={"eval_batch_size": 150})
    calls: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    monkeypatch.setattr(evaluation, "CPU_EVAL_SAMPLES", 64)        # 16 images at T = 4
    chunked = evaluation.evaluate(model, test_set, recipe, torch.device("cpu"))
    assert calls == [16] * 9 + [6]
    calls.clear()
    monkeypatch.setattr(evaluation, "CPU_EVAL_SAMPLES", 10_000)
    whole = evaluation.evaluate(model, test_set, recipe, torch.device("cpu"))
    assert calls == [150]
    # The same numbers up to oneDNN's choice of algorithm per batch size, which may move a conv output by an
    # ulp and flip a spike sitting at the threshold: at most one of the 150 predictions may differ.
    assert 0 < whole[1] < 1 and abs(chunked[1] - whole[1]) <= 1 / 150
    assert chunked[0] == pytest.approx(whole[0], rel=1e-3)
