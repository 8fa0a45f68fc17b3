"""The optimizer step of a sparse model: torch's SGD on every weight + the masks re-applied, against SGD
on the active weights only (`sparse.active_sgd`, what the trainer runs), per model and density.

    python -m benchmarks.optimizer_step [--models vgg16,resnet19] [--threads 2]

Random masks at one density for every conv/linear weight, gradients non-zero at the active positions
only (as the sparse kernels leave them), SGD with momentum 0.9 and weight decay; both sides alternate
round by round, median of each. "GB/s" is the dense side's compulsory traffic (weight, gradient and
momentum read, weight and momentum written, then weight and momentum read and written with the 1-byte
mask) over its time: what carries to another host.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ndsnn_cli.snn.models import create_model
from ndsnn_cli.sparse.active_sgd import MAX_DENSITY, ActiveWeightSGD
from ndsnn_cli.sparse.masks import Masks, random_mask, sparse_parameter_names

DENSITIES = (0.01, 0.05, 0.10, 0.25, 0.50)
DENSE_BYTES_PER_WEIGHT = 5 * 4 + 4 * 4 + 2  # SGD: 3 reads + 2 writes; re-apply: 2 reads + 2 writes + mask twice


def _setup(arch: str, density: float):  # noqa: ANN202
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_channels=3, image_size=32).to(memory_format=torch.channels_last)
    params = dict(model.named_parameters())
    weights = {n: params[n] for n in sparse_parameter_names(model)}
    generator = torch.Generator().manual_seed(0)
    masks = Masks(weights, {n: random_mask(w.shape, max(1, round(density * w.numel())), generator)
                            for n, w in weights.items()})
    masks.apply()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    for name, w in weights.items():
        w.grad.mul_(masks.masks[name])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    optimizer.step()  # momentum buffers exist from here on, as in a run
    masks.apply(optimizer)
    return model, masks, optimizer, sum(w.numel() for w in weights.values())


def measure(arch: str, density: float, rounds: int) -> tuple[float, float, int]:
    """(dense s, active s, sparse weights) medians."""
    model, masks, optimizer, numel = _setup(arch, density)
    stepper = ActiveWeightSGD(optimizer, masks.params, masks.masks, max_density=1.0)

    def dense() -> None:
        optimizer.step()
        masks.apply(optimizer)

    def active() -> None:
        masks.apply(optimizer, skip=stepper.step())

    times: dict[str, list[float]] = {"dense": [], "active": []}
    for index in range(rounds + 1):
        for side, run in (("dense", dense), ("active", active)):
            started = time.perf_counter()
            run()
            if index:
                times[side].append(time.perf_counter() - started)
    return statistics.median(times["dense"]), statistics.median(times["active"]), numel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg16,resnet19")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; the trainer takes the active step at density <= "
          f"{MAX_DENSITY}")
    print("model      density   dense ms  (GB/s)  active ms   active/dense")
    for arch in args.models.split(","):
        for density in DENSITIES:
            dense_s, active_s, numel = measure(arch, density, args.rounds)
            rate = numel * DENSE_BYTES_PER_WEIGHT / dense_s / 1e9
            print(f"{arch:9s}  {density:7.2f}  {dense_s * 1e3:9.2f}  ({rate:4.1f})  {active_s * 1e3:9.2f}   "
                  f"{active_s / dense_s:8.3f}x")


if __name__ == "__main__":
    main()
