"""What a device gets: models that take raw pixels (normalisation inside), byte-reproducible exports,
files readable as the umask says, and bounded options."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_run_recipe

from ndsnn_cli.atomic import current_umask, write_bytes
from ndsnn_cli.data import input_contract
from ndsnn_cli.data.loading import DEBIAN_FASHION_MNIST, raw_test_set
from ndsnn_cli.recipe import Recipe
from ndsnn_cli.rundir import RUN_CHECKPOINT
from ndsnn_cli.train import train

ROOT = Path(__file__).resolve().parents[1]
needs_fmnist = pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists(),
                                   reason="Debian's dataset-fashion-mnist is not installed")


@pytest.fixture(scope="module")
def fmnist_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny scnn on real Fashion-MNIST (normalised with mean 0.2860, std 0.3530 in training): ~5 s."""
    torch.set_num_threads(1)
    recipe = Recipe().replace(
        name="deploy", model={"arch": "scnn", "timesteps": 2},
        data={"dataset": "fashion-mnist", "train_limit": 2048, "test_limit": 256, "batch_size": 32,
              "augment": False},
        train={"epochs": 1, "device": "cpu", "threads": 1, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
        sparsity={"method": "static", "final": 0.5})
    out = tmp_path_factory.mktemp("deploy") / "run"
    train(recipe, out)
    return out


def _raw_test(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from ndsnn_cli.export.fold import load_trained

    test = raw_test_set(load_trained(run).recipe.data)
    return torch.stack([test[i][0] for i in range(len(test))]), torch.tensor([test[i][1] for i in range(len(test))])


@needs_fmnist
def test_onnx_and_csr_on_raw_pixels_reach_the_runs_own_test_accuracy(fmnist_run: Path, tmp_path: Path,
                                                                       run_main) -> None:
    """Images as a device has them (pixels / 255, no normalisation): the ONNX model under onnxruntime and
    the CSR artefact under `ndsnn run` score exactly the run's test accuracy on the same images."""
    import onnx
    import onnxruntime as ort

    summary = json.loads((fmnist_run / "summary.json").read_text())
    images, labels = _raw_test(fmnist_run)
    assert float(images.min()) >= 0 and float(images.max()) <= 1 and len(labels) == 256

    code, _, err = run_main("export", str(fmnist_run), "--format", "onnx", "-o", str(tmp_path / "m.onnx"))
    assert code == 0, err
    proto = onnx.load(str(tmp_path / "m.onnx"))
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["ndsnn.input"]) == input_contract("fashion-mnist")
    ops = [n.op_type for n in proto.graph.node if n.op_type != "Constant"]
    assert ops[:2] == ["Sub", "Div"]  # the normalisation is inside the graph
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"images": images.numpy()})[0]
    onnx_accuracy = float((torch.from_numpy(logits).argmax(-1) == labels).float().mean())
    assert onnx_accuracy == summary["test_accuracy"]
    assert onnx_accuracy > 0.5  # learned something: a wrong normalisation would not tie by chance

    code, _, err = run_main("export", str(fmnist_run), "--format", "csr", "-o", str(tmp_path / "m.csr"))
    assert code == 0, err
    code, out, err = run_main("run", str(tmp_path / "m.csr"), "--dataset-test", "--limit", "256", "--json")
    assert code == 0, err
    assert json.loads(out)["accuracy"] == summary["test_accuracy"]
    torch.save({"images": images, "labels": labels}, tmp_path / "raw.pt")
    np.save(tmp_path / "raw_uint8.npy", (images.numpy() * 255).round().astype(np.uint8))
    code, out, err = run_main("run", str(tmp_path / "m.csr"), "--input", str(tmp_path / "raw.pt"), "--json")
    assert code == 0 and json.loads(out)["accuracy"] == summary["test_accuracy"], err
    code, out, err = run_main("run", str(tmp_path / "m.csr"), "--input", str(tmp_path / "raw_uint8.npy"), "--json")
    assert code == 0 and json.loads(out)["samples"] == 256, err


@needs_fmnist
def test_run_input_reads_png_and_refuses_normalised_pixels(fmnist_run: Path, tmp_path: Path, run_main) -> None:
    from torchvision.io import encode_png

    from ndsnn_cli.export.runtime import load_network

    run_main("export", str(fmnist_run), "--format", "csr", "-o", str(tmp_path / "m.csr"))
    images, _ = _raw_test(fmnist_run)
    pixels = (images[0] * 255).round().to(torch.uint8)  # [1, 28, 28]
    (tmp_path / "shoe.png").write_bytes(encode_png(pixels).numpy().tobytes())
    code, out, err = run_main("run", str(tmp_path / "m.csr"), "--input", str(tmp_path / "shoe.png"), "--json")
    assert code == 0, err
    expected = load_network(tmp_path / "m.csr").predict(pixels.float().unsqueeze(0) / 255)
    assert json.loads(out)["predictions"] == expected.tolist()
    np.save(tmp_path / "normalised.npy", ((images[:2] - 0.2860) / 0.3530).numpy())
    code, _, err = run_main("run", str(tmp_path / "m.csr"), "--input", str(tmp_path / "normalised.npy"))
    assert code == 2 and "pixels must be in [0, 1]" in err and "normalises inside" in err
    np.save(tmp_path / "wrong_shape.npy", np.zeros((2, 3, 28, 28), dtype=np.float32))
    code, _, err = run_main("run", str(tmp_path / "m.csr"), "--input", str(tmp_path / "wrong_shape.npy"))
    assert code == 2 and "must be [B, 1, 28, 28]" in err


# ------------------------------------------------------------------------------- reproducibility

EXPORT_TWICE = r"""
import hashlib, sys
from ndsnn_cli.export.exporters import ExportOptions, export
result = export(sys.argv[1], sys.argv[2], sys.argv[3], ExportOptions(verify=False))
print(hashlib.sha256(result.path.read_bytes()).hexdigest())
"""


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    recipe = tiny_run_recipe(name="repro", model={"arch": "scnn"},
                             data={"train_limit": 64, "test_limit": 32, "batch_size": 32}, train={"epochs": 1},
                             sparsity={"method": "static", "final": 0.8})
    out = tmp_path_factory.mktemp("repro") / "run"
    train(recipe, out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["csr", "onnx"])
def test_exports_in_two_processes_are_byte_identical(synthetic_run: Path, tmp_path: Path, fmt: str) -> None:
    """Masks come out of a checkpoint in a fixed (sorted) order and safetensors metadata is written with
    sorted keys, so the artefact and the ONNX bytes do not depend on the process (the library's own
    orders, of tensors read and of metadata written, change from run to run)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "random"}
    digests = []
    for i in range(2):
        proc = subprocess.run([sys.executable, "-c", EXPORT_TWICE, fmt, str(synthetic_run), str(tmp_path / f"{i}")],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        digests.append(proc.stdout.strip())
    assert digests[0] == digests[1]


# ----------------------------------------------------------------------------------- file modes


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_umask_is_read_without_changing_it(umask_022: None) -> None:
    assert current_umask() == 0o022
    os.umask(0o027)
    assert current_umask() == 0o027


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_take_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        path = write_bytes(tmp_path / "f.bin", b"x")
        replaced = write_bytes(path, b"y")  # replacing keeps the rule (the temp file's mode is set)
    finally:
        os.umask(old)
    assert _mode(replaced) == 0o666 & ~umask
    assert not list(tmp_path.glob(".*.tmp"))


def test_every_kind_of_file_is_0644_under_umask_022(synthetic_run: Path, tmp_path: Path, umask_022: None,
                                                   run_main, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints, recipe.toml, summary.json, metrics.jsonl (a fresh run), CSR/ONNX/NIR artefacts,
    prune-compare reports and the cost plot: every file ndsnn writes is rw-r--r-- under umask 022."""
    recipe = tiny_run_recipe(name="modes", model={"timesteps": 1},
                             data={"train_limit": 32, "test_limit": 16, "batch_size": 16}, train={"epochs": 1})
    run = tmp_path / "run"
    train(recipe, run)
    written = [run / RUN_CHECKPOINT, run / "recipe.toml", run / "summary.json", run / "metrics.jsonl"]
    for fmt, suffix in (("csr", "csr"), ("onnx", "onnx"), ("nir", "nir")):
        code, _, err = run_main("export", str(synthetic_run), "--format", fmt, "-o", str(tmp_path / f"m.{suffix}"),
                                *(["--no-verify"] if fmt == "onnx" else []))
        assert code == 0 or fmt == "nir" and "max-pool" in err, err  # NIR has no max-pooling nodes
        if code == 0:
            written.append(tmp_path / f"m.{suffix}")
    code, _, err = run_main("cost", "--model", "scnn", "--dataset", "fashion-mnist", "--epochs", "2",
                            "--plot", str(tmp_path / "cost.png"))
    assert code == 0, err
    written.append(tmp_path / "cost.png")
    from ndsnn_cli import compare_report

    for render in ("to_csv", "to_markdown"):  # the call sites are under test here, not the table rendering
        monkeypatch.setattr(compare_report, render, lambda *a: "x\n")
    monkeypatch.setattr(compare_report, "plot_png", lambda table: b"png")
    written += list(compare_report.write_reports({"cells": [{"accuracy_mean": 0.5}]}, tmp_path / "compare").values())
    assert len(written) >= 11
    for path in written:
        assert _mode(path) == 0o644, (path, oct(_mode(path)))


# ------------------------------------------------------------------------------------ bounds


@pytest.mark.parametrize(("args", "needle"), [
    (("cost", "--model", "vgg16", "--sparsity", "0.9", "--epochs", "1000000000000"),
     "'--epochs': Input should be less than or equal to 100000"),
    (("cost", "--timesteps", "5000"), "less than or equal to 1024"),
    (("cost", "--batch-size", "10000000"), "less than or equal to 65536"),
    (("cost", "--train-size", "100000000000"), "less than or equal to 1000000000"),
    (("cost", "--model", "vgg16", "--epochs", "100000", "--train-size", "1000000000", "--batch-size", "1"),
     "optimizer steps: must be <= 50,000,000"),
    (("run", "x.csr", "--dataset-test", "--batch-size", "0"), "greater than or equal to 1"),
    (("train", "x.toml", "--nproc", "5000"), "less than or equal to 1024"),
])
def test_absurd_numeric_options_exit_2_naming_the_bound(run_main, args: tuple[str, ...], needle: str) -> None:
    code, out, err = run_main(*args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_every_count_in_a_recipe_has_an_upper_bound() -> None:
    """Integer keys and epoch counts: an absurd value is a RecipeError with the bound, not an allocation."""
    import dataclasses

    from ndsnn_cli.recipe import SECTIONS, RecipeError, parse_recipe

    unbounded = [f"[{table}] {f.name}" for table, cls in SECTIONS.items() for f in dataclasses.fields(cls)
                 if (f.type == "int" or f.name.endswith("epoch") or f.name.endswith("epochs"))
                 and f.metadata.get("hi") is None]
    assert unbounded == []
    with pytest.raises(RecipeError, match=r"\[model\] timesteps = 1000000000 must be in \[1, 1024\]"):
        parse_recipe("[model]\ntimesteps = 1000000000\n", "r.toml")
    with pytest.raises(RecipeError, match=r"seed = -1 must be in \[0, "):
        parse_recipe("seed = -1\n", "r.toml")
