"""`sparse_kernels = "calibrate"`: each layer's path decided by timing it both ways on the run's own steps.

The clocks are real; to make a decision certain, one path is slowed by a sleep per call (20 ms, against
sub-millisecond layers), and the test checks that the calibrated plan takes the other path, that every
recorded choice follows its recorded times, and that steps with dense weight gradients are not sampled.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ndsnn_cli.kernels import DENSE, available_kernels
from ndsnn_cli.kernels.calibration import REPROBE_FACTOR, ROUNDS, Calibrator, Measurement
from ndsnn_cli.kernels.execution import SparseExecution
from ndsnn_cli.sparse.masks import Masks, random_mask, sparse_parameter_names

NUMBA = pytest.mark.skipif("numba" not in available_kernels(), reason="numba not installed")
SLOW_S = 0.02


def _scnn(density: float) -> tuple[nn.Module, Masks]:
    from ndsnn_cli.snn.models import NeuronConfig, create_model

    torch.manual_seed(0)
    model = create_model("scnn", num_classes=10, in_channels=1, image_size=16,
                         neuron=NeuronConfig(timesteps=2)).to(memory_format=torch.channels_last).train()
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(0)
    masks = {name: random_mask(params[name].shape, int(params[name].numel() * density), generator)
             for name in sparse_parameter_names(model)}
    result = Masks({n: params[n] for n in masks}, masks)
    result.apply()
    return model, result


def _steps(model: nn.Module, execution: SparseExecution, count: int, dense_grad_at: int | None = None) -> list:
    images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    records = []
    with execution:
        for step in range(1, count + 1):
            execution.set_dense_weight_grad(step == dense_grad_at)
            execution.before_step()
            model.zero_grad()
            F.cross_entropy(model(images).mean(0), torch.arange(8) % 10).backward()
            records.append(execution.after_step(step))
    return records


def test_the_calibrator_decides_on_the_measured_crossover() -> None:
    calibrator = Calibrator()
    assert calibrator.decide("a", 0.3, 0.15) == (False, True)     # unmeasured: registry crossover, probe
    assert calibrator.decide("a", 0.6, 0.15) == (False, False)    # too dense to probe
    calibrator.measured["a"] = Measurement(0.3, sparse_s=2.0, dense_s=1.0)       # crossover 0.15
    assert calibrator.measured["a"].crossover == pytest.approx(0.15)
    assert calibrator.decide("a", 0.2, 0.5) == (False, False)     # measured dense, not far enough below
    assert calibrator.decide("a", REPROBE_FACTOR * 0.3, 0.5) == (True, True)  # 0.15: at the crossover, re-probed
    calibrator.measured["b"] = Measurement(0.4, sparse_s=1.0, dense_s=2.0)
    assert calibrator.decide("b", 0.1, 0.01) == (True, False)     # the kernel won at 0.4: it keeps winning


@NUMBA
def test_a_slow_kernel_is_calibrated_to_dense_and_the_record_says_why(monkeypatch) -> None:
    model, masks = _scnn(0.1)
    execution = SparseExecution(model, masks, "calibrate", "cpu")
    assert set(execution.rebuild().values()) == {"numba"}           # 0.1 <= the registry's 0.15
    kernel = next(layer.kernel for layer in execution.layers.values())
    forward = type(kernel).forward
    monkeypatch.setattr(type(kernel), "forward", lambda self, *a: (time.sleep(SLOW_S), forward(self, *a))[1])
    calls = {name: layer.calls for name, layer in execution.layers.items()}
    records = _steps(model, execution, 2 * ROUNDS + 1)
    assert records[:2 * ROUNDS - 1] == [None] * (2 * ROUNDS - 1) and records[-1] is None
    record = records[2 * ROUNDS - 1]
    assert record["kind"] == "kernel_calibration" and record["step"] == 2 * ROUNDS
    assert record["layers"].keys() == execution.layers.keys()
    for name, entry in record["layers"].items():
        assert entry["sparse_s"] > SLOW_S > entry["dense_s"] > 0, name
        assert entry["kernel"] == DENSE and entry["density"] == int(masks.masks[name].sum()) / masks.masks[name].numel()
        assert entry["crossover"] == pytest.approx(entry["density"] * entry["dense_s"] / entry["sparse_s"])
        assert execution.layers[name].calls - calls[name] == ROUNDS    # the kernel ran on the sparse steps only
    assert set(execution.assignment().values()) == {DENSE}
    assert execution.summary()["calibration"].keys() == execution.layers.keys()


@NUMBA
def test_slow_dense_convs_are_calibrated_onto_the_kernel_and_update_steps_are_not_sampled(monkeypatch) -> None:
    model, masks = _scnn(0.3)                                        # above the registry's crossover: dense
    execution = SparseExecution(model, masks, "calibrate", "cpu")
    assert set(execution.rebuild().values()) == {DENSE}
    conv = nn.Conv2d._conv_forward
    monkeypatch.setattr(nn.Conv2d, "_conv_forward", lambda self, *a: (time.sleep(SLOW_S), conv(self, *a))[1])
    records = _steps(model, execution, 2 * ROUNDS + 1, dense_grad_at=2)  # step 2 computes dense gradients
    assert records[:2 * ROUNDS] == [None] * (2 * ROUNDS)
    record = records[2 * ROUNDS]
    assert record["step"] == 2 * ROUNDS + 1
    for name, entry in record["layers"].items():
        conv_layer = isinstance(execution.layers[name].module, nn.Conv2d)
        assert (entry["kernel"] == "numba") == (entry["sparse_s"] < entry["dense_s"]), name
        if conv_layer:
            assert entry["dense_s"] > SLOW_S > entry["sparse_s"] and entry["kernel"] == "numba", name
    assert {execution.assignment()[n] for n, layer in execution.layers.items()
            if isinstance(layer.module, nn.Conv2d)} == {"numba"}


@NUMBA
def test_a_calibrated_run_logs_its_probe(tiny_recipe, tmp_path) -> None:
    from ndsnn_cli.rundir import read_metrics
    from ndsnn_cli.train import train

    recipe = tiny_recipe(model={"arch": "scnn"}, data={"train_limit": 384},
                         sparsity={"method": "static", "initial": 0.9},
                         train={"epochs": 1, "sparse_kernels": "calibrate"})
    summary = train(recipe, tmp_path / "run")
    records = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "kernel_calibration"]
    assert len(records) == 1 and records[0]["step"] == 2 * ROUNDS
    assert records[0]["layers"].keys() == summary["sparse_kernels"]["calibration"].keys()
    for name, entry in records[0]["layers"].items():
        assert summary["sparse_kernels"]["layers"][name] == entry["kernel"]
        assert (entry["kernel"] != DENSE) == (entry["sparse_s"] < entry["dense_s"]), name
