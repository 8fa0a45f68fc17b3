"""The C target: generated C99 compiled with the system compiler and run against the reference runtime.

Compiling takes seconds per model on a loaded machine, so each compiled test checks several things
of one build. Every compiled test is skipped (with the reason) where no C compiler exists.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_export_source
from torch import nn

from ndsnn_cli.data import input_contract
from ndsnn_cli.errors import UserError
from ndsnn_cli.evaluation import spike_rates
from ndsnn_cli.export import c, csr, graph
from ndsnn_cli.export.c import cortex_m4, generate, verify
from ndsnn_cli.export.fold import fold_batchnorm
from ndsnn_cli.snn.models import BasicBlock, NeuronConfig, SpikingNet, SpikingSequential, create_model
from ndsnn_cli.sparse.masks import scale_to_active_fan_in
from ndsnn_cli.train import train

COMPILER = c.find_compiler()
needs_cc = pytest.mark.skipif(COMPILER is None, reason="no C compiler (cc, gcc or clang) on this machine")
ARM = cortex_m4.find_toolchain()
ARM_MISSING = ARM if isinstance(ARM, str) else None if ARM.qemu else "qemu-system-arm not found"
needs_m4 = pytest.mark.skipif(COMPILER is None or ARM_MISSING is not None,
                              reason=f"Cortex-M4: {ARM_MISSING} (make test installs {cortex_m4.PACKAGES})")
ALLOWED_INCLUDES = {"stdint.h", "stddef.h", "ndsnn_model.h", "ndsnn_kernels.h"}  # freestanding: no libc


@pytest.fixture(scope="module")
def scnn_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny NDSNN-trained scnn (T=2, 90% sparse, synthetic data, 256 test images)."""
    return train_export_source(tmp_path_factory.mktemp("c") / "run", name="c-test", test_limit=256)


@pytest.fixture(scope="module")
def fmnist_run99(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small scnn trained with NDSNN to 99% sparsity on real Fashion-MNIST images (T=2, 128 steps: ~73%
    on its 256 test images; fewer steps leave a 99%-sparse net silent, one class for every image)."""
    from ndsnn_cli.data.loading import raw_test_set
    from ndsnn_cli.recipe import Recipe

    try:
        raw_test_set(Recipe().replace(data={"dataset": "fashion-mnist", "train_limit": 1, "test_limit": 1}).data)
    except UserError as exc:
        pytest.skip(f"Fashion-MNIST is not on this machine (make test installs it): {exc}")
    return train_export_source(tmp_path_factory.mktemp("m4") / "run", name="m4-test", dataset="fashion-mnist",
                               final=0.99, train_limit=4096, update_every_steps=8, test_limit=256)


def _random_sparse(model: SpikingNet, density: float, image_shape: tuple[int, ...],
                   seed: int = 0) -> tuple[SpikingNet, dict[str, torch.Tensor]]:
    """Random masks at `density`, weights rescaled to their active fan-in, BN statistics measured on random
    images and BN affine drawn so that every LIF layer fires; returns the BN-folded model and its masks."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                masks[name] = torch.rand(param.shape, generator=generator) < density
                param.mul_(masks[name])
                scale_to_active_fan_in(param, masks[name])
                if isinstance(model.get_submodule(name.removesuffix(".weight")), nn.Linear):
                    param.mul_(4.0)  # no BN behind a linear layer: enough current to reach threshold
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                module.momentum = None  # a cumulative average: the statistics of the calibration batch
                module.weight.uniform_(1.0, 2.5, generator=generator)
                module.bias.uniform_(0.0, 0.8, generator=generator)
        model.train()
        model(torch.randn(16, *image_shape, generator=generator))
    return fold_batchnorm(model.eval()), masks


def _small_resnet_vgg(neuron: NeuronConfig) -> SpikingNet:
    """Every op of the VGG/ResNet layouts at toy size: stride 2, a 1x1-conv and an identity shortcut,
    max-pooling of spikes, global average pooling, a spiking fc and a classifier."""
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    body = SpikingSequential(
        neuron.make(), BasicBlock(8, 16, 2, neuron), BasicBlock(16, 16, 1, neuron), nn.MaxPool2d(2, 2, ceil_mode=True),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), neuron.make(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 24), neuron.make(), nn.Linear(24, 10))
    return SpikingNet(encoder, body, neuron)


def _check_portable(directory: Path | dict[str, str]) -> None:
    texts = directory if isinstance(directory, dict) else {p.name: p.read_text() for p in directory.iterdir()}
    for name in ("ndsnn_model.c", "ndsnn_model.h", "ndsnn_kernels.c", "ndsnn_kernels.h"):
        includes = set(re.findall(r'#include [<"]([^>"]+)[>"]', texts[name]))
        assert includes <= ALLOWED_INCLUDES, (name, includes - ALLOWED_INCLUDES)
        assert not re.search(r"\b(malloc|calloc|realloc|free)\s*\(", texts[name])


# -- without a compiler ---------------------------------------------------------------------------

def test_int8_rows_are_symmetric_per_output_channel_and_round_to_nearest() -> None:
    values = np.array([0.5, -1.27, 0.01, 0.0, 0.0, 2.0], dtype=np.float32)
    scales, q = csr.quantise_rows(values, np.array([0, 3, 5, 5, 6]))
    # max|w| / 127 to the nearest bfloat16 (0.01 -> 0.010009765625 = 41 / 4096); all-zero and empty rows: 1
    assert scales.tolist() == [41 / 4096, 1.0, 1.0, float(torch.tensor(2.0 / 127).bfloat16())]
    assert q.tolist() == [50, -127, 1, 0, 0, 127]
    assert all(torch.tensor(s).bfloat16().item() == s for s in scales.tolist())  # stored as bf16 losslessly


def test_arena_reuses_a_freed_slot_and_grows_the_largest_free_one() -> None:
    arena = generate._Arena()
    first, second = arena.take(100), arena.take(10)
    arena.give_back(first)
    assert arena.take(50) == first and arena.sizes == [100, 10]
    arena.give_back(second)
    assert arena.take(400) == second and arena.sizes == [100, 400]


def test_generated_sources_state_ram_and_flash_use_only_portable_headers_and_no_heap() -> None:
    torch.manual_seed(0)
    mlp = create_model("mlp", num_classes=10, in_channels=1, image_size=28)
    model, masks = _random_sparse(mlp, 0.1, (1, 28, 28))
    sources = c.generate_sources(model, masks, contract=input_contract("mnist"), timesteps=5, num_classes=10)
    header = sources.files["ndsnn_model.h"]
    assert f"#define NDSNN_RAM_BYTES {sources.ram_bytes}" in header
    assert f"#define NDSNN_FLASH_BYTES {sources.flash_bytes}" in header
    nnz = sum(int(m.sum()) for m in masks.values())
    # fp32 values + one gap byte per weight (90% sparse: no gap reaches 255) + int32 row pointers + biases
    # and the normalisation constants; plain int16 columns cost 2 bytes per weight
    rows = 128 + 10
    assert [layer["index"] for layer in sources.layers] == ["gaps-u8", "gaps-u8"]
    assert sources.flash_bytes == nnz * 5 + (rows + 2) * 4 + rows * 4 + 2 * 4
    plain = c.generate_sources(model, masks, contract=input_contract("mnist"), timesteps=5, num_classes=10,
                               indices="plain")
    assert plain.flash_bytes == nnz * 6 + (rows + 2) * 4 + rows * 4 + 2 * 4
    assert sources.layers[0]["input"] == "analog" and sources.layers[1]["input"] == "spikes"
    _check_portable(sources.files)
    with pytest.raises(UserError, match="fp32 or int8"):
        c.generate_sources(model, masks, contract=input_contract("mnist"), timesteps=5, num_classes=10, dtype="fp16")


# -- compiled -------------------------------------------------------------------------------------

@needs_cc
def test_scnn_export_through_the_cli_matches_the_reference_on_256_test_images(
        scnn_run: Path, tmp_path: Path, run_main) -> None:
    out = tmp_path / "scnn_c"
    code, stdout, stderr = run_main("export", str(scnn_run), "--format", "c", "-o", str(out), "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    test = report["verify"]["images"]["test"]
    assert report["format"] == "c" and report["verify"]["passed"]
    assert test["samples"] == 256 and test["same_predictions"] == 256 and test["max_abs_logit_diff"] < 1e-3
    assert report["verify"]["images"]["random"]["same_predictions"] == 8
    _check_portable(out)
    # the build line, then the float and the uint8 entries on the same pixels k / 255
    demo = tmp_path / "demo"
    sources = sorted(str(p) for p in out.glob("*.c"))
    subprocess.run([COMPILER, "-std=c99", "-O2", "-o", str(demo), *sources, "-lm"], check=True)
    pixels = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    (tmp_path / "x.u8").write_bytes(pixels.numpy().tobytes())
    (tmp_path / "x.f32").write_bytes((pixels.float() / 255).numpy().astype("<f4").tobytes())
    as_float = subprocess.run([str(demo), str(tmp_path / "x.f32")], capture_output=True, text=True, check=True)
    as_u8 = subprocess.run([str(demo), "-u", str(tmp_path / "x.u8")], capture_output=True, text=True, check=True)
    assert as_float.stdout == as_u8.stdout and len(as_float.stdout.split()) == 20
    assert all(0 <= int(line) < 10 for line in as_float.stdout.splitlines())


@needs_cc
def test_scnn_int8_equals_the_int8_reference_and_quantises_within_half_a_step(scnn_run: Path, tmp_path: Path) -> None:
    """int8 is checked for what int8 changes, not for the luck of a 16-step model (whose int8 accuracy moves
    by a few of its 256 images either way): the C arithmetic against the reference runtime on the same int8
    weights (exactly the fp32 criteria), the quantiser's exact properties, and the accuracy drop against
    fp32 within its sampling bound (0.5 points + 3 standard errors of the paired difference)."""
    path, report = c.export_c(scnn_run, tmp_path / "int8", dtype="int8")
    checked = report["verify"]
    test = checked["images"]["test"]
    assert checked["passed"] and test["samples"] == 256
    assert test["same_predictions"] == 256 and test["max_abs_logit_diff"] < 1e-3  # the int8 reference runtime
    assert test["accuracy_c"] == test["accuracy_reference"]
    quantisation = checked["quantisation"]
    assert len(quantisation) == 4 and all(
        q["max_error_steps"] <= 0.5 + 1e-3 and q["rows_at_127"] == q["rows"] > 0 for q in quantisation.values())
    fp32 = test["fp32_reference"]
    assert fp32["samples"] == 256 and fp32["accuracy_fp32"] - fp32["accuracy_c"] <= fp32["allowed_drop"]
    assert fp32["allowed_drop"] == pytest.approx(0.005 + 3 * math.sqrt(fp32["discordant"]) / 256)
    assert (path / "ndsnn_model.c").read_text().count("static const int8_t") == 4  # one per weighted layer
    path32 = tmp_path / "fp32"
    _, report32 = c.export_c(scnn_run, path32, run_verify=False)
    assert report["flash_bytes"] < report32["flash_bytes"] and "verify" not in report32


@needs_cc
def test_a_refused_int8_export_says_in_one_line_what_was_measured_and_writes_nothing(
        scnn_run: Path, tmp_path: Path, run_main, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify, "INT8_ACCURACY_POINTS", -100.0)  # no accuracy can pass: exercises the refusal
    out = tmp_path / "int8"
    code, _, stderr = run_main("export", str(scnn_run), "--format", "c", "--dtype", "int8", "-o", str(out))
    assert code == 1 and not out.exists() and list(tmp_path.iterdir()) == []
    assert stderr.count("\n") == 1 and "differs from the reference runtime beyond tolerance" in stderr
    measured = re.search(r"test images \(256\): 256 same predictions .* accuracy int8 C (\d+\.\d\d)% vs fp32 "
                         r"reference (\d+\.\d\d)% \((\d+) images decided differently", stderr)
    assert measured, stderr
    assert "train the run further" in stderr and "--dtype fp32" in stderr and "--no-verify" in stderr


@needs_cc
def test_mlp_export_matches_the_reference(tiny_recipe, tmp_path: Path) -> None:
    run = tmp_path / "mlp"
    train(tiny_recipe(sparsity={"method": "static", "final": 0.9}), run)
    _, report = c.export_c(run, tmp_path / "mlp_c", verify_images=128)
    test = report["verify"]["images"]["test"]
    assert report["verify"]["passed"] and test["same_predictions"] == test["samples"] == 128


@needs_cc
def test_resnet_and_vgg_shaped_ops_match_the_reference_on_200_images_and_run_clean_under_sanitizers(
        tmp_path: Path) -> None:
    torch.manual_seed(0)
    neuron = NeuronConfig(timesteps=3)
    pixels = torch.rand(200, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model, masks = _random_sparse(_small_resnet_vgg(neuron), 0.3, (3, 32, 32))
    rates = list(spike_rates(model, c.normalise(pixels, input_contract("cifar10"))).values())
    assert all(0.01 < rate < 0.9 for rate in rates), rates  # every spiking layer fires, none saturates
    contract = input_contract("cifar10")
    sources = c.generate_sources(model, masks, contract=contract, timesteps=3, num_classes=10)
    report = c.verify_sources(sources, model, masks, 3, contract, {"random": (pixels, None)}, COMPILER)
    entry = report["images"]["random"]
    assert report["passed"] and entry["same_predictions"] == 200 and entry["max_abs_logit_diff"] < 1e-3
    sanitized = c.compile_demo(sources, tmp_path / "asan", COMPILER,
                               ("-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"))
    predictions, logits = c.run_demo(sanitized, pixels[:16], env={"ASAN_OPTIONS": "detect_leaks=1"})
    plain = c.compile_demo(sources, tmp_path / "plain", COMPILER)
    expected_predictions, expected_logits = c.run_demo(plain, pixels[:16])
    assert torch.equal(predictions, expected_predictions) and torch.equal(logits, expected_logits)
    assert bool((expected_logits.std(0) > 0).any())  # the logits depend on the image through the spikes


@needs_cc
@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_both_max_pool_paths_and_every_row_tail_match_the_reference(tmp_path: Path, dtype: str) -> None:
    """The C max-pool has a direct path for windows that tile the map (kernel = stride, no padding) and a
    general one with clipping (padding, overlapping windows, partial windows of ceil_mode); the row kernels
    run blocks of 8 and a scalar tail (odd widths: 27, 13, 7). Analog and spike maps through each, against
    the reference runtime (fp32: same predictions, logits to rounding; int8: the int8 reference)."""
    torch.manual_seed(0)
    neuron = NeuronConfig(timesteps=3)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.MaxPool2d(3, 2, padding=1))
    body = SpikingSequential(  # 27x27 -> 14x14 (general, analog) ...
        neuron.make(), nn.MaxPool2d(2, 2, ceil_mode=True),  # 14 -> 7, tiled (spikes)
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), neuron.make(),
        nn.MaxPool2d(2, 2, ceil_mode=True),  # 7 -> 4: a partial last window, general (spikes)
        nn.Flatten(), nn.Linear(16 * 4 * 4, 24), neuron.make(), nn.Linear(24, 10))
    model, masks = _random_sparse(SpikingNet(encoder, body, neuron), 0.5, (3, 27, 27))
    ops = [op for op in graph.walk(graph.network_graph(model, (3, 27, 27))) if isinstance(op, graph.MaxPool2d)]
    assert [(op.in_shape[1], op.out_shape[1]) for op in ops] == [(27, 14), (14, 7), (7, 4)]
    contract = {**input_contract("cifar10"), "shape": [3, 27, 27]}
    pixels = torch.rand(64, 3, 27, 27, generator=torch.Generator().manual_seed(6))
    rates = list(spike_rates(model, c.normalise(pixels, contract)).values())
    assert all(0.01 < rate < 0.9 for rate in rates), rates
    sources = c.generate_sources(model, masks, contract=contract, timesteps=3, num_classes=10, dtype=dtype)
    report = c.verify_sources(sources, model, masks, 3, contract, {"random": (pixels, None)}, COMPILER)
    entry = report["images"]["random"]
    assert report["passed"] and entry["same_predictions"] == 64 and entry["max_abs_logit_diff"] < 1e-3


@needs_cc
@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_gap_escapes_decode_in_c_as_the_reference_reads_them_under_sanitizers(tmp_path: Path, dtype: str) -> None:
    """An mlp at 0.5% density (784 columns, ~4 weights per row): most gaps need escape bytes (255). The
    sanitized C build decodes them (analog layer; the spike-fed one has 128 columns) as the int16 build reads
    its columns: same predictions and logits; fp32 also matches the reference runtime."""
    torch.manual_seed(0)
    mlp = create_model("mlp", num_classes=10, in_channels=1, image_size=28, neuron=NeuronConfig(timesteps=3))
    model, masks = _random_sparse(mlp, 0.005, (1, 28, 28), seed=1)
    gaps = csr.to_csr(model.state_dict()["encoder.1.weight"], masks["encoder.1.weight"], torch.float32, "gaps")
    assert int((gaps["col_gaps"] == 255).sum()) > 50  # escapes, not only one-byte gaps
    contract = input_contract("mnist")
    sources = c.generate_sources(model, masks, contract=contract, timesteps=3, num_classes=10, dtype=dtype,
                                 indices="gaps")
    assert all(layer["index"] == "gaps-u8" for layer in sources.layers)
    pixels = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    sanitized = c.compile_demo(sources, tmp_path / "asan", COMPILER,
                               ("-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"))
    predictions, logits = c.run_demo(sanitized, pixels)
    if dtype == "fp32":  # the reference runtime's predictions and logits
        report = c.verify_sources(sources, model, masks, 3, contract, {"random": (pixels, None)}, COMPILER)
        assert report["passed"] and report["images"]["random"]["same_predictions"] == 64
    reference = c.generate_sources(model, masks, contract=contract, timesteps=3, num_classes=10, dtype=dtype,
                                   indices="plain")  # the same weights with int16 columns: the same logits
    expected = c.run_demo(c.compile_demo(reference, tmp_path / "plain", COMPILER), pixels)
    assert torch.equal(predictions, expected[0]) and torch.equal(logits, expected[1])
    assert bool((logits.std(0) > 0).any())


@needs_cc
@pytest.mark.slow
def test_resnet19_at_99_percent_sparsity_matches_the_reference(tmp_path: Path) -> None:
    torch.manual_seed(0)
    neuron = NeuronConfig(timesteps=2)
    model, masks = _random_sparse(create_model("resnet19", num_classes=10, in_channels=3, image_size=32,
                                               neuron=neuron), 0.01, (3, 32, 32))
    contract = input_contract("cifar10")
    sources = c.generate_sources(model, masks, contract=contract, timesteps=2, num_classes=10)
    pixels = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    report = c.verify_sources(sources, model, masks, 2, contract, {"random": (pixels, None)}, COMPILER)
    assert report["passed"] and report["images"]["random"]["same_predictions"] == 32


def test_export_without_verification_writes_the_directory_and_says_so(scnn_run: Path, tmp_path: Path,
                                                                       run_main) -> None:
    code, _, stderr = run_main("export", str(scnn_run), "--format", "c", "-o", str(tmp_path / "d"), "--no-verify")
    assert code == 0 and "verification skipped: --no-verify" in stderr
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(
        ["Makefile", "main.c", "ndsnn_kernels.c", "ndsnn_kernels.h", "ndsnn_model.c", "ndsnn_model.h"])


def test_a_c_export_that_fails_part_way_leaves_nothing_behind_and_keeps_the_old_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ndsnn_cli import atomic

    files = {name: f"/* {name} */\n" for name in ("ndsnn_model.h", "ndsnn_model.c", "ndsnn_kernels.c", "Makefile")}
    written = []
    real_write = atomic.write_text

    def fail_third(path, text):
        written.append(path)
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        return real_write(path, text)

    monkeypatch.setattr(atomic, "write_text", fail_third)
    target = tmp_path / "out"
    with pytest.raises(UserError, match="cannot write output .No space left on device"):
        c.write_directory(target, files)
    assert list(tmp_path.iterdir()) == []  # no ndsnn_model.h left behind, no staging directory
    monkeypatch.setattr(atomic, "write_text", real_write)
    c.write_directory(target, files)
    (target / "demo").write_bytes(b"\x7fELF")  # a build output of the first export
    old = {p.name: p.read_bytes() for p in target.iterdir()}
    written.clear()
    monkeypatch.setattr(atomic, "write_text", fail_third)
    with pytest.raises(UserError):
        c.write_directory(target, {name: "new\n" for name in files})
    assert {p.name: p.read_bytes() for p in target.iterdir()} == old and sorted(tmp_path.iterdir()) == [target]
    monkeypatch.setattr(atomic, "write_text", real_write)
    assert c.write_directory(target, {name: "new\n" for name in files}) == 4 * 4
    assert sorted(p.name for p in target.iterdir()) == sorted(files)  # replaced whole: the old demo is gone
    assert all(p.read_text() == "new\n" for p in target.iterdir()) and sorted(tmp_path.iterdir()) == [target]
    assert target.stat().st_mode & 0o777 == 0o777 & ~atomic.current_umask()


def test_a_c_export_never_replaces_a_directory_holding_other_files(tmp_path: Path) -> None:
    target = tmp_path / "firmware"
    target.mkdir()
    (target / "main_app.c").write_text("int main(void) { return 0; }\n")
    with pytest.raises(UserError, match=r"firmware: holds files a C export does not write \(main_app.c\)"):
        c.write_directory(target, {"ndsnn_model.h": "/* */\n"})
    assert [p.name for p in target.iterdir()] == ["main_app.c"] and sorted(tmp_path.iterdir()) == [target]


# -- Cortex-M4 (QEMU mps2-an386) --------------------------------------------------------------------

@needs_m4
@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_scnn_at_99_percent_on_the_emulated_cortex_m4_predicts_what_the_reference_runtime_does(
        fmnist_run99: Path, tmp_path: Path, dtype: str) -> None:
    """Cross-compiled with -mcpu=cortex-m4 -mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16 -O2, run under
    qemu-system-arm -M mps2-an386 on 256 real test images (semihosting in and out; the run ends by itself,
    within cortex_m4.TIMEOUT_S): the host build's criteria, on every image for fp32."""
    path, report = c.export_c(fmnist_run99, tmp_path / dtype, dtype=dtype, target="cortex-m4")
    m4 = report["verify"]["cortex-m4"]
    test = m4["images"]["test"]
    assert m4["passed"] and test["samples"] == 256 and m4["images"]["random"]["samples"] == 8
    assert test["accuracy_reference"] > 0.3  # a network that computes something (chance: 0.1), not a silent one
    if dtype == "fp32":
        assert test["same_predictions"] == 256 and test["logits_within_tolerance"] == 256
        assert test["max_abs_logit_diff"] < 1e-3
    else:  # the int8 reference runtime's predictions; the accuracy against fp32 within the sampling bound
        assert verify.passes({"test": test}, "int8", report["layers"]) and test["same_predictions"] == 256
        fp32 = test["fp32_reference"]
        assert fp32["accuracy_fp32"] - fp32["accuracy_c"] <= fp32["allowed_drop"]
    assert test["instructions_per_tick"] == 40.0  # icount: 1 instruction per virtual ns, 25 MHz timer
    assert 1e5 < test["instructions_min"] <= test["instructions_median"] <= test["instructions_max"] < 1e9
    assert 64 < test["stack_bytes"] < cortex_m4.STACK_BYTES
    fit = report["fit"]
    assert fit["fits"] and fit["parts"]["mps2-an386"] and fit["stack_bytes"] == max(
        entry["stack_bytes"] for entry in m4["images"].values())
    assert fit["flash_bytes"] == report["cortex_m4_size"]["flash"] > report["flash_bytes"]  # code + const data
    if dtype == "fp32":  # the exported directory's own Makefile builds and runs the same firmware
        pixels = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(5))
        (path / "images.f32").write_bytes(pixels.numpy().astype("<f4").tobytes())
        for goal in ("firmware.elf", "qemu", "demo"):
            subprocess.run(["make", "-s", "-C", str(path), goal], check=True, capture_output=True, timeout=300)
        m4_predictions, m4_logits, _ = cortex_m4._parse_results((path / "results.bin").read_bytes(), 4)
        host_predictions, host_logits = c.run_demo(path / "demo", pixels)
        # the same IEEE single-precision operations in the same order (-std=c99: no contraction into FMA)
        assert torch.equal(m4_predictions, host_predictions) and torch.equal(m4_logits, host_logits)


@needs_cc
def test_a_build_over_the_budget_is_refused_in_one_line_and_nothing_is_written(
        scnn_run: Path, tmp_path: Path, run_main) -> None:
    out = tmp_path / "m4"
    code, _, stderr = run_main("export", str(scnn_run), "--format", "c", "--target", "stm32l432", "-o", str(out))
    assert code == 2 and not out.exists() and stderr.count("\n") == 1
    assert re.fullmatch(r"error: the C build does not fit: RAM [\d,]+ B > 65,536 B \(stm32l432\); nothing written\n",
                        stderr), stderr
    code, _, stderr = run_main("export", str(scnn_run), "--format", "c", "--flash", "8K", "--no-verify", "-o", str(out))
    assert code == 2 and not out.exists() and re.search(r"flash [\d,]+ B > 8,192 B \(--flash/--ram\)", stderr)
    for bad in (["--flash", "lots"], ["--ram", "0"], ["--target", "esp32"]):
        code, _, stderr = run_main("export", str(scnn_run), "--format", "c", *bad, "-o", str(out))
        assert code == 2 and bad[0] in stderr and stderr.count("\n") == 1, stderr


def test_without_the_arm_toolchain_a_cortex_m4_export_says_so_and_fits_by_the_generators_bytes(
        scnn_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cortex_m4, "find_toolchain", lambda: "arm-none-eabi-gcc not found (Debian: ...)")
    path, report = c.export_c(scnn_run, tmp_path / "m4", target="cortex-m4", run_verify=False)
    assert report["cortex_m4_skipped"].startswith("arm-none-eabi-gcc not found")
    assert report["fit"]["flash_bytes"] == report["flash_bytes"] and "code and stack not counted" in \
        report["fit"]["measured"]
    assert {"ndsnn_m4_startup.c", "ndsnn_m4_main.c", "ndsnn_m4.h", "ndsnn_m4.ld"} <= {p.name for p in path.iterdir()}
    assert "firmware.elf:" in (path / "Makefile").read_text()
