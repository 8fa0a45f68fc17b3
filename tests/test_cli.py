"""The real console entry point: exit codes, one-line errors without tracebacks, a JSON summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ndsnn_cli import __version__
from ndsnn_cli.recipe import parse_recipe
from ndsnn_cli.sparse.masks import layer_counts


def ndsnn(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m ndsnn_cli ARGS` in a fresh process: the same `main()` as the `ndsnn` console script."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
    return subprocess.run([sys.executable, "-m", "ndsnn_cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout, check=False)


def test_version_and_help_exit_zero() -> None:
    version = ndsnn("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"ndsnn {__version__}"
    help_text = ndsnn("--help")
    assert help_text.returncode == 0, help_text.stderr
    assert "train" in help_text.stdout
    train_help = ndsnn("train", "--help")
    assert train_help.returncode == 0
    assert "--resume" in train_help.stdout and "Example" in train_help.stdout


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "ndsnn"
    if not script.exists():
        pytest.skip("package not installed with its console script in this environment")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0
    assert result.stdout.strip() == f"ndsnn {__version__}"


def test_cli_module_does_not_import_torch() -> None:
    """`ndsnn --help` must answer instantly: torch is imported inside commands only."""
    code = "import sys, ndsnn_cli.cli; print(sorted(m for m in ('torch', 'onnx') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(("text", "message"), [
    ("[sparsity]\nfinal = 1.2\n", "error: bad.toml: [sparsity] final = 1.2 must be in [0, 1)"),
    ("[sparsity\n", "error: bad.toml: TOML syntax error: "),
    ("[train]\nepoch = 3\n", "error: bad.toml: [train] epoch is not a key of [train] (did you mean 'epochs'?)"),
])
def test_train_on_a_bad_recipe_exits_2_with_one_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "bad.toml").write_text(text)
    result = ndsnn("train", "bad.toml", "--out", "run", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(message)
    assert result.stdout == ""
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_train_on_a_missing_recipe_exits_2(tmp_path: Path) -> None:
    result = ndsnn("train", "nope.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "error: nope.toml: recipe file not found\n"


@pytest.mark.slow
def test_tiny_train_json_reports_the_target_sparsity(tmp_path: Path, tiny_recipe_toml: str) -> None:
    text = tiny_recipe_toml + '\n[sparsity]\nmethod = "static"\nfinal = 0.8\n'
    (tmp_path / "tiny.toml").write_text(text)
    result = ndsnn("train", "tiny.toml", "--out", "run", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout)
    assert summary["method"] == "static" and summary["epochs"] == 2 and summary["steps"] == 8
    layers = summary["sparsity"]["layers"]
    total = summary["sparsity"]["numel"]
    # within one weight per layer of the target, and per layer exactly the ERK count
    assert abs(summary["sparsity"]["nnz"] - 0.2 * total) <= len(layers)
    assert abs(summary["sparsity"]["sparsity"] - 0.8) <= len(layers) / total
    recipe = parse_recipe(text, "tiny.toml")
    zeros = {name: torch.zeros(layer["shape"]) for name, layer in layers.items()}
    assert {n: layer["nnz"] for n, layer in layers.items()} == layer_counts(zeros, 0.2, recipe.sparsity.distribution)
    assert (tmp_path / "run" / "summary.json").exists()
    assert parse_recipe((tmp_path / "run" / "recipe.toml").read_text()) == recipe


def test_an_epoch_line_fits_80_columns_at_three_digit_epochs_and_full_accuracy() -> None:
    from ndsnn_cli.cli.train import epoch_line

    record = {"epoch": 300, "train_loss": 12.3456, "train_accuracy": 1.0, "test_loss": 10.5, "test_accuracy": 1.0,
              "sparsity": 0.99}
    line = epoch_line(record)
    assert len(line) <= 80, line
    assert line == "epoch 300  train loss 12.346 100.00%  test loss 10.500 100.00%  sparsity 0.9900"


@pytest.mark.slow
def test_train_prints_in_80_columns_the_sparsity_reached_the_flops_and_what_to_run_next(
        tmp_path: Path, run_main, monkeypatch: pytest.MonkeyPatch) -> None:
    """The main job's screen: epoch lines and the summary fit an 80-column terminal; the table shows the
    sparsity reached and the run's training FLOPs relative to dense and LTH training of the same recipe
    (the `ndsnn cost` model); the next commands are printed and the first of them runs."""
    from conftest import tiny_toml

    from ndsnn_cli.cost import method_cost, model_layers, run_cost
    from ndsnn_cli.data import train_size
    from ndsnn_cli.recipe import load_recipe

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.chdir(tmp_path)
    Path("tiny.toml").write_text(tiny_toml(sparsity={"method": "ndsnn", "initial": 0.5, "final": 0.9,
                                                     "update_every_steps": 2}))
    code, out, err = run_main("train", "tiny.toml", "--out", "run")
    assert code == 0, err
    assert all(len(line) <= 80 for line in (out + err).splitlines()), [ln for ln in (out + err).splitlines()
                                                                        if len(ln) > 80]
    epochs = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and epochs[-1].endswith("sparsity 0.9000"), epochs
    summary = json.loads(Path("run/summary.json").read_text())
    assert f"{summary['sparsity']['sparsity']:.4f}" in out and "0.9000" in out
    recipe = load_recipe("run/recipe.toml")
    layers, images = model_layers(recipe), train_size(recipe.data)
    realised = run_cost("run").train_flops
    for baseline, label in (("dense", "dense"), ("lth", "LTH")):
        ratio = realised / method_cost(recipe, baseline, layers, images).train_flops
        row = next(line for line in out.splitlines() if f"training FLOPs vs {label}" in line)
        assert f"{ratio:.2%}" in row, row
    assert realised / method_cost(recipe, "dense", layers, images).train_flops < 1  # sparse training costs less
    commands = out[out.index("next:"):].splitlines()[1:]
    assert commands[0].strip() == "ndsnn export run --format csr -o run.safetensors"
    assert commands[-2].strip().startswith("ndsnn prune-compare run/recipe.toml")
    code, _, err = run_main(*commands[0].split()[1:])
    assert code == 0 and Path("run.safetensors").is_file(), err


def test_training_commands_keep_freed_memory_in_the_heap() -> None:
    """`keep_freed_memory` sets glibc's mallopt in a fresh process (the training commands call it first),
    and leaves a user's own MALLOC_* setting alone."""
    from ndsnn_cli.cli import process

    if not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None:
        pytest.skip("glibc only")
    code = "from ndsnn_cli.cli.process import keep_freed_memory; print(keep_freed_memory())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert fresh.stdout.split()[-1] == "True"
    users = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=env | {"MALLOC_MMAP_MAX_": "65536"})
    assert users.stdout.split()[-1] == "False"
    assert process.TRIM_THRESHOLD < 2**31  # mallopt's value is a C int
