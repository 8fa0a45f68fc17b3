"""Shared fixtures: a tiny recipe factory (synthetic data, seconds per run) and one torch thread."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch

from ndsnn_cli.recipe import Recipe

# Tests run on small tensors on a shared 2-core machine: a second intra-op thread only adds contention
# (a 30-step tiny-CNN run takes 0.9 s on one thread and 8 s on two under load).
torch.set_num_threads(1)

TINY_RECIPE = """
name = "tiny"
seed = 0
[model]
arch = "mlp"
timesteps = 2
[data]
dataset = "synthetic"
batch_size = 64
eval_batch_size = 256
augment = false
train_limit = 256
test_limit = 128
[train]
epochs = 2
lr = 0.05
log_every_steps = 1000
device = "cpu"
threads = 1
"""


def tiny_run_recipe(**tables: Any) -> Recipe:
    """The tiny recipe with some keys changed (`tiny_run_recipe(name="x", data={...})`): the one base every
    test's training run starts from (synthetic data, CPU, one thread, seconds per run)."""
    from ndsnn_cli.recipe import parse_recipe

    base = parse_recipe(TINY_RECIPE, "tiny.toml")
    return base.replace(**tables) if tables else base


def tiny_toml(**tables: Any) -> str:
    """The tiny recipe with some keys changed, as recipe-file text (`tiny_toml(seed=3, data={...})`)."""
    return tiny_run_recipe(**tables).to_toml()


def train_export_source(out: Any, *, name: str, arch: str = "scnn", train_limit: int = 512, test_limit: int = 128,
                        update_every_steps: int = 4, dataset: str = "synthetic", final: float = 0.9) -> Any:
    """A tiny NDSNN-trained run to export (T=2, 90% sparse, synthetic data, 1 epoch, one thread): the
    source the export tests share; returns `out`."""
    from ndsnn_cli.train import train

    torch.set_num_threads(1)
    recipe = tiny_run_recipe(
        name=name, model={"arch": arch},
        data={"dataset": dataset, "train_limit": train_limit, "test_limit": test_limit, "batch_size": 32},
        train={"epochs": 1, "optimizer": "adam", "lr": 0.02, "weight_decay": 0.0},
        sparsity={"method": "ndsnn", "final": final, "initial": 0.5, "update_every_steps": update_every_steps})
    train(recipe, out)
    return out


@pytest.fixture
def tiny_recipe_toml() -> str:
    """The tiny recipe as a file's text, for tests that go through `ndsnn train FILE`."""
    return TINY_RECIPE


@pytest.fixture
def tiny_recipe() -> Callable[..., Recipe]:
    """`tiny_recipe(sparsity={...}, train={...})`: a 4-steps-per-epoch MLP on synthetic data."""
    return tiny_run_recipe


@pytest.fixture
def run_main(capsys: pytest.CaptureFixture[str],
             monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[int, str, str]]:
    """`run_main(*args)`: `ndsnn_cli.cli.main()` in this process -> (exit code, stdout, stderr).

    Same UserError -> exit 2 mapping as the console script, without an interpreter start-up per call.
    """
    from ndsnn_cli.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["ndsnn", *args])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Good files to break (test_validate, test_hostile): a tiny 80%-sparse scnn (conv, BN, max-pool, linear;
    T = 2) run with its checkpoint, CSR artefacts (fp32 with plain int16 column indices; int8 with gap-coded
    ones), 4 raw images. Each test breaks copies in its own folder under `work`."""
    import numpy as np

    from ndsnn_cli.export.csr import export_csr
    from ndsnn_cli.rundir import RUN_CHECKPOINT
    from ndsnn_cli.train import train

    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("validate")
    recipe = tiny_run_recipe(name="validate", model={"arch": "scnn"},
                             data={"train_limit": 64, "test_limit": 32, "batch_size": 32}, train={"epochs": 1},
                             sparsity={"method": "static", "final": 0.8})
    train(recipe, work / "run")
    artefact, _ = export_csr(work / "run", work / "good.csr.safetensors", indices="plain")
    int8, _ = export_csr(work / "run", work / "good-int8.csr.safetensors", dtype="int8", indices="gaps")
    np.save(work / "images.npy", np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32))
    return {"work": work, "checkpoint": work / "run" / RUN_CHECKPOINT, "artefact": artefact, "int8": int8,
            "images": work / "images.npy"}
