"""CSR artefact size and reference-runtime latency against the dense model, vgg16/resnet19 on CIFAR-10 shapes.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python -m benchmarks.export_sizes

Freshly built models (no training; T from recipes/paper-<arch>-cifar10.toml), random ERK masks at
each sparsity, saved as a real checkpoint (`model::`/`mask::` tensors) so `export_csr` runs as for a
trained run. Sizes: file bytes of the CSR artefact (fp32, fp16, fp16 with BN folded) vs a dense fp32
safetensors file of the same state_dict. Latency: batch-1 forward, reference runtime on the
BN-folded fp32 artefact vs the dense PyTorch model in eval mode, both timed in this process, runs
interleaved (median of `--repeats` runs after warm-up). Writes benchmarks/export_sizes.md.

Sizes (artefact version 3): fp32 with plain int16 column indices (the version-2 layout), then fp32,
fp16 and int8 with the column encoding chosen per parameter (uint8 gaps where smaller), with and
without BN folded. `--sizes-only` measures sizes alone (they are deterministic) and replaces only the
Sizes section of an existing export_sizes.md, keeping its latency tables and notes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from ndsnn_cli.atomic import write_text
from ndsnn_cli.build import build_model
from ndsnn_cli.checkpoint import save_checkpoint
from ndsnn_cli.export.csr import export_csr, load_raw, split_csr
from ndsnn_cli.export.runtime import load_network
from ndsnn_cli.recipe import load_recipe
from ndsnn_cli.sparse.masks import layer_counts, random_mask, sparse_parameter_names

REPO = Path(__file__).resolve().parent.parent
OUT_MD = REPO / "benchmarks" / "export_sizes.md"
WARMUP = 3
NOTES_MARKER = "<!-- hand-written notes below: kept when the tables above are regenerated -->"


def sparse_checkpoint(arch: str, sparsity: float, path: Path, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """A fresh model with a random ERK mask at `sparsity`, written as an ndsnn checkpoint."""
    recipe = load_recipe(REPO / "recipes" / f"paper-{arch}-cifar10.toml").replace(
        sparsity={"method": "static", "final": sparsity, "distribution": "erk"}, train={"device": "cpu"})
    torch.manual_seed(seed)
    model = build_model(recipe).eval()
    params = dict(model.named_parameters())
    names = sparse_parameter_names(model, recipe.sparsity.dense)
    counts = layer_counts({n: params[n] for n in names}, 1 - sparsity, "erk")
    generator = torch.Generator().manual_seed(seed)
    masks = {n: random_mask(params[n].shape, counts[n], generator) for n in names}
    with torch.no_grad():
        for n, mask in masks.items():
            params[n].mul_(mask)
    save_checkpoint(path, model=model, optimizer=None, extra_tensors={f"mask::{n}": m for n, m in masks.items()},
                    meta={"recipe": recipe.to_toml(), "epoch": 0, "step": 0})
    return model, recipe


def size_breakdown(path: Path) -> dict[str, int]:
    """Bytes of CSR values, column and row indices, dense tensors and the JSON header of an artefact."""
    tensors, _ = load_raw(path)
    sparse, plain = split_csr(tensors)
    out = {"values": 0, "col_indices": 0, "col_gaps": 0, "flat_gaps": 0, "crow_indices": 0, "scales": 0, "shape": 0}
    for parts in sparse.values():
        for part, tensor in parts.items():
            out[part] += tensor.nbytes
    out["columns"] = out["col_indices"] + out["col_gaps"] + out["flat_gaps"]
    out["dense_params"] = sum(t.nbytes for t in plain.values())
    out["header"] = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    return out


def paired_ms(dense: Any, runtime: Any, images: torch.Tensor, repeats: int) -> tuple[list[float], list[float]]:
    """Per-run ms of dense and runtime forwards, interleaved so that load changes hit both sides alike."""
    dense_ms, runtime_ms = [], []
    with torch.no_grad():
        for i in range(WARMUP + repeats):
            for fn, times in ((dense, dense_ms), (runtime, runtime_ms)):
                start = time.perf_counter()
                fn(images)
                if i >= WARMUP:
                    times.append((time.perf_counter() - start) * 1e3)
    return dense_ms, runtime_ms


# (label, dtype, BN folded, column indices) of each artefact whose size is measured
VARIANTS = (("fp32_plain", "fp32", False, "plain"), ("fp32", "fp32", False, "auto"), ("fp16", "fp16", False, "auto"),
            ("fp16_fold", "fp16", True, "auto"), ("int8", "int8", False, "auto"), ("int8_fold", "int8", True, "auto"),
            ("fp32_fold", "fp32", True, "auto"))


def measure(arch: str, sparsity: float, workdir: Path, repeats: int, latency: bool = True) -> dict[str, Any]:
    ckpt = workdir / f"{arch}-{sparsity}.safetensors"
    model, recipe = sparse_checkpoint(arch, sparsity, ckpt)
    state = {k: v for k, v in model.state_dict().items()}
    dense_bytes = len(save_safetensors({k: v.contiguous() for k, v in state.items()}))
    files = {}
    for label, dtype, fold, indices in VARIANTS:
        path, meta = export_csr(ckpt, workdir / f"{arch}-{sparsity}-{label}.safetensors", dtype=dtype, fold_bn=fold,
                                indices=indices)
        files[label] = path
    row: dict[str, Any] = {"arch": arch, "sparsity": sparsity, "timesteps": recipe.model.timesteps,
                           "realised_sparsity": meta["sparsity"]["sparsity"], "dense_bytes": dense_bytes,
                           **{f"{k}_bytes": p.stat().st_size for k, p in files.items()},
                           "breakdown_fp32_plain": size_breakdown(files["fp32_plain"]),
                           "breakdown_int8_fold": size_breakdown(files["int8_fold"])}
    if not latency:
        return row
    net = load_network(files["fp32_fold"])
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        row["max_abs_logit_diff"] = float((net(images) - model(images)).abs().max())
    dense_ms, runtime_ms = paired_ms(model, net, images, repeats)
    row["dense_ms"], row["runtime_ms"] = statistics.median(dense_ms), statistics.median(runtime_ms)
    row["pair_speedup"] = statistics.median(d / r for d, r in zip(dense_ms, runtime_ms, strict=True))
    row["dense_ms_range"] = (min(dense_ms), max(dense_ms))
    row["runtime_ms_range"] = (min(runtime_ms), max(runtime_ms))
    return row


def profile(arch: str, sparsity: float, workdir: Path) -> str:
    """torch.profiler top ops of one runtime forward (why it is as fast or slow as it is)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ckpt = workdir / f"{arch}-{sparsity}-prof.safetensors"
    sparse_checkpoint(arch, sparsity, ckpt)
    path, _ = export_csr(ckpt, workdir / f"{arch}-prof.safetensors", fold_bn=True)
    net = load_network(path)
    images = torch.randn(1, 3, 32, 32)
    for _ in range(WARMUP):
        net(images)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            net(images)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


SIZE_COLUMNS = (("fp32_plain", "CSR fp32, int16 cols (v2 layout)"), ("fp32", "CSR fp32"), ("fp16", "CSR fp16"),
                ("fp16_fold", "CSR fp16 + BN fold"), ("int8", "CSR int8"), ("int8_fold", "CSR int8 + BN fold"))


def sizes_section(rows: list[dict[str, Any]]) -> list[str]:
    """The `## Sizes` section: file bytes per variant and % of dense, then where the bytes go."""
    lines = ["## Sizes", "",
             "Column indices: `int16` = plain `col_indices`; the other CSR columns choose per parameter the "
             "smallest of plain, uint8 row-wise gaps (`col_gaps` + `crow_indices`, version 3) and uint8 flat gaps "
             "over the whole matrix (`flat_gaps`, no `crow_indices`, version 4). int8: one bf16 scale per output "
             "row (version 4).", "",
             "| model | sparsity | dense fp32 bytes | " + " | ".join(f"{title} | %" for _, title in SIZE_COLUMNS)
             + " | int8 target <= 0.6% at 99% |",
             "|---|---|---|" + "---|---|" * len(SIZE_COLUMNS) + "---|"]
    for r in rows:
        pct = {k: 100 * r[f"{k}_bytes"] / r["dense_bytes"] for k, _ in SIZE_COLUMNS}
        target = (f"int8 {'met' if pct['int8'] <= 0.6 else 'NOT met'}, int8+fold "
                  f"{'met' if pct['int8_fold'] <= 0.6 else 'NOT met'}") if r["sparsity"] == 0.99 else ""
        cells = " | ".join(f"{r[f'{k}_bytes']:,} | {pct[k]:.2f}%" for k, _ in SIZE_COLUMNS)
        lines.append(f"| {r['arch']} | {r['sparsity']:.2f} | {r['dense_bytes']:,} | {cells} | {target} |")
    lines += ["", "Where the bytes go (CSR fp32 with int16 columns, no folding / int8 with BN folded and the "
              "column encoding chosen per parameter):", "",
              "| model | sparsity | values | column indices | crow_indices (int32) | scales | dense params | header |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["breakdown_fp32_plain"], r["breakdown_int8_fold"]
        lines.append(f"| {r['arch']} | {r['sparsity']:.2f} | {a['values']:,} / {b['values']:,} | "
                     f"{a['columns']:,} / {b['columns']:,} ({b['col_gaps']:,} as row gaps, {b['flat_gaps']:,} as "
                     f"flat gaps) | {a['crow_indices']:,} / {b['crow_indices']:,} | "
                     f"{b['scales']:,} | {a['dense_params']:,} / {b['dense_params']:,} | "
                     f"{a['header']:,} / {b['header']:,} |")
    return lines


def splice_sizes(old: str, rows: list[dict[str, Any]], note: str) -> str:
    """`old` (a full export_sizes.md) with its Sizes section replaced and `note` after its title block."""
    head, rest = old.split("## Sizes", 1)
    head = "\n".join(line for line in head.splitlines() if not line.startswith("Sizes regenerated by"))
    tail = rest[rest.index("## Batch-1 CPU latency"):]
    return head.rstrip() + "\n\n" + note + "\n\n" + "\n".join(sizes_section(rows)) + "\n\n" + tail


def markdown(rows: list[dict[str, Any]], context: dict[str, str], profiles: dict[str, str]) -> str:
    lines = ["# Export: CSR artefact size and reference-runtime latency", "",
             "Generated by `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python -m benchmarks.export_sizes` "
             f"({context['args']}).", "",
             f"- machine: {context['cpu']}, torch {torch.__version__}, {context['threads']} threads; "
             f"shared machine, `uptime` before: `{context['uptime_before']}`, after: `{context['uptime_after']}`",
             f"- malloc env: MALLOC_MMAP_MAX_={os.environ.get('MALLOC_MMAP_MAX_', 'unset')}, "
             f"MALLOC_TRIM_THRESHOLD_={os.environ.get('MALLOC_TRIM_THRESHOLD_', 'unset')}",
             "- models: freshly built (untrained), random ERK masks, CIFAR-10 shapes (3x32x32, 10 classes), "
             "T from the paper recipes; dense = safetensors of the full fp32 state_dict (incl. BN running stats)",
             "", *sizes_section(rows)]
    lines += ["", "## Batch-1 CPU latency", "",
              "Reference runtime (BN-folded fp32 artefact) vs the dense PyTorch model (eval mode, same masked "
              f"weights), {context['repeats']} runs each after {WARMUP} warm-up runs, same process, dense and runtime "
              "runs interleaved so that the shared machine's load changes hit both; medians, [min-max], and the "
              "median of the per-pair ratios.", "",
              "| model | T | sparsity | dense ms [min-max] | runtime ms [min-max] | speed-up (ratio of medians) "
              "| median per-pair speed-up | max abs logit diff | target >= 3x at 99% |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = r["dense_ms"] / r["runtime_ms"]
        target = ("met" if speedup >= 3 else "NOT met") if r["sparsity"] == 0.99 else ""
        (d_lo, d_hi), (r_lo, r_hi) = r["dense_ms_range"], r["runtime_ms_range"]
        lines.append(f"| {r['arch']} | {r['timesteps']} | {r['sparsity']:.2f} | "
                     f"{r['dense_ms']:.1f} [{d_lo:.0f}-{d_hi:.0f}] | {r['runtime_ms']:.1f} [{r_lo:.0f}-{r_hi:.0f}] | "
                     f"{speedup:.2f}x | {r['pair_speedup']:.2f}x | "
                     f"{r['max_abs_logit_diff']:.2g} | {target} |")
    for name, table in profiles.items():
        lines += ["", f"### Profile: runtime forward, {name} (5 forwards, top ops by self CPU time)", "", "```",
                  table.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vgg16,resnet19")
    parser.add_argument("--sparsities", default="0.9,0.95,0.98,0.99")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="append torch.profiler tables at 99%%")
    parser.add_argument("--sizes-only", action="store_true",
                        help="measure sizes only; replace only the Sizes section of an existing --out")
    parser.add_argument("--out", type=Path, default=OUT_MD)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    context = {"args": " ".join(f"--{k}={v}" for k, v in vars(args).items() if k != "out"), "cpu": cpu,
               "threads": str(args.threads), "repeats": str(args.repeats),
               "uptime_before": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    rows, profiles = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models.split(","):
            for sparsity in (float(s) for s in args.sparsities.split(",")):
                row = measure(arch, sparsity, Path(tmp), args.repeats, latency=not args.sizes_only)
                rows.append(row)
                if args.sizes_only:
                    print(f"{arch} s={sparsity}: " + ", ".join(f"{k} {row[f'{k}_bytes']:,} B "
                          f"({100 * row[f'{k}_bytes'] / row['dense_bytes']:.2f}%)" for k, _ in SIZE_COLUMNS),
                          flush=True)
                    continue
                print(f"{arch} s={sparsity}: dense {row['dense_bytes']:,} B, csr fp32 {row['fp32_bytes']:,} B "
                      f"({100 * row['fp32_bytes'] / row['dense_bytes']:.2f}%), fp16 {row['fp16_bytes']:,} B "
                      f"({100 * row['fp16_bytes'] / row['dense_bytes']:.2f}%), fp16+fold {row['fp16_fold_bytes']:,} B "
                      f"({100 * row['fp16_fold_bytes'] / row['dense_bytes']:.2f}%); latency dense "
                      f"{row['dense_ms']:.1f} ms, runtime {row['runtime_ms']:.1f} ms "
                      f"({row['dense_ms'] / row['runtime_ms']:.2f}x, per-pair {row['pair_speedup']:.2f}x)", flush=True)
            if args.profile:
                profiles[f"{arch} at 0.99"] = profile(arch, 0.99, Path(tmp))
                print(profiles[f"{arch} at 0.99"], flush=True)
    if args.sizes_only:
        note = (f"Sizes regenerated by `python -m benchmarks.export_sizes --sizes-only` ({context['args']}); "
                "the latency tables below are from the last full run.")
        write_text(args.out, splice_sizes(args.out.read_text(), rows, note))
        print(f"wrote {args.out} (Sizes section)")
        return
    context["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    text = markdown(rows, context, profiles)
    if args.out.exists() and NOTES_MARKER in args.out.read_text():  # keep the hand-written analysis
        text += "\n" + NOTES_MARKER + args.out.read_text().split(NOTES_MARKER, 1)[1]
    write_text(args.out, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
