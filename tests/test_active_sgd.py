"""SGD on the active weights only (`sparse.active_sgd`): bit-identical to torch's dense SGD step followed by
the masks' re-application, with real gradients (non-zero outside the masks, as the masked-dense engine has),
through mask changes; and a whole training run equal with and without it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from ndsnn_cli import trainer
from ndsnn_cli.checkpoint import load_checkpoint
from ndsnn_cli.recipe import Recipe
from ndsnn_cli.rundir import RUN_CHECKPOINT
from ndsnn_cli.sparse import active_sgd
from ndsnn_cli.sparse.active_sgd import ActiveWeightSGD
from ndsnn_cli.sparse.masks import Masks
from ndsnn_cli.train import train

DENSITIES = {"0.weight": 0.6, "2.weight": 0.1, "4.weight": 0.02}  # the first stays above MAX_DENSITY


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1), nn.Flatten(),
                        nn.Linear(8 * 6 * 6, 10))
    return net.to(memory_format=torch.channels_last)  # 4-D weights channels-last, as the models train


def _random_masks(net: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    params = dict(net.named_parameters())
    return {name: torch.rand(params[name].shape, generator=generator) < d for name, d in DENSITIES.items()}


def _state(net: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in net.parameters()]
    for p in net.parameters():
        buffer = optimizer.state.get(p, {}).get("momentum_buffer")
        tensors.append(buffer.clone() if buffer is not None else torch.tensor([]))
    return tensors


@pytest.mark.parametrize("hyper", [
    {"momentum": 0.9, "weight_decay": 5e-4},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 0.0, "foreach": True},
    {"momentum": 0.0, "weight_decay": 1e-3},
    {"momentum": 0.8, "dampening": 0.1, "weight_decay": 5e-4, "maximize": True},
], ids=["momentum-wd", "nesterov-foreach", "plain", "dampening-maximize"])
def test_active_weight_step_equals_the_dense_step_and_reapplied_masks(hyper: dict) -> None:
    sides = []
    for _ in range(2):
        net = _net()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05, **hyper)
        masks = Masks({name: dict(net.named_parameters())[name] for name in DENSITIES}, _random_masks(net, 1))
        masks.apply(optimizer)
        sides.append((net, optimizer, masks))
    (net_a, opt_a, masks_a), (net_b, opt_b, masks_b) = sides
    stepper = ActiveWeightSGD(opt_b, masks_b.params, masks_b.masks)
    data = torch.Generator().manual_seed(2)
    for step in range(6):
        x = torch.randn(16, 3, 6, 6, generator=data).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (16,), generator=data)
        for net, optimizer, _ in sides:
            optimizer.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(net(x), y).backward()
        assert float(net_b[2].weight.grad[~masks_b.masks["2.weight"]].abs().sum()) > 0  # dense gradients
        opt_a.step()
        masks_a.apply(opt_a)
        settled = stepper.step()
        assert settled == {"2.weight", "4.weight"}
        masks_b.apply(opt_b, skip=settled)
        for a, b in zip(_state(net_a, opt_a), _state(net_b, opt_b), strict=True):
            assert torch.equal(a, b), step
        for name in settled:  # still zero outside the mask without the re-application
            outside = ~masks_b.masks[name]
            assert not masks_b.params[name][outside].any()
            if hyper["momentum"]:
                assert not opt_b.state[masks_b.params[name]]["momentum_buffer"][outside].any()
        if step == 2:  # a mask update: one mask replaced, one changed in place; then the full re-application
            new = _random_masks(net_a, 7)
            for masks in (masks_a, masks_b):
                masks.masks["4.weight"] = new["4.weight"].clone()
                masks.masks["2.weight"].copy_(new["2.weight"])
                masks.apply(opt_a if masks is masks_a else opt_b)


def test_a_layer_above_the_density_limit_takes_the_dense_step() -> None:
    net = _net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    masks = Masks({name: dict(net.named_parameters())[name] for name in DENSITIES}, _random_masks(net, 1))
    stepper = ActiveWeightSGD(optimizer, masks.params, masks.masks, max_density=0.05)
    nn.functional.cross_entropy(net(torch.randn(4, 3, 6, 6)), torch.tensor([0, 1, 2, 3])).backward()
    assert stepper.step() == {"4.weight"}
    assert stepper.active_indices("2.weight") is None
    assert stepper.active_indices("4.weight").numel() == int(masks.masks["4.weight"].sum())
    assert not active_sgd.supports(torch.optim.Adam(net.parameters()))
    with pytest.raises(ValueError, match="torch.optim.SGD"):
        ActiveWeightSGD(torch.optim.Adam(net.parameters()), masks.params, masks.masks)


def _final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / RUN_CHECKPOINT).tensors


@pytest.mark.parametrize("kernels", ["auto", "off"])
def test_a_training_run_is_bit_identical_with_and_without_it(tiny_recipe: Callable[..., Recipe], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, kernels: str) -> None:
    recipe = tiny_recipe(model={"arch": "scnn"}, data={"batch_size": 32},
                         train={"optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4, "sparse_kernels": kernels},
                         sparsity={"method": "ndsnn", "initial": 0.5, "final": 0.95, "update_every_steps": 2,
                                   "ramp_end_epoch": 1.0, "update_end_epoch": 1.5})
    settled: list[frozenset[str]] = []
    original = ActiveWeightSGD.step

    def spy(self: ActiveWeightSGD) -> frozenset[str]:
        settled.append(original(self))
        return settled[-1]

    monkeypatch.setattr(ActiveWeightSGD, "step", spy)
    train(recipe, tmp_path / "active")
    assert len(settled) == 16 and any(settled[-1]) and not settled[0]  # dense at 0.5, active at the end
    monkeypatch.setattr(trainer.active_sgd, "supports", lambda optimizer: False)
    train(recipe, tmp_path / "dense")
    assert len(settled) == 16
    a, b = _final_tensors(tmp_path / "active"), _final_tensors(tmp_path / "dense")
    assert a.keys() == b.keys()
    for key in a:  # weights, masks, momentum: bit-identical
        assert torch.equal(a[key], b[key]), key
