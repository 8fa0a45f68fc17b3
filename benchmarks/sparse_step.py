"""Sparse kernels vs the masked-dense path: per-layer and whole-step ratios measured in one run.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python -m benchmarks.sparse_step [--quick]

Per layer: one training pass (forward + input and weight gradients) of each VGG-16 conv shape on a
batch of T*B = 160 spike maps (15% ones, marked as spikes as the trainer's fused path does), at
densities 0.30 ... 0.01, the layer's own dense forward (oneDNN, channels-last) against the "numba"
kernel on the same weights, layout transposes in and out included. Whole step: VGG-16 and ResNet-19 at
0.99 (ERK masks), forward + backward + the optimizer step (dense: SGD; sparse: the trainer's SGD on the
active weights, `sparse.active_sgd`, and the other masks re-applied), dense and sparse steps alternating in one
process (median per-pair ratio; the machine's speed drifts); the layout rebuild of one mask update;
and each side's peak RSS over 3 steps in a child process of its own. `--quick`: 3 shapes, VGG-16 only,
no memory. The full run also writes its tables into benchmarks/README.md (between the
`sparse_step` markers). Needs numba (`pip install '.[kernels]'`).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import torch
from torch import nn

from ndsnn_cli.sparse.active_sgd import ActiveWeightSGD

SHAPES = [(64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8), (256, 256, 8), (256, 512, 4),
          (512, 512, 4), (512, 512, 2)]  # (c_in, c_out, input size) of VGG-16's convs at CIFAR-10
QUICK_SHAPES = [(64, 64, 32), (256, 256, 8), (512, 512, 4)]
DENSITIES = (0.30, 0.20, 0.10, 0.05, 0.01)
QUICK_DENSITIES = (0.10, 0.05, 0.01)
README = Path(__file__).with_name("README.md")
MARKERS = ("<!-- sparse_step:begin -->", "<!-- sparse_step:end -->")
SPIKE_RATE = 0.15
MODEL_INPUT = {"scnn": (1, 28), "mlp": (1, 28)}  # (channels, size) of the quickstart's Fashion-MNIST; else CIFAR


def _pass(conv: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor) -> float:
    from ndsnn_cli.snn.neuron import mark_spikes, saving_spikes_as_bool

    x = x.detach().requires_grad_(True)
    started = time.perf_counter()
    with saving_spikes_as_bool():
        out = conv(mark_spikes(x))
    out.backward(grad)
    return time.perf_counter() - started


def pass_work(c_in: int, c_out: int, size: int, batch: int, density: float) -> dict[str, float]:
    """The work of one training pass of a 3x3 / stride-1 conv, as host-independent numbers: FLOPs (multiply-
    adds x 2, forward + input gradient + weight gradient; the kernel's are the active weights' only) and the
    compulsory bytes each path must move (every operand read once, every result written once). Dense:
    fp32 activations, weights and gradients. Kernel: the 0/1 input as 1 byte, the active weights as value +
    int32 index, fp32 gradients, and the layout transposes around it (x to 1 byte, grad_out in, out and
    grad_in back: read + write each)."""
    x, y, w = batch * c_in * size * size, batch * c_out * size * size, c_out * c_in * 9
    dense_flops = 3 * 2 * y * c_in * 9
    nnz = density * w
    return {"dense_flops": dense_flops, "sparse_flops": density * dense_flops,
            "dense_bytes": 4 * 3 * (x + y + w),
            "sparse_bytes": (x * 1 + nnz * 8 + y * 4) + (y * 4 + nnz * 8 + x * 4) + (x * 1 + y * 4 + nnz * 4)
                            + (x * 5 + y * 8 + y * 8 + x * 8)}


def layer_ratios(shapes: list[tuple[int, int, int]], densities: tuple[float, ...], batch: int, repeats: int) -> None:
    from ndsnn_cli.kernels.execution import SparseExecution
    from ndsnn_cli.sparse.masks import Masks

    print(f"per layer, fwd + both grads, batch {batch}, spike rate {SPIKE_RATE}: sparse/dense time")
    print("  shape              " + "  ".join(f"d={d:.2f}" for d in densities))
    rates = []
    for c_in, c_out, size in shapes:
        row, dense_times, sparse_times = [], [], []
        for density in densities:
            conv = nn.Conv2d(c_in, c_out, 3, padding=1).to(memory_format=torch.channels_last)
            mask = torch.rand(conv.weight.shape) < density
            with torch.no_grad():
                conv.weight.mul_(mask)
            x = (torch.rand(batch, c_in, size, size) < SPIKE_RATE).float().contiguous(memory_format=torch.channels_last)
            grad = torch.randn(batch, c_out, size, size).contiguous(memory_format=torch.channels_last)
            with SparseExecution(conv, Masks({"weight": conv.weight}, {"weight": mask}), "on", "cpu") as execution:
                execution.available = ("numba",)
                execution.rebuild()
                dense_layer = execution.layers["weight"]
                kernel, layout = dense_layer.kernel, dense_layer.layout
                pairs, times = [], []
                for _ in range(repeats + 1):  # the first pair warms up (JIT cache load, allocator)
                    dense_layer.kernel = None
                    dense = _pass(conv, x, grad)
                    dense_layer.kernel, dense_layer.layout = kernel, layout
                    sparse = _pass(conv, x, grad)
                    pairs.append(sparse / dense)
                    times.append((dense, sparse))
            row.append(statistics.median(pairs[1:]))
            dense_times.append(statistics.median(t[0] for t in times[1:]))
            sparse_times.append(statistics.median(t[1] for t in times[1:]))
        print(f"  {c_in:>3}->{c_out:<3} @{size:>2}x{size:<2}     " + "    ".join(f"{r:5.2f}x" for r in row))
        rates.append(((c_in, c_out, size), dense_times, sparse_times))
    print_rates(rates, densities, batch)


def print_rates(rates: list, densities: tuple[float, ...], batch: int) -> None:
    """What carries across hosts: each path's achieved GFLOP/s (useful FLOPs / its time) and its compulsory
    bytes (`pass_work`) over its time, dense (median over the densities' runs) and the kernel per density."""
    print("  achieved, per pass: dense GFLOP/s GB/s (MB) | kernel GFLOP/s GB/s (MB) at each density")
    for (c_in, c_out, size), dense_times, sparse_times in rates:
        dense_s = statistics.median(dense_times)
        work = pass_work(c_in, c_out, size, batch, densities[0])
        cells = []
        for density, sparse_s in zip(densities, sparse_times, strict=True):
            flops, moved = (pass_work(c_in, c_out, size, batch, density)[k] for k in ("sparse_flops", "sparse_bytes"))
            cells.append(f"{flops / sparse_s / 1e9:5.1f} {moved / sparse_s / 1e9:4.1f} ({moved / 1e6:3.0f})")
        print(f"  {c_in:>3}->{c_out:<3} @{size:>2}x{size:<2}  {work['dense_flops'] / dense_s / 1e9:5.1f} "
              f"{work['dense_bytes'] / dense_s / 1e9:4.1f} ({work['dense_bytes'] / 1e6:3.0f}) | " + "  ".join(cells))


def _step_setup(arch: str, batch: int, timesteps: int, sparsity: float):  # noqa: ANN202
    """A channels-last model at `sparsity` (random ERK masks), its optimizer, a batch, and the kernel plan."""
    from ndsnn_cli.kernels.execution import SparseExecution
    from ndsnn_cli.snn.models import NeuronConfig, create_model
    from ndsnn_cli.sparse.masks import Masks, layer_counts, random_mask, sparse_parameter_names

    torch.manual_seed(0)
    channels, size = MODEL_INPUT.get(arch, (3, 32))
    model = create_model(arch, num_classes=10, in_channels=channels, image_size=size, neuron=NeuronConfig(timesteps))
    model = model.to(memory_format=torch.channels_last).train()
    params = dict(model.named_parameters())
    weights = {n: params[n] for n in sparse_parameter_names(model)}
    counts = layer_counts(weights, 1 - sparsity, "erk")
    generator = torch.Generator().manual_seed(0)
    masks = Masks(weights, {n: random_mask(w.shape, counts[n], generator) for n, w in weights.items()})
    masks.apply()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    images, labels = torch.rand(batch, channels, size, size), torch.randint(0, 10, (batch,))
    execution = SparseExecution(model, masks, "auto", "cpu").__enter__()  # installed for the process's lifetime
    return model, masks, optimizer, images, labels, execution


STEP_SIDES = ("dense", "per-layer", "batch-last")  # masked dense; the kernels, transposed per layer; kept batch-last


def step_ratio(arch: str, batch: int, timesteps: int, steps: int, sparsity: float) -> dict[str, float]:
    """Median per-triple ratios sparse/dense of a training step, for both activation layouts."""
    from ndsnn_cli.evaluation import spiking_loss

    model, masks, optimizer, images, labels, execution = _step_setup(arch, batch, timesteps, sparsity)
    started = time.perf_counter()
    kernels = execution.rebuild()
    rebuild_s = time.perf_counter() - started
    sparse_layers = [n for n, k in kernels.items() if k != "dense"]

    stepper = ActiveWeightSGD(optimizer, masks.params, masks.masks)

    def one_step(side: str) -> float:
        execution.remove()
        execution.mode, execution.layout = ("off", "per-layer") if side == "dense" else ("auto", side)
        execution.__enter__()
        execution.rebuild()
        begin = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)
        spiking_loss(model(images), labels).backward()
        if side == "dense":  # a dense run's optimizer step (no masks to re-apply) ...
            optimizer.step()
        else:  # the trainer's: SGD on the active weights, the other layers' masks re-applied
            masks.apply(optimizer, skip=stepper.step())
        seconds = time.perf_counter() - begin
        if side == "dense":  # ... and the masks re-applied untimed, so the sparse sides start from zeros outside
            masks.apply(optimizer)
        return seconds

    seconds: dict[str, list[float]] = {side: [] for side in STEP_SIDES}
    ratios: dict[str, list[float]] = {side: [] for side in STEP_SIDES[1:]}
    for index in range(steps + 1):
        triple = {side: one_step(side) for side in STEP_SIDES}
        if index:  # the first triple warms up
            for side in STEP_SIDES:
                seconds[side].append(triple[side])
            for side in ratios:
                ratios[side].append(triple[side] / triple["dense"])
    median = {side: statistics.median(values) for side, values in seconds.items()}
    print(f"{arch} step at {sparsity}: {len(sparse_layers)}/{len(kernels)} layers sparse; dense "
          f"{median['dense']:.3f} s, sparse per-layer {median['per-layer']:.3f} s, batch-last "
          f"{median['batch-last']:.3f} s (median of {steps}); layout rebuild of one mask update "
          f"{rebuild_s * 1e3:.1f} ms")
    return {side: statistics.median(values) for side, values in ratios.items()}


def memory_side(arch: str, mode: str, batch: int, timesteps: int, sparsity: float) -> None:
    """Child process: 3 training steps on one side; prints the peak RSS (MiB) and the RSS before them."""
    from ndsnn_cli.evaluation import spiking_loss

    model, masks, optimizer, images, labels, execution = _step_setup(arch, batch, timesteps, sparsity)
    execution.mode = mode
    execution.rebuild()
    before = _peak_rss_mib()
    stepper = ActiveWeightSGD(optimizer, masks.params, masks.masks)
    for _ in range(3):
        optimizer.zero_grad(set_to_none=False)
        spiking_loss(model(images), labels).backward()
        if mode == "off":
            optimizer.step()
        else:
            masks.apply(optimizer, skip=stepper.step())
    print(f"{_peak_rss_mib():.0f} {before:.0f}")


def _peak_rss_mib() -> float:
    """This process's peak RSS: /proc's VmHWM (ru_maxrss would carry the parent's peak over fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(arch: str, args: argparse.Namespace) -> None:
    peaks = {}
    for mode in ("off", "auto"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.sparse_step", "--memory-side", mode, "--models", arch,
                              "--batch", str(args.batch), "--timesteps", str(args.timesteps),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True,
                             env={**os.environ, "MALLOC_MMAP_MAX_": os.environ.get("MALLOC_MMAP_MAX_", "0"),
                                  "MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_", "68719476736")})
        peaks[mode] = [float(v) for v in out.stdout.split()[-2:]]
    (dense, dense_before), (sparse, sparse_before) = peaks["off"], peaks["auto"]
    print(f"{arch} peak RSS over 3 steps at 0.99: dense {dense:.0f} MiB (before {dense_before:.0f}), sparse "
          f"{sparse:.0f} MiB (before {sparse_before:.0f}): {sparse / dense:.2f}x")


def write_readme(text: str) -> None:
    """Put the full run's output between the README's markers (atomically)."""
    from ndsnn_cli.atomic import write_text

    readme = README.read_text()
    begin, end = MARKERS
    block = f"{begin}\n```\n{text.rstrip()}\n```\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    readme = pattern.sub(lambda _: block, readme) if pattern.search(readme) else readme.rstrip() + "\n\n" + block + "\n"
    write_text(README, readme)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 layer shapes, 1 repeat, VGG-16, 2 steps (< 60 s)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--timesteps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--models", default="vgg16,resnet19")
    parser.add_argument("--step-only", action="store_true",
                        help="only the whole-step triples of --models (e.g. --models scnn --batch 128 --timesteps 4)")
    parser.add_argument("--memory-side", choices=("off", "auto"), help=argparse.SUPPRESS)  # peak_memory's child
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_side:
        memory_side(args.models, args.memory_side, args.batch, args.timesteps, 0.99)
        return
    if args.step_only:
        for arch in args.models.split(","):
            ratio = step_ratio(arch, args.batch, args.timesteps, args.steps, 0.99)
            print(f"sparse/dense step at 0.99 ({arch}): per-layer {ratio['per-layer']:.2f}x, "
                  f"batch-last {ratio['batch-last']:.2f}x")
        return
    if args.quick:
        layer_ratios(QUICK_SHAPES, QUICK_DENSITIES, args.batch * args.timesteps, 1)
        ratio = step_ratio("vgg16", args.batch, args.timesteps, 2, 0.99)
        print(f"sparse/dense step at 0.99 (vgg16): per-layer {ratio['per-layer']:.2f}x, "
              f"batch-last {ratio['batch-last']:.2f}x")
        return
    captured = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, text: str) -> int:
            sys.__stdout__.write(text)
            sys.__stdout__.flush()
            return captured.write(text)

    with redirect_stdout(Tee()):
        print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {args.threads} threads, "
              f"torch {torch.__version__}, batch {args.batch}, T {args.timesteps}")
        layer_ratios(SHAPES, DENSITIES, args.batch * args.timesteps, 3)
        ratios = {}
        for arch in args.models.split(","):
            ratios[arch] = step_ratio(arch, args.batch, args.timesteps, args.steps, 0.99)
            peak_memory(arch, args)
        for arch, ratio in ratios.items():
            print(f"sparse/dense step at 0.99 ({arch}): per-layer {ratio['per-layer']:.2f}x, "
                  f"batch-last {ratio['batch-last']:.2f}x")
    write_readme(captured.getvalue())


if __name__ == "__main__":
    main()
