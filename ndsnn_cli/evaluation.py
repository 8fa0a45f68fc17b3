"""How a spiking network is scored: the loss over time steps, the prediction, test accuracy, spike rates
and the dead-layer check, shared by the trainer, its summary and the export tests."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ndsnn_cli import distributed
from ndsnn_cli.data.loading import make_loader
from ndsnn_cli.recipe import Recipe
from ndsnn_cli.snn.models import SpikingNet
from ndsnn_cli.sparse.masks import Masks


def spiking_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean over time steps of the cross-entropy of each step's logits ([T, B, C])."""
    steps = logits.shape[0]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.repeat(steps), label_smoothing=label_smoothing)


def predict(logits: torch.Tensor) -> torch.Tensor:
    return logits.sum(0).argmax(-1)


# Samples (T x images) per model call when evaluating on the CPU. An evaluation batch (eval_batch_size, 512
# by default) in one call ran VGG-16 at T = 5 on 2,560 samples: its activation maps (10 MB per channel plane
# of the sparse kernels' layout, 670 MB per dense map) left the caches, and it set the whole run's peak
# memory. In calls of ~256 samples the same 512 images took 0.61x the time on the sparse kernels at 0.99
# and ~0.75x dense (2-core AMD EPYC host), with the same logits (BatchNorm uses its running statistics).
CPU_EVAL_SAMPLES = 256


def batched_logits(model: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`model(images)` ([T, B, classes]); on the CPU in calls of CPU_EVAL_SAMPLES samples, joined over B."""
    timesteps = int(getattr(model, "timesteps", 1))
    chunk = max(1, CPU_EVAL_SAMPLES // timesteps)
    if device.type != "cpu" or images.shape[0] <= chunk:
        return model(images)
    return torch.cat([model(part) for part in images.split(chunk)], dim=1)


@torch.no_grad()
def evaluate(model: nn.Module, test_set: torch.utils.data.Dataset, recipe: Recipe,
             device: torch.device) -> tuple[float, float]:
    """Test loss and accuracy (prediction = argmax of the summed per-step logits).

    Under DDP each rank scores every world_size-th image (no padding) and the sums are all-reduced.
    """
    model.eval()
    if distributed.active():
        test_set = torch.utils.data.Subset(test_set, range(distributed.rank(), len(test_set),
                                                           distributed.world_size()))
    loader = make_loader(test_set, recipe.data.eval_batch_size, shuffle=False, seed=0, epoch=0,
                         num_workers=recipe.data.num_workers)
    loss_sum, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                            enabled=recipe.train.amp):
            logits = batched_logits(model, images, device)
        loss_sum += spiking_loss(logits, labels).item() * labels.shape[0]
        correct += int((predict(logits) == labels).sum())
        seen += labels.shape[0]
    model.train()
    loss_sum, correct, seen = distributed.sum_values(loss_sum, correct, seen)
    return loss_sum / max(1, seen), correct / max(1, seen)


@torch.no_grad()
def spike_rates(model: SpikingNet, images: torch.Tensor) -> dict[str, float]:
    """Mean firing rate of every LIF layer on a batch (spikes per neuron per time step)."""
    rates: dict[str, float] = {}
    names = {module: name for name, module in model.named_modules()}
    hooks = [lif.register_forward_hook(lambda m, _i, out: rates.__setitem__(names[m], float(out.float().mean())))
             for lif in model.lif_layers()]
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return rates


DEAD_SPIKE_RATE = 1e-4  # a LIF layer firing less than this at the first evaluation passes (almost) no gradient


def dead_layers(model: SpikingNet, masks: Masks | None, rates: dict[str, float]) -> dict[str, dict[str, Any]]:
    """LIF layers whose spike rate (`spike_rates` on a probe batch) is below DEAD_SPIKE_RATE, each with the
    weight that feeds it (the nearest conv/linear before it, shortcuts aside) and that weight's density."""
    feeding, last = {}, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear) and "shortcut" not in name:
            last = f"{name}.weight"
        elif name in rates:
            feeding[name] = last
    dead = {}
    for name, rate in rates.items():
        if rate < DEAD_SPIKE_RATE:
            weight = feeding.get(name)
            density = float(masks.masks[weight].float().mean()) if masks and weight in masks.masks else 1.0
            dead[name] = {"spike_rate": rate, "weight": weight, "density": density}
    return dead


def probe(test_set: torch.utils.data.Dataset, device: torch.device) -> torch.Tensor:
    """The first (up to) 64 test images: the fixed batch spike rates are measured on."""
    return torch.stack([test_set[i][0] for i in range(min(64, len(test_set)))]).to(device)
