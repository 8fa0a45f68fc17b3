"""Multi-process training: 2 CPU ranks (gloo) under torchrun stay bit-identical and learn; single-process helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_toml

from ndsnn_cli import distributed
from ndsnn_cli.checkpoint import load_checkpoint
from ndsnn_cli.errors import UserError
from ndsnn_cli.rundir import RUN_CHECKPOINT, read_metrics

ROOT = Path(__file__).resolve().parents[1]

RECIPE = tiny_toml(name="ddp", seed=5, data={"batch_size": 32, "train_limit": 512, "test_limit": 128},
                   sparsity={"method": "set", "final": 0.9, "update_every_steps": 2})


def test_helpers_are_no_ops_in_a_single_process() -> None:
    assert not distributed.init_from_env("cpu")
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    tensor = torch.tensor([1.0, 2.0])
    distributed.broadcast_tensors([tensor])
    assert torch.equal(tensor, torch.tensor([1.0, 2.0]))
    assert distributed.sum_values(1.5, 3) == [1.5, 3]
    assert distributed.in_sync([tensor])
    assert distributed.on_main(lambda: 7) == 7


def test_fingerprint_sees_one_flipped_bit() -> None:
    a = torch.arange(10, dtype=torch.float32)
    b = a.clone()
    b.view(torch.int32)[3] ^= 1
    assert distributed.fingerprint([a]) == distributed.fingerprint([a.clone()])
    assert distributed.fingerprint([a]) != distributed.fingerprint([b])
    assert distributed.fingerprint([torch.tensor(3)]) == distributed.fingerprint([torch.tensor(3)])  # 0-d


def test_world_size_without_torchrun_variables_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(UserError, match="launch with torchrun"):
        distributed.init_from_env("cpu")


@pytest.mark.slow
def test_two_gloo_ranks_stay_in_sync_learn_and_resume(tmp_path: Path) -> None:
    recipe = tmp_path / "ddp.toml"
    recipe.write_text(RECIPE)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "ndsnn_cli", "train", str(recipe), "--out", str(run), "--json", "--quiet"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    # per-rank batch 32, 512 images over 2 ranks: 8 steps per epoch
    assert summary["steps"] == 16
    epochs = [r for r in read_metrics(run) if r["kind"] == "epoch"]
    assert len(epochs) == 2 and epochs[1]["train_loss"] < epochs[0]["train_loss"]
    updates = [r for r in read_metrics(run) if r["kind"] == "mask_update"]
    assert updates and all(r["sparsity"] == pytest.approx(0.9, abs=1e-3) for r in updates)
    masks = load_checkpoint(run / RUN_CHECKPOINT).masks
    assert masks and 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values()) \
        == pytest.approx(summary["sparsity"]["sparsity"], abs=0)
    # resuming a finished run through torchrun again: nothing retrained, ranks still agree
    again = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["ranks_in_sync"] is True
    assert [r for r in read_metrics(run) if r["kind"] == "epoch"] == epochs
