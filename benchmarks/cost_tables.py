"""Regenerate the tables of docs/cost.md exactly as `ndsnn cost --model M --sparsity S` computes them.

    python -m benchmarks.cost_tables
"""

from __future__ import annotations

from ndsnn_cli.cost import base_recipe, training_cost

SPARSITIES = (0.9, 0.95, 0.98, 0.99)


def main() -> None:
    for arch in ("resnet19", "vgg16"):
        print(f"### {arch}\n")
        print("| sparsity | method | training FLOPs | vs LTH | vs dense | mean density | inference FLOPs/sample |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for sparsity in SPARSITIES:
            report = training_cost(base_recipe(model=arch, sparsity=sparsity))
            for name, mc in report.methods.items():
                print(f"| {sparsity:g} | {name} | {mc.train_flops:.3e} | {report.relative(name, 'lth'):.2%} | "
                      f"{report.relative(name, 'dense'):.2%} | {mc.mean_density:.4f} | {mc.inference_flops:.3e} |")
            print(f"| {sparsity:g} | (LTH) | {report.methods['lth'].note} | | | | |")
        print()


if __name__ == "__main__":
    main()
