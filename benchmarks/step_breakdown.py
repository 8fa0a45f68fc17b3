"""Where one training step's time goes, by layer kind: dense against sparse (random ERK masks, kernels auto).

    python -m benchmarks.step_breakdown --arch scnn --image 1,28,28 --batch 128 --timesteps 4 --sparsity 0.99

torch.profiler over a few steps after a warm-up: forward time per leaf module (a `record_function` scope
opened and closed by the module's forward hooks, so a sparse layer's numba kernel counts in its layer),
backward time per autograd node (the engine's `evaluate_function` events), the optimizer step and the mask
re-application. Shares, not seconds, are what carry across hosts; the seconds are this host's (lscpu printed).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.autograd.profiler import record_function


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _setup(arch: str, image: tuple[int, int, int], batch: int, timesteps: int, sparsity: float):  # noqa: ANN202
    from ndsnn_cli.kernels.execution import SparseExecution
    from ndsnn_cli.snn.models import NeuronConfig, create_model
    from ndsnn_cli.sparse.masks import Masks, layer_counts, random_mask, sparse_parameter_names

    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_channels=image[0], image_size=image[1],
                         neuron=NeuronConfig(timesteps)).to(memory_format=torch.channels_last).train()
    params = dict(model.named_parameters())
    weights = {n: params[n] for n in sparse_parameter_names(model)}
    masks = None
    if sparsity > 0:
        counts = layer_counts(weights, 1 - sparsity, "erk")
        generator = torch.Generator().manual_seed(0)
        masks = Masks(weights, {n: random_mask(w.shape, counts[n], generator) for n, w in weights.items()})
        masks.apply()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    images, labels = torch.rand(batch, *image), torch.randint(0, 10, (batch,))
    execution = SparseExecution(model, masks, "auto" if masks else "off", "cpu") if masks else None
    return model, masks, optimizer, images, labels, execution


def _scoped(label: str, fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapper


def _scope_calls(model: nn.Module) -> list[Any]:
    """Profiler scopes around every leaf module's forward (named by its class) and around the neuron's entry
    points (LIF, BN + LIF fused, repeated-input LIF, spike max-pool), which the models call directly."""
    from ndsnn_cli.snn import models, neuron

    undo = []
    for owner, name, label in [(neuron.LIF, "forward", "forward LIF"),
                               (neuron.LIF, "after_batch_norm", "forward BatchNorm+LIF (fused)"),
                               (neuron.LIF, "repeated", "forward LIF (repeated input)"),
                               (models, "spike_max_pool2d", "forward MaxPool2d (spikes)")]:
        original = getattr(owner, name)
        setattr(owner, name, _scoped(label, original))
        undo.append(lambda owner=owner, name=name, original=original: setattr(owner, name, original))
    for module in model.modules():
        if any(True for _ in module.children()) or isinstance(module, neuron.LIF):
            continue
        original = module.forward
        module.forward = _scoped(f"forward {type(module).__name__}", original)
        undo.append(lambda module=module: delattr(module, "forward"))
    return undo


def breakdown(arch: str, image: tuple[int, int, int], batch: int, timesteps: int, sparsity: float,
              steps: int) -> tuple[dict[str, float], float, dict[str, str]]:
    """(ms per step by category, measured ms per step, the kernel of each sparse layer)."""
    from torch.profiler import ProfilerActivity, profile

    from ndsnn_cli.evaluation import spiking_loss

    model, masks, optimizer, images, labels, execution = _setup(arch, image, batch, timesteps, sparsity)
    kernels: dict[str, str] = {}
    if execution is not None:
        execution.__enter__()
        kernels = execution.rebuild()

    def step() -> None:
        optimizer.zero_grad(set_to_none=False)
        with record_function("loss"):
            loss = spiking_loss(model(images), labels)
        loss.backward()
        with record_function("optimizer.step"):
            optimizer.step()
        if masks is not None:
            with record_function("masks.apply"):
                masks.apply(optimizer)

    step()
    undo = _scope_calls(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        begin = time.perf_counter()
        for _ in range(steps):
            step()
        measured = (time.perf_counter() - begin) * 1e3 / steps
    for restore in undo:
        restore()
    if execution is not None:
        execution.__exit__(None, None, None)
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        key = event.key
        if key.startswith("forward ") or key in ("optimizer.step", "masks.apply"):
            totals[key] += event.cpu_time_total / 1e3 / steps
        elif key.startswith("autograd::engine::evaluate_function: "):
            totals["backward " + key.split(": ", 1)[1]] += event.cpu_time_total / 1e3 / steps
    return dict(totals), measured, kernels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="scnn")
    parser.add_argument("--image", default="1,28,28", help="C,H,W of the input (Fashion-MNIST: 1,28,28)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--timesteps", type=int, default=4)
    parser.add_argument("--sparsity", type=float, default=0.99)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=14)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    image = tuple(int(v) for v in args.image.split(","))
    assert len(image) == 3, "--image is C,H,W"
    dense, dense_ms, _ = breakdown(args.arch, image, args.batch, args.timesteps, 0.0, args.steps)
    sparse, sparse_ms, kernels = breakdown(args.arch, image, args.batch, args.timesteps, args.sparsity, args.steps)
    print(f"# {args.arch}, input {args.image}, batch {args.batch}, T = {args.timesteps}, {args.threads} thread(s), "
          f"{_cpu_name()}")
    print(f"step: dense {dense_ms:.1f} ms, sparse {args.sparsity:g} {sparse_ms:.1f} ms "
          f"({sparse_ms / dense_ms:.2f}x) under the profiler, mean of {args.steps}; kernels: "
          + ", ".join(f"{n}: {k}" for n, k in kernels.items()))
    print("\n| part (inclusive CPU ms per step) | dense | share | sparse | share |\n|---|---:|---:|---:|---:|")
    keys = sorted(set(dense) | set(sparse), key=lambda k: -max(dense.get(k, 0.0), sparse.get(k, 0.0)))
    for key in keys[:args.top]:
        d, s = dense.get(key, 0.0), sparse.get(key, 0.0)
        print(f"| {key} | {d:.1f} | {d / dense_ms:.0%} | {s:.1f} | {s / sparse_ms:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
