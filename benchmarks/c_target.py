"""Flash, RAM and latency of the C target (`ndsnn export --format c`), sparse vs a dense build.

    python -m benchmarks.c_target --run runs/quick                 # a trained run (its recipe's data)
    python -m benchmarks.c_target --arch vgg16 --sparsity 0.99     # random masks, random pixels

For fp32 and int8, sparse and `--dense` (every weight position stored, same generator): the generator's
const-data and static-RAM bytes, `size` of the host objects (text + data, bss) and the host demo's
per-image latency (batch 1, one thread, -O2) beside the torch reference runtime (`ndsnn run`'s
SparseNetwork, one thread). Dense builds of large models are counted, not compiled (`--compile-dense`).

Cortex-M4 cross-compile (Debian `gcc-arm-none-eabi`, ~440 MB, not installed in CI): when
`arm-none-eabi-gcc` is on PATH the objects are also built with

    arm-none-eabi-gcc -std=c99 -Wall -Wextra -Werror -pedantic -O2 -mcpu=cortex-m4 -mthumb \\
        -mfloat-abi=hard -mfpu=fpv4-sp-d16 -c ndsnn_model.c ndsnn_kernels.c && arm-none-eabi-size *.o

and their `size` is reported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ndsnn_cli.export import c

ARM_FLAGS = ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16")


def object_sizes(directory: Path, compiler: str, size_tool: str, flags: tuple[str, ...] = ()) -> dict[str, int]:
    """text, data, bss of ndsnn_model.o + ndsnn_kernels.o (what a firmware links), from `size`."""
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
    return totals


def latency_ms(demo: Path, pixels: torch.Tensor) -> float:
    """Median per-image milliseconds of the demo over 3 runs of all images (process start included once)."""
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.f32"
        path.write_bytes(pixels.numpy().astype("<f4").tobytes())
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run([str(demo), str(path)], check=True, capture_output=True)
            times.append((time.perf_counter() - start) / len(pixels) * 1e3)
    return sorted(times)[1]


def reference_latency_ms(net: Any, pixels: torch.Tensor, contract: dict[str, Any]) -> float:
    torch.set_num_threads(1)
    images = c.normalise(pixels, contract)
    net.predict(images[:1])
    start = time.perf_counter()
    for i in range(len(images)):
        net.predict(images[i:i + 1])
    return (time.perf_counter() - start) / len(images) * 1e3


def measure(model: Any, masks: dict[str, torch.Tensor], contract: dict[str, Any], timesteps: int,
            num_classes: int, pixels: torch.Tensor, compile_dense: bool) -> list[dict[str, Any]]:
    compiler = c.find_compiler()
    net = c.reference_network(model, masks, timesteps)
    rows = [{"build": "torch reference runtime", "latency_ms": reference_latency_ms(net, pixels, contract)}]
    for dense in (False, True):
        for dtype in ("fp32", "int8"):
            sources = c.generate_sources(model, masks, contract=contract, timesteps=timesteps,
                                         num_classes=num_classes, dtype=dtype, dense=dense)
            row: dict[str, Any] = {"build": f"{'dense' if dense else 'sparse'} {dtype}",
                                   "const_bytes": sources.flash_bytes, "static_ram_bytes": sources.ram_bytes}
            if compiler and (compile_dense or not dense):
                with tempfile.TemporaryDirectory() as tmp:
                    demo = c.compile_demo(sources, Path(tmp), compiler)
                    row["host_size"] = object_sizes(Path(tmp), compiler, "size")
                    row["latency_ms"] = latency_ms(demo, pixels)
                    if shutil.which("arm-none-eabi-gcc"):
                        row["cortex_m4_size"] = object_sizes(Path(tmp), "arm-none-eabi-gcc", "arm-none-eabi-size",
                                                             ARM_FLAGS)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a trained run directory or checkpoint")
    parser.add_argument("--arch", default="scnn")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--sparsity", type=float, default=0.99)
    parser.add_argument("--timesteps", type=int, default=5)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--compile-dense", action="store_true")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    from ndsnn_cli.data import dataset_info, input_contract
    from ndsnn_cli.export.fold import fold_batchnorm, load_trained

    if args.run:
        trained = load_trained(args.run)
        model, masks = fold_batchnorm(trained.model), trained.masks
        args.dataset, args.timesteps = trained.recipe.data.dataset, trained.recipe.model.timesteps
    else:
        model, masks = _random_model(args.arch, args.dataset, args.sparsity, args.timesteps)
    info, contract = dataset_info(args.dataset), input_contract(args.dataset)
    pixels = torch.rand(args.images, *contract["shape"], generator=torch.Generator().manual_seed(0))
    rows = measure(model, masks, contract, args.timesteps, info.num_classes, pixels, args.compile_dense)
    for row in rows:
        print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


def _random_model(arch: str, dataset: str, sparsity: float, timesteps: int) -> tuple[Any, dict[str, torch.Tensor]]:
    """The registry model with uniform random masks (weights rescaled to their active fan-in), BN folded."""
    from ndsnn_cli.data import dataset_info
    from ndsnn_cli.export.fold import fold_batchnorm
    from ndsnn_cli.snn.models import NeuronConfig, create_model
    from ndsnn_cli.sparse.masks import scale_to_active_fan_in

    info = dataset_info(dataset)
    model = create_model(arch, num_classes=info.num_classes, in_channels=info.in_channels,
                         image_size=info.image_size, neuron=NeuronConfig(timesteps=timesteps)).eval()
    generator = torch.Generator().manual_seed(0)
    masks = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                masks[name] = torch.rand(param.shape, generator=generator) >= sparsity
                param.mul_(masks[name])
                scale_to_active_fan_in(param, masks[name])
    return fold_batchnorm(model), masks


if __name__ == "__main__":
    main()
