"""From a recipe to its model: one home for building the network the trainer trains, the exporters
rebuild from a checkpoint, and prune-compare inspects (so no exporter imports the trainer)."""

from __future__ import annotations

import torch

from ndsnn_cli.data import dataset_info
from ndsnn_cli.recipe import Recipe
from ndsnn_cli.snn.models import NeuronConfig, SpikingNet, create_model


def build_model(recipe: Recipe) -> SpikingNet:
    info = dataset_info(recipe.data.dataset)
    m = recipe.model
    neuron = NeuronConfig(m.timesteps, m.tau, m.v_threshold, m.surrogate, m.surrogate_alpha, m.lif_backend)
    return create_model(m.arch, num_classes=info.num_classes, in_channels=info.in_channels,
                        image_size=info.image_size, neuron=neuron)


def build_training_model(recipe: Recipe, device: torch.device | str = "cpu") -> SpikingNet:
    """The model as the trainer runs it: on `device`, conv weights channels-last.

    oneDNN (CPU) and cuDNN convolutions run faster on NHWC feature maps (benchmarks/README.md: 6-15%
    per training step here), and a channels-last weight makes every conv output, and so every
    spike map after it, channels-last. Values and the state_dict are unchanged (checkpoints store
    contiguous tensors); only the rounding of the convolutions may differ from an NCHW run.
    """
    return build_model(recipe).to(device, memory_format=torch.channels_last)
