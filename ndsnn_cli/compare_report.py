"""prune-compare's report: the tables per budget, the equal-cost verdicts, the frontier figure, the files.

Every table holds one kind of cell (accuracy, FLOPs, % of LTH, wall seconds, training seconds), so that a
reader (or a test) never meets a FLOPs count in an accuracy table or a percentage beside an absolute count.
Markdown and the terminal render the same `ReportTable`s. The table dict comes from `compare.aggregate`.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ndsnn_cli import plots
from ndsnn_cli.atomic import write_bytes, write_json, write_text

PLOT_FILE = "results.png"
BUDGET_NAMES = {"epochs": "equal epochs", "flops": "equal training FLOPs", "steps": "equal optimizer steps",
                "wall": "equal wall time"}
LINESTYLES = {"epochs": "-", "flops": "--", "steps": ":", "wall": "-."}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def cell(table: dict[str, Any], method: str, sparsity: float, budget: str = "epochs") -> dict[str, Any] | None:
    return next((c for c in table["cells"] if c["method"] == method and c["sparsity"] == sparsity
                 and c.get("budget", "epochs") == budget), None)


def format_accuracy(c: dict[str, Any] | None) -> str:
    """`87.12 ± 0.34` (percent); `—` where no run finished, `(2/3)` where only some seeds did."""
    if c is None or c["accuracy_mean"] is None:
        return "—"
    text = f"{100 * c['accuracy_mean']:.2f} ± {100 * c['accuracy_std']:.2f}"
    return text if c["done"] == c["runs"] else f"{text} ({c['done']}/{c['runs']})"


def format_sparsity(sparsity: float) -> str:
    return "0 (dense)" if sparsity == 0 else f"{sparsity:g}"


def format_flops(c: dict[str, Any] | None) -> str:
    """Training FLOPs of the cost model, `1.92e+11`; `—` where it cannot say or nothing ran."""
    return "—" if c is None or c["training_flops"] is None or not c["runs"] else f"{c['training_flops']:.3g}"


def format_lth_share(c: dict[str, Any] | None) -> str:
    """`30.5% of LTH` (LTH at the recipe's length, same sparsity); `—` without an LTH cell there."""
    if c is None or c.get("flops_vs_lth") is None or not c["runs"]:
        return "—"
    return f"{100 * c['flops_vs_lth']:.1f}% of LTH"


def format_seconds(c: dict[str, Any] | None) -> str:
    """Mean wall time per run (training and per-epoch evaluation), `41.3 s`."""
    return "—" if c is None or c["wall_time_s_mean"] is None else f"{c['wall_time_s_mean']:.1f} s"


def format_train_seconds(c: dict[str, Any] | None) -> str:
    """Mean training time per run (summary `train_wall_s`, evaluation aside), `35.0 s`; `—` for runs too old
    to record it."""
    return "—" if c is None or c.get("train_wall_s_mean") is None else f"{c['train_wall_s_mean']:.1f} s"


@dataclass(frozen=True)
class ReportTable:
    """One table of one kind of cell: `kind` is accuracy | flops | lth | seconds | train_seconds."""

    title: str    # what the cells are, e.g. "training FLOPs (the `ndsnn cost` model)"
    kind: str
    columns: list[str]
    rows: list[tuple[str, list[tuple[str, bool]]]]  # (row label, [(cell text, best in its column)])
    section: str  # the budget's heading, e.g. "Equal epochs (every method at the recipe's length)"


def budget_title(budget: str, reference: str) -> str:
    if budget == "epochs":
        return "Equal epochs (every method at the recipe's length)"
    what = {"flops": "training FLOPs", "steps": "optimizer steps", "wall": "measured wall time"}[budget]
    name = BUDGET_NAMES[budget]
    return f"{name[0].upper()}{name[1:]} (each method as long as costs {reference}'s {what} at the recipe's " \
           "length, per sparsity)"


def report_tables(table: dict[str, Any]) -> list[ReportTable]:
    """Per budget: accuracy, training FLOPs, % of LTH (when LTH is compared), wall time and training time
    (when the runs record it)."""
    cols = table["sparsities"]
    kinds = [("accuracy", "Test accuracy (%), mean ± std over seeds; best per sparsity in bold", format_accuracy),
             ("flops", "Training FLOPs (the `ndsnn cost` model)", format_flops),
             ("lth", "Training FLOPs, % of LTH's at the recipe's length at the same sparsity", format_lth_share),
             ("seconds", "Wall time per run (s), training and evaluation, mean over seeds", format_seconds),
             ("train_seconds", "Training time per run (s), evaluation aside (summary train_wall_s), mean over seeds",
              format_train_seconds)]
    shown = {"lth": any(c.get("flops_vs_lth") is not None for c in table["cells"]),
             "train_seconds": any(c.get("train_wall_s_mean") is not None for c in table["cells"])}
    tables = []
    for budget in table.get("budgets", ["epochs"]):
        rows = [m for m in table["methods"] if any(cell(table, m, s, budget) for s in cols)]
        for kind, what, fmt in kinds:
            if not shown.get(kind, True):
                continue
            body = [(m, [(fmt(c := cell(table, m, s, budget)), bool(kind == "accuracy" and c and c["best"]))
                         for s in cols]) for m in rows]
            tables.append(ReportTable(what, kind, [format_sparsity(s) for s in cols], body,
                                      budget_title(budget, table.get("reference", "ndsnn"))))
    return tables


# ---------------------------------------------------------------- what the tables say


def _spread_text(a: dict[str, Any], b: dict[str, Any]) -> tuple[bool, str]:
    gap = 100 * (a["accuracy_mean"] - b["accuracy_mean"])
    if a["done"] < 2 or b["done"] < 2:
        return True, "(one seed: no spread measured)"
    spread = 100 * (a["accuracy_std"] + b["accuracy_std"])
    return gap > spread, f"({'more than' if gap > spread else 'within'} the sum of their seed std, {spread:.1f})"


def _acc(c: dict[str, Any]) -> str:
    return f"{100 * c['accuracy_mean']:.1f} ± {100 * c['accuracy_std']:.1f}%"


def verdicts(table: dict[str, Any]) -> list[str]:
    """One sentence per (budget, sparsity): which method is best there, by how much over the next one, and
    whether that gap exceeds the seeds' spread; where the reference stands; which rows could not run."""
    sentences = []
    reference = table.get("reference", "ndsnn")
    for budget in table.get("budgets", ["epochs"]):
        for sparsity in (s for s in table["sparsities"] if s > 0):
            column = [c for c in table["cells"] if c.get("budget", "epochs") == budget and c["sparsity"] == sparsity]
            ranked = sorted((c for c in column if c["accuracy_mean"] is not None),
                            key=lambda c: c["accuracy_mean"], reverse=True)
            if not ranked:
                continue
            best = ranked[0]
            text = f"At {sparsity:g}, {BUDGET_NAMES[budget]}: {best['method']} is best ({_acc(best)})"
            if len(ranked) > 1:
                second = ranked[1]
                _, spread = _spread_text(best, second)
                text += (f", {100 * (best['accuracy_mean'] - second['accuracy_mean']):.1f} points above "
                         f"{second['method']} ({_acc(second)}) {spread}")
            ref = next((c for c in ranked if c["method"] == reference), None)
            if ref is not None and ref is not best and ref is not ranked[1]:
                text += f"; {reference} is {100 * (best['accuracy_mean'] - ref['accuracy_mean']):.1f} points below it"
            absent = [c["method"] for c in column if c.get("missing")]
            if absent:
                text += f"; not run at this budget: {', '.join(absent)} (see the notes)"
            sentences.append(text + ".")
    return sentences


def unique_points(table: dict[str, Any]) -> list[dict[str, Any]]:
    """One cell per set of runs: budgets that agree on a length share their runs and appear once."""
    seen, points = set(), []
    for c in table["cells"]:
        key = (c["method"], c["sparsity"], c.get("length_epochs"))
        if c["accuracy_mean"] is not None and key not in seen:
            seen.add(key)
            points.append(c)
    return points


def non_dominated(points: list[dict[str, Any]], cost: str = "training_flops") -> list[dict[str, Any]]:
    """The points no other point at the same sparsity beats on both accuracy (higher) and `cost` (lower)."""
    front = []
    for p in points:
        if p[cost] is None or p["sparsity"] == 0:
            continue
        rivals = [q for q in points if q is not p and q["sparsity"] == p["sparsity"] and q[cost] is not None]
        if not any(q[cost] <= p[cost] and q["accuracy_mean"] >= p["accuracy_mean"]
                   and (q[cost] < p[cost] or q["accuracy_mean"] > p["accuracy_mean"]) for q in rivals):
            front.append(p)
    return front


def frontier_text(table: dict[str, Any]) -> list[str]:
    """Per sparsity, the non-dominated (accuracy, training FLOPs) points, cheapest first."""
    front = non_dominated(unique_points(table))
    lines = []
    for sparsity in sorted({p["sparsity"] for p in front}):
        here = sorted((p for p in front if p["sparsity"] == sparsity), key=lambda p: p["training_flops"])
        lines.append(f"At {sparsity:g}: " + ", ".join(_point_text(p) for p in here))
    return lines


def _point_text(p: dict[str, Any]) -> str:
    length = f"{p['length_epochs']} ep" + ("/round" if p["method"].startswith("lth") else "")
    return f"{p['method']} {length} ({100 * p['accuracy_mean']:.1f}%, {p['training_flops']:.3g} FLOPs)"


# ---------------------------------------------------------------- files


def to_csv(table: dict[str, Any]) -> str:
    from ndsnn_cli.trainer import TIME_PHASES  # the time split's columns: seconds per phase, mean over seeds

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["budget", "method", "sparsity", "runs_done", "runs", "accuracy_mean", "accuracy_std", "best",
                     "test_accuracies", "realised_sparsity_mean", "epochs", "length_epochs", "steps",
                     "wall_time_s_mean", "train_wall_s_mean", "training_flops", "flops_vs_lth",
                     *(f"{phase}_s_mean" for phase in TIME_PHASES)])
    for c in table["cells"]:
        split = c.get("time_split_mean") or {}
        writer.writerow([c.get("budget", "epochs"), c["method"], f"{c['sparsity']:g}", c["done"], c["runs"],
                         _num(c["accuracy_mean"]), _num(c["accuracy_std"]), int(c["best"]),
                         ";".join(repr(a) for a in c["test_accuracy"]), _num(c["realised_sparsity_mean"]),
                         _num(c["epochs"]), _num(c.get("length_epochs")), _num(c.get("steps")),
                         _num(c["wall_time_s_mean"]), _num(c.get("train_wall_s_mean")), _num(c["training_flops"]),
                         _num(c["flops_vs_lth"]), *(_num(split.get(phase)) for phase in TIME_PHASES)])
    return buffer.getvalue()


def _num(value: float | int | None) -> str:
    return "" if value is None else repr(value)


FIGURE_CAPTION = "test accuracy vs sparsity, vs training FLOPs (the frontier) and vs measured time"


def to_markdown(table: dict[str, Any], plot: str | None = None) -> str:
    """Every report table, the equal-cost verdicts, the frontier (and `plot`, the PNG beside it), the notes."""
    lines: list[str] = []
    section = None
    for t in report_tables(table):
        if t.section != section:
            section = t.section
            lines += [f"## {section}", ""]
        lines += [f"### {t.title}", "", "| method | " + " | ".join(t.columns) + " |",
                  "|---|" + "---:|" * len(t.columns)]
        lines += [f"| {row} | " + " | ".join(f"**{text}**" if best else text for text, best in cells) + " |"
                  for row, cells in t.rows]
        lines.append("")
    said = verdicts(table)
    if said:
        lines += ["## Best method per sparsity and budget", ""] + [f"- {s}" for s in said] + [""]
    front = frontier_text(table)
    if front:
        lines += ["## Non-dominated points (higher accuracy, fewer training FLOPs), per sparsity", ""]
        lines += [f"- {f}" for f in front] + [""]
    if plot:
        lines += [f"## {FIGURE_CAPTION[0].upper()}{FIGURE_CAPTION[1:]}", "", f"![{FIGURE_CAPTION}]({plot})", ""]
    if table["notes"]:
        lines += ["Notes:", ""] + [f"- {note}" for note in table["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def write_reports(table: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """results.csv/.json/.md/.png in OUT, each written atomically; the Markdown shows the PNG."""
    out = Path(out)
    plot = PLOT_FILE if any(c["accuracy_mean"] is not None for c in table["cells"]) else None
    paths = {"csv": write_text(out / "results.csv", to_csv(table)),
             "json": write_json(out / "results.json", json_safe(table)),
             "md": write_text(out / "results.md", to_markdown(table, plot))}
    if plot:
        paths["png"] = write_bytes(out / plot, plot_png(table))
    return paths


def json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------- the figure


def results_figure(table: dict[str, Any]) -> Any:
    """Accuracy vs sparsity (log density axis; one line style per budget), the frontier (accuracy vs training
    FLOPs, one curve per method across budgets and sparsities, non-dominated points ringed) and accuracy vs
    measured time per run (`seconds_measure`). One colour per row (method) in every panel; panels without data
    are left out."""
    plt = plots.pyplot()
    points = unique_points(table)
    panels = [_accuracy_vs_sparsity]
    if any(p["training_flops"] is not None for p in points):
        panels.append(_accuracy_vs_flops)
    if any(p["wall_time_s_mean"] is not None and p["sparsity"] > 0 for p in points):
        panels.append(_accuracy_vs_wall)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), dpi=120, squeeze=False)
    colours = {method: f"C{i}" for i, method in enumerate(table["methods"])}
    for ax, panel in zip(axes[0], panels, strict=True):
        panel(ax, table, colours)
    fig.tight_layout()
    return fig


def _accuracy_vs_sparsity(ax: Any, table: dict[str, Any], colours: dict[str, str]) -> None:
    """Mean ± std over seeds at each sparsity, x = density 1 - s on a log axis; dense as a line (± std band).
    The first budget's lines are labelled by row, the others `row (budget)` in their own line style."""
    budgets = table.get("budgets", ["epochs"])
    for budget in budgets:
        for method in table["methods"]:
            cs = [c for c in table["cells"] if c["method"] == method and c["accuracy_mean"] is not None
                  and c.get("budget", "epochs") == budget]
            if not cs:
                continue
            label = method if budget == budgets[0] else f"{method} ({budget})"
            if method == "dense":
                mean, std = 100 * cs[0]["accuracy_mean"], 100 * cs[0]["accuracy_std"]
                ax.axhline(mean, color=colours[method], linestyle="--", label=label)
                if std:
                    ax.axhspan(mean - std, mean + std, color=colours[method], alpha=0.12, linewidth=0)
                continue
            ax.errorbar([1 - c["sparsity"] for c in cs], [100 * c["accuracy_mean"] for c in cs],
                        yerr=[100 * c["accuracy_std"] for c in cs], marker="o", capsize=3, color=colours[method],
                        linestyle=LINESTYLES[budget], label=label)
    plots.log_density_axis(ax, "x", [s for s in table["sparsities"] if s > 0])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy vs sparsity (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _cost_panel(ax: Any, table: dict[str, Any], colours: dict[str, str], cost: str) -> None:
    """Each method's mean points (marker: sparsity) joined cheapest first; the non-dominated ones ringed."""
    points = [p for p in unique_points(table) if p[cost] is not None]
    markers = {s: MARKERS[i % len(MARKERS)] for i, s in enumerate(table["sparsities"])}
    for method in table["methods"]:
        mine = sorted((p for p in points if p["method"] == method), key=lambda p: p[cost])
        if not mine:
            continue
        ax.plot([p[cost] for p in mine], [100 * p["accuracy_mean"] for p in mine], color=colours[method],
                alpha=0.5, linewidth=1)
        for p in mine:
            ax.plot([p[cost]], [100 * p["accuracy_mean"]], marker=markers[p["sparsity"]], color=colours[method],
                    linestyle="none")
        if cost == "training_flops":  # every run, so the seeds' spread shows
            ax.scatter([p[cost] for p in mine for _ in p["test_accuracy"]],
                       [100 * a for p in mine for a in p["test_accuracy"]], color=colours[method], s=10, alpha=0.5,
                       label=method, zorder=3)
        else:
            ax.plot([], [], color=colours[method], label=method)
    front = non_dominated(points, cost)
    if front:
        ax.scatter([p[cost] for p in front], [100 * p["accuracy_mean"] for p in front], s=140, facecolors="none",
                   edgecolors="black", linewidths=1.2, label="non-dominated at its sparsity", zorder=4)
    for sparsity, marker in markers.items():
        if any(p["sparsity"] == sparsity for p in points):
            ax.plot([], [], marker=marker, color="grey", linestyle="none",
                    label=f"sparsity {format_sparsity(sparsity)}")
    ax.set_xscale("log")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")


def _accuracy_vs_flops(ax: Any, table: dict[str, Any], colours: dict[str, str]) -> None:
    _cost_panel(ax, table, colours, "training_flops")
    ax.set_xlabel("training FLOPs (ndsnn cost model)")
    ax.set_title("frontier: accuracy vs training FLOPs (dots: runs)")


def seconds_measure(table: dict[str, Any]) -> tuple[str, str]:
    """The time the wall panel plots, (cell key, what it is): training time (`train_wall_s_mean`, evaluation
    aside) where every timed point records it, else wall time (one measure on one axis, never a mix)."""
    timed = [p for p in unique_points(table) if p["wall_time_s_mean"] is not None]
    if timed and all(p.get("train_wall_s_mean") is not None for p in timed):
        return "train_wall_s_mean", "training time"
    return "wall_time_s_mean", "wall time"


def _accuracy_vs_wall(ax: Any, table: dict[str, Any], colours: dict[str, str]) -> None:
    key, what = seconds_measure(table)
    _cost_panel(ax, table, colours, key)
    aside = ", evaluation aside" if key == "train_wall_s_mean" else ", training and evaluation"
    ax.set_xlabel(f"{what} per run (s{aside}; mean over seeds; this machine, its load)")
    ax.set_title(f"accuracy vs measured {what}")


def plot_png(table: dict[str, Any]) -> bytes:
    return plots.png_bytes(results_figure(table))
