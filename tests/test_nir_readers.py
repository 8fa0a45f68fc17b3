"""NIR files as the ecosystem reads them: snnTorch's and SpikingJelly's own `import_from_nir`, at their
defaults (dt = 1e-4 s), reproduce ndsnn's predictions and logits for mlp, resnet19 and vgg16.

Every LIF layer must fire on the test images (asserted), otherwise matching logits would prove nothing.
Inputs: 100 real Fashion-MNIST test images (mlp, resnet19 at 1x28x28; vgg16 needs 3x32x32, so the
same images upsampled bilinearly to 32x32 and replicated over 3 channels). NDSNN_NIR_READER_IMAGES=N
runs resnet19 and vgg16 on fewer on a slow machine (the issue asks for >= 100: CI runs the default).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ndsnn_cli.build import build_model
from ndsnn_cli.checkpoint import save_checkpoint
from ndsnn_cli.data.loading import build_datasets
from ndsnn_cli.export.fold import fold_batchnorm, load_trained
from ndsnn_cli.recipe import Recipe
from ndsnn_cli.snn.neuron import LIF
from ndsnn_cli.sparse.budget import active_count
from ndsnn_cli.sparse.masks import random_mask, sparse_parameter_names
from ndsnn_cli.train import train

nir = pytest.importorskip("nir")
LOGIT_TOL = 1e-4
# A charge this close to the threshold (8 float32 ulps at 1.0) may fire or not by float rounding alone: in a
# reader whose LIF arithmetic is not ours (snnTorch scales by tau and fires at `>`), or on another CPU kernel
# path. An image where any neuron at any step came this close is a tie, exempt from equality: in the CNNs
# (~10^5 neurons x T per image) about 1 image in 5 (21-22 of 100 measured), in the mlp none.
TIE_MARGIN = 1e-6
MAX_TIED_SHARE = 0.4
IMAGES = 100
CNN_IMAGES = int(os.environ.get("NDSNN_NIR_READER_IMAGES", IMAGES))  # resnet19, vgg16


@dataclass(frozen=True)
class Case:
    """An exported model, the images it runs on, ndsnn's logits [T, B, classes] and each LIF's spike rate."""

    nir_path: Path
    images: torch.Tensor
    expected: np.ndarray
    spike_rates: dict[str, float]
    threshold_margin: np.ndarray  # [B]: per image, the smallest |H - v_th| of any neuron at any step


def _fashion_mnist(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    recipe = Recipe().replace(data={"dataset": "fashion-mnist", "test_limit": count, "train_limit": 1,
                                    "augment": False})
    _, test = build_datasets(recipe.data)
    return torch.stack([test[i][0] for i in range(count)]), torch.tensor([test[i][1] for i in range(count)])


def _reference(checkpoint: Path, images: torch.Tensor, tmp: Path) -> Case:
    """Export to NIR (default dt) and run the BN-folded PyTorch model (the weights NIR holds) with every
    LIF's spike rate recorded."""
    from ndsnn_cli.export.nir import export_nir

    path, _ = export_nir(checkpoint, tmp / "model.nir")
    model = fold_batchnorm(load_trained(checkpoint).model)
    rates: dict[str, float] = {}
    margin = torch.full((len(images),), float("inf"))

    def record(lif: LIF, inputs: tuple[torch.Tensor, ...], out: torch.Tensor, name: str) -> None:
        rates[name] = float(out.mean())
        margin.copy_(torch.minimum(margin, _threshold_margin(lif, inputs[0])))

    hooks = [m.register_forward_hook(lambda m, i, out, name=name: record(m, i, out, name))
             for name, m in model.named_modules() if isinstance(m, LIF)]
    with torch.no_grad():
        expected = model(images).numpy()
    for hook in hooks:
        hook.remove()
    return Case(path, images, expected, rates, margin.numpy())


def _threshold_margin(lif: LIF, x: torch.Tensor) -> torch.Tensor:
    """Per image, min over steps and neurons of |H[t] - v_th|, H the reference recurrence's charge."""
    x_seq = x.reshape(lif.timesteps, -1, *x.shape[1:]).float()
    v, margin = torch.zeros_like(x_seq[0]), None
    for x_t in x_seq:
        h = v + (x_t - v) / lif.tau
        step = (h - lif.v_threshold).abs().flatten(1).amin(1)
        margin = step if margin is None else torch.minimum(margin, step)
        v = h * (h < lif.v_threshold)
    return margin


def _save(model: nn.Module, masks: dict[str, torch.Tensor], recipe: Recipe, path: Path) -> Path:
    return save_checkpoint(path, model=model, optimizer=None,
                           extra_tensors={f"mask::{n}": m for n, m in masks.items()},
                           meta={"recipe": recipe.to_toml(), "epoch": 0, "step": 0})


def _set_up_firing(arch: str, dataset: str, images: torch.Tensor, path: Path) -> Path:
    """A 90%-sparse `arch` whose every LIF fires on `images`: BatchNorm statistics measured on them (BN
    bias 0.3 so each BN-fed LIF sees N(0.3, 1)), and each Linear's output standardised the same way
    (scaled as a whole, so the mask pattern stays)."""
    recipe = Recipe().replace(model={"arch": arch, "timesteps": 2}, data={"dataset": dataset},
                              sparsity={"method": "static", "final": 0.9})
    torch.manual_seed(0)
    model = build_model(recipe)
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(0)
    masks = {n: random_mask(params[n].shape, active_count(params[n].numel(), 0.1), generator)
             for n in sparse_parameter_names(model)}

    def standardise(linear: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        mean, std = out.mean(), out.std()
        linear.weight.div_(std)
        linear.bias.sub_(mean).div_(std).add_(0.3)
        return (out - mean) / std + 0.3

    with torch.no_grad():
        for n, mask in masks.items():
            params[n].mul_(mask)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # running statistics = this one batch's
                module.bias.fill_(0.3)
        hooks = [m.register_forward_hook(standardise) for m in model.modules() if isinstance(m, nn.Linear)]
        model.train()(images[:16])
        for hook in hooks:
            hook.remove()
    return _save(model.eval(), masks, recipe, path)


@pytest.fixture(scope="module")
def mlp_case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """The issue's case: an NDSNN-trained spiking MLP (90% sparse) on real Fashion-MNIST, T = 4."""
    torch.set_num_threads(2)
    recipe = Recipe().replace(
        name="nir-readers", model={"arch": "mlp", "timesteps": 4},
        data={"dataset": "fashion-mnist", "train_limit": 1024, "test_limit": IMAGES, "batch_size": 64,
              "augment": False},
        train={"epochs": 1, "device": "cpu", "optimizer": "adam", "lr": 0.01, "weight_decay": 0.0},
        sparsity={"method": "ndsnn", "final": 0.9, "initial": 0.5, "update_every_steps": 4})
    tmp = tmp_path_factory.mktemp("mlp")
    train(recipe, tmp / "run")
    images, _ = _fashion_mnist(IMAGES)
    return _reference(tmp / "run", images, tmp)


@pytest.fixture(scope="module")
def resnet19_case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("resnet19")
    images, _ = _fashion_mnist(CNN_IMAGES)
    return _reference(_set_up_firing("resnet19", "fashion-mnist", images, tmp / "c.safetensors"), images, tmp)


@pytest.fixture(scope="module")
def vgg16_case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("vgg16")
    images, _ = _fashion_mnist(CNN_IMAGES)
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1).contiguous()
    return _reference(_set_up_firing("vgg16", "cifar10", images, tmp / "c.safetensors"), images, tmp)


def run_snntorch(path: Path, images: torch.Tensor, timesteps: int) -> np.ndarray:
    """snnTorch's importer at its defaults, one image at a time: its `Flatten(start_dim=0)` flattens the
    batch axis too, so it runs only at batch 1. Hidden state lives in the neurons: reset per image."""
    import snntorch.utils
    from snntorch.import_nir import import_from_nir

    net = import_from_nir(nir.read(path))
    per_image = []
    with torch.no_grad():
        for image in images:
            snntorch.utils.reset(net)
            state, steps = None, []
            for _ in range(timesteps):
                out, state = net(image[None], state)
                steps.append(out.reshape(-1))  # [classes]: the batch axis went with the Flatten
            per_image.append(torch.stack(steps))
    return torch.stack(per_image, dim=1).numpy()


def run_spikingjelly(path: Path, images: torch.Tensor, timesteps: int) -> np.ndarray:
    """SpikingJelly's importer at its defaults (dt = 1e-4, single-step mode), the whole batch at once."""
    from spikingjelly.activation_based.nir_exchange import import_from_nir

    net = import_from_nir(path)
    state, steps = None, []
    with torch.no_grad():
        for _ in range(timesteps):
            out, state = net(images, state)
            steps.append(out)
    return torch.stack(steps).numpy()


READERS: dict[str, tuple[str, Callable[[Path, torch.Tensor, int], np.ndarray]]] = {
    "snntorch": ("snntorch.import_nir", run_snntorch),
    "spikingjelly": ("spikingjelly.activation_based.nir_exchange", run_spikingjelly),
}


def _check_reader(case: Case, reader: str) -> None:
    """Same predictions and logits within LOGIT_TOL on every image without a threshold tie (no neuron's charge
    within TIE_MARGIN of v_th in ndsnn's run), and at most MAX_TIED_SHARE of the images tied. SpikingJelly runs
    our arithmetic; snnTorch runs our neuron scaled by tau and fires at `>` instead of `>=`, so at a tie either
    may fire by rounding, and so may another CPU's kernels (docs/nir.md)."""
    module, run = READERS[reader]
    pytest.importorskip("nirtorch")
    pytest.importorskip(module)
    assert case.spike_rates and all(rate > 0 for rate in case.spike_rates.values()), case.spike_rates
    timesteps = case.expected.shape[0]
    got = run(case.nir_path, case.images, timesteps)
    assert got.shape == case.expected.shape
    untied = case.threshold_margin >= TIE_MARGIN
    assert (~untied).mean() <= MAX_TIED_SHARE, f"{int((~untied).sum())} of {len(untied)} images tie"
    same = got.sum(0).argmax(-1) == case.expected.sum(0).argmax(-1)
    diff = np.abs(got - case.expected).max(axis=(0, 2))  # [B]
    print(f"RESULT {reader}: {int(same.sum())}/{got.shape[1]} same predictions, max logit diff {diff.max():.2g}, "
          f"{int((~untied).sum())} tied images, max diff untied {diff[untied].max():.2g}")
    assert same[untied].all() and diff[untied].max() <= LOGIT_TOL


@pytest.mark.parametrize("reader", sorted(READERS))
def test_mlp_nir_runs_identically_in_the_readers_at_their_default_dt(mlp_case: Case, reader: str) -> None:
    _check_reader(mlp_case, reader)


@pytest.mark.slow
@pytest.mark.parametrize("reader", sorted(READERS))
def test_resnet19_nir_with_residual_sums_runs_identically_in_the_readers(resnet19_case: Case, reader: str) -> None:
    _check_reader(resnet19_case, reader)


@pytest.mark.slow
@pytest.mark.parametrize("reader", sorted(READERS))
def test_vgg16_max_pools_as_sum_pool_and_gate_run_identically_in_the_readers(vgg16_case: Case,
                                                                             reader: str) -> None:
    _check_reader(vgg16_case, reader)


def test_mlp_predictions_match_ndsnn_run_on_the_csr_artefact(mlp_case: Case, tmp_path: Path, run_main) -> None:
    run_dir = mlp_case.nir_path.parent / "run"
    artefact = tmp_path / "mlp.safetensors"
    assert run_main("export", str(run_dir), "--format", "csr", "--fold-bn", "-o", str(artefact))[0] == 0
    code, out, err = run_main("run", str(artefact), "--dataset-test", "--limit", str(IMAGES), "--json")
    assert code == 0, err
    assert json.loads(out)["predictions"] == mlp_case.expected.sum(0).argmax(-1).tolist()
