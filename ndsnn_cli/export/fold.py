"""From a checkpoint to an inference model: load it, fold BatchNorm into the layer before.

Folding `BN(conv(x))` into `conv'(x)` scales each output row of the weight, so the sparsity pattern
(the mask) is unchanged. `inference_graph` is the artefact's JSON form of `graph.network_graph`, the
op list the reference runtime executes without the training code.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ndsnn_cli.checkpoint import load_checkpoint
from ndsnn_cli.errors import UserError
from ndsnn_cli.export import graph
from ndsnn_cli.recipe import Recipe, parse_recipe
from ndsnn_cli.rundir import RUN_CHECKPOINT
from ndsnn_cli.snn.models import BasicBlock, SpikingNet
from ndsnn_cli.validate import check_checkpoint_fits


@dataclass
class TrainedModel:
    """A checkpoint's model in eval mode, its masks (param -> bool tensor) and where it came from."""

    model: SpikingNet
    masks: dict[str, torch.Tensor]
    recipe: Recipe
    path: Path
    meta: dict[str, Any]


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory means its checkpoints/last.safetensors."""
    path = Path(path)
    if path.is_dir():
        path = path / RUN_CHECKPOINT
        if not path.is_file():
            raise UserError(f"{path}: run directory has no checkpoint (train it first)")
    elif not path.exists():
        raise UserError(f"{path}: no such run directory or checkpoint")
    return path


def load_trained(path: str | Path) -> TrainedModel:
    """Rebuild the checkpoint's model from its recipe and load weights; bad files are one-line UserErrors."""
    from ndsnn_cli.build import build_model

    path = resolve_checkpoint(path)
    checkpoint = load_checkpoint(path)
    if "recipe" not in checkpoint.meta:
        raise UserError(f"{path}: checkpoint has no recipe (an LTH rewind file?); export a run's last.safetensors")
    recipe = parse_recipe(checkpoint.meta["recipe"], f"{path} (embedded recipe)")
    model = build_model(recipe)
    check_checkpoint_fits(path, checkpoint.tensors, model)
    model.load_state_dict(checkpoint.model_state)
    masks = {name: mask.to(torch.bool) for name, mask in checkpoint.masks.items()}
    model.eval()
    return TrainedModel(model, masks, recipe, path, checkpoint.meta)


def _fold_pair(layer: nn.Conv2d | nn.Linear, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
    """In place: layer <- BN(layer), computed in float64 and rounded once to the layer's dtype."""
    weight = layer.weight.detach().double()
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    folded_weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    folded_bias = (bias - bn.running_mean.double()) * scale + bn.bias.detach().double()
    dtype = layer.weight.dtype
    layer.weight = nn.Parameter(folded_weight.to(dtype))
    layer.bias = nn.Parameter(folded_bias.to(dtype))


def fold_batchnorm(model: SpikingNet) -> SpikingNet:
    """A copy with every BatchNorm that directly follows a conv/linear folded into it (BN -> Identity)."""
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if not isinstance(module, nn.Sequential | BasicBlock):
            continue
        children = list(module.named_children())
        for (_, first), (second_name, second) in zip(children, children[1:], strict=False):
            if (isinstance(first, nn.Conv2d | nn.Linear) and isinstance(second, nn.BatchNorm1d | nn.BatchNorm2d)
                    and second.track_running_stats and second.affine):
                _fold_pair(first, second)
                setattr(module, second_name, nn.Identity())
    return folded


def inference_graph(model: SpikingNet) -> list[dict[str, Any]]:
    """The artefact's `graph` metadata: `network_graph` as JSON (encoder ops, `repeat_timesteps`, body ops)."""
    return graph.to_json(graph.network_graph(model))
