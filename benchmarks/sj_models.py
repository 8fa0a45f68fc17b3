"""SpikingJelly twins of ndsnn's models: the same layers, in SpikingJelly's multi-step style.

`sj_twin(model)` rebuilds an ndsnn `SpikingNet` from `spikingjelly.activation_based` modules
(`layer.*` with step_mode='m', `neuron.LIFNode` with tau 4/3, v_threshold 1, v_reset 0, ATan,
detach_reset=True) under the same parameter names, so `twin.load_state_dict(model.state_dict())`
gives both the identical initial weights. Input `[B, C, H, W]`; output `[T, B, classes]`.
"""

from __future__ import annotations

import torch
from spikingjelly.activation_based import functional, layer, neuron, surrogate
from torch import nn

from ndsnn_cli.snn.models import BasicBlock, SpikingNet
from ndsnn_cli.snn.neuron import LIF


def _sj_lif(lif: LIF) -> nn.Module:
    if lif.surrogate != "atan":
        raise ValueError(f"the SpikingJelly twin supports the atan surrogate only, not {lif.surrogate!r}")
    return neuron.LIFNode(tau=float(lif.tau), decay_input=True, v_threshold=float(lif.v_threshold), v_reset=0.0,
                          surrogate_function=surrogate.ATan(alpha=lif.alpha), detach_reset=True, step_mode="m")


class SJBasicBlock(nn.Module):
    """ndsnn's BasicBlock on `[T, B, ...]` sequences: conv-BN-LIF-conv-BN + shortcut, then LIF."""

    def __init__(self, block: BasicBlock) -> None:
        super().__init__()
        self.conv1, self.bn1 = _sj_module(block.conv1), _sj_module(block.bn1)
        self.lif1 = _sj_lif(block.lif1)
        self.conv2, self.bn2 = _sj_module(block.conv2), _sj_module(block.bn2)
        self.shortcut = _sj_module(block.shortcut)
        self.lif2 = _sj_lif(block.lif2)

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        out = self.lif1(self.bn1(self.conv1(x_seq)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x_seq)
        return self.lif2(out)


def _sj_module(module: nn.Module) -> nn.Module:
    """One ndsnn module as its SpikingJelly multi-step counterpart (same hyper-parameters, fresh weights)."""
    m = module
    if isinstance(m, LIF):
        return _sj_lif(m)
    if isinstance(m, BasicBlock):
        return SJBasicBlock(m)
    if isinstance(m, nn.Sequential):
        return nn.Sequential(*(_sj_module(child) for child in m))
    if isinstance(m, nn.Identity):
        return nn.Identity()
    if isinstance(m, nn.Conv2d):
        return layer.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                            m.groups, m.bias is not None, m.padding_mode, step_mode="m")
    if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
        cls = layer.BatchNorm2d if isinstance(m, nn.BatchNorm2d) else layer.BatchNorm1d
        return cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, step_mode="m")
    if isinstance(m, nn.MaxPool2d):
        return layer.MaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode, step_mode="m")
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return layer.AdaptiveAvgPool2d(m.output_size, step_mode="m")
    if isinstance(m, nn.Flatten):
        # multi-step stateless layers run on the [T*B, ...] view, so start_dim keeps its meaning
        return layer.Flatten(m.start_dim, m.end_dim, step_mode="m")
    if isinstance(m, nn.Linear):
        return layer.Linear(m.in_features, m.out_features, m.bias is not None, step_mode="m")
    raise TypeError(f"no SpikingJelly twin for {type(m).__name__}")


class SJSpikingNet(nn.Module):
    """Encoder (plain single-step conv+BN, once) -> repeat to `[T, B, ...]` -> multi-step body."""

    def __init__(self, model: SpikingNet) -> None:
        super().__init__()
        # The encoder sees the analog image once, as in ndsnn (direct encoding): plain torch modules.
        self.encoder = nn.Sequential(*(_plain_copy(m) for m in model.encoder))
        self.body = _sj_module(model.body)
        self.timesteps = model.timesteps

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        encoded = self.encoder(images)
        x_seq = encoded.unsqueeze(0).repeat(self.timesteps, *([1] * encoded.dim()))
        return self.body(x_seq)

    def reset_states(self) -> None:
        """Clear every LIFNode's membrane state (SpikingJelly keeps it between calls)."""
        functional.reset_net(self)


def _plain_copy(module: nn.Module) -> nn.Module:
    m = module
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                         m.groups, m.bias is not None, m.padding_mode)
    if isinstance(m, nn.BatchNorm2d):
        return nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    if isinstance(m, nn.BatchNorm1d):
        return nn.BatchNorm1d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    if isinstance(m, nn.Linear):
        return nn.Linear(m.in_features, m.out_features, m.bias is not None)
    if isinstance(m, nn.MaxPool2d):
        return nn.MaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode)
    if isinstance(m, nn.Flatten):
        return nn.Flatten(m.start_dim, m.end_dim)
    raise TypeError(f"no plain copy for encoder module {type(m).__name__}")


def sj_twin(model: SpikingNet) -> SJSpikingNet:
    """The SpikingJelly twin of `model`, holding a copy of its current weights and BN statistics."""
    twin = SJSpikingNet(model)
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin.to(next(model.parameters()).device)


def record_spikes(model: nn.Module, kind: type) -> list[torch.Tensor]:
    """A list that fills with every `kind` layer's output spikes (flattened) on each forward pass:
    ndsnn's `LIF` or SpikingJelly's `LIFNode`, for the equivalence checks."""
    spikes: list[torch.Tensor] = []
    for module in model.modules():
        if isinstance(module, kind):
            module.register_forward_hook(lambda _m, _i, out: spikes.append(out.detach().reshape(-1)))
    return spikes
