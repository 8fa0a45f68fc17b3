"""A whole NDSNN run on the sparse kernels against the dense run of the same recipe: wall time beside
`ndsnn cost`'s training-FLOPs ratio for that run, and each run's peak memory.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python -m benchmarks.sparse_run [--quick]

One recipe (VGG-16 on a Fashion-MNIST subset, T = 5, batch 32; NDSNN 0.5 -> 0.99 with the paper's
schedule shape: ramp to the final sparsity at 50% of training, masks frozen from 75%), trained by
`ndsnn train` in a child process per side: `dense` (method dense), `ndsnn` (sparse_kernels = auto, the
default) and, with `--masked`, `ndsnn-masked` (sparse_kernels = off: the masked-dense engine), with
`--per-layer` `ndsnn-per-layer` (sparse_layout = per-layer), with `--calibrate` `ndsnn-calibrate`
(sparse_kernels = calibrate: each layer's path timed on the run's own steps). `--recipe` runs another
recipe's sides (e.g. recipes/quickstart.toml).
Peak RSS is each child's own (`os.wait4`). The default length fits ~20 min on the 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = """\
name = "sparse-run-{side}"
seed = 0

[model]
arch = "{arch}"
timesteps = {timesteps}

[data]
dataset = "fashion-mnist"
batch_size = {batch}
augment = false
train_limit = {train_limit}
test_limit = {test_limit}

[train]
epochs = {epochs}
optimizer = "sgd"
lr = 0.05
momentum = 0.9
weight_decay = 5e-4
lr_schedule = "cosine"
sparse_kernels = "{kernels}"
sparse_layout = "{layout}"

[sparsity]
method = "{method}"
initial = 0.5
final = {final}
distribution = "erk"
update_every_steps = {update_every}
ramp_end_epoch = {ramp_end}
update_end_epoch = {update_end}
"""

# side: (method, sparse_kernels, sparse_layout)
SIDES = {"dense": ("dense", "auto", "batch-last"), "ndsnn": ("ndsnn", "auto", "batch-last"),
         "ndsnn-per-layer": ("ndsnn", "auto", "per-layer"), "ndsnn-masked": ("ndsnn", "off", "per-layer"),
         "ndsnn-calibrate": ("ndsnn", "calibrate", "batch-last")}


def side_recipe(side: str, args: argparse.Namespace) -> str:
    """The side's recipe text: the built-in VGG-16 one, or `--recipe` with the side's method and kernels."""
    method, kernels, layout = SIDES[side]
    if args.recipe is not None:
        from ndsnn_cli.recipe import load_recipe

        base = load_recipe(args.recipe)
        return base.replace(name=f"{base.name}-{side}", sparsity={"method": method},
                            train={"sparse_kernels": kernels, "sparse_layout": layout}).to_toml()
    return RECIPE.format(
        side=side, arch=args.model, timesteps=args.timesteps, batch=args.batch,
        train_limit=args.steps_per_epoch * args.batch, test_limit=args.test_limit, epochs=args.epochs,
        kernels=kernels, layout=layout, method=method, final=args.final, update_every=args.update_every,
        ramp_end=args.epochs * 0.5, update_end=args.epochs * 0.75)


def run_side(side: str, args: argparse.Namespace, root: Path) -> dict:
    recipe = root / f"{side}.toml"
    recipe.write_text(side_recipe(side, args))
    run_dir = root / side
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "NUMBA_NUM_THREADS": str(args.threads)}
    env.setdefault("MALLOC_MMAP_MAX_", "0")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "68719476736")
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "ndsnn_cli", "train", str(recipe), "--out", str(run_dir), "-q"],
                             env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"{side}: ndsnn train exited with status {status} (recipe {recipe})")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["process_s"] = time.perf_counter() - started
    summary["peak_rss_mib"] = usage.ru_maxrss / 1024
    summary["run_dir"] = str(run_dir)
    return summary


def train_flops(run_dir: str) -> float:
    """`ndsnn cost RUN --json`: the training FLOPs of the run as it ran (its own density schedule)."""
    out = subprocess.run([sys.executable, "-m", "ndsnn_cli", "cost", run_dir, "--json"], capture_output=True,
                         text=True, check=True).stdout
    return float(json.loads(out)["train_flops"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs of 10 steps (a smoke run, ~3 min)")
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps-per-epoch", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--timesteps", type=int, default=5)
    parser.add_argument("--test-limit", type=int, default=500)
    parser.add_argument("--final", type=float, default=0.99)
    parser.add_argument("--update-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--masked", action="store_true", help="also the masked-dense NDSNN run (sparse_kernels off)")
    parser.add_argument("--per-layer", action="store_true",
                        help="also the NDSNN run with sparse_layout = per-layer (transposes around every sparse layer)")
    parser.add_argument("--calibrate", action="store_true",
                        help="also the NDSNN run with sparse_kernels = calibrate (each layer's path timed on the run)")
    parser.add_argument("--recipe", type=Path,
                        help="run this recipe's sides instead of the built-in one (e.g. recipes/quickstart.toml)")
    parser.add_argument("--out", type=Path, help="keep the run directories here (default: a temporary directory)")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.steps_per_epoch, args.test_limit = 2, 10, 100
    sides = ["dense", "ndsnn"] + (["ndsnn-per-layer"] if args.per_layer else []) + (
        ["ndsnn-masked"] if args.masked else []) + (["ndsnn-calibrate"] if args.calibrate else [])
    with tempfile.TemporaryDirectory() as scratch:
        root = args.out or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        results = {side: run_side(side, args, root) for side in sides}
        flops = {side: train_flops(r["run_dir"]) for side, r in results.items()}
    dense = results["dense"]
    steps = args.epochs * args.steps_per_epoch
    if args.recipe is not None:
        print(f"{args.recipe} ({results['dense']['steps']} steps), {args.threads} threads")
    else:
        print(f"{args.model}, fashion-mnist, {steps} steps (batch {args.batch}, T {args.timesteps}), "
              f"{args.threads} threads; NDSNN 0.5 -> {args.final}, dT {args.update_every}")
    print("| run | wall s | vs dense | FLOPs vs dense | sparse-layer s | dense-layer s | peak RSS MiB | test acc | "
          "sparsity |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for side, s in results.items():
        kernels = s.get("sparse_kernels", {})
        split = (f"{kernels['sparse_layers_s']:.0f} | {kernels['dense_layers_s']:.0f}" if "sparse_layers_s" in kernels
                 else "- | -")  # a dense run has no masks: no kernel dispatch to clock
        print(f"| {side} | {s['wall_time_s']:.0f} | {s['wall_time_s'] / dense['wall_time_s']:.2f}x | "
              f"{flops[side] / flops['dense']:.2f}x | {split} | {s['peak_rss_mib']:.0f} | "
              f"{100 * s['test_accuracy']:.1f} | {s['sparsity']['sparsity']:.3f} |")
    for side in sides[1:]:
        wall = results[side]["wall_time_s"] / dense["wall_time_s"]
        print(f"whole run: {side}/dense wall time {wall:.2f}x, training FLOPs {flops[side] / flops['dense']:.2f}x "
              f"({args.recipe or args.model})")


if __name__ == "__main__":
    main()
