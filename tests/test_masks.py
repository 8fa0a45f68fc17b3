"""Masks: exact per-layer counts, ERK/uniform/global budgets, dense exclusions, zeroed weights and optimizer state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ndsnn_cli.errors import UserError
from ndsnn_cli.snn.models import create_model
from ndsnn_cli.sparse.budget import active_count, erk_densities
from ndsnn_cli.sparse.masks import Masks, layer_counts, magnitude_mask, random_mask, sparse_parameter_names


def model_weights(name: str = "resnet19", size: int = 32) -> dict[str, torch.Tensor]:
    model = create_model(name, num_classes=10, in_channels=3, image_size=size)
    params = dict(model.named_parameters())
    return {n: params[n] for n in sparse_parameter_names(model)}


@pytest.fixture(scope="module")
def resnet_shapes() -> dict[str, tuple[int, ...]]:
    return {n: tuple(w.shape) for n, w in model_weights().items()}


@pytest.mark.parametrize("density", [0.5, 0.2, 0.1, 0.05, 0.01])
def test_erk_densities_hit_the_overall_budget_and_cap_at_one(resnet_shapes: dict[str, tuple[int, ...]],
                                                             density: float) -> None:
    densities = erk_densities(resnet_shapes, density)
    numels = {n: math.prod(s) for n, s in resnet_shapes.items()}
    total = sum(numels.values())
    assert all(0.0 < d <= 1.0 for d in densities.values())
    assert sum(densities[n] * numels[n] for n in numels) == pytest.approx(density * total, rel=1e-12)
    counts = {n: active_count(numels[n], densities[n]) for n in numels}
    # Rounding each layer to a whole weight moves the total by at most half a weight per layer.
    assert abs(sum(counts.values()) - density * total) <= len(numels) / 2
    # ERK: density_l proportional to sum(shape)/prod(shape) among the layers that are not capped.
    free = [n for n in numels if densities[n] < 1.0]
    ratios = {n: densities[n] / (sum(resnet_shapes[n]) / numels[n]) for n in free}
    assert max(ratios.values()) == pytest.approx(min(ratios.values()), rel=1e-12)


def test_erk_caps_small_layers_at_one_and_resolves_the_rest() -> None:
    # The 3->64 stem (1,728 weights) and the fc 256->10 would exceed density 1 under ERK at 50%.
    densities = erk_densities({"stem": (64, 3, 3, 3), "big": (512, 512, 3, 3), "fc": (10, 256)}, 0.5)
    assert densities["stem"] == 1.0
    assert densities["fc"] == 1.0
    total = 64 * 27 + 512 * 512 * 9 + 2560
    assert densities["big"] == pytest.approx((0.5 * total - 64 * 27 - 2560) / (512 * 512 * 9), rel=1e-12)


def test_erk_of_full_density_is_all_dense() -> None:
    assert erk_densities({"a": (4, 3), "b": (100, 100)}, 1.0) == {"a": 1.0, "b": 1.0}


def test_uniform_counts_are_round_density_times_numel() -> None:
    weights = {"a": torch.zeros(64, 3, 3, 3), "b": torch.zeros(10, 257), "c": torch.zeros(7)}
    counts = layer_counts(weights, 0.1, "uniform")
    assert counts == {"a": round(0.1 * 1728), "b": round(0.1 * 2570), "c": round(0.1 * 7)}
    assert counts == {"a": 173, "b": 257, "c": 1}


def test_global_counts_keep_exactly_the_total_largest_magnitudes() -> None:
    weights = {"a": torch.tensor([[0.1, -5.0], [3.0, 0.2]]), "b": torch.tensor([4.0, -0.3, 2.0, 0.05, 1.0])}
    counts = layer_counts(weights, 0.5, "global")
    # 9 weights, density 0.5 -> round(4.5) = 4 kept: |-5|, |4|, |3|, |2|
    assert counts == {"a": 2, "b": 2}
    masked = layer_counts(weights, 0.3, "global", masks={"a": torch.tensor([[True, False], [True, True]]),
                                                          "b": torch.ones(5, dtype=torch.bool)})
    assert masked == {"a": 1, "b": 2}  # -5 is pruned already: keep 4, 3, 2


@pytest.mark.parametrize(("numel", "density"), [(1000, 0.1), (1001, 0.333), (17, 0.5), (5, 0.99), (4096, 0.0)])
def test_random_mask_has_exactly_round_density_times_numel(numel: int, density: float) -> None:
    generator = torch.Generator().manual_seed(1)
    count = active_count(numel, density)
    assert count == round(density * numel)
    mask = random_mask((numel,), count, generator)
    assert mask.dtype == torch.bool
    assert int(mask.sum()) == count


def test_random_mask_is_seeded() -> None:
    a = random_mask((30, 30), 90, torch.Generator().manual_seed(3))
    b = random_mask((30, 30), 90, torch.Generator().manual_seed(3))
    c = random_mask((30, 30), 90, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_magnitude_mask_keeps_the_largest_absolute_values() -> None:
    weight = torch.tensor([[0.5, -2.0, 0.1], [1.5, -0.05, 3.0]])
    assert magnitude_mask(weight, 3).tolist() == [[False, True, False], [True, False, True]]
    assert int(magnitude_mask(weight, 0).sum()) == 0


def test_sparse_parameters_are_conv_and_linear_weights_minus_dense() -> None:
    model = create_model("scnn", num_classes=10, in_channels=1, image_size=28)
    assert sparse_parameter_names(model) == ["encoder.0.weight", "body.1.weight", "body.6.weight", "body.8.weight"]
    assert sparse_parameter_names(model, ["encoder.0", "body.8.weight"]) == ["body.1.weight", "body.6.weight"]
    # A prefix ending in "." and a whole sub-module both work; biases and BN never are sparse.
    assert sparse_parameter_names(model, ["body."]) == ["encoder.0.weight"]


def test_dense_name_that_matches_nothing_is_a_user_error() -> None:
    model = create_model("mlp", num_classes=10, in_channels=1, image_size=28)
    with pytest.raises(UserError, match=r"^\[sparsity\] dense = 'encoder\.9' matches no parameter of the model"):
        sparse_parameter_names(model, ["encoder.9"])
    # A name prefix that is not a module boundary does not count as a match.
    with pytest.raises(UserError, match="'body.1.weigh'"):
        sparse_parameter_names(model, ["body.1.weigh"])


def _masked_linear(optimizer_name: str) -> tuple[nn.Linear, torch.optim.Optimizer, Masks, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.Linear(20, 10)
    optimizer = (torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9) if optimizer_name == "sgd"
                 else torch.optim.Adam(layer.parameters(), lr=0.1))
    mask = random_mask((10, 20), 50, torch.Generator().manual_seed(0))
    masks = Masks({"weight": layer.weight}, {"weight": mask})
    return layer, optimizer, masks, mask


@pytest.mark.parametrize(("optimizer_name", "state_keys"), [("sgd", ["momentum_buffer"]),
                                                            ("adam", ["exp_avg", "exp_avg_sq"])])
def test_apply_zeros_weights_and_per_weight_optimizer_state(optimizer_name: str, state_keys: list[str]) -> None:
    layer, optimizer, masks, mask = _masked_linear(optimizer_name)
    masks.apply()
    assert int((layer.weight != 0).sum()) == 50
    for _ in range(3):
        optimizer.zero_grad()
        layer(torch.randn(8, 20)).square().sum().backward()
        optimizer.step()
        state = optimizer.state[layer.weight]
        for key in state_keys:  # a dense gradient fills the state everywhere ...
            assert int((state[key] != 0).sum()) > 50
        masks.apply(optimizer)
        assert torch.equal(layer.weight != 0, mask)  # ... and apply() clears it outside the mask
        for key in state_keys:
            assert torch.equal(state[key] != 0, mask)
    assert masks.nnz() == {"weight": 50}
    assert masks.sparsity() == 0.75
    report = masks.report()
    assert report["nnz"] == 50 and report["numel"] == 200 and report["sparsity"] == 0.75
    assert report["layers"]["weight"] == {"shape": [10, 20], "numel": 200, "nnz": 50, "sparsity": 0.75}
    # The bias is not masked and keeps its values.
    assert int((layer.bias != 0).sum()) == 10


@pytest.mark.parametrize("make", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                                  lambda p: torch.optim.Adam(p, lr=0.1, amsgrad=True)])
def test_per_weight_state_is_every_buffer_shaped_like_the_weight(make: object) -> None:
    from ndsnn_cli.sparse.masks import per_weight_state

    weight = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = make([weight])
    weight.grad = torch.randn(4, 3)
    optimizer.step()
    buffers = per_weight_state(optimizer, weight)
    expected = [k for k, v in optimizer.state[weight].items() if v.shape == weight.shape]
    assert len(buffers) == len(expected) >= 1
    assert set(expected) <= {"momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    masks = Masks({"w": weight}, {"w": torch.tensor([[True, False, True]] * 4)})
    masks.apply(optimizer)
    assert all(not b[:, 1].any() and b[:, 0].all() for b in buffers)
    assert per_weight_state(None, weight) == []
