"""Training-step time and peak memory: ndsnn dense, ndsnn NDSNN (0.99), SpikingJelly, on one architecture.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python -m benchmarks.train_step \
        --models vgg16,resnet19 --batch 32 --timesteps 5 --steps 10 --threads 2

Each side runs in its own subprocess (so peak RSS is that side's alone) on the same weights, input
and SGD settings (from recipes/paper-<model>-cifar10.toml, fp32 on CPU). NDSNN uses the real
SparseMethod with dT = 100: every measured step re-applies the masks, and mask updates are timed
separately and amortised over dT. A separate child checks that ndsnn and SpikingJelly produce the
same spikes and loss on the same weights. Needs `pip install --no-deps spikingjelly==2.0.0` (README).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
SIDES = ("dense", "ndsnn", "sj")
UPDATE_EVERY_STEPS = 100
# The ramp ends at step 2 dT, so the two timed updates (steps dT and 2 dT) are real ramp updates
# (drop > grow), the second one landing on the final sparsity 0.99.
TIMED_UPDATES = 2
WARMUP_STEPS = 2
LOSS_TOLERANCE = 1e-5


def _recipe(model: str, batch: int, timesteps: int) -> Any:
    from ndsnn_cli.recipe import load_recipe

    path = REPO / "recipes" / f"paper-{model}-cifar10.toml"
    recipe = load_recipe(path if path.exists() else REPO / "recipes" / "paper-resnet19-cifar10.toml")
    return recipe.replace(model={"arch": model, "timesteps": timesteps, "lif_backend": "fused"},
                          data={"batch_size": batch}, train={"amp": False, "device": "cpu"},
                          sparsity={"update_every_steps": UPDATE_EVERY_STEPS,
                                    "ramp_end_epoch": TIMED_UPDATES * UPDATE_EVERY_STEPS / (50000 // batch)})


def _inputs(batch: int, seed: int = 0) -> tuple[Any, Any]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    return images, labels


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _models(model_name: str, batch: int, timesteps: int, side: str) -> tuple[Any, Any, Any]:
    """(model, recipe, reset): ndsnn's model, or its SpikingJelly twin with ndsnn's initial weights."""
    import torch

    from ndsnn_cli.build import build_training_model

    recipe = _recipe(model_name, batch, timesteps)
    torch.manual_seed(recipe.seed)
    model = build_training_model(recipe)
    if side != "sj":
        return model, recipe, None
    from benchmarks.sj_models import sj_twin

    twin = sj_twin(model)
    del model
    return twin, recipe, twin.reset_states


def run_side(model_name: str, side: str, batch: int, timesteps: int, steps: int, threads: int) -> dict[str, Any]:
    """Measure one side in this process: median step seconds, peak RSS, page faults per step."""
    import torch

    from ndsnn_cli.evaluation import spiking_loss
    from ndsnn_cli.sparse.methods import build_method
    from ndsnn_cli.trainer import build_optimizer

    torch.set_num_threads(threads)
    model, recipe, reset = _models(model_name, batch, timesteps, side)
    model.train()
    optimizer = build_optimizer(recipe, model)
    method = None
    if side == "ndsnn":
        method = build_method(recipe, steps_per_epoch=50000 // batch)
        method.setup(model)
    images, labels = _inputs(batch)
    rss_before = _rss_bytes()

    def step(index: int) -> float:
        optimizer.zero_grad(set_to_none=False)
        loss = spiking_loss(model(images), labels)
        loss.backward()
        optimizer.step()
        if reset is not None:
            reset()
        if method is not None:
            assert method.after_step(index, optimizer) is None  # not an update step: masks re-applied only
        return loss.item()

    for i in range(WARMUP_STEPS):
        step(i + 1)
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for i in range(steps):
        start = time.perf_counter()
        step(WARMUP_STEPS + i + 1)
        times.append(time.perf_counter() - start)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    result: dict[str, Any] = {"model": model_name, "side": side, "step_s": statistics.median(times),
                              "step_times_s": times, "faults_per_step": faults / steps,
                              "rss_before_bytes": rss_before,
                              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if method is not None:
        # Mask updates happen after the optimizer step of steps dT, 2dT, ...: time them on real gradients.
        update_times = []
        for k in range(1, TIMED_UPDATES + 1):
            step(WARMUP_STEPS + steps + k)  # fresh gradients (not an update step)
            start = time.perf_counter()
            update = method.after_step(k * UPDATE_EVERY_STEPS, optimizer)
            update_times.append(time.perf_counter() - start)
            assert update is not None
        result["update_s"] = statistics.median(update_times)
        result["amortised_step_s"] = result["step_s"] + result["update_s"] / UPDATE_EVERY_STEPS
        result["sparsity"] = method.masks.sparsity()
        result["final_sparsity"] = recipe.sparsity.final
    return result


def check_equivalence(model_name: str, batch: int, timesteps: int, threads: int) -> dict[str, Any]:
    """Same weights and input: every LIF layer's spikes identical, losses within LOSS_TOLERANCE."""
    import torch
    from spikingjelly.activation_based import neuron as sj_neuron

    from benchmarks.sj_models import record_spikes, sj_twin
    from ndsnn_cli.build import build_model
    from ndsnn_cli.evaluation import spiking_loss
    from ndsnn_cli.snn.neuron import LIF

    torch.set_num_threads(threads)
    recipe = _recipe(model_name, batch, timesteps)
    torch.manual_seed(recipe.seed)
    ours = build_model(recipe)
    theirs = sj_twin(ours)
    images, labels = _inputs(batch)

    our_spikes, their_spikes = record_spikes(ours, LIF), record_spikes(theirs, sj_neuron.LIFNode)
    our_loss = spiking_loss(ours(images), labels).item()
    their_loss = spiking_loss(theirs(images), labels).item()
    layers_equal = [bool(torch.equal(a, b)) for a, b in zip(our_spikes, their_spikes, strict=True)]
    spike_rate = float(torch.cat(our_spikes).mean())
    return {"model": model_name, "side": "equivalence", "lif_layers": len(layers_equal),
            "spikes_identical": all(layers_equal), "spike_rate": spike_rate, "loss_ndsnn": our_loss,
            "loss_sj": their_loss, "loss_abs_diff": abs(our_loss - their_loss),
            "ok": all(layers_equal) and abs(our_loss - their_loss) <= LOSS_TOLERANCE}


def paired_times(model_name: str, batch: int, timesteps: int, steps: int, threads: int) -> dict[str, Any]:
    """ndsnn dense and SpikingJelly in one process, steps alternating (order swapped every pair).

    On a shared machine whose speed drifts by 10% within minutes, the median of the per-pair ratios
    compares the two at the same moments; peak memory cannot be separated here (the sides do that).
    """
    import torch

    from ndsnn_cli.evaluation import spiking_loss
    from ndsnn_cli.trainer import build_optimizer

    torch.set_num_threads(threads)
    ours, recipe, _ = _models(model_name, batch, timesteps, "dense")
    theirs, _, reset = _models(model_name, batch, timesteps, "sj")
    models = {"ndsnn": ours, "sj": theirs}
    optimizers = {side: build_optimizer(recipe, model) for side, model in models.items()}
    images, labels = _inputs(batch)

    def step(side: str) -> float:
        model, optimizer = models[side], optimizers[side]
        model.train()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)
        spiking_loss(model(images), labels).backward()
        optimizer.step()
        if side == "sj":
            reset()
        return time.perf_counter() - start

    for _ in range(WARMUP_STEPS):
        step("ndsnn"), step("sj")
    times: dict[str, list[float]] = {"ndsnn": [], "sj": []}
    for i in range(steps):
        for side in ("ndsnn", "sj") if i % 2 == 0 else ("sj", "ndsnn"):
            times[side].append(step(side))
    ratios = [a / b for a, b in zip(times["ndsnn"], times["sj"], strict=True)]
    return {"model": model_name, "side": "paired", "ndsnn_step_s": statistics.median(times["ndsnn"]),
            "sj_step_s": statistics.median(times["sj"]), "median_pair_ratio": statistics.median(ratios),
            "ratios": ratios}


def conv_floor(model_name: str, batch: int, timesteps: int, steps: int, threads: int) -> dict[str, Any]:
    """The dense model's convolutions alone, forward and backward, on the inputs a real step gives them.

    Every conv sees a copy of its real input (the spikes, in the model's memory format, needing a gradient
    where the model's does) and a random output gradient; the median time of the whole set and its FLOPs
    (torch.utils.flop_counter) give the achieved GFLOP/s. Convolution is the part of a dense step that
    neither side can skip, so this time over SpikingJelly's step is the floor of the ndsnn/SJ ratio.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(threads)
    model, _, _ = _models(model_name, batch, timesteps, "dense")
    model.train()
    captured: list[tuple[torch.nn.Conv2d, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: captured.append((mod, args[0].detach().clone(
        memory_format=torch.preserve_format).requires_grad_(args[0].requires_grad))))
        for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    images, _ = _inputs(batch)
    model(images)
    for hook in hooks:
        hook.remove()
    generator = torch.Generator().manual_seed(0)
    work = []
    for conv, x in captured:
        weight = conv.weight.detach().clone().requires_grad_(True)
        out_shape = F.conv2d(x.detach(), weight.detach(), None, conv.stride, conv.padding).shape
        grad = torch.randn(out_shape, generator=generator).contiguous(
            memory_format=torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous() else torch.contiguous_format)
        work.append((conv, x, weight, grad))

    def run() -> float:
        start = time.perf_counter()
        for conv, x, weight, grad in work:
            F.conv2d(x, weight, None, conv.stride, conv.padding).backward(grad)
        return time.perf_counter() - start

    with FlopCounterMode(display=False) as counter:
        run()
    for _ in range(WARMUP_STEPS):
        run()
    seconds = statistics.median(run() for _ in range(steps))
    flops = counter.get_total_flops()
    return {"model": model_name, "side": "convs", "convs": len(work), "step_s": seconds, "flops": flops,
            "gflops_per_s": flops / seconds / 1e9}


def profile_side(model_name: str, side: str, batch: int, timesteps: int, threads: int) -> str:
    """torch.profiler table (CPU time and memory by op) of one training step after one warm-up step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ndsnn_cli.evaluation import spiking_loss
    from ndsnn_cli.trainer import build_optimizer

    torch.set_num_threads(threads)
    model, recipe, reset = _models(model_name, batch, timesteps, side)
    optimizer = build_optimizer(recipe, model)
    images, labels = _inputs(batch)
    def step() -> None:
        optimizer.zero_grad(set_to_none=False)
        spiking_loss(model(images), labels).backward()
        optimizer.step()
        if reset is not None:
            reset()

    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    averages = prof.key_averages()
    return (averages.table(sort_by="self_cpu_time_total", row_limit=15) + "\n"
            + averages.table(sort_by="self_cpu_memory_usage", row_limit=12))


def _child(args: list[str]) -> dict[str, Any]:
    """Run this module as a subprocess with the malloc settings and return its JSON result."""
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in MALLOC_ENV.items()}}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.train_step", *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _wall_time(command: list[str]) -> dict[str, Any]:
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    return {"command": " ".join(command), "wall_s": time.perf_counter() - start, "rc": proc.returncode}


def _cli_times() -> list[dict[str, Any]]:
    """Wall time of the installed `ndsnn` entry point (else `python -m ndsnn_cli`) for two quick commands."""
    script = Path(sys.executable).with_name("ndsnn")
    ndsnn = [str(script)] if script.exists() else [sys.executable, "-m", "ndsnn_cli"]
    return [_wall_time([*ndsnn, "--help"]), _wall_time([*ndsnn, "cost", "--model", "resnet19", "--sparsity", "0.99"])]


def _render(results: dict[str, dict[str, dict[str, Any]]], cli: list[dict[str, Any]], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"training step, batch {args.batch}, T={args.timesteps}, {args.threads} threads, "
                        f"{args.steps} measured steps (median) after {WARMUP_STEPS} warm-up")
    for column in ("model", "side", "step s", "peak RSS MiB", "RSS before MiB", "faults/step",
                   "ndsnn/SJ time", "ndsnn/SJ mem", "NDSNN/dense time"):
        table.add_column(column, justify="left" if column in ("model", "side") else "right")
    mib = 1 << 20
    for model, sides in results.items():
        sj, dense = sides["sj"], sides["dense"]
        for side in SIDES:
            r = sides[side]
            step_s = r.get("amortised_step_s", r["step_s"])
            label = {"dense": "ndsnn dense", "ndsnn": f"ndsnn NDSNN {r.get('final_sparsity', '')} (+upd/dT)",
                     "sj": "SpikingJelly 2.0"}[side]
            ours = side != "sj"
            table.add_row(model, label, f"{step_s:.3f}", f"{r['peak_rss_bytes'] / mib:.0f}",
                          f"{r['rss_before_bytes'] / mib:.0f}", f"{r['faults_per_step']:.0f}",
                          f"{step_s / sj['step_s']:.2f}x" if ours else "",
                          f"{r['peak_rss_bytes'] / sj['peak_rss_bytes']:.2f}x" if ours else "",
                          f"{step_s / dense['step_s']:.2f}x" if side == "ndsnn" else "")
    console.print(table)
    for model, sides in results.items():
        n, e = sides["ndsnn"], sides["equivalence"]
        console.print(f"{model}: NDSNN mask update {n['update_s']:.3f} s (amortised over dT={UPDATE_EVERY_STEPS}: "
                      f"{n['update_s'] / UPDATE_EVERY_STEPS * 1e3:.1f} ms/step), realised sparsity "
                      f"{n['sparsity']:.4f}; equivalence vs SpikingJelly: {e['lif_layers']} LIF layers, spikes "
                      f"identical={e['spikes_identical']} (rate {e['spike_rate']:.3f}), loss {e['loss_ndsnn']:.7f} vs "
                      f"{e['loss_sj']:.7f} (|diff| {e['loss_abs_diff']:.1e}) -> {'OK' if e['ok'] else 'MISMATCH'}")
        c, sj_step = sides["convs"], sides["sj"]["step_s"]
        console.print(f"{model}: the {c['convs']} convolutions alone (forward + backward, the step's real inputs): "
                      f"{c['step_s']:.3f} s, {c['flops'] / 1e9:.1f} GFLOP at {c['gflops_per_s']:.0f} GFLOP/s = "
                      f"{c['step_s'] / sides['dense']['step_s']:.0%} of the ndsnn dense step; over SpikingJelly's "
                      f"step {c['step_s'] / sj_step:.2f}x, the floor of ndsnn/SJ at fp32")
        if "paired" in sides:
            p = sides["paired"]
            console.print(f"{model}: paired (alternating, one process): ndsnn dense {p['ndsnn_step_s']:.3f} s, "
                          f"SpikingJelly {p['sj_step_s']:.3f} s, median per-pair ratio {p['median_pair_ratio']:.3f}x")
    for c in cli:
        console.print(f"`{c['command'].replace(sys.executable, 'python')}`: "
                      f"{c['wall_s']:.2f} s wall (rc {c['rc']})")
    settings = ", ".join(f"{k}={os.environ.get(k, v)}" for k, v in MALLOC_ENV.items())
    console.print(f"malloc: {settings} (every side); load average at end: {os.getloadavg()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="vgg16,resnet19")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--timesteps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="measured steps per side (after warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write all results here")
    parser.add_argument("--profile", choices=SIDES, help="print a torch.profiler table of one step of this side")
    parser.add_argument("--paired", action="store_true",
                        help="also time ndsnn dense and SpikingJelly alternating in one process (noisy machines)")
    parser.add_argument("--child", choices=[*SIDES, "equivalence", "paired", "convs"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profile:
        print(profile_side(args.models.split(",")[0], args.profile, args.batch, args.timesteps, args.threads))
        return 0
    if args.child:
        if args.child == "equivalence":
            result = check_equivalence(args.models, args.batch, args.timesteps, args.threads)
        elif args.child == "paired":
            result = paired_times(args.models, args.batch, args.timesteps, args.steps, args.threads)
        elif args.child == "convs":
            result = conv_floor(args.models, args.batch, args.timesteps, args.steps, args.threads)
        else:
            result = run_side(args.models, args.child, args.batch, args.timesteps, args.steps, args.threads)
        print(json.dumps(result))
        return 0
    try:
        import spikingjelly  # noqa: F401
    except ImportError:
        print("spikingjelly is not installed: pip install --no-deps spikingjelly==2.0.0 && "
              "pip install loguru tqdm packaging", file=sys.stderr)
        return 2
    common = ["--batch", str(args.batch), "--timesteps", str(args.timesteps), "--steps", str(args.steps),
              "--threads", str(args.threads)]
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for model in args.models.split(","):
        children = (*SIDES, "equivalence", "convs", *(["paired"] if args.paired else []))
        results[model] = {side: _child(["--child", side, "--models", model, *common]) for side in children}
    cli = _cli_times()
    _render(results, cli, args)
    if args.json:
        from ndsnn_cli.atomic import write_json

        write_json(args.json, {"results": results, "cli": cli, "args": {k: str(v) for k, v in vars(args).items()}})
    failed = [m for m, sides in results.items() if not sides["equivalence"]["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
