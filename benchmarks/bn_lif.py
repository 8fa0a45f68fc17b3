"""Fused BatchNorm + LIF in the batch-last layout against the dense path: forward + backward, ratios in one run.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python -m benchmarks.bn_lif [--quick]

Per VGG-16 / ResNet-19-like BN shape at T = 4, B = 32 (training mode, atan surrogate, no residual), one
forward + backward (a random upstream gradient) of four sides, alternating round by round:

- dense: `LIF.after_batch_norm` on a channels-last `[T*B, C, H, W]` map (`neuron._BatchNormLIF`, what
  the models run today);
- numba / torch: `kernels.bn_lif.batch_norm_lif` on the `[C, H, W, T*B]` map, the two implementations;
- sparse today: what a sparse layer pays now to use the dense BN + LIF: its batch-last output to
  channels-last, dense BN + LIF, the spikes back to batch-last (uint8, as `to_batch_last` writes them),
  and in backward the gradient in and out again (the `kernels` copies of `execution`).

Bytes: what each side must move at least, per element: BN + LIF reads x and writes the spikes (fp32) in
forward, reads x and dL/dS and writes dL/dx in backward: 20 B. The sparse side adds its four layout
copies (fp32 in 4 + out 4 for x, gradient in and out; the spikes 4 in + 1 out): 20 + 29 B. Two-pass
statistics and the recomputation of H in backward read x more often than that, so GB/s here is an
effective rate against that floor (the memory-bound budget), not the bus traffic.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

SHAPES = [(64, 32), (128, 16), (256, 8), (512, 4)]  # (channels, map size): VGG-16 / ResNet-19 at CIFAR-10
SIDES = ("dense", "numba", "torch", "sparse today")
BYTES_PER_ELEMENT = {"dense": 20, "numba": 20, "torch": 20, "sparse today": 20 + 29}


def _cpu_model() -> str:
    return next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), "unknown CPU")


def _sides(channels: int, size: int, timesteps: int, batch: int) -> dict[str, Callable[[], float]]:
    """One timed forward + backward per side, on the same data and equal BN modules."""
    from ndsnn_cli.kernels.bn_lif import batch_norm_lif
    from ndsnn_cli.kernels.execution import create_kernel, from_batch_last, to_batch_last
    from ndsnn_cli.snn.neuron import LIF

    lif = LIF(timesteps)
    kernel = create_kernel("numba")
    gen = torch.Generator().manual_seed(channels)
    n = timesteps * batch
    y_bl = torch.randn(channels, size, size, n, generator=gen) * 0.8 + 0.5       # a conv output, batch-last
    g_bl = torch.randn(channels, size, size, n, generator=gen)
    y_dense = y_bl.permute(3, 0, 1, 2).contiguous(memory_format=torch.channels_last)
    g_dense = g_bl.permute(3, 0, 1, 2).contiguous(memory_format=torch.channels_last)
    bns = {side: nn.BatchNorm2d(channels).train() for side in SIDES}

    def dense() -> float:
        x = y_dense.detach().requires_grad_()
        begin = time.perf_counter()
        lif.after_batch_norm(x, bns["dense"]).backward(g_dense)
        return time.perf_counter() - begin

    def fused(impl: str) -> Callable[[], float]:
        def run() -> float:
            x = y_bl.detach().requires_grad_()
            begin = time.perf_counter()
            batch_norm_lif(x, bns[impl], lif, impl=impl).backward(g_bl)
            return time.perf_counter() - begin
        return run

    def sparse_today() -> float:
        begin = time.perf_counter()
        x = from_batch_last(y_bl, torch.channels_last, kernel).requires_grad_()
        spikes = lif.after_batch_norm(x, bns["sparse today"])
        to_batch_last(spikes.detach(), kernel, spikes=True)                        # to the next sparse layer
        spikes.backward(from_batch_last(g_bl, torch.channels_last, kernel))        # its input gradient, in
        to_batch_last(x.grad, kernel, spikes=False)                                # this layer's, out
        return time.perf_counter() - begin

    return {"dense": dense, "numba": fused("numba"), "torch": fused("torch"), "sparse today": sparse_today}


def measure(channels: int, size: int, timesteps: int, batch: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Per side: (median seconds, median per-round ratio to dense), after one warm-up round."""
    sides = _sides(channels, size, timesteps, batch)
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    for index in range(rounds + 1):
        for side, run in sides.items():
            elapsed = run()
            if index:
                times[side].append(elapsed)
    return {side: (statistics.median(t), statistics.median(a / d for a, d in zip(t, times["dense"], strict=True)))
            for side, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 measured rounds per shape instead of 7 (~1 min)")
    parser.add_argument("--timesteps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("NUMBA_NUM_THREADS", str(args.threads))
    rounds = 3 if args.quick else 7
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"{time.strftime('%Y-%m-%d')}, {_cpu_model()}, {os.cpu_count()} cores, {args.threads} threads, "
          f"torch {torch.__version__}, T {args.timesteps}, B {args.batch}, median of {rounds} rounds; {load}")
    print("| shape | side | fwd+bwd ms | vs dense | MB moved (floor) | GB/s |")
    print("|---|---|---:|---:|---:|---:|")
    for channels, size in SHAPES:
        elements = channels * size * size * args.timesteps * args.batch
        for side, (seconds, ratio) in measure(channels, size, args.timesteps, args.batch, rounds).items():
            moved = BYTES_PER_ELEMENT[side] * elements
            print(f"| {channels}@{size}x{size} | {side} | {seconds * 1e3:.1f} | {ratio:.2f}x | {moved / 1e6:.0f} | "
                  f"{moved / seconds / 1e9:.1f} |")


if __name__ == "__main__":
    main()
