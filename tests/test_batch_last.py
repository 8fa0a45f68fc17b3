"""Activations kept batch-last between sparse layers (`kernels.batch_last`, `[train] sparse_layout`).

Against the per-layer layout, on the same kernels and weights: spikes identical (the two BN + LIF
implementations sum in other orders, which may flip a spike whose H lands within rounding of the
threshold; bn_lif's own tests measured none in 57 M, and none happens on these seeds), logits and
gradients within TOL of the largest value (the kernels' sums are the same; BN's differ in order),
running statistics within 1e-6. A bias right before a BatchNorm has a zero true gradient: its computed
one is rounding noise, compared with the weight gradient's scale.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ndsnn_cli.kernels import available_kernels
from ndsnn_cli.kernels.execution import SparseExecution
from ndsnn_cli.sparse.masks import Masks, random_mask, sparse_parameter_names

KERNEL_NAMES = available_kernels()
NUMBA = pytest.mark.skipif("numba" not in KERNEL_NAMES, reason="numba not installed")
TOL = 2e-5


def _masked_model(arch: str, size: int, channels: int, every_third_dense: bool) -> tuple[nn.Module, Masks]:
    """A channels-last training model with random masks at density 0.1 (every third layer at 0.5 when
    `every_third_dense`: above the auto crossover, so it runs dense inside a batch-last stretch)."""
    from ndsnn_cli.snn.models import NeuronConfig, create_model

    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_channels=channels, image_size=size,
                         neuron=NeuronConfig(timesteps=2)).to(memory_format=torch.channels_last).train()
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(0)
    masks = {}
    for index, name in enumerate(sparse_parameter_names(model)):
        density = 0.5 if every_third_dense and index % 3 == 1 else 0.1
        masks[name] = random_mask(params[name].shape, int(params[name].numel() * density), generator)
    result = Masks({n: params[n] for n in masks}, masks)
    result.apply()
    return model, result


def _train_and_evaluate(model: nn.Module, masks: Masks, images: torch.Tensor, layout: str, kernel: str):  # noqa: ANN202
    """LIF spikes (by forward hooks), logits and gradients of one training step; BN running statistics
    after it; logits in evaluation (no autograd)."""
    spikes: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: spikes.__setitem__(name, out.detach().clone()))
             for name, m in model.named_modules() if type(m).__name__ == "LIF"]
    # auto never picks the torch fallback: "on" puts it on every layer
    execution = SparseExecution(model, masks, "auto" if kernel == "numba" else "on", "cpu", layout)
    execution.available = (kernel,)
    plan = execution.rebuild()
    with execution:
        logits = model(images)
        logits.square().mean().backward()
        for hook in hooks:
            hook.remove()
        model.eval()
        with torch.no_grad():
            evaluated = model(images)
    running = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return plan, spikes, logits.detach(), grads, running, evaluated


def _bias_before_bn(model: nn.Module, name: str) -> bool:
    return name.endswith("bias") and isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.Conv2d)


@pytest.mark.parametrize(("arch", "size", "channels", "kernel"), [
    pytest.param("scnn", 16, 1, "numba", marks=NUMBA), ("scnn", 16, 1, "torch-sparse"),
    pytest.param("vgg16", 32, 3, "numba", marks=NUMBA), pytest.param("resnet19", 8, 3, "numba", marks=NUMBA)])
def test_batch_last_layout_matches_the_per_layer_layout(arch, size, channels, kernel) -> None:
    base, _ = _masked_model(arch, size, channels, every_third_dense=True)
    images = torch.rand(4, channels, size, size, generator=torch.Generator().manual_seed(1))
    runs = {}
    for layout in ("per-layer", "batch-last"):
        model, masks = _masked_model(arch, size, channels, every_third_dense=True)
        model.load_state_dict(base.state_dict())
        runs[layout] = _train_and_evaluate(model, masks, images, layout, kernel)
    (plan, spikes, logits, grads, running, evaluated) = runs["per-layer"]
    (plan_bl, spikes_bl, logits_bl, grads_bl, running_bl, evaluated_bl) = runs["batch-last"]
    assert plan == plan_bl and kernel in plan.values()
    if kernel == "numba" and arch != "scnn":  # a dense-planned layer inside a batch-last stretch is covered
        assert "dense" in plan.values()
    assert spikes.keys() == spikes_bl.keys() and len(spikes) >= 3
    for name in spikes:
        assert torch.equal(spikes[name], spikes_bl[name]), name
    scale = max(1.0, float(logits.abs().max()))
    assert float((logits - logits_bl).abs().max()) <= TOL * scale
    assert float((evaluated - evaluated_bl).abs().max()) <= TOL * max(1.0, float(evaluated.abs().max()))
    for name, grad in grads.items():
        reference = grads[name.replace("bias", "weight")] if _bias_before_bn(base, name) else grad
        assert float((grads_bl[name] - grad).abs().max()) <= TOL * max(1e-3, float(reference.abs().max())), name
    for name, value in running.items():
        assert float((running_bl[name].double() - value.double()).abs().max()) <= 1e-6, name


@NUMBA
def test_a_sparse_vgg_body_transposes_once_in_and_once_out(monkeypatch) -> None:
    """Every VGG-16 layer on the kernel: per layer, each one transposes in and out (forward and backward);
    batch-last, the body does once at its start and once at its end per direction (the encoder conv, in a
    plain nn.Sequential, keeps its own transposes: in + out forward, the output gradient in backward)."""
    import ndsnn_cli.kernels.execution as execution_module

    counts = {"in": 0, "out": 0}

    def counted(function, key):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            counts[key] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(execution_module, "to_batch_last", counted(execution_module.to_batch_last, "in"))
    monkeypatch.setattr(execution_module, "from_batch_last", counted(execution_module.from_batch_last, "out"))
    seen = {}
    for layout in ("per-layer", "batch-last"):
        model, masks = _masked_model("vgg16", 32, 3, every_third_dense=False)
        counts.update({"in": 0, "out": 0})
        execution = SparseExecution(model, masks, "auto", "cpu", layout)
        assert set(execution.rebuild().values()) == {"numba"}
        with execution:
            model(torch.rand(2, 3, 32, 32)).sum().backward()
        seen[layout] = dict(counts)
    assert seen["per-layer"] == {"in": 2 * 14, "out": 2 * 14 - 1}
    assert seen["batch-last"] == {"in": 2 + 2, "out": 1 + 2}


@pytest.mark.parametrize("impl", [pytest.param("numba", marks=NUMBA), "torch"])
def test_spike_max_pool_routes_the_gradient_as_torch_does(impl) -> None:
    """Ties are the rule for 0/1 maps: the gradient goes to the first maximum in row-major order, exactly."""
    from ndsnn_cli.kernels.batch_last import _SpikeMaxPool2x2

    generator = torch.Generator().manual_seed(0)
    spikes = (torch.rand(6, 3, 8, 10, generator=generator) < 0.4).float()       # [N, C, H, W]
    grad = torch.randn(6, 3, 4, 5, generator=generator)
    dense = spikes.clone().requires_grad_(True)
    F.max_pool2d(dense, 2, 2).backward(grad)
    bl = spikes.permute(1, 2, 3, 0).contiguous().requires_grad_(True)        # [C, H, W, N]
    out = _SpikeMaxPool2x2.apply(bl, impl)
    out.backward(grad.permute(1, 2, 3, 0).contiguous())
    assert torch.equal(out.permute(3, 0, 1, 2), F.max_pool2d(spikes, 2, 2))
    assert torch.equal(bl.grad.permute(3, 0, 1, 2), dense.grad)
    assert int((dense.grad != 0).sum()) == int((F.max_pool2d(spikes, 2, 2) >= 0).sum())  # one position per window


@pytest.mark.parametrize("kind", ["2d", "1d"])
def test_batch_norm_alone_on_a_batch_last_map_equals_the_module(kind) -> None:
    """The shortcut's BN: outputs, input/affine gradients and the running statistics' update as on [N, C, H, W]."""
    from ndsnn_cli.kernels.batch_last import BatchLast, batch_norm
    from ndsnn_cli.kernels.execution import create_kernel

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, 4, 4, generator=generator) * 3 + 1
    if kind == "1d":
        x = x[:, :, :1, :1]
    bn = nn.BatchNorm2d(5) if kind == "2d" else nn.BatchNorm1d(5)
    twin = copy.deepcopy(bn)
    dense_in = x.clone().requires_grad_(True)
    expected = bn(dense_in if kind == "2d" else dense_in.flatten(1))
    grad = torch.randn(expected.shape, generator=generator)
    expected.backward(grad)
    bl_in = x.permute(1, 2, 3, 0).contiguous().requires_grad_(True)
    out = batch_norm(twin, BatchLast(bl_in, False, kind == "1d", create_kernel("torch-sparse"),
                                     torch.contiguous_format))
    out.data.backward(grad.reshape(x.shape).permute(1, 2, 3, 0))
    assert torch.allclose(out.data.permute(3, 0, 1, 2).reshape(expected.shape), expected, atol=1e-6)
    assert torch.allclose(bl_in.grad.permute(3, 0, 1, 2), dense_in.grad, atol=1e-6)
    assert torch.allclose(twin.weight.grad, bn.weight.grad, atol=1e-5)
    assert torch.allclose(twin.running_var, bn.running_var, atol=1e-6)
    assert torch.allclose(twin.running_mean, bn.running_mean, atol=1e-6)
    assert int(twin.num_batches_tracked) == 1


def test_an_unknown_layout_is_refused() -> None:
    conv = nn.Conv2d(2, 2, 3)
    masks = Masks({"weight": conv.weight}, {"weight": torch.ones_like(conv.weight, dtype=torch.bool)})
    with pytest.raises(ValueError, match="unknown sparse layout 'columns'"):
        SparseExecution(conv, masks, "auto", "cpu", "columns")
