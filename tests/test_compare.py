"""prune-compare: the grid of runs, resume/skip, the aggregated table and its CSV/JSON/Markdown files."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_toml
from typer.testing import CliRunner

from ndsnn_cli import compare
from ndsnn_cli import compare_report as report
from ndsnn_cli.cli import app
from ndsnn_cli.errors import UserError
from ndsnn_cli.recipe import parse_recipe

RECIPE = tiny_toml(seed=3, data={"batch_size": 32, "eval_batch_size": 64, "train_limit": 64, "test_limit": 64},
                   train={"epochs": 1}, sparsity={"method": "rigl", "update_every_steps": 1})

METHODS, SPARSITIES, SEEDS = "rigl,static,dense", "0.5,0.8", 2


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NDSNN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """One real grid run through the CLI, shared by the tests that read it (training is the slow part)."""
    root = tmp_path_factory.mktemp("grid")
    recipe_path = root / "tiny.toml"
    recipe_path.write_text(RECIPE)
    out = root / "out"
    result = CliRunner().invoke(app, _args(recipe_path, out), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return recipe_path, out, result.output


def _args(recipe_path: Path, out: Path, *extra: str) -> list[str]:
    return ["prune-compare", str(recipe_path), "--methods", METHODS, "--sparsities", SPARSITIES,
            "--seeds", str(SEEDS), "--out", str(out), *extra]


def test_every_method_sparsity_seed_gets_its_run_dir_and_dense_runs_once_per_seed(grid: tuple[Path, Path, str]) -> None:
    _, out, _ = grid
    expected = {f"{m}-s{s}-seed{k}" for m in ("rigl", "static") for s in ("0.5", "0.8") for k in (3, 4)}
    expected |= {"dense-s0-seed3", "dense-s0-seed4"}
    assert {p.name for p in out.iterdir() if p.is_dir()} == expected
    for name in expected:
        summary = json.loads((out / name / "summary.json").read_text())
        method, sparsity, seed = name.split("-")
        assert summary["method"] == method and summary["seed"] == int(seed[4:])
        recipe = parse_recipe((out / name / "recipe.toml").read_text())
        assert recipe.data.train_limit == 64 and recipe.train.epochs == 1 and recipe.model.arch == "mlp"
        if method != "dense":
            # ERK layer targets round per layer: realised sparsity within 1% of the requested one
            assert summary["sparsity"]["sparsity"] == pytest.approx(float(sparsity[1:]), abs=0.01)


def test_second_invocation_skips_finished_runs_without_retraining(grid: tuple[Path, Path, str]) -> None:
    recipe_path, out, _ = grid
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    checkpoints = {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoints/last.safetensors")}
    assert len(before) == 10
    result = CliRunner().invoke(app, _args(recipe_path, out), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")} == before
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoints/last.safetensors")} == checkpoints


def test_execute_reports_skips_and_trains_only_the_missing_run(grid: tuple[Path, Path, str], tmp_path: Path) -> None:
    recipe_path, out, _ = grid
    base = parse_recipe(recipe_path.read_text())
    plan = compare.plan_runs(base, ["static"], [0.5], 1, out)
    events: list[tuple[str, str]] = []
    results = compare.execute(plan, on_event=lambda key, status, info: events.append((key, status)))
    assert results == {"static-s0.5-seed3": "done"}
    assert events == [("static-s0.5-seed3", "done")]  # skipped: no "running" event, no training
    fresh = compare.plan_runs(base, ["static"], [0.5], 1, tmp_path / "fresh")
    events.clear()
    assert compare.execute(fresh, on_event=lambda key, status, info: events.append((key, status))) == \
        {"static-s0.5-seed3": "done"}
    assert ("static-s0.5-seed3", "running") in events and events[-1] == ("static-s0.5-seed3", "done")
    # same recipe, same seed, deterministic trainer: the fresh run reproduces the grid's accuracy exactly
    first = json.loads((out / "static-s0.5-seed3" / "summary.json").read_text())
    again = json.loads((tmp_path / "fresh" / "static-s0.5-seed3" / "summary.json").read_text())
    assert again["test_accuracy"] == first["test_accuracy"]


def _hand_cells(out: Path) -> dict[tuple[str, str], tuple[float, float]]:
    cells = {}
    for method, sparsities in (("rigl", ("0.5", "0.8")), ("static", ("0.5", "0.8")), ("dense", ("0",))):
        for s in sparsities:
            accs = [json.loads((out / f"{method}-s{s}-seed{k}" / "summary.json").read_text())["test_accuracy"]
                    for k in (3, 4)]
            mean = sum(accs) / 2
            std = (sum((a - mean) ** 2 for a in accs) / (2 - 1)) ** 0.5
            cells[method, s] = (mean, std)
    return cells


def test_csv_json_md_hold_mean_and_std_computed_by_hand(grid: tuple[Path, Path, str]) -> None:
    _, out, output = grid
    cells = _hand_cells(out)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 5
    for row in rows:
        mean, std = cells[row["method"], row["sparsity"]]
        assert float(row["accuracy_mean"]) == pytest.approx(mean, abs=1e-12)
        assert float(row["accuracy_std"]) == pytest.approx(std, abs=1e-12)
        assert row["runs_done"] == row["runs"] == "2"
    flops = {(r["method"], r["sparsity"]): float(r["training_flops"]) for r in rows}  # the `ndsnn cost` model
    assert flops["dense", "0"] > flops["rigl", "0.5"] > flops["rigl", "0.8"] > 0
    assert flops["static", "0.5"] > flops["static", "0.8"] > 0
    assert all(r["flops_vs_lth"] == "" for r in rows)  # no LTH in this grid: no ratio, not a made-up one
    table = json.loads((out / "results.json").read_text())
    for c in table["cells"]:
        mean, std = cells[c["method"], f"{c['sparsity']:g}"]
        assert c["accuracy_mean"] == pytest.approx(mean, abs=1e-12)
        assert c["accuracy_std"] == pytest.approx(std, abs=1e-12)
    for s in (0.5, 0.8):
        best = max(cells["rigl", f"{s:g}"][0], cells["static", f"{s:g}"][0])
        assert {c["method"] for c in table["cells"] if c["sparsity"] == s and c["best"]} == \
            {m for m in ("rigl", "static") if cells[m, f"{s:g}"][0] == best}
    md = (out / "results.md").read_text()
    for mean, std in cells.values():
        assert f"{100 * mean:.2f} ± {100 * std:.2f}" in md
        assert f"{100 * mean:.2f} ± {100 * std:.2f}" in output  # the rich table printed the same cell
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_only_renders_the_same_table_without_training(grid: tuple[Path, Path, str]) -> None:
    recipe_path, out, output = grid
    md_before = (out / "results.md").read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
    result = CliRunner().invoke(app, _args(recipe_path, out, "--report-only"), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (out / "results.md").read_text() == md_before
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")} == mtimes
    start = output.index("┃ method")  # the first table (its title wraps with the terminal width)
    assert result.output[result.output.index("┃ method"):].split("written:")[0] == \
        output[start:].split("written:")[0]


def test_report_only_without_runs_is_a_user_error(tmp_path: Path) -> None:
    recipe_path = tmp_path / "tiny.toml"
    recipe_path.write_text(RECIPE)
    with pytest.raises(UserError, match="no finished runs"):
        CliRunner().invoke(app, _args(recipe_path, tmp_path / "empty", "--report-only"), catch_exceptions=False)
    assert not (tmp_path / "empty" / "results.csv").exists()


def test_bad_method_name_is_one_line_exit_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    recipe_path = tmp_path / "tiny.toml"
    recipe_path.write_text(RECIPE)
    proc = subprocess.run([sys.executable, "-m", "ndsnn_cli", "prune-compare", str(recipe_path), "--methods",
                           "ndsnn,rigll", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == \
        ["error: --methods: unknown method 'rigll' (known: dense, static, set, rigl, gmp, ndsnn, lth)"]
    assert not (tmp_path / "o").exists()


def test_lth_gets_ltsnn_defaults_and_other_methods_no_lth_keys() -> None:
    base = parse_recipe(RECIPE.replace("epochs = 1", "epochs = 30"))
    lth, notes = compare.run_recipe(base, "lth", 0.9, 0)
    assert (lth.sparsity.method, lth.sparsity.prune_rate, lth.sparsity.rewind_epoch) == ("lth", 0.25, 3)
    assert any("prune_rate = 0.25" in n for n in notes)
    base_lth = base.replace(sparsity={"method": "lth", "prune_rate": 0.5, "rewind_epoch": 2})
    for method in ("rigl", "set", "ndsnn", "gmp", "static", "dense"):
        recipe, _ = compare.run_recipe(base_lth, method, 0.9, 1)
        assert (recipe.sparsity.prune_rate, recipe.sparsity.rewind_epoch) == (-1.0, -1)
        assert recipe.seed == 1 and recipe.sparsity.method == method
    lth_own, notes = compare.run_recipe(base_lth, "lth", 0.95, 0)
    assert (lth_own.sparsity.prune_rate, lth_own.sparsity.rewind_epoch, lth_own.sparsity.final) == (0.5, 2, 0.95)
    assert notes == []
    plan = compare.plan_runs(base_lth, ["lth"], [0.75, 0.9], 1, "out")
    # prune_rate 0.5: 0 -> 0.5 -> 0.75 (3 rounds); 0 -> 0.5 -> 0.75 -> 0.875 -> 0.9 (5 rounds)
    assert any("rounds incl. the dense one per sparsity: 0.75: 3, 0.9: 5" in n for n in plan.notes)


def test_mean_and_std_aggregation_with_one_missing_seed(tmp_path: Path) -> None:
    base = parse_recipe(RECIPE)
    plan = compare.plan_runs(base, ["rigl", "lth"], [0.5], 3, tmp_path)
    summaries = {
        "rigl-s0.5-seed3": {"test_accuracy": 0.5, "wall_time_s": 10.0, "epochs": 1, "sparsity": {"sparsity": 0.5}},
        "rigl-s0.5-seed4": {"test_accuracy": 0.7, "wall_time_s": 20.0, "epochs": 1, "sparsity": {"sparsity": 0.5}},
        "lth-s0.5-seed3": {"test_accuracy": 0.65, "wall_time_s": 40.0, "epochs": 1, "total_epochs": 4,
                           "sparsity": {"sparsity": 0.5}},
    }
    table = compare.aggregate(plan, summaries, flops=lambda spec: {"rigl": 3.0, "lth": 12.0}[spec.method])
    rigl, lth = report.cell(table, "rigl", 0.5), report.cell(table, "lth", 0.5)
    assert rigl["accuracy_mean"] == pytest.approx(0.6)
    assert rigl["accuracy_std"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert (rigl["done"], rigl["runs"], rigl["best"], lth["best"]) == (2, 3, False, True)
    assert rigl["flops_vs_lth"] == 0.25 and lth["flops_vs_lth"] == 1.0 and lth["epochs"] == 4
    assert report.format_accuracy(rigl) == "60.00 ± 14.14 (2/3)"
    assert report.format_accuracy(lth) == "65.00 ± 0.00 (1/3)"
    assert (report.format_lth_share(rigl), report.format_flops(rigl), report.format_seconds(rigl)) == \
        ("25.0% of LTH", "3", "15.0 s")
    assert report.format_lth_share({**rigl, "flops_vs_lth": None}) == "—"


def test_bad_sparsities_and_seeds_are_user_errors() -> None:
    with pytest.raises(UserError, match="--sparsities: 1.5 must be in"):
        compare.parse_sparsities("0.9,1.5")
    with pytest.raises(UserError, match="'x' is not a number"):
        compare.parse_sparsities("x")
    with pytest.raises(UserError, match="--seeds 0"):
        compare.plan_runs(parse_recipe(RECIPE), ["rigl"], [0.9], 0, "out")


@pytest.mark.slow  # spawns two worker processes that each import torch: ~10 s idle, a minute on a busy machine
def test_parallel_jobs_give_the_same_runs_as_serial(grid: tuple[Path, Path, str], tmp_path: Path) -> None:
    recipe_path, out, _ = grid
    plan = compare.plan_runs(parse_recipe(recipe_path.read_text()), ["static"], [0.8], 2, tmp_path / "par")
    statuses: dict[str, list[str]] = {}
    results = compare.execute(plan, jobs=2, on_event=lambda k, s, i: statuses.setdefault(k, []).append(s))
    assert results == {"static-s0.8-seed3": "done", "static-s0.8-seed4": "done"}
    for key, seen in statuses.items():
        assert seen[0] == "running" and seen[-1] == "done", (key, seen)  # worker events reached the parent
        serial = json.loads((out / key / "summary.json").read_text())
        parallel = json.loads((tmp_path / "par" / key / "summary.json").read_text())
        assert parallel["test_accuracy"] == serial["test_accuracy"]
        assert parallel["sparsity"]["nnz"] == serial["sparsity"]["nnz"]


def test_interrupted_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    base = parse_recipe(RECIPE.replace("epochs = 1", "epochs = 2"))
    plan = compare.plan_runs(base, ["rigl"], [0.5], 1, tmp_path / "cut")

    def stop_after_first_epoch(key: str, status: str, info: dict) -> None:
        if info.get("epoch") == 1 and "test_accuracy" in info:
            raise KeyboardInterrupt  # as Ctrl-C would, after the epoch-end checkpoint

    with pytest.raises(KeyboardInterrupt):
        compare.execute(plan, on_event=stop_after_first_epoch)
    assert [compare.run_status(s) for s in plan.runs] == ["partial"]
    starts: list[int] = []
    compare.execute(plan, on_event=lambda k, s, i: starts.append(i["step"]) if "step" in i and not starts else None)
    assert starts == [2]  # 64 images / batch 32: resumed at the start of epoch 2, not from step 0
    whole = compare.plan_runs(base, ["rigl"], [0.5], 1, tmp_path / "whole")
    compare.execute(whole)
    resumed = json.loads((tmp_path / "cut" / "rigl-s0.5-seed3" / "summary.json").read_text())
    uninterrupted = json.loads((tmp_path / "whole" / "rigl-s0.5-seed3" / "summary.json").read_text())
    assert resumed["test_accuracy"] == uninterrupted["test_accuracy"]
    assert resumed["sparsity"]["nnz"] == uninterrupted["sparsity"]["nnz"]


def test_run_dir_with_a_different_recipe_is_refused(tmp_path: Path) -> None:
    base = parse_recipe(RECIPE)
    plan = compare.plan_runs(base, ["static"], [0.5], 1, tmp_path)
    run_dir = plan.runs[0].run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.toml").write_text(plan.runs[0].recipe.replace(train={"lr": 0.2}).to_toml())
    with pytest.raises(UserError, match="holds a run of a different recipe"):
        compare.check_run_dirs(plan)


def test_published_baselines_follow_their_papers_schedules_scaled_to_the_run() -> None:
    # 2048 synthetic images at batch 32: 64 steps an epoch, shorter than RigL's 391: ΔT = round(100 * 64 / 391) = 16
    base = parse_recipe(tiny_toml(data={"batch_size": 32, "train_limit": 0}, train={"epochs": 6}))
    plan = compare.plan_runs(base, ["ndsnn", "rigl", "set", "lth", "dense"], [0.9], 1, "out", "both")
    rows = {spec.row: spec for spec in plan.runs}
    assert list(rows) == ["ndsnn", "rigl", "rigl-pub", "set", "set-pub", "lth", "dense"]
    rigl, set_ = rows["rigl-pub"].recipe.sparsity, rows["set-pub"].recipe.sparsity
    assert (rigl.method, rigl.update_every_steps, rigl.drop_fraction, rigl.drop_fraction_min, rigl.grow,
            rigl.update_end_epoch) == ("rigl", 16, 0.3, 0.0, "gradient", 4.5)
    assert (set_.method, set_.update_every_steps, set_.drop_fraction, set_.drop_fraction_min, set_.grow,
            set_.update_end_epoch) == ("set", 64, 0.3, 0.3, "random", 6.0)
    assert rigl.dense == set_.dense == ["encoder.1.weight"]  # the mlp's first layer, dense as in RigL
    assert rows["rigl"].recipe.sparsity.update_every_steps == base.sparsity.update_every_steps  # shared settings
    assert rows["rigl-pub"].run_dir == Path("out/rigl-pub-s0.9-seed0")
    # the recipe has no LTH settings, so LTH-SNN's are used either way: one run, one row
    assert (rows["lth"].recipe.sparsity.prune_rate, rows["lth"].recipe.sparsity.rewind_epoch) == (0.25, 0)
    assert any(n.startswith("rigl-pub: RigL's published schedule: ΔT = 16 steps") for n in plan.notes)
    published = compare.plan_runs(base, ["rigl", "lth", "ndsnn"], [0.9], 1, "out", "published")
    assert [s.row for s in published.runs] == ["rigl-pub", "lth", "ndsnn"]
    own_lth = base.replace(sparsity={"method": "lth", "prune_rate": 0.5, "rewind_epoch": 2})
    both = compare.plan_runs(own_lth, ["lth"], [0.9], 1, "out", "both")
    assert [s.row for s in both.runs] == ["lth", "lth-pub"]
    assert both.runs[1].recipe.sparsity.prune_rate == 0.25


def test_rigl_published_delta_t_is_100_steps_on_epochs_of_391_steps_or_more() -> None:
    base = parse_recipe(tiny_toml(data={"dataset": "cifar10", "batch_size": 128, "train_limit": 0},
                                  model={"arch": "scnn"}))
    recipe, notes = compare.published_recipe(compare.run_recipe(base, "rigl", 0.9, 0)[0], "encoder.0.weight")
    assert recipe.sparsity.update_every_steps == 100 and "ΔT = 100 steps;" in notes[0]


def test_set_overrides_change_every_run_and_bad_ones_are_one_line_errors() -> None:
    base = parse_recipe(RECIPE)
    changed = compare.apply_overrides(base, ["sparsity.init=dense", "train.epochs=3", "model.timesteps = 3"])
    assert (changed.sparsity.init, changed.train.epochs, changed.model.timesteps) == ("dense", 3, 3)
    for bad, message in [("sparsity.init=sparse", "must be one of scaled, dense"), ("epochs=3", "TABLE.KEY=VALUE"),
                         ("nope.x=1", "unknown table"), ("train.epochz=3", "did you mean 'epochs'")]:
        with pytest.raises(UserError, match=message):
            compare.apply_overrides(base, [bad])


def test_unknown_baselines_value_is_exit_2(tmp_path: Path, run_main: Any) -> None:
    recipe_path = tmp_path / "r.toml"
    recipe_path.write_text(RECIPE)
    code, _, err = run_main("prune-compare", str(recipe_path), "--baselines", "papers", "--out", str(tmp_path / "o"))
    assert code == 2 and "--baselines: unknown 'papers' (known: same, published, both)" in err
