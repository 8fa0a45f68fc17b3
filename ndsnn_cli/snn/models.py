"""Spiking model registry: `create_model("resnet19", num_classes=10, ...)`, layouts as in LTH-SNN.

Every model takes an analog image batch `[B, C, H, W]`, runs its first conv+BN once (direct
encoding), repeats that over T, and returns per-step logits `[T, B, classes]`. Loss is the mean over
t of the cross-entropy; the prediction is the argmax of the summed logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ndsnn_cli.errors import UserError
from ndsnn_cli.kernels import batch_last, bn_lif
from ndsnn_cli.kernels.batch_last import BatchLast
from ndsnn_cli.snn.neuron import LIF, is_spikes, mark_spikes, saving_spikes_as_bool, spike_max_pool2d


@dataclass(frozen=True)
class NeuronConfig:
    timesteps: int = 5
    tau: float = 4.0 / 3.0
    v_threshold: float = 1.0
    surrogate: str = "atan"
    alpha: float = 2.0
    backend: str = "fused"

    def make(self) -> LIF:
        return LIF(self.timesteps, self.tau, self.v_threshold, self.surrogate, self.alpha, self.backend)


ModelBuilder = Callable[..., "SpikingNet"]
MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def add(builder: ModelBuilder) -> ModelBuilder:
        MODELS[name] = builder
        return builder
    return add


def create_model(name: str, *, num_classes: int, in_channels: int, image_size: int,
                 neuron: NeuronConfig | None = None) -> SpikingNet:
    if name not in MODELS:
        raise UserError(f"unknown model '{name}' (known: {', '.join(sorted(MODELS))})")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                        neuron=neuron or NeuronConfig())


class SpikingNet(nn.Module):
    """Encoder (conv+BN, once) -> repeat over T -> `body` on the [T*B] batch -> [T, B, classes].

    Training with the `fused` LIF backend runs the memory-lean path (README "The SNN"); the
    `reference` backend and evaluation run plain module calls.
    """

    def __init__(self, encoder: nn.Module, body: nn.Module, neuron: NeuronConfig) -> None:
        super().__init__()
        self.encoder, self.body = encoder, body
        self.timesteps = neuron.timesteps

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and all(lif.backend == "fused" for lif in self.lif_layers()):
            with saving_spikes_as_bool():
                logits = self._forward(images)
        else:
            logits = self._forward(images)
        return logits.reshape(self.timesteps, images.shape[0], -1)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        encoded = self.encoder(images)
        first = self.body[0]
        if isinstance(first, LIF):  # every registry model: the encoder's output drives a LIF
            return self.body(bn_lif.repeated_input(first, encoded), start=1)
        return self.body(encoded.unsqueeze(0).expand(self.timesteps, *encoded.shape).reshape(-1, *encoded.shape[1:]))

    def lif_layers(self) -> list[LIF]:
        return [m for m in self.modules() if isinstance(m, LIF)]

    def set_lif_backend(self, backend: str) -> None:
        from ndsnn_cli.snn import LIF_BACKENDS

        if backend not in LIF_BACKENDS:
            raise ValueError(f"unknown LIF backend {backend!r} (known: {', '.join(LIF_BACKENDS)})")
        for lif in self.lif_layers():
            lif.backend = backend


class SpikingSequential(nn.Sequential):
    """nn.Sequential (same modules, same state_dict) that takes the memory-lean path while training:
    a BatchNorm followed by a LIF runs as one fused node, and spike maps are pooled and saved as
    1 byte (`neuron.saving_spikes_as_bool`). Evaluation and export see plain module calls.
    Under a batch-last `SparseExecution` the stretches between sparse layers run in the kernels' layout
    (`kernels.batch_last.step`); the result is always dense."""

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:  # type: ignore[override]
        modules = list(self)
        i = start
        while i < len(modules):
            stepped = batch_last.step(modules, i, x)
            if stepped is not None:
                x, consumed = stepped
                i += consumed
                continue
            if isinstance(x, BatchLast):
                x = x.dense()
            module = modules[i]
            following = modules[i + 1] if i + 1 < len(modules) else None
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d) and isinstance(following, LIF):
                x = bn_lif.after_batch_norm(following, x, module)
                i += 2
                continue
            if is_spikes(x) and isinstance(module, nn.MaxPool2d):
                x = spike_max_pool2d(x, module)
            elif is_spikes(x) and isinstance(module, nn.Flatten | nn.Identity):
                x = mark_spikes(module(x))
            else:
                x = module(x)
            i += 1
        return x.dense() if isinstance(x, BatchLast) else x


def _conv_bn(c_in: int, c_out: int, *, stride: int = 1, kernel: int = 3, bias: bool = False) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=bias), nn.BatchNorm2d(c_out)]


VGG16_LAYOUT: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                                 512, 512, 512, "M"]


@register_model("vgg16")
def vgg16(*, num_classes: int, in_channels: int, image_size: int, neuron: NeuronConfig) -> SpikingNet:
    """VGG-16 (LTH-SNN): conv3x3 (with bias) + BN + LIF, 2x2 max-pooling, one linear classifier.

    Pooling uses ceil_mode so 28x28 inputs work; for 32 and 64 it equals the floor layout.
    """
    layers: list[nn.Module] = []
    channels, size = in_channels, image_size
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            size = -(-size // 2)
        else:
            layers += _conv_bn(channels, int(item), bias=True) + [neuron.make()]
            channels = int(item)
    encoder = nn.Sequential(*layers[:2])
    body = SpikingSequential(*layers[2:], nn.Flatten(), nn.Linear(channels * size * size, num_classes))
    return _init_vgg(SpikingNet(encoder, body, neuron))


def _init_vgg(model: SpikingNet) -> SpikingNet:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


class BasicBlock(nn.Module):
    """conv-BN-LIF-conv-BN (+ shortcut, 1x1 conv+BN when the shape changes) then LIF."""

    def __init__(self, c_in: int, c_out: int, stride: int, neuron: NeuronConfig) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, c_out, stride=stride)
        self.lif1 = neuron.make()
        self.conv2, self.bn2 = _conv_bn(c_out, c_out)
        self.shortcut = (nn.Sequential(*_conv_bn(c_in, c_out, stride=stride, kernel=1))
                         if stride != 1 or c_in != c_out else nn.Identity())
        self.lif2 = neuron.make()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = bn_lif.after_batch_norm(self.lif1, self.conv1(x), self.bn1)
        # An identity shortcut passes the spikes x on: the fused node saves them as 1 byte, shared with conv1.
        return bn_lif.after_batch_norm(self.lif2, self.conv2(out), self.bn2, residual=self.shortcut(x))

    def forward_batch_last(self, x: torch.Tensor | BatchLast) -> BatchLast | None:
        """The block in the sparse kernels' layout (`kernels.batch_last`): a batch-last x, or a dense x when
        conv1 runs on a kernel (None otherwise: the caller runs `forward`). Same arithmetic as `forward`."""
        if not isinstance(x, BatchLast):
            plan = batch_last.sparse_layer(self.conv1)
            if plan is None or not batch_last.runs_batch_last(self.conv1, x):
                return None
            x = batch_last.enter(x, plan.kernel)
        out = batch_last.bn_lif(self.bn1, self.lif1, batch_last.layer(self.conv1, x))
        if isinstance(self.shortcut, nn.Identity):
            residual = x
        else:
            conv, bn = self.shortcut
            residual = batch_last.batch_norm(bn, batch_last.layer(conv, x))
        return batch_last.bn_lif(self.bn2, self.lif2, batch_last.layer(self.conv2, out), residual)


@register_model("resnet19")
def resnet19(*, num_classes: int, in_channels: int, image_size: int, neuron: NeuronConfig) -> SpikingNet:
    """ResNet-19 (LTH-SNN): stem conv 3->64 + BN + LIF; blocks 3x128, 3x256, 2x512, each stage stride 2;
    global average pool; fc 512->256 + LIF; fc 256->classes."""
    blocks: list[nn.Module] = []
    channels = 64
    for width, count in ((128, 3), (256, 3), (512, 2)):
        for i in range(count):
            blocks.append(BasicBlock(channels, width, 2 if i == 0 else 1, neuron))
            channels = width
    encoder = nn.Sequential(*_conv_bn(in_channels, 64))
    body = SpikingSequential(neuron.make(), *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(512, 256), neuron.make(), nn.Linear(256, num_classes))
    return SpikingNet(encoder, body, neuron)


@register_model("scnn")
def scnn(*, num_classes: int, in_channels: int, image_size: int, neuron: NeuronConfig) -> SpikingNet:
    """A small spiking CNN for CPU runs: conv16-pool | LIF-conv32-LIF-pool-fc128-LIF-fc (~0.2 M weights at 28x28).

    The encoder pools the analog conv output once, before time is unrolled, so the first LIF and the
    second conv run at a quarter of the resolution: 4x cheaper per step on a CPU.
    """
    size = image_size // 4
    encoder = nn.Sequential(*_conv_bn(in_channels, 16), nn.MaxPool2d(2))
    body = SpikingSequential(
        neuron.make(),
        *_conv_bn(16, 32), neuron.make(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * size * size, 128), neuron.make(),
        nn.Linear(128, num_classes),
    )
    return SpikingNet(encoder, body, neuron)


@register_model("mlp")
def mlp(*, num_classes: int, in_channels: int, image_size: int, neuron: NeuronConfig) -> SpikingNet:
    """A two-layer spiking MLP: the smallest useful model, for tests and quick checks."""
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, 128), nn.BatchNorm1d(128))
    body = SpikingSequential(neuron.make(), nn.Linear(128, num_classes))
    return SpikingNet(encoder, body, neuron)
