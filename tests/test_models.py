"""Model registry: the paper layouts have the LTH-SNN parameter counts; every model returns [T, B, classes]."""

from __future__ import annotations

import copy

import pytest
import torch

from ndsnn_cli.build import build_training_model
from ndsnn_cli.errors import UserError
from ndsnn_cli.recipe import parse_recipe
from ndsnn_cli.snn.models import MODELS, NeuronConfig, create_model
from ndsnn_cli.snn.neuron import LIF

# Counted once from this code for CIFAR-10 (3x32x32, 10 classes), all parameters incl. BN and biases.
# Plausible against the published layouts: VGG-16 (conv biases, one 512->10 classifier) ~14.7 M,
# ResNet-19 (TET/LTH-SNN, fc 512->256->10) ~12.6 M.
VGG16_CIFAR10_PARAMS = 14_728_266
RESNET19_CIFAR10_PARAMS = 12_630_858


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_vgg16_cifar10_parameter_count() -> None:
    model = create_model("vgg16", num_classes=10, in_channels=3, image_size=32)
    assert count(model) == VGG16_CIFAR10_PARAMS
    conv_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    # 13 conv3x3 layers of 64,64,128,128,256x3,512x6: the classic VGG-16 feature extractor.
    assert conv_weights == 9 * (3 * 64 + 64 * 64 + 64 * 128 + 128 * 128 + 128 * 256 + 2 * 256 * 256
                                + 256 * 512 + 5 * 512 * 512)
    assert len(model.lif_layers()) == 13


def test_resnet19_cifar10_parameter_count() -> None:
    model = create_model("resnet19", num_classes=10, in_channels=3, image_size=32)
    assert count(model) == RESNET19_CIFAR10_PARAMS
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 256), (256, 10)]
    # stem + 8 blocks x 2 + the LIF after fc 512->256
    assert len(model.lif_layers()) == 1 + 16 + 1


@pytest.mark.parametrize("name", ["vgg16", "resnet19", "scnn", "mlp"])
@pytest.mark.parametrize("image_size", [28, 32, 64])
def test_output_shape_is_time_batch_classes(name: str, image_size: int) -> None:
    torch.manual_seed(0)
    steps, batch, classes = 2, 2, 7
    model = create_model(name, num_classes=classes, in_channels=3, image_size=image_size,
                         neuron=NeuronConfig(timesteps=steps))
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 3, image_size, image_size))
    assert out.shape == (steps, batch, classes)
    assert torch.isfinite(out).all()


def test_encoder_runs_once_and_repeats_over_time() -> None:
    model = create_model("scnn", num_classes=10, in_channels=1, image_size=28, neuron=NeuronConfig(timesteps=3))
    calls = []
    model.encoder.register_forward_hook(lambda _m, inputs, _o: calls.append(inputs[0].shape[0]))
    model.eval()
    with torch.no_grad():
        model(torch.randn(5, 1, 28, 28))
    assert calls == [5]  # analog image batch, not T*B


def test_neuron_config_reaches_every_lif() -> None:
    neuron = NeuronConfig(timesteps=3, tau=2.0, v_threshold=0.5, surrogate="sigmoid", alpha=4.0, backend="reference")
    model = create_model("resnet19", num_classes=10, in_channels=3, image_size=32, neuron=neuron)
    lifs = model.lif_layers()
    assert all(isinstance(lif, LIF) for lif in lifs)
    assert {(lif.timesteps, lif.tau, lif.v_threshold, lif.surrogate, lif.alpha, lif.backend) for lif in lifs} == {
        (3, 2.0, 0.5, "sigmoid", 4.0, "reference")}
    model.set_lif_backend("fused")
    assert {lif.backend for lif in lifs} == {"fused"}


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(UserError) as info:
        create_model("resnet18", num_classes=10, in_channels=3, image_size=32)
    message = str(info.value)
    assert message.startswith("unknown model 'resnet18' (known: ")
    for name in MODELS:
        assert name in message


@pytest.mark.parametrize(("name", "size", "channels"), [("vgg16", 32, 3), ("resnet19", 32, 3), ("scnn", 28, 1),
                                                         ("mlp", 28, 1)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_memory_lean_training_path_equals_plain_modules(name: str, size: int, channels: int,
                                                        memory_format: torch.memory_format, monkeypatch) -> None:
    """The fused backend's torch training forward (BN+LIF fused, 1-byte spikes, lean pooling) against the
    reference backend's plain module calls: identical logits and running statistics, equal gradients,
    in NCHW and in the trainer's channels-last layout. (The numba channels-last BN + LIF, which sums the
    statistics in another order, is held off here: tests/test_bn_lif_channels_last.py compares it.)"""
    from ndsnn_cli.kernels import bn_lif

    monkeypatch.setattr(bn_lif, "channels_last_fits", lambda *args: False)
    torch.manual_seed(0)
    lean = create_model(name, num_classes=10, in_channels=channels, image_size=size, neuron=NeuronConfig(timesteps=3))
    lean = lean.to(memory_format=memory_format)
    plain = copy.deepcopy(lean)
    plain.set_lif_backend("reference")
    images = torch.randn(4, channels, size, size)
    outputs = []
    for model in (lean, plain):
        out = model(images)
        out.square().mean().backward()
        outputs.append(out.detach())
    assert torch.equal(outputs[0], outputs[1])
    scale = max(p.grad.abs().max().item() for p in plain.parameters())
    for (param_name, a), b in zip(lean.named_parameters(), plain.parameters(), strict=True):
        # conv biases in front of BN have a true gradient of 0: only rounding noise there, so the
        # tolerance is relative to the largest gradient of the model
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6 * scale, msg=param_name)
    for (buffer_name, a), b in zip(lean.named_buffers(), plain.buffers(), strict=True):
        assert torch.equal(a, b), buffer_name



@pytest.mark.parametrize(("name", "size", "channels"), [("vgg16", 32, 3), ("resnet19", 32, 3), ("scnn", 28, 1)])
def test_training_model_keeps_every_feature_map_channels_last(name: str, size: int, channels: int) -> None:
    """The trainer's model (channels-last weights) keeps NHWC through the fused nodes, the repeated
    encoder output and the pooling, forward and backward: no layout round trips between convs."""
    recipe = parse_recipe(f"[model]\narch = '{name}'\ntimesteps = 3\n[data]\n"
                          f"dataset = '{'cifar10' if channels == 3 else 'fashion-mnist'}'\n")
    model = build_training_model(recipe).train()
    layouts: list[tuple[str, str, bool]] = []

    def record(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        tensors = [("output", output)] + ([("input", inputs[0])] if module is not first_conv else [])
        for where, tensor in tensors:
            layouts.append((type(module).__name__, where, tensor.is_contiguous(memory_format=torch.channels_last)))

    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    first_conv = convs[0]  # its input is the caller's image batch
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.MaxPool2d):
            module.register_forward_hook(record)
    model(torch.randn(2, channels, size, size)).sum().backward()
    assert layouts and all(ok for _, _, ok in layouts), [x for x in layouts if not x[2]]
    assert all(m.weight.grad.is_contiguous(memory_format=torch.channels_last) for m in convs)
