"""Reliability: kill -9 at any point resumes bit-identically, bad input is one clean line, NaN stops the run."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
from cli_jobs import cli_env, run_cli_jobs
from conftest import tiny_toml

from ndsnn_cli.checkpoint import load_checkpoint
from ndsnn_cli.recipe import parse_recipe
from ndsnn_cli.rundir import RUN_CHECKPOINT, read_metrics, truncate_metrics
from ndsnn_cli.train import train
from ndsnn_cli.trainer import TrainingDiverged, check_weights_finite

ROOT = Path(__file__).resolve().parents[1]
BAD = Path(__file__).parent / "bad_inputs"
CASES = tomllib.loads((BAD / "cases.toml").read_text())["case"]

def tiny_recipe_file(tmp: Path, *, epochs: int = 2, train_limit: int = 256, every: int = 2) -> Path:
    path = tmp / "tiny.toml"
    path.write_text(tiny_toml(seed=3, data={"batch_size": 32, "train_limit": train_limit, "test_limit": 64},
                              train={"epochs": epochs, "checkpoint_every_steps": every, "log_every_steps": 1},
                              sparsity={"method": "ndsnn", "final": 0.9, "initial": 0.5, "update_every_steps": 3}))
    return path


def dir_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# kill -9


def _metrics_lines_whole(run_dir: Path) -> None:
    path = run_dir / "metrics.jsonl"
    if path.exists():
        raw = path.read_bytes()
        assert raw == b"" or raw.endswith(b"\n"), "metrics.jsonl ends in a torn line"
        for line in raw.decode().splitlines():
            json.loads(line)


def _kill_when(run_dir: Path, proc: subprocess.Popen[bytes], moment: str, rng: random.Random) -> str:
    """SIGKILL `proc` at `moment`; returns what was seen when it died."""
    checkpoints = run_dir / RUN_CHECKPOINT.parent
    deadline = time.monotonic() + 60
    seen = "timeout"
    start_mtime = None
    while time.monotonic() < deadline and proc.poll() is None:
        ckpt = run_dir / RUN_CHECKPOINT
        if moment == "before-first-checkpoint" and (run_dir / "recipe.toml").exists() and not ckpt.exists():
            seen = "recipe.toml written, no checkpoint"
            break
        if moment == "during-checkpoint-write" and checkpoints.is_dir() and any(
                n.endswith(".tmp") for n in os.listdir(checkpoints)):
            seen = "checkpoint temp file present"
            break
        if moment == "after-checkpoint" and ckpt.exists():
            mtime = ckpt.stat().st_mtime_ns
            if start_mtime is None:
                start_mtime = mtime
            elif mtime != start_mtime:
                time.sleep(rng.uniform(0.0, 0.05))
                seen = "checkpoint just replaced"
                break
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return seen


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    recipe_path = tiny_recipe_file(tmp_path, epochs=3, train_limit=1024, every=2)
    recipe = parse_recipe(recipe_path.read_text(), "tiny.toml")
    reference = tmp_path / "reference"
    torch.set_num_threads(1)
    train(recipe, reference)

    run = tmp_path / "killed"
    rng = random.Random(0)
    command = [sys.executable, "-m", "ndsnn_cli", "train", str(recipe_path), "--out", str(run), "--quiet"]
    seen = []
    for i, moment in enumerate(["before-first-checkpoint", "during-checkpoint-write", "after-checkpoint"]):
        proc = subprocess.Popen(command + ["--resume"] * (i > 0), env=cli_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        seen.append(_kill_when(run, proc, moment, rng))
        assert proc.returncode == -signal.SIGKILL, f"run {i} ended before the kill ({moment})"
        _metrics_lines_whole(run)
    assert seen[0] == "recipe.toml written, no checkpoint"
    finish = subprocess.run(command + ["--resume"], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert finish.returncode == 0, finish.stderr

    assert (run / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()
    mine, theirs = load_checkpoint(run / RUN_CHECKPOINT), load_checkpoint(reference / RUN_CHECKPOINT)
    assert mine.meta["step"] == theirs.meta["step"] == 3 * 32
    assert sorted(mine.tensors) == sorted(theirs.tensors)
    assert any(k.startswith("mask::") for k in mine.tensors)
    for key, tensor in theirs.tensors.items():
        if key.startswith(("model::", "mask::", "optim::", "method::")):
            assert torch.equal(mine.tensors[key], tensor), key
    assert not list(run.rglob("*.tmp")), "temp files of killed writes were not cleaned up on resume"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sparsity"] == json.loads((reference / "summary.json").read_text())["sparsity"]


def test_resume_after_a_kill_before_the_first_checkpoint_starts_clean(tmp_path: Path) -> None:
    """recipe.toml, a stale temp file and a torn metrics line, but no checkpoint: --resume trains from step 0."""
    recipe = parse_recipe(tiny_recipe_file(tmp_path, epochs=1, train_limit=128).read_text(), "tiny.toml")
    train(recipe, tmp_path / "ref")
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.toml").write_text(recipe.to_toml())
    (run / "metrics.jsonl").write_text('{"kind": "mask_update", "step": 3}\n{"kind": "ep')
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / ".last.safetensors.abc.tmp").write_bytes(b"half")
    train(recipe, run, resume=True)
    assert (run / "metrics.jsonl").read_bytes() == (tmp_path / "ref" / "metrics.jsonl").read_bytes()
    assert not list(run.rglob("*.tmp"))


def test_epoch_record_after_a_last_batch_checkpoint_is_not_duplicated_on_resume(tmp_path: Path) -> None:
    """Killed between the epoch record and the epoch-end checkpoint: the record is rewritten once, not twice."""
    recipe = parse_recipe(tiny_recipe_file(tmp_path, epochs=2, train_limit=128, every=2).read_text(), "tiny.toml")
    run = tmp_path / "run"
    train(recipe, run)  # 4 steps/epoch: the step-4 checkpoint is on epoch 1's last batch, epoch not yet done
    records = read_metrics(run)
    assert [r["step"] for r in records if r["kind"] == "epoch"] == [4, 8]
    truncate_metrics(run / "metrics.jsonl", step=4, epoch=0)
    kept = read_metrics(run)
    assert all(r["kind"] != "epoch" for r in kept)
    masks = [r["step"] for r in records if r["kind"] in ("mask_init", "mask_update") and r["step"] <= 4]
    assert [r["step"] for r in kept] == masks


# ---------------------------------------------------------------------------------------------
# numerical guards


def test_nan_weights_stop_the_run_naming_layer_and_step_and_keep_the_last_good_checkpoint(tmp_path: Path) -> None:
    recipe = parse_recipe(tiny_recipe_file(tmp_path, epochs=1).read_text(), "tiny.toml")
    recipe = recipe.replace(train={"lr": 1e30, "momentum": 0.0, "checkpoint_every_steps": 1})
    with pytest.raises(TrainingDiverged) as info:
        train(recipe, tmp_path / "run")
    message = str(info.value)
    assert re.fullmatch(r"weight [\w.]+ holds NaN/inf after step \d+; the last good checkpoint is .+", message)
    step = int(re.search(r"after step (\d+)", message).group(1))
    checkpoint = load_checkpoint(tmp_path / "run" / RUN_CHECKPOINT)
    assert checkpoint.meta["step"] == step - 1
    assert all(torch.isfinite(v).all() for k, v in checkpoint.tensors.items() if k.startswith("model::"))


def test_nan_loss_exits_2_with_one_line_naming_the_step(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from ndsnn_cli.cli import main

    recipe_path = tiny_recipe_file(tmp_path, epochs=1, every=0)
    text = recipe_path.read_text().replace("lr = 0.05", "lr = 1e30")
    recipe_path.write_text(text)
    monkeypatch.setattr(sys, "argv", ["ndsnn", "train", str(recipe_path), "--out", str(tmp_path / "run"), "-q"])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"error: loss is (nan|inf|-inf) at step \d+ \(epoch 1\)", err[0]), err
    assert not (tmp_path / "run" / RUN_CHECKPOINT).exists()  # nothing good to keep: no checkpoint was ever written


def test_weight_check_names_the_layer() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with torch.no_grad():
        model[1].weight[0, 1] = float("inf")
    with pytest.raises(TrainingDiverged, match=r"^weight 1\.weight holds NaN/inf after step 7;"):
        check_weights_finite(model, 7, Path("x"))


# ---------------------------------------------------------------------------------------------
# bad-input corpus

REAL_SUBPROCESS = ("ckpt_truncated",)  # one real `python -m ndsnn_cli` call (each costs a torch import)


def _commands() -> set[str]:
    from ndsnn_cli.cli import app

    return {c.name or (c.callback.__name__.replace("_", "-") if c.callback else "") for c in app.registered_commands}


def _job(case: dict[str, object], base_run: Path, work: Path) -> dict[str, object]:
    """The argv for a case and the run directory it must leave untouched."""
    run = base_run
    if "checkpoint" in case:
        run = work / f"run_{case['id']}"
        shutil.copytree(base_run, run)
        target = run / RUN_CHECKPOINT
        target.unlink()
        if case["checkpoint"] == "<directory>":
            target.mkdir()
        else:
            shutil.copy(BAD / str(case["checkpoint"]), target)
        argv = ["train", str(run / "recipe.toml"), "--out", str(run), "--resume", "-q"]
    elif "file" in case:
        argv = ["train", str(BAD / str(case["file"])), "--out", str(run), "--resume", "-q"]
    else:
        argv = [str(a).replace("{run}", str(run)).replace("{here}", str(BAD)) for a in case["args"]]  # type: ignore[union-attr]
    return {"id": case["id"], "argv": argv, "watch": str(run)}


@pytest.fixture(scope="module")
def corpus_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    """Run every case once: all in one CLI process (main() in a loop), a few also as real subprocesses."""
    work = tmp_path_factory.mktemp("bad_inputs")
    base_run = work / "run"
    recipe = parse_recipe(tiny_recipe_file(work, epochs=1, train_limit=64).read_text(), "tiny.toml")
    train(recipe, base_run)
    commands = _commands()
    jobs = [_job(c, base_run, work) for c in CASES if c.get("command", "train") in commands]
    results, _ = run_cli_jobs(jobs, work, timeout=600)
    for job in jobs:
        if job["id"] in REAL_SUBPROCESS:
            before = dir_digest(Path(str(job["watch"])))
            proc = subprocess.run([sys.executable, "-m", "ndsnn_cli", *job["argv"]], env=cli_env(),  # type: ignore[list-item]
                                  capture_output=True, text=True, timeout=120)
            results[f"{job['id']}@subprocess"] = {"code": proc.returncode, "stderr": proc.stderr,
                                                  "unchanged": before == dir_digest(Path(str(job["watch"])))}
    return results


def test_corpus_has_at_least_40_malformed_recipes_and_5_malformed_files() -> None:
    assert sum("file" in c for c in CASES) >= 40
    assert sum("checkpoint" in c for c in CASES) >= 5
    assert len({c["id"] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES + [{**c, "id": f"{c['id']}@subprocess"} for c in CASES
                                          if c["id"] in REAL_SUBPROCESS], ids=lambda c: c["id"])
def test_bad_input_is_one_line_exit_2_and_leaves_the_run_untouched(
        case: dict[str, object], corpus_results: dict[str, dict[str, object]]) -> None:
    command = str(case.get("command", "train"))
    if command not in _commands():
        pytest.skip(f"`ndsnn {command}` does not exist yet")
    result = corpus_results[str(case["id"])]
    stderr = str(result["stderr"])
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert result["code"] == 2, stderr
    assert len(lines) == 1, stderr
    assert str(case["expect"]) in lines[0], lines[0]
    if "file" in case:
        assert lines[0].startswith(f"error: {case['file']}: "), lines[0]
    if "checkpoint" in case:
        assert "last.safetensors" in lines[0], lines[0]
    assert result["unchanged"], "the pre-existing run directory changed"
