"""Flash, RAM, latency and accuracy of the C target (`ndsnn export --format c`), sparse vs a dense build.

    python -m benchmarks.c_target --run runs/quick --accuracy          # a trained run (its recipe's data)
    python -m benchmarks.c_target --arch vgg16 --sparsity 0.99         # random masks, random pixels

For fp32 and int8, sparse and dense (`dense=True`: every weight position stored, same generator): the
generator's const-data and static-RAM bytes, `size` of the host objects ndsnn_model.o + ndsnn_kernels.o
(text + data = flash, bss = RAM; main.c is the host demo, not counted) and the host demo's per-image
latency (batch 1, one thread, -O2), beside the torch reference runtime (`ndsnn run`'s SparseNetwork) and
onnxruntime on the dense ONNX export (`ndsnn export --format onnx`), each batch 1 on one thread, timed in
turn for ROUNDS rounds (one pass over the images each; medians, and the median per-round ratio to the C
sparse fp32 build, so that a shared machine's load changes hit every side alike). Dense C
builds of large models are counted, not compiled (`--compile-dense` compiles them). `--accuracy` runs the
sparse fp32 and int8 C builds on the run's test set (its recipe's test_limit, the images its summary.json
accuracy was measured on; all 10,000 for the quickstart) and prints that accuracy beside them.

Cortex-M4 cross-compile (Debian `gcc-arm-none-eabi`): when `arm-none-eabi-gcc` is on PATH each compiled
build's objects are also built with

    arm-none-eabi-gcc -std=c99 -Wall -Wextra -Werror -pedantic -O2 -mcpu=cortex-m4 -mthumb \\
        -mfloat-abi=hard -mfpu=fpv4-sp-d16 -c ndsnn_model.c ndsnn_kernels.c && arm-none-eabi-size *.o

and their text + data (flash) and bss (RAM) are reported; without the toolchain the rows say so.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ndsnn_cli.export import c

ARM_CC, ARM_SIZE = "arm-none-eabi-gcc", "arm-none-eabi-size"
ARM_FLAGS = ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16")
NO_ARM = f"{ARM_CC} not on PATH (Debian: apt-get install gcc-arm-none-eabi): Cortex-M4 sizes skipped"


def object_sizes(directory: Path, compiler: str, size_tool: str, flags: tuple[str, ...] = ()) -> dict[str, int]:
    """text, data, bss of ndsnn_model.o + ndsnn_kernels.o (what a firmware links), from `size`;
    flash = text + data, ram = bss (+ data, copied to RAM at start-up; 0 here: every array is const)."""
    objects = []
    for name in ("ndsnn_model.c", "ndsnn_kernels.c"):
        obj = directory / name.replace(".c", ".o")
        subprocess.run([compiler, *c.CFLAGS, *flags, "-c", name, "-o", str(obj)], cwd=directory, check=True)
        objects.append(str(obj))
    lines = subprocess.run([size_tool, *objects], capture_output=True, text=True, check=True).stdout.splitlines()
    totals = {"text": 0, "data": 0, "bss": 0}
    for line in lines[1:]:
        text, data, bss = (int(v) for v in line.split()[:3])
        totals["text"] += text
        totals["data"] += data
        totals["bss"] += bss
    return {**totals, "flash": totals["text"] + totals["data"], "ram": totals["bss"] + totals["data"]}


ROUNDS = 7  # latency: rounds of one pass per contestant, in turn, so that load changes hit every side alike


def demo_pass(demo: Path, images_file: Path, count: int) -> Any:
    """One pass of the C demo over all images (one process, one image at a time): per-image ms."""
    def run() -> float:
        start = time.perf_counter()
        subprocess.run([str(demo), str(images_file)], check=True, capture_output=True)
        return (time.perf_counter() - start) / count * 1e3
    return run


def python_pass(run_one: Any, pixels: torch.Tensor) -> Any:
    """One pass over the images, one image per call (batch 1): per-image ms (after one warm-up call)."""
    run_one(pixels[:1])

    def run() -> float:
        start = time.perf_counter()
        for i in range(len(pixels)):
            run_one(pixels[i:i + 1])
        return (time.perf_counter() - start) / len(pixels) * 1e3
    return run


def interleaved_latency(passes: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Median per-image ms of each contestant over ROUNDS rounds (one pass each per round, in turn), and the
    median over rounds of every contestant's time relative to the first one's (the machine is shared)."""
    times: dict[str, list[float]] = {name: [] for name in passes}
    torch.set_num_threads(1)
    with torch.no_grad():
        for _ in range(ROUNDS):
            for name, run in passes.items():
                times[name].append(run())
    first = next(iter(times.values()))
    return {name: {"latency_ms": statistics.median(t),
                   "range_ms": [min(t), max(t)],
                   f"median_ratio_to_{next(iter(times))}": statistics.median(a / b for a, b in zip(t, first,
                                                                                                  strict=True))}
            for name, t in times.items()}


def onnx_session(checkpoint: Path, workdir: Path) -> Any:
    """onnxruntime (CPU, one intra- and one inter-op thread, sequential) on the dense ONNX export, or None."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    from ndsnn_cli.export.onnx import export_onnx

    path, _ = export_onnx(checkpoint, workdir / "model.onnx", run_verify=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def spike_rates(model: Any, pixels: torch.Tensor, contract: dict[str, Any]) -> list[float]:
    """Mean spike rate of each LIF layer on the timed images: the C spike-fed layers' work scales with it
    (an untrained model whose layers never fire would time as trivially fast)."""
    from ndsnn_cli.evaluation import spike_rates as lif_rates

    return [round(rate, 4) for rate in lif_rates(model, c.normalise(pixels, contract)).values()]


def c_accuracy(demo: Path, images: torch.Tensor, labels: torch.Tensor) -> float:
    predictions = torch.cat([c.run_demo(demo, images[i:i + 2000])[0] for i in range(0, len(images), 2000)])
    return float((predictions == labels).float().mean())


def measure(checkpoint: Path, pixels: torch.Tensor, compile_dense: bool, workdir: Path,
            test: tuple[torch.Tensor, torch.Tensor] | None) -> list[dict[str, Any]]:
    from ndsnn_cli.data import dataset_info, input_contract
    from ndsnn_cli.export.fold import fold_batchnorm, load_trained

    trained = load_trained(checkpoint)
    model, masks, recipe = fold_batchnorm(trained.model), trained.masks, trained.recipe
    contract, info = input_contract(recipe.data.dataset), dataset_info(recipe.data.dataset)
    timesteps = recipe.model.timesteps
    compiler = c.find_compiler()
    arm = shutil.which(ARM_CC) is not None and shutil.which(ARM_SIZE) is not None
    if not arm:
        print(NO_ARM, flush=True)
    weights = sum(int(p.numel()) for name, p in model.named_parameters() if name.endswith("weight") and p.dim() > 1)
    rows: list[dict[str, Any]] = [
        {"build": "spike rates per LIF layer on the timed images", "rates": spike_rates(model, pixels, contract)},
        {"build": "dense fp32 weight arrays alone (4 B per conv/linear weight, no indices)",
         "const_bytes": 4 * weights}]
    images_file = workdir / "images.f32"
    images_file.write_bytes(pixels.numpy().astype("<f4").tobytes())
    passes: dict[str, Any] = {}
    # (dense, dtype, column indices): the sparse builds as exported (gap-coded where smaller), the same with
    # plain int16/int32 columns (the layout before gap coding; sizes only), and the dense baseline
    builds = [(False, dtype, "auto") for dtype in ("fp32", "int8")] + \
        [(False, dtype, "plain") for dtype in ("fp32", "int8")] + [(True, dtype, "auto") for dtype in ("fp32", "int8")]
    for dense, dtype, indices in builds:
        sources = c.generate_sources(model, masks, contract=contract, timesteps=timesteps,
                                     num_classes=info.num_classes, dtype=dtype, dense=dense, indices=indices)
        name = f"C {'dense' if dense else 'sparse'} {dtype}" + (", plain column indices" if indices == "plain" else "")
        row: dict[str, Any] = {"build": name, "const_bytes": sources.flash_bytes,
                               "static_ram_bytes": sources.ram_bytes,
                               "index": sorted({layer["index"] for layer in sources.layers})}
        if compiler and (compile_dense or not dense):
            directory = workdir / name.replace(" ", "_").replace(",", "")
            demo = c.compile_demo(sources, directory, compiler)
            row["host_size"] = object_sizes(directory, compiler, "size")
            row["cortex_m4_size"] = (object_sizes(directory, ARM_CC, ARM_SIZE, ARM_FLAGS) if arm
                                     else "skipped: " + NO_ARM)
            if indices == "auto":
                passes[name] = demo_pass(demo, images_file, len(pixels))
            if test is not None and not dense and indices == "auto":
                row["test_accuracy"] = c_accuracy(demo, *test)
                row["test_images"] = len(test[1])
        print(json.dumps(row), flush=True)
        rows.append(row)
    net = c.reference_network(model, masks, timesteps, contract)
    passes["torch reference runtime (1 thread)"] = python_pass(net.predict, pixels)
    session = onnx_session(checkpoint, workdir)
    if session is not None:
        passes["onnxruntime, dense ONNX export (1 thread)"] = python_pass(
            lambda x: session.run(["logits"], {"images": x.numpy()}), pixels)
    for name, timing in interleaved_latency(passes).items():
        row = next((r for r in rows if r["build"] == name), None)
        if row is None:
            rows.append(row := {"build": name})
        row.update(timing)
        print(json.dumps({"build": name, **timing}), flush=True)
    summary = checkpoint.parent.parent / "summary.json"
    if test is not None and summary.is_file():
        rows.append({"build": "run summary.json (PyTorch, training's evaluation)",
                     "test_accuracy": json.loads(summary.read_text())["test_accuracy"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def random_checkpoint(arch: str, dataset: str, sparsity: float, timesteps: int, path: Path) -> Path:
    """An untrained registry model with uniform random masks (weights rescaled to their active fan-in),
    saved as an ndsnn checkpoint so that every exporter reads it as a trained run."""
    from ndsnn_cli.build import build_model
    from ndsnn_cli.checkpoint import save_checkpoint
    from ndsnn_cli.recipe import Recipe
    from ndsnn_cli.sparse.masks import scale_to_active_fan_in

    recipe = Recipe().replace(name=f"random-{arch}", model={"arch": arch, "timesteps": timesteps},
                              data={"dataset": dataset}, train={"device": "cpu"},
                              sparsity={"method": "static", "final": sparsity})
    torch.manual_seed(0)
    model = build_model(recipe).eval()
    generator = torch.Generator().manual_seed(0)
    masks = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                masks[name] = torch.rand(param.shape, generator=generator) >= sparsity
                param.mul_(masks[name])
                scale_to_active_fan_in(param, masks[name])
    return save_checkpoint(path, model=model, optimizer=None, extra_tensors={f"mask::{n}": m for n, m in masks.items()},
                           meta={"recipe": recipe.to_toml(), "epoch": 0, "step": 0})


def test_images(checkpoint: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The run's test set (its recipe's `test_limit`: what summary.json's accuracy was measured on) as
    [0, 1] pixels with labels, or None when the data set is not here."""
    from ndsnn_cli.data.loading import raw_test_set
    from ndsnn_cli.errors import UserError
    from ndsnn_cli.export.fold import load_trained

    recipe = load_trained(checkpoint).recipe
    try:
        test = raw_test_set(recipe.replace(data={"train_limit": 1}).data)
    except UserError:
        return None
    pairs = [test[i] for i in range(len(test))]
    return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a trained run directory or checkpoint")
    parser.add_argument("--arch", default="scnn")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--sparsity", type=float, default=0.99)
    parser.add_argument("--timesteps", type=int, default=5)
    parser.add_argument("--images", type=int, default=50, help="images timed per build (batch 1 each)")
    parser.add_argument("--accuracy", action="store_true", help="C builds on the run's test set (--run only)")
    parser.add_argument("--compile-dense", action="store_true")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    from ndsnn_cli.rundir import RUN_CHECKPOINT

    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            checkpoint = args.run / RUN_CHECKPOINT if args.run.is_dir() else args.run
        else:
            checkpoint = random_checkpoint(args.arch, args.dataset, args.sparsity, args.timesteps,
                                           Path(tmp) / "random.safetensors")
        test = test_images(checkpoint) if args.run else None
        if test is not None:  # real test images: the spike activity the latency depends on
            pixels = test[0][:args.images]
        else:
            from ndsnn_cli.data import input_contract
            from ndsnn_cli.export.fold import load_trained

            shape = input_contract(load_trained(checkpoint).recipe.data.dataset)["shape"]
            pixels = torch.rand(args.images, *shape, generator=torch.Generator().manual_seed(0))
        rows = measure(checkpoint, pixels, args.compile_dense, Path(tmp), test if args.accuracy else None)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
