"""Hostile inputs beyond the CSR corpus (issue 28): every other file, folder and option ndsnn reads, each
family broken the way a hostile user would break it, through the real CLI in one child process (so a
signal, a hang or a library's own stderr output is seen). A refusal is exit 2 and one line on stderr
naming the file; nothing is written where the input says. The crafted artefacts and checkpoints are in
test_validate.py; the limits are listed in docs/reliability.md.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_jobs import run_cli_jobs
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ndsnn_cli import limits as L
from ndsnn_cli.rundir import RUN_CHECKPOINT

# ------------------------------------------------------------------------------------------ builders


def _png(width: int, height: int, rows: int) -> bytes:
    """A grayscale PNG whose header says width x height and whose data holds `rows` rows."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1) * rows))
            + chunk(b"IEND", b""))


def _jpeg_claiming(width: int, height: int) -> bytes:
    """An 8 x 8 JPEG whose frame header (SOF0) claims width x height."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    at = data.index(b"\xff\xc0")
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _npy_claiming(shape: tuple[int, ...]) -> bytes:
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (63 - len(header) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(64)


def _deflated(path: Path, tensor: torch.Tensor) -> None:
    """torch.save's zip with its entries re-written deflated (13 MB of zero pixels in 13 KB: torch inflates
    whatever size the entry claims)."""
    plain = io.BytesIO()
    torch.save(tensor, plain)
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))


def _edit_checkpoint(path: Path, edit: Callable[[dict[str, torch.Tensor], dict[str, Any]], None]) -> None:
    raw = path.read_bytes()
    tensors = dict(load_safetensors(raw))
    meta = json.loads(json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]["ndsnn"])
    edit(tensors, meta)
    path.write_bytes(save_safetensors({k: v.contiguous() for k, v in tensors.items()},
                                      metadata={"ndsnn": json.dumps(meta)}))


def _first(tensors: dict[str, torch.Tensor], prefix: str, contains: str = "") -> str:
    return next(k for k in sorted(tensors) if k.startswith(prefix) and contains in k)


def _set_first(prefix: str, contains: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., None]:
    def edit(t: dict[str, torch.Tensor], m: dict[str, Any]) -> None:
        key = _first(t, prefix, contains)
        t[key] = make(t[key])
    return edit


class _RunsCode:
    """Unpickling this calls os.system: a CIFAR batch crafted to run a command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (self.command,)


def _cifar_folder(root: Path, marker: Path) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows = np.zeros((2, 3072), dtype=np.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({"data": rows, "labels": [0, 1]}, protocol=2))
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": _RunsCode(f"touch {marker}"), "labels": [0, 1]}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}, protocol=2))


def _idx_folder(root: Path, *, claimed_images: int, label: int) -> None:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, count in (("train", 4), ("t10k", 4)):
        images = b"\0\0\x08\x03" + struct.pack(">III", claimed_images if split == "train" else count, 28, 28)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(images + bytes(count * 28 * 28))
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01" + struct.pack(">I", count)
                                                          + bytes([label] * count))


def _recipe_with(run: Path, old: str, new: str) -> str:
    text = (run / "recipe.toml").read_text()
    assert old in text, old
    return text.replace(old, new)


# ------------------------------------------------------------------------------------ one CLI child

# family -> [(case id, expected text in the one line; None: exit 0 expected)]
FAMILIES: dict[str, list[tuple[str, str | None]]] = {}


def _case(jobs: list[dict[str, Any]], family: str, case: str, argv: list[str], expect: str | None,
          watch: Path | None = None) -> None:
    FAMILIES.setdefault(family, []).append((case, expect))
    jobs.append({"id": case, "argv": argv, **({"watch": str(watch)} if watch else {})})


@pytest.fixture(scope="module")
def hostile(good: dict[str, Any]) -> dict[str, Any]:
    """Every case below built under one folder and run in one CLI child process."""
    work = good["work"] / "hostile"
    work.mkdir()
    artefact, run = str(good["artefact"]), good["checkpoint"].parents[1]
    jobs: list[dict[str, Any]] = []

    def copy_run(name: str) -> Path:
        target = work / name
        shutil.copytree(run, target)
        return target

    # Input files of `run --input`: headers checked before pixels, sizes before reading, dense tensors.
    inputs = {
        "png_header_claims_60000_square": ("huge.png", _png(60000, 60000, 4), "image of 60000 x 60000 pixels"),
        "jpeg_header_claims_65500_square": ("huge.jpg", _jpeg_claiming(65500, 65500), "image of 65500 x 65500"),
        "png_data_shorter_than_header": ("short.png", _png(28, 28, 4)[:60], "not a readable image"),
        "npy_header_claims_3_tb": ("huge.npy", _npy_claiming((1000000, 1, 28, 28000)),
                                   "images of shape [1000000, 1, 28, 28000] must be [B, 1, 28, 28]"),
        "npy_header_longer_than_data": ("short.npy", _npy_claiming((4, 1, 28, 28)),
                                        "header claims shape [4, 1, 28, 28]"),
    }
    for case, (name, data, expect) in inputs.items():
        (work / name).write_bytes(data)
        _case(jobs, "input files", case, ["run", artefact, "--input", str(work / name)], expect)
    torch.save(torch.zeros(1).expand(4000, 1, 28, 28), work / "stride0.pt")
    torch.save(torch.zeros(4, 1, 28, 28).to_sparse(), work / "sparse.pt")
    _deflated(work / "deflated.pt", torch.zeros(4096, 1, 28, 28))
    torch.save({"images": torch.rand(4, 1, 28, 28), "labels": torch.tensor([1, 2, 3, 200])}, work / "labels.pt")
    for case, name, expect in [("pt_stride_0_tensor", "stride0.pt", "must be a dense, contiguous tensor"),
                               ("pt_sparse_tensor", "sparse.pt", "must be a dense, contiguous tensor"),
                               ("pt_deflated_zip_bomb", "deflated.pt", "compressed or oversized entries"),
                               ("pt_labels_outside_the_classes", "labels.pt",
                                "labels must be class indices in [0, 10)")]:
        _case(jobs, "input files", case, ["run", artefact, "--input", str(work / name)], expect)

    # Run directories read by `cost RUN` and `train --resume`.
    for case, line in [("metrics_line_is_a_list", "[1]"), ("metrics_line_is_an_empty_object", "{}")]:
        folder = copy_run(case)
        with open(folder / "metrics.jsonl", "a") as handle:
            handle.write(line + "\n")
        number = len((folder / "metrics.jsonl").read_text().splitlines())
        expect = f"metrics.jsonl: line {number}: must be a record"
        _case(jobs, "run directories", f"{case}@cost", ["cost", str(folder)], expect)
        _case(jobs, "run directories", f"{case}@resume",
              ["train", str(folder / "recipe.toml"), "--out", str(folder), "--resume", "-q"], expect)
    for case, value in [("spike_rate_1e308", 1e308), ("spike_rate_negative", -5)]:
        folder = copy_run(case)
        summary = json.loads((folder / "summary.json").read_text())
        summary["spike_rates"][next(iter(summary["spike_rates"]))] = value
        (folder / "summary.json").write_text(json.dumps(summary))
        _case(jobs, "run directories", case, ["cost", str(folder)], "must be in [0, 1]")
    folder = copy_run("recipe_toml_not_utf8")
    (folder / "recipe.toml").write_bytes((folder / "recipe.toml").read_bytes().replace(b'"validate"', b'"caf\xe9"'))
    _case(jobs, "run directories", "recipe_toml_not_utf8@cost", ["cost", str(folder)], "is not a UTF-8 text file")
    folder = copy_run("summary_int_5000_digits")
    (folder / "summary.json").write_text('{"epochs": ' + "1" * 5000 + "}")
    _case(jobs, "run directories", "summary_int_5000_digits", ["cost", str(folder)],
          "summary.json: not a readable JSON file (holds an integer of 5,000 digits")

    # Resume state against the optimizer and the method it feeds.
    resume_cases = {
        "momentum_buffer_of_one_element": (_set_first("optim::", "momentum", lambda x: x.reshape(-1)[:1].clone()),
                                           "momentum_buffer: shape [1] must be its parameter's"),
        "param_groups_empty": (lambda t, m: m["optimizer"].__setitem__("param_groups", []),
                               "optimizer.param_groups: holds 0 group(s); the recipe's optimizer has 1"),
        "param_group_lr_a_string": (lambda t, m: m["optimizer"]["param_groups"][0].__setitem__("lr", "fast"),
                                    "optimizer.param_groups[0].lr: must be a finite number"),
        "rng_cuda_key_not_a_device": (lambda t, m: t.__setitem__("rng::cuda::x", torch.zeros(16, dtype=torch.uint8)),
                                      "rng::cuda::x: RNG entries are"),
        "mask_missing": (lambda t, m: t.pop(_first(t, "mask::")), "missing (the recipe's method keeps this"),
        "method_generator_missing": (lambda t, m: t.pop("method::generator"), "method::generator: missing"),
        "momentum_buffer_complex": (_set_first("optim::", "momentum", lambda x: x.to(torch.complex64)),
                                    "dtype torch.complex64: optimizer state is"),
        "pending_update_not_one_bool": (lambda t, m: t.__setitem__("method::pending_update", torch.ones(3, 3).bool()),
                                        "method::pending_update: must be one bool"),
    }
    for case, (edit, expect) in resume_cases.items():
        folder = copy_run(f"resume_{case}")
        _edit_checkpoint(folder / RUN_CHECKPOINT, edit)
        argv = ["train", str(folder / "recipe.toml"), "--out", str(folder), "--resume", "-q"]
        _case(jobs, "resume state", case, argv, expect, watch=folder)

    # Where ndsnn writes: output paths, and the data folder of `run --dataset-test`.
    os.mkfifo(work / "fifo.csr")
    _case(jobs, "filesystem", "export_onto_a_fifo", ["export", str(run), "-o", str(work / "fifo.csr")],
          "cannot write output (exists and is not a regular file)")
    _case(jobs, "filesystem", "out_name_of_300_characters",
          ["train", str(run / "recipe.toml"), "--out", str(work / ("y" * 300)), "-q"], "File name too long")
    _case(jobs, "filesystem", "inspect_name_of_300_characters", ["inspect", str(work / ("y" * 300))],
          "File name too long")
    tensors = dict(load_safetensors(good["artefact"].read_bytes()))
    raw = good["artefact"].read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    strings = header["__metadata__"]
    strings["recipe"] = strings["recipe"].replace('dataset = "synthetic"', 'dataset = "mnist"').replace(
        'root = ""', f'root = "{work / "chosen_by_the_file" / "data"}"').replace("download = false", "download = true")
    (work / "embedded_root.safetensors").write_bytes(save_safetensors(tensors, metadata=strings))
    _case(jobs, "filesystem", "dataset_test_root_from_the_artefact",
          ["run", str(work / "embedded_root.safetensors"), "--dataset-test", "--limit", "4"], "no MNIST data found")
    (work / "empty").mkdir()
    _case(jobs, "filesystem", "dataset_test_data_root_given",
          ["run", str(work / "embedded_root.safetensors"), "--dataset-test", "--limit", "4", "--data-root",
           str(work / "empty")], f"no MNIST data found in {work / 'empty'}")

    # Options checked beyond finiteness (an MLP run: NIR exports it).
    from ndsnn_cli.train import train

    mlp = work / "mlp_run"
    from conftest import tiny_run_recipe

    train(tiny_run_recipe(name="mlp", train={"epochs": 1}, data={"train_limit": 32, "test_limit": 16,
                                                                   "batch_size": 16}), mlp)
    for case, dt in [("nir_dt_1e308", "1e308"), ("nir_dt_denormal", "1e-320")]:
        argv = ["export", str(mlp), "--format", "nir", "--dt", dt, "-o", str(work / f"{case}.nir")]
        _case(jobs, "options", case, argv, "the simulation step must be between 1e-09 and 1 seconds")

    # Data folders a recipe points at.
    _idx_folder(work / "idx_lies", claimed_images=60000, label=0)
    _idx_folder(work / "idx_label", claimed_images=4, label=200)
    marker = work / "code_ran"
    _cifar_folder(work / "cifar", marker)
    for case, root, dataset, expect in [
            ("idx_header_claims_more_images", "idx_lies", "fashion-mnist", "header says [60000, 28, 28]"),
            ("idx_label_outside_the_classes", "idx_label", "fashion-mnist", "label 200 is not a class in [0, 10)"),
            ("cifar_batch_that_runs_code", "cifar", "cifar10", "refuses the global posix.system")]:
        text = _recipe_with(run, 'dataset = "synthetic"', f'dataset = "{dataset}"').replace(
            'root = ""', f'root = "{work / root}"')
        (work / f"{case}.toml").write_text(text)
        argv = ["train", str(work / f"{case}.toml"), "--out", str(work / f"{case}_run"), "-q"]
        _case(jobs, "data folders", case, argv, expect)

    # An embedded recipe is shown by inspect as far as it reads: never a traceback.
    for case, recipe in [("embedded_recipe_model_is_an_int", "model = 1\n"),
                         ("embedded_recipe_nested_5000_deep", "a = " + "[" * 5000 + "]" * 5000 + "\n"),
                         ("embedded_recipe_int_of_5000_digits", "seed = " + "1" * 5000 + "\n")]:
        strings = {**header["__metadata__"], "recipe": recipe}
        (work / f"{case}.safetensors").write_bytes(save_safetensors(tensors, metadata=strings))
        _case(jobs, "embedded recipes", case, ["inspect", str(work / f"{case}.safetensors"), "--json"], None)

    results, _ = run_cli_jobs(jobs, work, timeout=900)
    return {"results": results, "work": work, "marker": marker, "jobs": {j["id"]: j for j in jobs}}


# Cases whose data may be installed where the test runs (the data set's default location): exit 0 is fine too.
MAY_SUCCEED = {"dataset_test_root_from_the_artefact"}


def _refused(hostile: dict[str, Any], family: str) -> None:
    for case, expect in FAMILIES[family]:
        result = hostile["results"][case]
        stderr = result["stderr"]
        assert "Traceback" not in stderr, (case, stderr[-2000:])
        if expect is None or (case in MAY_SUCCEED and result["code"] == 0):
            assert result["code"] == 0, (case, stderr)
            continue
        lines = stderr.strip().splitlines()
        assert result["code"] == 2 and len(lines) == 1, (case, stderr)
        assert lines[0].startswith("error: ") and expect in lines[0], (case, lines[0])
        if result.get("unchanged") is not None:
            assert result["unchanged"], f"{case}: the run directory changed"


def test_input_files_are_bounded_by_their_headers_before_pixels_are_decoded(hostile: dict[str, Any]) -> None:
    """PNG/JPEG headers claiming 3.6 G pixels, a PNG cut short (libpng's own message must not reach stderr), .npy
    headers claiming 3 TB or more than the file holds, a stride-0 / sparse / deflated .pt, labels beyond the classes."""
    _refused(hostile, "input files")


def test_run_directories_with_foreign_records_exit_2(hostile: dict[str, Any]) -> None:
    """metrics.jsonl lines `[1]` and `{}` (cost and resume), spike rates 1e308 and -5, a non-UTF-8 recipe.toml,
    a 5000-digit integer in summary.json."""
    _refused(hostile, "run directories")


def test_resume_state_is_checked_per_tensor_against_the_optimizer_and_method(hostile: dict[str, Any]) -> None:
    """A 1-element momentum buffer, empty param_groups, an lr that is a string, rng::cuda::x, a missing mask or
    generator, a complex buffer, a 3x3 pending flag: refused before anything is restored; the run is untouched."""
    _refused(hostile, "resume state")


def test_nothing_is_written_where_an_input_says(hostile: dict[str, Any]) -> None:
    """An export onto a FIFO does not replace it; 300-character names are one line; `run --dataset-test` ignores
    the artefact's data root and download flag (no folder appears where the file said)."""
    _refused(hostile, "filesystem")
    assert (hostile["work"] / "fifo.csr").is_fifo()
    assert not (hostile["work"] / "chosen_by_the_file").exists()


def test_options_are_checked_for_sense_not_only_finiteness(hostile: dict[str, Any]) -> None:
    _refused(hostile, "options")
    assert not list(hostile["work"].glob("nir_dt_*.nir"))


def test_data_folders_are_checked_before_torchvision_reads_them(hostile: dict[str, Any]) -> None:
    """IDX headers that claim more than the file, labels beyond the classes, a CIFAR batch whose pickle calls
    os.system: refused, and the command never ran."""
    _refused(hostile, "data folders")
    assert not hostile["marker"].exists(), "the crafted CIFAR batch ran its command"


def test_inspect_shows_a_file_whose_embedded_recipe_is_hostile(hostile: dict[str, Any]) -> None:
    _refused(hostile, "embedded recipes")
    for case, _ in FAMILIES["embedded recipes"]:
        shown = json.loads(hostile["results"][case]["stdout"])
        assert shown["kind"] == "artefact" and shown["recipe"].get("arch") is None, case


# ---------------------------------------------------------------------------------- in-process cases


@pytest.mark.parametrize("name", ["../escape", "{tmp}/absolute", "a\u0000b", "x" * 300, "..", "a/b"])
def test_a_recipe_name_is_one_safe_folder_under_runs(name: str, tmp_path: Path, run_main,
                                                      monkeypatch: pytest.MonkeyPatch, tiny_recipe) -> None:
    """Without --out a run goes to runs/<name>: a name that is not one plain path component is refused
    before any folder is made (it placed runs outside runs/: "../x", an absolute path)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NDSNN_RUNS", str(tmp_path / "runs"))
    name = name.replace("{tmp}", str(tmp_path))
    text = tiny_recipe().to_toml().replace('name = "tiny"', f"name = {json.dumps(name)}")
    (tmp_path / "recipe.toml").write_text(text)
    code, _, err = run_main("train", str(tmp_path / "recipe.toml"), "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "must be a plain folder name" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.toml"]


def test_a_recipe_file_over_the_size_bound_is_refused_before_parsing(tmp_path: Path, run_main) -> None:
    path = tmp_path / "big.toml"
    path.write_text("#" * L.MAX_RECIPE_BYTES + "\n")
    code, _, err = run_main("train", str(path))
    assert code == 2 and err.strip() == (f"error: big.toml: is {L.MAX_RECIPE_BYTES + 1:,} bytes, more than the "
                                         f"{L.MAX_RECIPE_BYTES:,} this file may have"), err


def test_the_validators_pool_size_is_torchs_for_every_small_case() -> None:
    """The reference twin of the max-pool shape rule: every (size, kernel, stride, padding, ceil_mode) with
    size <= 12, kernel <= 4, padding <= kernel // 2 gives torch's own output size."""
    from ndsnn_cli.validate import _pooled_size

    checked = 0
    for size in range(1, 13):
        for kernel in range(1, 5):
            for stride in range(1, 5):
                for padding in range(kernel // 2 + 1):
                    for ceil_mode in (False, True):
                        if size + 2 * padding < kernel:
                            continue
                        out = torch.nn.functional.max_pool2d(torch.zeros(1, 1, size, size), kernel, stride, padding,
                                                             ceil_mode=ceil_mode)
                        assert _pooled_size(size, kernel, stride, padding, ceil_mode) == out.shape[-1], \
                            (size, kernel, stride, padding, ceil_mode)
                        checked += 1
    assert checked > 500


def test_an_artefact_with_ceil_mode_pooling_that_torch_runs_is_accepted(good: dict[str, Any], tmp_path: Path,
                                                                         run_main) -> None:
    """The body's max-pool as kernel 3, stride 3, padding 1, ceil_mode (torch: 14 -> 5, the plain ceiling: 6) with
    a linear of 32 * 25 inputs: accepted (it was refused as not fitting 1152 features), and its CSR kernels
    give the logits of its dense kernels."""
    from test_validate import decode, encode

    from ndsnn_cli.export import csr
    from ndsnn_cli.export.runtime import load_network

    tensors, metadata = decode(good["artefact"].read_bytes())
    pools = [op for op in metadata["graph"] if op["op"] == "maxpool2d"]
    pools[1].update(kernel=[3, 3], stride=[3, 3], padding=[1, 1], ceil_mode=True)
    weight = torch.randn(128, 32 * 25, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(128, 32 * 25, generator=torch.Generator().manual_seed(1)) < 0.05
    for part, tensor in csr.to_csr(weight, mask, torch.float32, "plain").items():
        tensors[f"body.6.weight.{part}"] = tensor
    path = tmp_path / "ceil.safetensors"
    path.write_bytes(encode(tensors, metadata))
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    logits = load_network(path, dense_above=1.0)(images)
    assert logits.shape == (2, 3, 10) and bool(torch.isfinite(logits).all())
    assert torch.allclose(logits, load_network(path, dense_above=0.0)(images), atol=1e-4, rtol=1e-4)
    code, out, err = run_main("run", str(path), "--input", str(good["images"]), "--json")
    assert code == 0, err
    assert len(json.loads(out)["predictions"]) == 4


def test_run_splits_a_batch_so_no_call_builds_more_than_the_run_bound(good: dict[str, Any],
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`SparseNetwork` processes at most MAX_RUN_ELEMENTS // (per-image peak) images per call; the logits of a
    split batch equal those of one call (the ops are per image)."""
    from ndsnn_cli.export import runtime

    whole = runtime.load_network(good["artefact"])
    images = torch.rand(7, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    expected = whole(images)
    monkeypatch.setattr(L, "MAX_RUN_ELEMENTS", 2 * runtime.sample_elements("x", *_raw(good["artefact"])))
    split = runtime.load_network(good["artefact"])
    assert split.images_per_call == 2 and whole.images_per_call > 7
    calls = []
    original = split._run
    monkeypatch.setattr(split, "_run", lambda ops, x: calls.append(x.shape[0]) or original(ops, x))
    assert torch.allclose(split(images), expected, atol=1e-5, rtol=1e-5)
    assert calls == [2, 2, 2, 1]


def _raw(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from ndsnn_cli.export.csr import load_raw

    return load_raw(path)


def test_nir_inspect_refuses_string_metadata_and_arrays_too_large_uncompressed(tmp_path: Path, run_main) -> None:
    """NIR graph metadata given as strings (dt, version, timesteps, sparsity), and an HDF5 dataset of 6.4 GB of
    gzip-compressed zeros in a 200 KB file: one line each, nothing decompressed."""
    nir = pytest.importorskip("nir")
    import h5py

    nodes = {"input": nir.Input(input_type={"input": np.array([4])}),
             "fc": nir.Affine(weight=np.ones((2, 4), dtype=np.float32), bias=np.zeros(2, dtype=np.float32)),
             "output": nir.Output(output_type={"output": np.array([2])})}
    edges = [("input", "fc"), ("fc", "output")]
    for key in ("dt", "version", "timesteps", "sparsity"):
        path = tmp_path / f"{key}.nir"
        nir.write(str(path), nir.NIRGraph(nodes=nodes, edges=edges, metadata={"dt": 1e-4, key: "fast"}))
        code, _, err = run_main("inspect", str(path))
        assert code == 2 and err.strip() == f"error: {path}: metadata {key}: must be a finite number (got 'fast')", err
    bomb = tmp_path / "bomb.nir"
    nir.write(str(bomb), nir.NIRGraph(nodes=nodes, edges=edges, metadata={"dt": 1e-4}))
    with h5py.File(bomb, "a") as handle:
        node = handle["node"]["nodes"]["fc"]
        del node["weight"]
        node.create_dataset("weight", shape=(40000, 40000), dtype="f4", chunks=(4000, 4000), compression="gzip")
    assert bomb.stat().st_size < 1 << 20
    code, _, err = run_main("inspect", str(bomb))
    assert code == 2 and "its arrays hold 6,400,000," in err and len(err.strip().splitlines()) == 1, err


def test_a_fifo_or_device_is_never_replaced_by_an_atomic_write(tmp_path: Path) -> None:
    from ndsnn_cli.atomic import write_bytes

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="exists and is not a regular file"):
        write_bytes(fifo, b"x")
    assert fifo.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_every_bound_of_the_text_parsers(tmp_path: Path) -> None:
    """JSON and TOML nesting, integer length and size bounds (formats/text.py), each at its edge."""
    from ndsnn_cli.formats.text import TextError, parse_json, parse_toml, read_text_file

    depth = L.MAX_NESTING
    assert parse_json("[" * depth + "]" * depth) is not None
    for text in ("[" * (depth + 1) + "]" * (depth + 1), "[" * 100_000, "1" * (L.MAX_INT_DIGITS + 1)):
        with pytest.raises(TextError):
            parse_json(text)
    assert parse_json("1" * L.MAX_INT_DIGITS) == int("1" * L.MAX_INT_DIGITS)
    assert "a" in parse_toml("a = " + "[" * (depth - 1) + "]" * (depth - 1))  # the table itself is a level
    with pytest.raises(TextError, match="nested deeper than"):
        parse_toml("a = " + "[" * depth + "]" * depth)
    for text in ("a = " + "[" * 5000 + "]" * 5000, "a = " + "{b = " * 5000 + "1" + "}" * 5000,
                 "a = " + "1" * 5000, "a = " + "9" * (L.MAX_INT_DIGITS + 1), "x" * (L.MAX_RECIPE_BYTES + 1)):
        with pytest.raises(TextError):
            parse_toml(text)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(TextError, match="is not a UTF-8 text file"):
        read_text_file(tmp_path / "latin1.txt", 100)
    with pytest.raises(TextError, match="more than the 3 this file may have"):
        read_text_file(tmp_path / "latin1.txt", 3)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(TextError, match="is not a regular file"):
        read_text_file(tmp_path / "fifo", 100)
