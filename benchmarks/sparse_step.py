"""Sparse kernels vs the masked-dense path: per-layer and whole-step ratios measured in one run.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python -m benchmarks.sparse_step [--quick]

Per layer: one training pass (forward + input and weight gradients) of each VGG-16 conv shape on a
batch of T*B = 160 spike maps (15% ones, marked as spikes as the trainer's fused path does), at
densities 0.10 / 0.05 / 0.01, the layer's own dense forward (oneDNN, channels-last) against the
"numba" kernel on the same weights. Whole step: VGG-16 at 0.99 (ERK masks), forward + backward + SGD +
mask re-apply, dense and sparse steps alternating in one process (median per-pair ratio; the machine's
speed drifts). Also the layout rebuild time of one mask update. Needs numba (`pip install '.[kernels]'`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

SHAPES = [(64, 64, 32), (64, 128, 16), (128, 128, 16), (128, 256, 8), (256, 256, 8), (256, 512, 4),
          (512, 512, 4), (512, 512, 2)]  # (c_in, c_out, input size) of VGG-16's convs at CIFAR-10
QUICK_SHAPES = [(64, 64, 32), (256, 256, 8), (512, 512, 4)]
DENSITIES = (0.10, 0.05, 0.01)
SPIKE_RATE = 0.15


def _pass(conv: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor) -> float:
    from ndsnn_cli.snn.neuron import mark_spikes, saving_spikes_as_bool

    x = x.detach().requires_grad_(True)
    started = time.perf_counter()
    with saving_spikes_as_bool():
        out = conv(mark_spikes(x))
    out.backward(grad)
    return time.perf_counter() - started


def layer_ratios(shapes: list[tuple[int, int, int]], batch: int, repeats: int) -> None:
    from ndsnn_cli.kernels.execution import SparseExecution
    from ndsnn_cli.sparse.masks import Masks

    print(f"per layer, fwd + both grads, batch {batch}, spike rate {SPIKE_RATE}: sparse/dense time")
    print("  shape              " + "  ".join(f"d={d:.2f}" for d in DENSITIES))
    for c_in, c_out, size in shapes:
        row = []
        for density in DENSITIES:
            conv = nn.Conv2d(c_in, c_out, 3, padding=1).to(memory_format=torch.channels_last)
            mask = torch.rand(conv.weight.shape) < density
            with torch.no_grad():
                conv.weight.mul_(mask)
            x = (torch.rand(batch, c_in, size, size) < SPIKE_RATE).float().contiguous(memory_format=torch.channels_last)
            grad = torch.randn(batch, c_out, size, size).contiguous(memory_format=torch.channels_last)
            execution = SparseExecution(conv, Masks({"weight": conv.weight}, {"weight": mask}), "on", "cpu")
            execution.available = ("numba",)
            execution.rebuild()
            dense_layer = execution.layers["weight"]
            kernel, layout = dense_layer.kernel, dense_layer.layout
            pairs = []
            for _ in range(repeats + 1):  # the first pair warms up (JIT cache load, allocator)
                dense_layer.kernel = None
                dense = _pass(conv, x, grad)
                dense_layer.kernel, dense_layer.layout = kernel, layout
                pairs.append(_pass(conv, x, grad) / dense)
            row.append(statistics.median(pairs[1:]))
        print(f"  {c_in:>3}->{c_out:<3} @{size:>2}x{size:<2}     " + "    ".join(f"{r:5.2f}x" for r in row))


def step_ratio(batch: int, timesteps: int, steps: int, sparsity: float) -> float:
    from ndsnn_cli.kernels.execution import SparseExecution
    from ndsnn_cli.snn.models import NeuronConfig, create_model
    from ndsnn_cli.sparse.masks import Masks, layer_counts, random_mask, sparse_parameter_names
    from ndsnn_cli.train import spiking_loss

    torch.manual_seed(0)
    model = create_model("vgg16", num_classes=10, in_channels=3, image_size=32, neuron=NeuronConfig(timesteps))
    model = model.to(memory_format=torch.channels_last).train()
    params = dict(model.named_parameters())
    weights = {n: params[n] for n in sparse_parameter_names(model)}
    counts = layer_counts(weights, 1 - sparsity, "erk")
    generator = torch.Generator().manual_seed(0)
    masks = Masks(weights, {n: random_mask(w.shape, counts[n], generator) for n, w in weights.items()})
    masks.apply()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    images, labels = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    execution = SparseExecution(model, masks, "auto", "cpu")
    started = time.perf_counter()
    kernels = execution.rebuild()
    rebuild_s = time.perf_counter() - started
    sparse_layers = [n for n, k in kernels.items() if k != "dense"]

    def one_step(mode: str) -> float:
        execution.mode = mode
        execution.rebuild()
        begin = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)
        spiking_loss(model(images), labels).backward()
        optimizer.step()
        masks.apply(optimizer)
        return time.perf_counter() - begin

    pairs, dense_s, sparse_s = [], [], []
    for index in range(steps + 1):
        dense, sparse = one_step("off"), one_step("auto")
        if index:  # the first pair warms up
            pairs.append(sparse / dense)
            dense_s.append(dense)
            sparse_s.append(sparse)
    print(f"vgg16 step at {sparsity}: {len(sparse_layers)}/{len(kernels)} layers sparse; dense "
          f"{statistics.median(dense_s):.3f} s, sparse {statistics.median(sparse_s):.3f} s (median of {steps}); "
          f"layout rebuild of one mask update {rebuild_s * 1e3:.1f} ms")
    return statistics.median(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 layer shapes, 1 repeat, 2 steps (< 60 s)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--timesteps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layer_ratios(QUICK_SHAPES if args.quick else SHAPES, args.batch * args.timesteps, 1 if args.quick else 3)
    ratio = step_ratio(args.batch, args.timesteps, 2 if args.quick else args.steps, 0.99)
    print(f"sparse/dense step at 0.99: {ratio:.2f}x (vgg16)")


if __name__ == "__main__":
    main()
