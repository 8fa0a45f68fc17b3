"""Flash, RAM, latency and accuracy of the C target (`ndsnn export --format c`), sparse vs a dense build, on
the host and on the emulated Cortex-M4.

    python -m benchmarks.c_target --run runs/quickstart --accuracy --m4     # a trained run (its recipe's data)
    python -m benchmarks.c_target --arch vgg16 --sparsity 0.99              # random masks, random pixels

For fp32 and int8, sparse and dense (`dense=True`: every weight position stored, same generator): the
generator's const-data and static-RAM bytes, `size` of the host objects ndsnn_model.o + ndsnn_kernels.o
(text + data = flash, bss = RAM) and, with `--m4`, the Cortex-M4 build (`cortex_m4.CortexM4`: the model
objects' `arm-none-eabi-size`, then the firmware under `qemu-system-arm -M mps2-an386 -icount shift=0` on
`--m4-images` images: instructions per inference, from the board's timer, and the stack the inference used;
the fit against every named part class). Dense builds over the emulated board's 4 MiB are counted, not run.

Host latency, batch 1, one thread, for the C sparse builds, the torch reference runtime (`ndsnn run`'s
SparseNetwork) and onnxruntime on the dense ONNX export (`ndsnn export --format onnx`): timed in turn for
ROUNDS rounds of one pass over the images each, as CPU time of the timed process (`clock()` in a timing
main linked with the model, `time.process_time()` around the Python calls) and wall time. CPU time is what
the ratio uses: on a shared machine another job's time slices inflate the wall clock of whichever
contestant they hit, not its CPU time. onnxruntime is called through its Python API (one `session.run`
per image); the same call on a one-op (Identity) model is timed beside it as the floor of that overhead.
`--accuracy` runs the sparse fp32 and int8 C builds on the run's test set (its recipe's test_limit).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ndsnn_cli.export import c
from ndsnn_cli.export.c import cortex_m4

ROUNDS = 7  # latency: rounds of one pass per contestant, in turn, so that load changes hit every side alike
TIMING_MAIN = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "ndsnn_model.h"

/* Benchmark timing main: ./timing IMAGES.f32 PASSES. One warm-up pass over the images, then PASSES passes,
 * each printed as CPU seconds per image (clock()). */
int main(int argc, char **argv)
{
    FILE *file;
    float *images;
    long count, i;
    int passes, pass, checksum = 0;
    if (argc != 3 || (file = fopen(argv[1], "rb")) == NULL) {
        return 2;
    }
    passes = atoi(argv[2]);
    fseek(file, 0, SEEK_END);
    count = ftell(file) / (long)(sizeof(float) * NDSNN_INPUT_SIZE);
    fseek(file, 0, SEEK_SET);
    images = malloc(sizeof(float) * NDSNN_INPUT_SIZE * (size_t)count);
    if (images == NULL || fread(images, sizeof(float) * NDSNN_INPUT_SIZE, (size_t)count, file) != (size_t)count) {
        return 1;
    }
    for (pass = -1; pass < passes; ++pass) {
        clock_t start = clock();
        for (i = 0; i < count; ++i) {
            checksum += ndsnn_model_run(images + i * NDSNN_INPUT_SIZE, NULL);
        }
        if (pass >= 0) {
            printf("%.9f\n", (double)(clock() - start) / CLOCKS_PER_SEC / (double)count);
        }
    }
    fprintf(stderr, "checksum %d\n", checksum);
    fclose(file);
    free(images);
    return 0;
}
"""


def object_sizes(directory: Path, compiler: str, size_tool: str) -> dict[str, int]:
    """text, data, bss of the host objects ndsnn_model.o + ndsnn_kernels.o, from `size`."""
    objects = []
    for name in cortex_m4.MODEL_SOURCES:
        obj = directory / name.replace(".c", ".o")
        subprocess.run([compiler, *c.CFLAGS, "-c", name, "-o", str(obj)], cwd=directory, check=True)
        objects.append(str(obj))
    lines = subprocess.run([size_tool, *objects], capture_output=True, text=True, check=True).stdout.splitlines()
    text, data, bss = (sum(int(line.split()[i]) for line in lines[1:]) for i in range(3))
    return {"text": text, "data": data, "bss": bss, "flash": text + data, "ram": bss + data}


def c_pass(directory: Path, compiler: str, images_file: Path, count: int) -> Any:
    """One pass of a timing main linked with the build (same CFLAGS): (CPU, wall) ms per image; the wall
    time is the process's (start, warm-up pass and timed pass) over two passes."""
    (directory / "timing_main.c").write_text(TIMING_MAIN)
    binary = directory / "timing"
    subprocess.run([compiler, *c.CFLAGS, "-o", str(binary), "timing_main.c", *cortex_m4.MODEL_SOURCES],
                   cwd=directory, check=True)

    def run() -> tuple[float, float]:
        start = time.perf_counter()
        done = subprocess.run([str(binary), str(images_file), "1"], capture_output=True, text=True, check=True)
        return float(done.stdout.split()[0]) * 1e3, (time.perf_counter() - start) / (2 * count) * 1e3
    return run


def python_pass(run_one: Any, pixels: torch.Tensor) -> Any:
    """One pass over the images, one image per call (batch 1): (CPU, wall) ms per image (after a warm-up)."""
    run_one(pixels[:1])

    def run() -> tuple[float, float]:
        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(len(pixels)):
            run_one(pixels[i:i + 1])
        return (time.process_time() - cpu) / len(pixels) * 1e3, (time.perf_counter() - wall) / len(pixels) * 1e3
    return run


def interleaved_latency(passes: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per contestant over ROUNDS rounds (one pass each per round, in turn): median and min CPU ms, median
    wall ms, and the median over rounds of the first contestant's CPU time relative to this one's
    (speed-up of the first: the C sparse fp32 build)."""
    cpu: dict[str, list[float]] = {name: [] for name in passes}
    wall: dict[str, list[float]] = {name: [] for name in passes}
    torch.set_num_threads(1)
    with torch.no_grad():
        for _ in range(ROUNDS):
            for name, run in passes.items():
                one_cpu, one_wall = run()
                cpu[name].append(one_cpu)
                wall[name].append(one_wall)
    first = next(iter(cpu))
    return {name: {"cpu_ms": statistics.median(t), "cpu_ms_min": min(t), "wall_ms": statistics.median(wall[name]),
                   f"{first} speed-up (median of per-round CPU ratios)":
                       statistics.median(b / a for a, b in zip(cpu[first], t, strict=True))}
            for name, t in cpu.items()}


def onnx_sessions(checkpoint: Path, workdir: Path) -> tuple[Any, Any] | None:
    """onnxruntime (CPU, one intra- and one inter-op thread, sequential) on the dense ONNX export, and on a
    one-op Identity model of the same input (the Python call's floor), or None without onnxruntime."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        return None
    from ndsnn_cli.export.onnx import export_onnx

    path, _ = export_onnx(checkpoint, workdir / "model.onnx", run_verify=False)
    model = onnx.load(str(path))
    images = model.graph.input[0]
    identity = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["images"], ["logits"])], "identity", [images],
        [onnx.helper.make_tensor_value_info("logits", images.type.tensor_type.elem_type, None)]),
        opset_imports=model.opset_import)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return tuple(ort.InferenceSession(m, options, providers=["CPUExecutionProvider"])  # type: ignore[return-value]
                 for m in (str(path), identity.SerializeToString()))


def multiply_accumulates(model: Any, masks: dict[str, torch.Tensor], shape: tuple[int, ...],
                         timesteps: int) -> dict[str, int]:
    """Weight x output-position products of one inference (the encoder once, the body T times): over the
    stored weights (what the C kernels compute, every position, branchless) and over all weights (what a
    dense runtime computes). Host-independent: divided by a time they give the rate each side achieved."""
    from ndsnn_cli.export import graph

    ops = graph.network_graph(model, shape)
    cut = next(i for i, op in enumerate(ops) if isinstance(op, graph.RepeatTimesteps))
    totals = {"stored_macs": 0, "dense_macs": 0}
    for index, op in enumerate(ops):
        for inner in graph.walk([op]):
            if isinstance(inner, graph.Conv2d | graph.Linear):
                positions = inner.out_shape[1] * inner.out_shape[2] if isinstance(inner, graph.Conv2d) else 1
                weight = dict(model.named_parameters())[inner.weight]
                steps = 1 if index < cut else timesteps
                stored = int(masks[inner.weight].sum()) if inner.weight in masks else weight.numel()
                totals["stored_macs"] += stored * positions * steps
                totals["dense_macs"] += weight.numel() * positions * steps
    return totals


def spike_rates(model: Any, pixels: torch.Tensor, contract: dict[str, Any]) -> list[float]:
    """Mean spike rate of each LIF layer on the timed images: the spike-fed layers' work depends on it."""
    from ndsnn_cli.evaluation import spike_rates as lif_rates

    return [round(rate, 4) for rate in lif_rates(model, c.normalise(pixels, contract)).values()]


def c_accuracy(demo: Path, images: torch.Tensor, labels: torch.Tensor) -> float:
    predictions = torch.cat([c.run_demo(demo, images[i:i + 2000])[0] for i in range(0, len(images), 2000)])
    return float((predictions == labels).float().mean())


def m4_row(sources: c.CSources, directory: Path, toolchain: cortex_m4.Toolchain,
           pixels: torch.Tensor) -> dict[str, Any]:
    """The Cortex-M4 build's model sizes, and (when it fits the emulated board) its cost under QEMU and fit."""
    firmware = cortex_m4.CortexM4(directory, toolchain) if sources.flash_bytes < cortex_m4.MIB * 3 else None
    if firmware is None:
        return {"skipped": "const data alone over the emulated board's 4 MiB"}
    out: dict[str, Any] = {"size": firmware.model_sizes()}
    if toolchain.qemu is not None and len(pixels):
        started = time.perf_counter()
        predictions, _, costs = firmware.run(pixels)
        out.update(costs, qemu_seconds=round(time.perf_counter() - started, 1), images=len(pixels))
        out["fit"] = cortex_m4.parts_fitting(out["size"]["flash"], out["size"]["ram"] + costs["stack_bytes"])
    return out


LIF_DIVISION = "float h = v[i] + (x[i] - v[i]) / tau;"


def lif_multiply(sources: c.CSources) -> c.CSources:
    """The same build with the LIF multiplying by 1/tau instead of dividing by tau (one rounding more, so
    not bit-equal to the training neuron): what the exact division costs."""
    kernels = sources.files["ndsnn_kernels.c"]
    assert LIF_DIVISION in kernels, "the LIF line this variant replaces has changed"
    kernels = kernels.replace(LIF_DIVISION, "float h = v[i] + (x[i] - v[i]) * tau; /* tau holds 1 / tau */")
    kernels = kernels.replace("    for (i = 0; i + LIF_BLOCK <= count; i += LIF_BLOCK) {",
                              "    tau = 1.0f / tau;\n    for (i = 0; i + LIF_BLOCK <= count; i += LIF_BLOCK) {")
    return dataclasses.replace(sources, files={**sources.files, "ndsnn_kernels.c": kernels})


def lif_multiply_row(sources: c.CSources, workdir: Path, compiler: str, images_file: Path, pixels: torch.Tensor,
                     reference: torch.Tensor, passes: dict[str, Any]) -> dict[str, Any]:
    """Time the multiply-by-1/tau LIF beside the exact one; how many predictions stay the reference's."""
    name = "C sparse fp32, LIF multiplying by 1/tau (not bit-equal)"
    directory = workdir / "lif_multiply"
    demo = c.compile_demo(lif_multiply(sources), directory, compiler)
    passes[name] = c_pass(directory, compiler, images_file, len(pixels))
    predictions = c.run_demo(demo, pixels)[0]
    return {"build": name, "same_predictions_as_reference": int((predictions == reference).sum()),
            "images": len(pixels)}


def build_rows(model: Any, masks: Any, recipe: Any, pixels: torch.Tensor, m4_pixels: torch.Tensor | None,
               compile_dense: bool, workdir: Path, test: tuple[torch.Tensor, torch.Tensor] | None,
               passes: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per build (sparse as exported, sparse with plain indices, dense; fp32 and int8)."""
    from ndsnn_cli.data import dataset_info, input_contract

    contract, info = input_contract(recipe.data.dataset), dataset_info(recipe.data.dataset)
    compiler = c.find_compiler()
    toolchain = cortex_m4.find_toolchain() if m4_pixels is not None else None
    if isinstance(toolchain, str):
        print(json.dumps({"cortex-m4": f"skipped: {toolchain}"}), flush=True)
        toolchain = None
    images_file = workdir / "images.f32"
    images_file.write_bytes(pixels.numpy().astype("<f4").tobytes())
    rows = []
    builds = [(False, dtype, "auto") for dtype in ("fp32", "int8")] + \
        [(False, dtype, "plain") for dtype in ("fp32", "int8")] + [(True, dtype, "auto") for dtype in ("fp32", "int8")]
    for dense, dtype, indices in builds:
        sources = cortex_m4.with_firmware(c.generate_sources(
            model, masks, contract=contract, timesteps=recipe.model.timesteps, num_classes=info.num_classes,
            dtype=dtype, dense=dense, indices=indices))
        name = f"C {'dense' if dense else 'sparse'} {dtype}" + (", plain column indices" if indices == "plain" else "")
        row: dict[str, Any] = {"build": name, "const_bytes": sources.flash_bytes,
                               "static_ram_bytes": sources.ram_bytes,
                               "index": sorted({layer["index"] for layer in sources.layers})}
        if compiler and (compile_dense or not dense):
            directory = workdir / name.replace(" ", "_").replace(",", "")
            demo = c.compile_demo(sources, directory, compiler)
            row["host_size"] = object_sizes(directory, compiler, "size")
            if toolchain is not None and indices == "auto":
                row["cortex_m4"] = m4_row(sources, directory, toolchain, m4_pixels)
            if indices == "auto" and not dense:
                passes[name] = c_pass(directory, compiler, images_file, len(pixels))
            if indices == "auto" and not dense and dtype == "fp32":
                reference = c.reference_network(model, masks, recipe.model.timesteps, contract).predict(pixels)
                rows.append(lif_multiply_row(sources, workdir, compiler, images_file, pixels, reference, passes))
            if test is not None and not dense and indices == "auto":
                row["test_accuracy"], row["test_images"] = c_accuracy(demo, *test), len(test[1])
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def load() -> dict[str, str]:
    """`uptime` and the busiest processes: the figures are read beside the load they were taken under."""
    top = subprocess.run(["ps", "-eo", "pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True).stdout
    return {"uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
            "top": " | ".join(line.strip() for line in top.splitlines()[1:6])}


def measure(checkpoint: Path, pixels: torch.Tensor, m4_pixels: torch.Tensor | None, compile_dense: bool,
            workdir: Path, test: tuple[torch.Tensor, torch.Tensor] | None) -> list[dict[str, Any]]:
    from ndsnn_cli.data import input_contract
    from ndsnn_cli.export.fold import fold_batchnorm, load_trained

    trained = load_trained(checkpoint)
    model, masks, recipe = fold_batchnorm(trained.model), trained.masks, trained.recipe
    contract = input_contract(recipe.data.dataset)
    weights = sum(int(p.numel()) for name, p in model.named_parameters() if name.endswith("weight") and p.dim() > 1)
    rows: list[dict[str, Any]] = [
        {"build": "load before", **load()},
        {"build": "spike rates per LIF layer on the timed images", "rates": spike_rates(model, pixels, contract)},
        {"build": "multiply-accumulates per inference",
         **multiply_accumulates(model, masks, tuple(contract["shape"]), recipe.model.timesteps)},
        {"build": "dense fp32 weight arrays alone (4 B per conv/linear weight, no indices)",
         "const_bytes": 4 * weights}]
    passes: dict[str, Any] = {}
    rows += build_rows(model, masks, recipe, pixels, m4_pixels, compile_dense, workdir, test, passes)
    net = c.reference_network(model, masks, recipe.model.timesteps, contract)
    passes["torch reference runtime (1 thread)"] = python_pass(net.predict, pixels)
    sessions = onnx_sessions(checkpoint, workdir)
    if sessions is not None:
        passes["onnxruntime, dense ONNX export (1 thread, Python API)"] = python_pass(
            lambda x: sessions[0].run(["logits"], {"images": x.numpy()}), pixels)
        passes["onnxruntime, one Identity op (the Python call's floor)"] = python_pass(
            lambda x: sessions[1].run(["logits"], {"images": x.numpy()}), pixels)
    for name, timing in interleaved_latency(passes).items():
        row = next((r for r in rows if r["build"] == name), None)
        if row is None:
            rows.append(row := {"build": name})
        row.update(timing)
        print(json.dumps({"build": name, **timing}), flush=True)
    summary = checkpoint.parent.parent / "summary.json"
    tail = [{"build": "run summary.json (PyTorch, training's evaluation)",
             "test_accuracy": json.loads(summary.read_text())["test_accuracy"]}] if summary.is_file() else []
    for row in [*tail, {"build": "load after", **load()}]:
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def random_checkpoint(arch: str, dataset: str, sparsity: float, timesteps: int, path: Path,
                      calibrate: torch.Tensor | None = None) -> Path:
    """An untrained registry model with uniform random masks (weights rescaled to their active fan-in),
    saved as an ndsnn checkpoint so that every exporter reads it as a trained run. `calibrate` (images):
    BatchNorm statistics measured on them and BN affine drawn (weight U(1, 2.5), bias U(0, 0.8)) so that
    every LIF layer fires, as the tests' random networks do; otherwise an untrained VGG-16 fires no spike at
    all and times as a silent network."""
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
        if calibrate is not None:
            calibrate_batchnorm(model, calibrate, generator)
    return save_checkpoint(path, model=model, optimizer=None, extra_tensors={f"mask::{n}": m for n, m in masks.items()},
                           meta={"recipe": recipe.to_toml(), "epoch": 0, "step": 0})


def calibrate_batchnorm(model: torch.nn.Module, images: torch.Tensor, generator: torch.Generator) -> None:
    """BN running statistics of `images` (a cumulative average over one batch), BN affine drawn so that the
    normalised pre-activations cross the LIF threshold at moderate rates."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
            module.momentum = None
            module.reset_running_stats()
            module.weight.uniform_(1.0, 2.5, generator=generator)
            module.bias.uniform_(0.0, 0.8, generator=generator)
    model.train()
    model(images)
    model.eval()


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
    parser.add_argument("--m4", action="store_true", help="Cortex-M4 sizes, and cost under QEMU")
    parser.add_argument("--m4-images", type=int, default=32, help="images run under QEMU per build")
    parser.add_argument("--calibrate-bn", action="store_true",
                        help="random masks: BN statistics and affine set so that every LIF layer fires")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    from ndsnn_cli.rundir import RUN_CHECKPOINT

    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            checkpoint = args.run / RUN_CHECKPOINT if args.run.is_dir() else args.run
        else:
            calibration = None
            if args.calibrate_bn:
                from ndsnn_cli.data import input_contract

                contract = input_contract(args.dataset)
                calibration = c.normalise(torch.rand(64, *contract["shape"], generator=torch.Generator()
                                                     .manual_seed(1)), contract)
            checkpoint = random_checkpoint(args.arch, args.dataset, args.sparsity, args.timesteps,
                                           Path(tmp) / "random.safetensors", calibration)
        test = test_images(checkpoint) if args.run else None
        if test is not None:  # real test images: the spike activity the latency depends on
            pixels = test[0][:args.images]
        else:
            from ndsnn_cli.data import input_contract
            from ndsnn_cli.export.fold import load_trained

            shape = input_contract(load_trained(checkpoint).recipe.data.dataset)["shape"]
            pixels = torch.rand(args.images, *shape, generator=torch.Generator().manual_seed(0))
        m4_pixels = (test[0] if test is not None else pixels)[:args.m4_images] if args.m4 else None
        rows = measure(checkpoint, pixels, m4_pixels, args.compile_dense, Path(tmp),
                       test if args.accuracy else None)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
