"""Figures: sparsity on a log density axis labelled as sparsity; accuracy vs training FLOPs, one point per run.

Axes are read back from the figure objects (scale, labels, tick labels, drawn data), not from pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ndsnn_cli import compare
from ndsnn_cli import compare_report as report
from ndsnn_cli.plots import spread_ticks
from ndsnn_cli.recipe import Recipe

SPARSITIES = (0.9, 0.95, 0.98, 0.99)
ROWS = ("dense", "ndsnn", "rigl", "rigl-pub")
ACCURACY = {"dense": 0.90, "ndsnn": 0.88, "rigl": 0.86, "rigl-pub": 0.85}


def _table(tmp_path: Path, with_flops: bool = True) -> dict[str, Any]:
    """Two seeds per cell; accuracy falls 1 point per sparsity step, seed 1 one point above seed 0."""
    runs, summaries = [], {}
    for row in ROWS:
        method = row.removesuffix("-pub")
        for i, sparsity in enumerate([0.0] if row == "dense" else SPARSITIES):
            for seed in (0, 1):
                spec = compare.RunSpec(method, sparsity, seed, Recipe(), tmp_path / row, "" if row == method else row)
                runs.append(spec)
                summaries[spec.key] = {"test_accuracy": ACCURACY[row] - 0.01 * i + 0.01 * seed, "wall_time_s": 1.0,
                                       "epochs": 1, "sparsity": {"sparsity": sparsity}}
    flops = (lambda spec: 1e12 * (1 - spec.sparsity) * (2 if spec.row == "rigl-pub" else 1)) if with_flops else (
        lambda spec: None)
    return compare.aggregate(compare.Plan(runs), summaries, flops=flops)


def _labels(ax: Any) -> dict[str, str]:
    """Legend label -> colour of what it names."""
    from matplotlib.collections import PathCollection
    from matplotlib.colors import to_hex
    from matplotlib.container import ErrorbarContainer

    def colour(handle: Any) -> Any:
        if isinstance(handle, ErrorbarContainer):
            return handle.lines[0].get_color()  # its data line
        if isinstance(handle, PathCollection):  # a hollow ring has no face colour: its edge's
            return (handle.get_facecolor() if len(handle.get_facecolor()) else handle.get_edgecolor())[0]
        return handle.get_color()

    handles, labels = ax.get_legend_handles_labels()
    return {label: to_hex(colour(h)) for label, h in zip(labels, handles, strict=True)}


def test_accuracy_vs_sparsity_is_on_a_log_density_axis_labelled_as_sparsity(tmp_path: Path) -> None:
    fig = report.results_figure(_table(tmp_path))
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.xaxis_inverted()  # sparsity grows to the right
    assert "sparsity" in ax.get_xlabel() and "density" in ax.get_xlabel()
    ticks = dict(zip(ax.get_xticks(), (t.get_text() for t in ax.get_xticklabels()), strict=True))
    assert sorted(ticks) == pytest.approx([0.01, 0.02, 0.05, 0.1])  # densities ...
    assert [ticks[x] for x in sorted(ticks)] == ["0.99", "0.98", "0.95", "0.9"]  # ... labelled as sparsities
    assert ax.get_ylabel() == "test accuracy (%)"
    # one error-bar series per sparse row: x = density, y = mean over seeds, bars = std over seeds
    bars = {c.get_label(): c for c in ax.containers}
    assert set(bars) == {"ndsnn", "rigl", "rigl-pub"}
    line, _caps, (bar_lines,) = bars["ndsnn"].lines
    assert list(line.get_xdata()) == pytest.approx([1 - s for s in SPARSITIES])
    assert list(line.get_ydata()) == pytest.approx([88.5, 87.5, 86.5, 85.5])
    spans = [seg[1][1] - seg[0][1] for seg in bar_lines.get_segments()]
    assert spans == pytest.approx([2 * 100 * 0.01 / 2 ** 0.5] * 4)  # ± sample std of two seeds 1 point apart
    # dense: a horizontal line at its mean, not a point on the density axis
    (dense,) = [line for line in ax.get_lines() if line.get_label() == "dense"]
    assert list(dense.get_ydata()) == pytest.approx([90.5, 90.5])
    assert set(_labels(ax)) == set(ROWS)


def test_accuracy_vs_training_flops_has_one_point_per_run_one_colour_per_method(tmp_path: Path) -> None:
    table = _table(tmp_path)
    fig = report.results_figure(table)
    density_ax, flops_ax, wall_ax = fig.axes
    assert flops_ax.get_xscale() == "log" and flops_ax.get_xlabel().startswith("training FLOPs")
    assert flops_ax.get_ylabel() == "test accuracy (%)"
    points = {c.get_label(): c.get_offsets() for c in flops_ax.collections}
    assert {row: len(p) for row, p in points.items()} == {"dense": 2, "ndsnn": 8, "rigl": 8, "rigl-pub": 8,
                                                          "non-dominated at its sparsity": 4}
    assert sorted(points["rigl-pub"][:, 0]) == pytest.approx(sorted(2e12 * (1 - s) for s in SPARSITIES for _ in "ab"))
    assert sorted(points["dense"][:, 1]) == pytest.approx([90.0, 91.0])
    # at each sparsity ndsnn has rigl's FLOPs and more accuracy, half rigl-pub's: it alone is not dominated
    ringed = sorted(map(tuple, points["non-dominated at its sparsity"]))
    expected = sorted((1e12 * (1 - s), 88.5 - i) for i, s in enumerate(SPARSITIES))
    assert [x for x, _ in ringed] == pytest.approx([x for x, _ in expected])
    assert [y for _, y in ringed] == pytest.approx([y for _, y in expected])
    flops_colours = {k: v for k, v in _labels(flops_ax).items() if k in ROWS}
    assert flops_colours == _labels(density_ax)  # the same colour for a method in every panel
    assert len(set(flops_colours.values())) == len(ROWS)
    assert wall_ax.get_xscale() == "log" and wall_ax.get_xlabel().startswith("wall time per run")


def test_without_flops_the_figure_has_the_sparsity_and_wall_panels_only(tmp_path: Path) -> None:
    fig = report.results_figure(_table(tmp_path, with_flops=False))
    assert len(fig.axes) == 2 and fig.axes[0].get_xscale() == "log"
    assert fig.axes[1].get_xlabel().startswith("wall time per run")


def test_reports_write_the_png_and_the_markdown_shows_it(tmp_path: Path) -> None:
    paths = report.write_reports(_table(tmp_path), tmp_path / "out")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"![{report.FIGURE_CAPTION}](results.png)" in paths["md"].read_text()


def test_cost_plot_draws_density_on_a_log_axis_labelled_as_sparsity() -> None:
    from ndsnn_cli.cli.cost import cost_figure
    from ndsnn_cli.cost import training_cost

    report = training_cost(Recipe().replace(
        model={"arch": "mlp", "timesteps": 3}, data={"dataset": "synthetic", "batch_size": 128}, train={"epochs": 4},
        sparsity={"final": 0.98, "initial": 0.5, "distribution": "uniform", "update_every_steps": 5}))
    density_ax, flops_ax = cost_figure(report).axes
    assert density_ax.get_yscale() == "log" and density_ax.yaxis_inverted()
    ticks = dict(zip(density_ax.get_yticks(), (t.get_text() for t in density_ax.get_yticklabels()), strict=True))
    assert [ticks[y] for y in sorted(ticks)] == ["0.98", "0.95", "0.9", "0.8", "0.5", "0"]
    assert "sparsity" in density_ax.get_ylabel()
    assert flops_ax.get_yscale() == "log"


def test_spread_ticks_keeps_required_ones_and_drops_optional_ones_that_would_overlap() -> None:
    # 0.987 (density 0.013) sits too close to 0.99 (0.01) to be labelled apart; 0.995 (0.005) does not
    assert spread_ticks([0.0, 0.99], [0.5, 0.9, 0.987, 0.995, 0.999]) == [0.0, 0.5, 0.9, 0.99, 0.995, 0.999]
