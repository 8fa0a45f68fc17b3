"""prune-compare's report tables for every mix of rows, baselines and budgets, rendered without training.

Issue 25: with `--baselines published` and no LTH, results.md's cost table showed accuracy cells for rigl-pub
and set-pub, then the same rows again with absolute FLOPs. Here a real plan (`plan_runs`) of a small recipe
gets synthetic but well-formed summaries (distinct accuracies, wall and training seconds per run); every
table of results.md, of the terminal and of results.csv must then hold each expected row exactly once, and
every cell its table's kind of value, equal to what the summaries (and the `ndsnn cost` model) give.
"""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_toml
from typer.testing import CliRunner

from ndsnn_cli import compare, equal_cost
from ndsnn_cli import compare_report as report
from ndsnn_cli.cli import app
from ndsnn_cli.recipe import parse_recipe

# 64 images at batch 32: 2 steps an epoch, 2 epochs; at equal FLOPs SET trains 3-4 epochs (`-e<N>` run dirs)
RECIPE = tiny_toml(seed=3, data={"batch_size": 32, "eval_batch_size": 64, "train_limit": 64, "test_limit": 64},
                   train={"epochs": 2}, sparsity={"method": "rigl", "update_every_steps": 1})
SPARSITIES, SEEDS = [0.5, 0.8], 2
METHOD_SETS = [["ndsnn", "rigl", "set", *extra] for extra in ([], ["lth"], ["dense"], ["lth", "dense"])]
BUDGETS = [("epochs",), ("epochs", "flops")]
CASES = [(methods, baselines, budgets) for methods in METHOD_SETS for baselines in compare.BASELINES
         for budgets in BUDGETS]

DASH = "—"
CELL = {"accuracy": r"\d{1,3}\.\d{2} ± \d{1,3}\.\d{2}( \(\d+/\d+\))?",  # percent, mean ± std (done/runs)
        "flops": r"\d(\.\d{1,2})?e\+\d{2}",                             # absolute count, never a share
        "lth": r"\d{1,4}\.\d% of LTH",
        "seconds": r"\d+\.\d s",
        "train_seconds": r"\d+\.\d s"}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NDSNN_CACHE", str(tmp_path / "cache"))


def expected_rows(methods: list[str], baselines: str, own_lth: bool = False) -> list[str]:
    """The table rows, in --methods order: RigL and SET (LTH where the recipe has its own settings) as
    `<m>`, `<m>-pub` or both; the others once."""
    rows = []
    for m in methods:
        published = m in ("rigl", "set") or (m == "lth" and own_lth)
        if baselines == "same" or not published:
            rows.append(m)
        else:
            rows += [f"{m}-pub"] if baselines == "published" else [m, f"{m}-pub"]
    return rows


def fake_summary(spec: compare.RunSpec, index: int, train_wall: bool = True) -> dict[str, Any]:
    """A summary.json as the trainer writes it, with numbers distinct per run (index in the plan)."""
    accuracy = 0.5 + 0.37 * ((index * 37) % 101) / 101
    wall = 20.0 + 3.7 * index
    train = 0.8 * wall
    summary: dict[str, Any] = {
        "method": spec.method, "seed": spec.seed, "test_accuracy": accuracy, "wall_time_s": wall,
        "epochs": spec.recipe.train.epochs, "sparsity": {"sparsity": spec.sparsity, "layers": {}},
        "time_split": {"setup": 0.5, "data": 0.1 * train, "step": 0.8 * train, "mask_update": 0.1 * train,
                       "evaluation": wall - train - 0.5, "checkpoint": 0.0}}
    if train_wall:
        summary["train_wall_s"] = train
    return summary


def make_table(methods: list[str], baselines: str, budgets: tuple[str, ...], base: str = RECIPE,
               train_wall: bool = True, out: Path = Path("out")) -> tuple[compare.Plan, dict, dict[str, Any]]:
    plan = compare.plan_runs(parse_recipe(base), methods, SPARSITIES, SEEDS, out, baselines, budgets)
    summaries = {spec.key: fake_summary(spec, i, train_wall) for i, spec in enumerate(plan.runs)}
    return plan, summaries, compare.aggregate(plan, summaries)


def _expected_cells(plan: compare.Plan, summaries: dict, budget: str, row: str, sparsity: float) -> dict[str, str]:
    """Each kind's cell text at (budget, row, sparsity), computed from the summaries and the cost model."""
    specs = [s for s in plan.runs if s.row == row and s.sparsity == sparsity and budget in s.budgets]
    if not specs:
        return dict.fromkeys(CELL, DASH)
    done = [summaries[s.key] for s in specs]
    accuracies = [d["test_accuracy"] for d in done]
    std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    flops = statistics.fmean(equal_cost.training_flops(s.recipe) for s in specs)
    lth = [equal_cost.training_flops(s.recipe) for s in plan.runs
           if s.method == "lth" and s.sparsity == sparsity and "epochs" in s.budgets and s.seed == specs[0].seed]
    return {"accuracy": f"{100 * statistics.fmean(accuracies):.2f} ± {100 * std:.2f}",
            "flops": f"{flops:.3g}",
            "lth": f"{100 * flops / lth[0]:.1f}% of LTH" if lth else DASH,
            "seconds": f"{statistics.fmean(d['wall_time_s'] for d in done):.1f} s",
            "train_seconds": (f"{statistics.fmean(d['train_wall_s'] for d in done):.1f} s"
                              if all("train_wall_s" in d for d in done) else DASH)}


def expected_kinds(methods: list[str], train_wall: bool = True) -> list[str]:
    return ["accuracy", "flops", *(["lth"] if "lth" in methods else []), "seconds",
            *(["train_seconds"] if train_wall else [])]


def parse_markdown(md: str) -> list[tuple[str, str, list[str], list[tuple[str, list[str]]]]]:
    """results.md -> [(section, title, columns, [(row, cells)])] of every `###` table."""
    tables: list[tuple[str, str, list[str], list[tuple[str, list[str]]]]] = []
    section = title = ""
    for line in md.splitlines():
        if line.startswith("## "):
            section = line[3:]
        elif line.startswith("### "):
            title = line[4:]
        elif line.startswith("| method |"):
            tables.append((section, title, [c.strip() for c in line.strip("|").split("|")][1:], []))
        elif line.startswith("| ") and tables:
            row, *cells = [c.strip() for c in line.strip("|").split("|")]
            tables[-1][3].append((row, cells))
    return tables


def parse_rich(text: str) -> list[tuple[str, list[str], list[tuple[str, list[str]]]]]:
    """The terminal's tables -> [(title, columns, [(row, cells)])]; a title wrapped over lines is re-joined."""
    tables: list[tuple[str, list[str], list[tuple[str, list[str]]]]] = []
    title: list[str] = []
    for line in (raw.strip() for raw in text.splitlines()):
        if line.startswith("┃"):
            tables.append((" ".join(title), [c.strip() for c in line.strip("┃").split("┃")][1:], []))
            title = []
        elif line.startswith("│"):
            row, *cells = [c.strip() for c in line.strip("│").split("│")]
            tables[-1][2].append((row, cells))
        elif line and line[0] not in "┏┡└":
            title.append(line)
    return tables


def check_table(kind: str, rows: list[tuple[str, list[str]]], columns: list[str], want_rows: list[str],
                expect: Any, best_mark: Any) -> None:
    """Every expected row once, in order; every cell of `kind` (or `—`) and equal to the summaries' value."""
    labels = [row for row, _ in rows]
    assert labels == want_rows, (kind, labels)
    assert all(n == 1 for n in Counter(labels).values())
    assert columns == [report.format_sparsity(s) for s in expect.columns]
    for row, cells in rows:
        assert len(cells) == len(columns)
        for text, sparsity in zip(cells, expect.columns, strict=True):
            plain, best = best_mark(text)
            assert plain == DASH or re.fullmatch(CELL[kind], plain), (kind, row, sparsity, text)
            assert plain == expect(row, sparsity)[kind], (kind, row, sparsity, text)
            assert best == (kind == "accuracy" and (row, sparsity) in expect.best), (kind, row, sparsity, text)


class Expect:
    """The expected cells of one budget: columns, best rows per column, cell texts per (row, sparsity)."""

    def __init__(self, plan: compare.Plan, summaries: dict, budget: str) -> None:
        self.plan, self.summaries, self.budget = plan, summaries, budget
        self.columns = sorted({s.sparsity for s in plan.runs})
        self.best: set[tuple[str, float]] = set()
        for sparsity in self.columns:
            means = {row: statistics.fmean(summaries[s.key]["test_accuracy"] for s in specs)
                     for row in dict.fromkeys(s.row for s in plan.runs)
                     if (specs := [s for s in plan.runs if s.row == row and s.sparsity == sparsity
                                   and budget in s.budgets])}
            self.best |= {(row, sparsity) for row, mean in means.items() if mean == max(means.values())}

    def __call__(self, row: str, sparsity: float) -> dict[str, str]:
        return _expected_cells(self.plan, self.summaries, self.budget, row, sparsity)


def budget_of(spec: report.ReportTable, budgets: tuple[str, ...]) -> str:
    (budget,) = [b for b in budgets if report.budget_title(b, "ndsnn") == spec.section]
    return budget


def _md_mark(text: str) -> tuple[str, bool]:
    bold = text.startswith("**") and text.endswith("**")
    return (text[2:-2] if bold else text), bold


def _rich_mark(text: str) -> tuple[str, bool]:
    return (text[:-2], True) if text.endswith(" *") else (text, False)


@pytest.mark.parametrize(("methods", "baselines", "budgets"), CASES,
                         ids=[f"{'+'.join(m)}-{b}-{'+'.join(g)}" for m, b, g in CASES])
def test_every_table_holds_each_row_once_and_only_its_kind_of_cell(
        methods: list[str], baselines: str, budgets: tuple[str, ...], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    plan, summaries, table = make_table(methods, baselines, budgets)
    rows = expected_rows(methods, baselines)
    kinds = expected_kinds(methods)
    # the shared model the Markdown and the terminal render
    specs = report.report_tables(table)
    assert [(t.section, t.kind) for t in specs] == \
        [(report.budget_title(b, "ndsnn"), k) for b in budgets for k in kinds]
    # results.md
    md = parse_markdown(report.to_markdown(table))
    assert [(section, title) for section, title, _, _ in md] == [(t.section, t.title) for t in specs]
    for t, (_, _, columns, body) in zip(specs, md, strict=True):
        check_table(t.kind, body, columns, rows, Expect(plan, summaries, budget_of(t, budgets)), _md_mark)
    # the terminal (wide enough that no cell wraps)
    monkeypatch.setenv("COLUMNS", "300")
    from ndsnn_cli.cli.compare import print_tables

    capsys.readouterr()
    print_tables(table)
    shown = parse_rich(capsys.readouterr().out)
    assert len(shown) == len(specs)
    for t, (title, columns, body) in zip(specs, shown, strict=True):
        assert title.startswith(f"{t.section}: {t.title}")
        check_table(t.kind, body, columns, rows, Expect(plan, summaries, budget_of(t, budgets)), _rich_mark)
    # results.csv: one line per (budget, row, sparsity) that has runs or a reason it has none
    lines = list(csv.DictReader(io.StringIO(report.to_csv(table))))
    keys = [(r["budget"], r["method"], float(r["sparsity"])) for r in lines]
    assert len(keys) == len(set(keys))
    assert {(b, m) for b, m, _ in keys} == {(b, m) for b in budgets for m in rows}
    for r in lines:
        want = _expected_cells(plan, summaries, r["budget"], r["method"], float(r["sparsity"]))
        if want["accuracy"] == DASH:
            assert r["accuracy_mean"] == r["wall_time_s_mean"] == r["train_wall_s_mean"] == ""
            continue
        assert f"{float(r['wall_time_s_mean']):.1f} s" == want["seconds"]
        assert f"{float(r['train_wall_s_mean']):.1f} s" == want["train_seconds"]
        assert f"{float(r['training_flops']):.3g}" == want["flops"]
        assert (f"{100 * float(r['flops_vs_lth']):.1f}% of LTH" if r["flops_vs_lth"] else DASH) == want["lth"]


@pytest.mark.parametrize("baselines", compare.BASELINES)
@pytest.mark.parametrize("budgets", BUDGETS, ids="+".join)
def test_lth_with_its_own_settings_gets_an_lth_pub_row_and_the_share_table(baselines: str,
                                                                           budgets: tuple[str, ...]) -> None:
    own = tiny_toml(seed=3, data={"batch_size": 32, "eval_batch_size": 64, "train_limit": 64, "test_limit": 64},
                    train={"epochs": 2}, sparsity={"method": "lth", "prune_rate": 0.5, "rewind_epoch": 1})
    methods = ["ndsnn", "rigl", "set", "lth", "dense"]
    plan, summaries, table = make_table(methods, baselines, budgets, base=own)
    rows = expected_rows(methods, baselines, own_lth=True)
    specs = report.report_tables(table)
    assert [t.kind for t in specs] == expected_kinds(methods) * len(budgets)
    for t, (_, _, columns, body) in zip(specs, parse_markdown(report.to_markdown(table)), strict=True):
        check_table(t.kind, body, columns, rows, Expect(plan, summaries, budget_of(t, budgets)), _md_mark)


def test_published_without_lth_cost_tables_hold_no_accuracy_and_no_repeated_rows() -> None:
    """The reported case itself: `--methods ndsnn,rigl,set --baselines published`."""
    _, _, table = make_table(["ndsnn", "rigl", "set"], "published", ("epochs",))
    md = report.to_markdown(table)
    (flops,) = [body for _, title, _, body in parse_markdown(md) if title.startswith("Training FLOPs")]
    assert [row for row, _ in flops] == ["ndsnn", "rigl-pub", "set-pub"]
    assert all(re.fullmatch(CELL["flops"], c) for _, cells in flops for c in cells)
    assert "% of LTH" not in md
    assert md.count("| rigl-pub |") == md.count("| set-pub |") == len(report.report_tables(table))


def test_cells_hold_the_mean_wall_and_training_seconds_of_their_summaries() -> None:
    plan, summaries, table = make_table(["ndsnn", "lth", "dense"], "same", ("epochs",))
    for row, sparsity in [("ndsnn", 0.5), ("ndsnn", 0.8), ("lth", 0.8), ("dense", 0.0)]:
        runs = [summaries[s.key] for s in plan.runs if s.row == row and s.sparsity == sparsity]
        assert len(runs) == SEEDS
        c = report.cell(table, row, sparsity)
        assert c["wall_time_s_mean"] == pytest.approx(statistics.fmean(r["wall_time_s"] for r in runs), rel=1e-12)
        assert c["train_wall_s_mean"] == pytest.approx(statistics.fmean(r["train_wall_s"] for r in runs), rel=1e-12)
        assert c["train_wall_s_mean"] < c["wall_time_s_mean"]  # evaluation aside
        assert report.format_train_seconds(c) == f"{c['train_wall_s_mean']:.1f} s"
        for phase in ("data", "step", "evaluation"):
            assert c["time_split_mean"][phase] == pytest.approx(statistics.fmean(r["time_split"][phase] for r in runs))
    rows = {(r["method"], r["sparsity"]): r for r in csv.DictReader(io.StringIO(report.to_csv(table)))}
    c = report.cell(table, "lth", 0.8)
    assert float(rows[("lth", "0.8")]["step_s_mean"]) == pytest.approx(c["time_split_mean"]["step"], rel=1e-6)
    assert {f"{p}_s_mean" for p in ("setup", "data", "step", "mask_update", "evaluation", "checkpoint")} \
        <= set(rows[("lth", "0.8")])


def test_old_summaries_without_train_wall_s_show_no_training_table_and_a_partial_one_shows_a_dash() -> None:
    plan, summaries, table = make_table(["ndsnn", "rigl"], "same", ("epochs",), train_wall=False)
    assert all(c["train_wall_s_mean"] is None for c in table["cells"])
    assert [t.kind for t in report.report_tables(table)] == ["accuracy", "flops", "seconds"]
    assert {r["train_wall_s_mean"] for r in csv.DictReader(io.StringIO(report.to_csv(table)))} == {""}
    # one seed of one cell from before the trainer recorded it: that cell has no mean (not one seed's)
    first = plan.runs[0]
    mixed = {k: {**v, "train_wall_s": 0.8 * v["wall_time_s"]} for k, v in summaries.items() if k != first.key}
    mixed[first.key] = summaries[first.key]
    table = compare.aggregate(plan, mixed)
    assert report.cell(table, first.row, first.sparsity)["train_wall_s_mean"] is None
    (train,) = [t for t in report.report_tables(table) if t.kind == "train_seconds"]
    texts = {(row, column): text for row, cells in train.rows
             for column, (text, _) in zip(train.columns, cells, strict=True)}
    assert [key for key, text in texts.items() if text == DASH] == \
        [(first.row, report.format_sparsity(first.sparsity))]


def _timed_x(ax: Any) -> list[float]:
    """The x of every mean point drawn (a marker without a line; legend entries have no data)."""
    return sorted(x for line in ax.get_lines() if line.get_linestyle() == "None" for x in line.get_xdata())


def test_figure_plots_training_time_where_every_point_has_it_else_wall_time() -> None:
    plan, summaries, table = make_table(["ndsnn", "rigl", "dense"], "same", ("epochs",))
    cells = {(s.row, s.sparsity) for s in plan.runs}
    means = {cell: [summaries[s.key] for s in plan.runs if (s.row, s.sparsity) == cell] for cell in cells}
    label, xs = _time_panel(table)
    assert label.startswith("training time per run (s, evaluation aside")
    assert xs == pytest.approx(sorted(statistics.fmean(r["train_wall_s"] for r in runs) for runs in means.values()))
    # one run from before train_wall_s: every point falls back to wall time, and the label says so
    first = plan.runs[0].key
    summaries[first] = {k: v for k, v in summaries[first].items() if k != "train_wall_s"}
    label, xs = _time_panel(compare.aggregate(plan, summaries))
    assert label.startswith("wall time per run (s, training and evaluation")
    assert xs == pytest.approx(sorted(statistics.fmean(r["wall_time_s"] for r in runs) for runs in means.values()))


def _time_panel(table: dict[str, Any]) -> tuple[str, list[float]]:
    """The figure's time panel: its x label and its points' x values."""
    fig = report.results_figure(table)
    try:
        ax = fig.axes[-1]
        return ax.get_xlabel(), _timed_x(ax)
    finally:
        report.plots.pyplot().close(fig)


def test_report_only_renders_written_summaries_through_the_cli(tmp_path: Path) -> None:
    """End to end on files: summary.json in each run dir, `--report-only`, results.md/.csv and the terminal."""
    recipe_path = tmp_path / "r.toml"
    recipe_path.write_text(RECIPE)
    out = tmp_path / "out"
    methods = ["ndsnn", "rigl", "set"]
    plan = compare.plan_runs(parse_recipe(RECIPE), methods, SPARSITIES, SEEDS, out, "published", BUDGETS[1])
    summaries = {}
    for i, spec in enumerate(plan.runs):
        spec.run_dir.mkdir(parents=True)
        summaries[spec.key] = fake_summary(spec, i)
        (spec.run_dir / "summary.json").write_text(json.dumps(summaries[spec.key]))
    result = CliRunner().invoke(app, ["prune-compare", str(recipe_path), "--methods", ",".join(methods),
                                      "--sparsities", "0.5,0.8", "--seeds", str(SEEDS), "--out", str(out),
                                      "--baselines", "published", "--budget", "epochs,flops", "--report-only"],
                                catch_exceptions=False, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    rows, kinds = expected_rows(methods, "published"), expected_kinds(methods)
    md = parse_markdown((out / "results.md").read_text())
    assert len(md) == 2 * len(kinds)
    for i, (_, _, columns, body) in enumerate(md):
        check_table(kinds[i % len(kinds)], body, columns, rows,
                    Expect(plan, summaries, BUDGETS[1][i // len(kinds)]), _md_mark)
    shown = parse_rich(result.output)
    assert [[row for row, _ in body] for _, _, body in shown] == [rows] * len(md)
    lines = list(csv.DictReader((out / "results.csv").open()))
    for r in lines:
        want = _expected_cells(plan, summaries, r["budget"], r["method"], float(r["sparsity"]))
        assert f"{float(r['train_wall_s_mean']):.1f} s" == want["train_seconds"]
