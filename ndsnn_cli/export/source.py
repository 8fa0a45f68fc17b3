"""What every exporter starts from: a trained run loaded once (`ExportSource`), the one artefact header,
and the one place an export's file is named and written.

csr, onnx, nir and c all read a checkpoint (or run directory) the same way: load and validate it, fold
BatchNorm where the target asks, state the input contract and the data set's shape. `artefact_header` is
the metadata a CSR artefact carries, built here for the CSR export, the ONNX metadata and the C target's
reference runtime alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ndsnn_cli import __version__
from ndsnn_cli.atomic import write_bytes
from ndsnn_cli.data import DatasetInfo, dataset_info, input_contract
from ndsnn_cli.errors import UserError
from ndsnn_cli.export.fold import TrainedModel, fold_batchnorm, inference_graph, load_trained
from ndsnn_cli.recipe import Recipe
from ndsnn_cli.snn.models import SpikingNet


@dataclass(eq=False)
class ExportSource:
    """A checkpoint ready to export: its model (eval mode), masks, recipe and where it came from, the
    BN-folded twin (computed once, on first use), the data set's facts and the input contract."""

    trained: TrainedModel
    info: DatasetInfo
    contract: dict[str, Any] = field(repr=False)

    @property
    def recipe(self) -> Recipe:
        return self.trained.recipe

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return self.trained.masks

    @property
    def path(self) -> Path:
        return self.trained.path

    @cached_property
    def folded(self) -> SpikingNet:
        """BatchNorm folded into the layer before it: same masks, same spikes (export/fold.py)."""
        return fold_batchnorm(self.trained.model)

    def model(self, *, fold_bn: bool) -> SpikingNet:
        return self.folded if fold_bn else self.trained.model

    def header(self, model: SpikingNet, *, bn_folded: bool) -> dict[str, Any]:
        """The full artefact header of `model` (this source's model, folded or not), with provenance."""
        m = self.recipe.model
        return artefact_header(
            model, self.masks, contract=self.contract, timesteps=m.timesteps, bn_folded=bn_folded,
            dataset={"name": self.info.name, "num_classes": self.info.num_classes,
                     "in_channels": self.info.in_channels, "image_size": self.info.image_size},
            neuron={"model": "lif", "tau": m.tau, "v_threshold": m.v_threshold, "reset": "hard", "v_reset": 0.0,
                    "surrogate": m.surrogate, "surrogate_alpha": m.surrogate_alpha},
            recipe=self.recipe,
            source={"checkpoint": str(self.path), "epoch": self.trained.meta.get("epoch"),
                    "step": self.trained.meta.get("step")})

    def output(self, out: str | Path | None, suffix: str) -> Path:
        """The user's `-o`, else runs/<run>/export/last.<suffix>."""
        return Path(out) if out is not None else default_output(self.path, suffix)


def load_source(path: str | Path) -> ExportSource:
    """A checkpoint or run directory as an ExportSource; bad files are one-line UserErrors."""
    trained = load_trained(path)
    dataset = trained.recipe.data.dataset
    return ExportSource(trained, dataset_info(dataset), input_contract(dataset))


def artefact_header(model: Any, masks: dict[str, torch.Tensor], *, contract: dict[str, Any], timesteps: int,
                    dataset: dict[str, Any], bn_folded: bool, neuron: dict[str, Any] | None = None,
                    recipe: Recipe | None = None, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a deployment needs besides the tensors: the layer graph, T, the input contract, the data set's
    shape, per-layer sparsity; with a recipe, also the neuron, provenance and the recipe itself. (The
    format, version and value dtype are added by `csr.pack`.)"""
    params = dict(model.named_parameters())
    layers = {}
    for name, mask in masks.items():
        nnz = int(mask.sum())
        layers[name] = {"shape": list(params[name].shape), "numel": mask.numel(), "nnz": nnz,
                        "sparsity": 1 - nnz / mask.numel()}
    numel = sum(layer["numel"] for layer in layers.values())
    nnz = sum(layer["nnz"] for layer in layers.values())
    header: dict[str, Any] = {
        "timesteps": timesteps, "dataset": dataset, "input": contract,
        "sparsity": {"layers": layers, "numel": numel, "nnz": nnz, "sparsity": 1 - nnz / numel if numel else 0.0},
        "graph": inference_graph(model), "bn_folded": bn_folded, "ndsnn_version": __version__,
    }
    if recipe is not None:
        header.update(arch=recipe.model.arch, neuron=neuron, recipe=recipe.to_toml(), recipe_sha256=recipe.sha256(),
                      source=source)
    return header


def default_output(checkpoint: Path, suffix: str) -> Path:
    """runs/x/checkpoints/last.safetensors -> runs/x/export/last.<suffix>."""
    return checkpoint.parent.parent / "export" / f"{checkpoint.name.removesuffix('.safetensors')}.{suffix}"


def write_checked(target: Path, data: bytes) -> Path:
    """Atomic write; an unwritable place is a UserError naming the path (nothing is left behind)."""
    if target.exists() and target.is_dir():
        raise UserError(f"{target}: output path is a directory")
    try:
        return write_bytes(target, data)
    except OSError as exc:
        raise UserError(f"{target}: cannot write output ({exc.strerror or exc})") from None
