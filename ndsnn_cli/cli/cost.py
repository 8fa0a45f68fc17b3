"""`ndsnn cost`: training FLOPs of dense / LTH / SET / RigL / GMP / NDSNN / static, each relative to LTH."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ndsnn_cli import limits as L
from ndsnn_cli.cli.app import app
from ndsnn_cli.errors import UserError

if TYPE_CHECKING:
    from ndsnn_cli.cost import CostReport, RunCost


@app.command()
def cost(
    target: Annotated[Path | None, typer.Argument(
        metavar="[RECIPE.toml|RUN_DIR]", help="Take the settings from a recipe, or report a finished run.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model (default resnet19).")] = None,
    sparsity: Annotated[float | None, typer.Option("--sparsity", "-s",
                                                   help="Final sparsity s_f (default 0.99).")] = None,
    dataset: Annotated[str | None, typer.Option(
        help="Data set: image size, classes, train size (default cifar10).")] = None,
    train_size: Annotated[int | None, typer.Option(min=1, max=L.MAX_SAMPLES,
                                                   help="Training images per epoch (default: the data set's).")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, max=L.MAX_EPOCHS, help="Training epochs (default 300).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, max=L.MAX_BATCH_SIZE,
                                                   help="Batch size (default 128).")] = None,
    timesteps: Annotated[int | None, typer.Option("--timesteps", "-T", min=1, max=L.MAX_TIMESTEPS,
                                                  help="Time steps T (default 5).")] = None,
    initial: Annotated[float | None, typer.Option(help="NDSNN initial sparsity s_i (default 0.5).")] = None,
    update_every: Annotated[int | None, typer.Option(min=1, max=L.MAX_STEPS,
                                                     help="dT: steps between mask updates (default 100).")] = None,
    ramp_start: Annotated[float | None, typer.Option(min=0, max=L.MAX_EPOCHS, help="t0 in epochs (default 0).")] = None,
    ramp_end: Annotated[float | None, typer.Option(min=0, max=L.MAX_EPOCHS,
                                                   help="t1 in epochs (default 75% of update end).")] = None,
    update_end: Annotated[float | None, typer.Option(min=0, max=L.MAX_EPOCHS,
                                                     help="t_end in epochs (default 75% of training).")] = None,
    distribution: Annotated[str | None, typer.Option(help="Layer split: erk, uniform, global (default erk).")] = None,
    prune_rate: Annotated[float | None, typer.Option(help="LTH: fraction pruned per round (default 0.25).")] = None,
    rewind_epoch: Annotated[int | None, typer.Option(min=0, max=L.MAX_EPOCHS,
                                                     help="LTH: rewind epoch (default 20).")] = None,
    round_epochs: Annotated[int | None, typer.Option(min=1, max=L.MAX_EPOCHS,
                                                     help="LTH: epochs per round (default: --epochs).")] = None,
    per_layer: Annotated[bool, typer.Option("--per-layer", help="Also print a table per layer.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON (stable keys) instead of tables.")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", metavar="FILE.png",
                                              help="Density and cumulative FLOPs over training, per method.")] = None,
) -> None:
    """Training FLOPs per sparse method from the real model layers and the trainer's own schedules.

    \b
    Examples:
      ndsnn cost --model resnet19 --sparsity 0.99
      ndsnn cost recipes/quickstart.toml --per-layer
      ndsnn cost runs/quick
    """
    import json

    if sparsity is not None and not 0 <= sparsity < 1:
        raise UserError(f"--sparsity {sparsity:g} must be in [0, 1)")
    if target is not None and not target.exists():
        raise UserError(f"{target}: no such recipe file or run directory")
    from ndsnn_cli.cost import base_recipe, is_run_dir, run_cost, training_cost

    if target is not None and target.is_dir():
        if not is_run_dir(target):
            raise UserError(f"{target}: not a run directory (no summary.json or metrics.jsonl)")
        result = run_cost(target)
        if json_output:
            typer.echo(json.dumps(result.to_json(), indent=2))
        else:
            print_run(result)
        return
    base = base_recipe(
        target, model=model, timesteps=timesteps, dataset=dataset, batch_size=batch_size, epochs=epochs,
        sparsity=sparsity, initial=initial, update_every=update_every, ramp_start=ramp_start, ramp_end=ramp_end,
        update_end=update_end, distribution=distribution, round_epochs=round_epochs, prune_rate=prune_rate,
        rewind_epoch=rewind_epoch)
    report = training_cost(base, train_size)
    if plot is not None:
        write_plot(report, plot)
    if json_output:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        print_report(report, per_layer)
        if plot is not None:
            typer.echo(f"plot: {plot}")


def print_report(report: CostReport, per_layer: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    table = Table(title=f"Training cost: {report.arch} on {report.dataset}, sparsity {report.sparsity:g}")
    for col in ("method", "training FLOPs", "vs LTH", "vs dense", "mean density", "inference FLOPs", "note"):
        table.add_column(col, justify="left" if col in ("method", "note") else "right")
    for name, mc in report.methods.items():
        rel_lth, rel_dense = report.relative(name, "lth"), report.relative(name, "dense")
        table.add_row(name, f"{mc.train_flops:.3e}", _pct(rel_lth), _pct(rel_dense), f"{mc.mean_density:.4f}",
                      f"{mc.inference_flops:.3e}", mc.note)
    console.print(table)
    a = report.assumptions
    console.print(
        f"[dim]Assumptions: {a['train_size']:,} images x {a['epochs']} epochs, batch {a['batch_size']} "
        f"({a['steps_per_epoch']} steps/epoch), T={a['timesteps']}; LTH: prune {a['lth_prune_rate']:g} of the "
        f"remaining per round, {a['lth_rounds']} rounds: {a['lth_round_epochs']} epochs dense, then "
        f"{a['lth_round_epochs'] - a['lth_rewind_epoch']} per round from the weights rewound to epoch "
        f"{a['lth_rewind_epoch']} (LTH-SNN), global magnitude split "
        f"estimated as {a['split_used']}; NDSNN s_i={a['ndsnn_initial_sparsity']:g}, t0={a['ramp_start_epoch']:g}, "
        f"t1={a['ramp_end_epoch']:g}, t_end={a['update_end_epoch']:g} epochs, dT={a['update_every_steps']} steps, "
        f"grow={a['grow']}; layer split {a['distribution']}"
        f"{' (as erk)' if a['distribution'] == 'global' else ''}. FLOPs = 2 x MAC of conv/linear only; "
        f"step = 3 x forward (2 x for the first layer, no input gradient); gradient growth pays the dense "
        f"weight gradient at each update; encoder once per sample, other layers x T.[/dim]")
    paper = report.to_json()["paper_ndsnn_relative_to_lth"]
    if paper is not None and "ndsnn" in report.methods:
        console.print(f"Paper (DAC 2023, CIFAR-10): NDSNN = {paper:.2%} of LTH; this model: "
                      f"{_pct(report.relative('ndsnn', 'lth'))} (see docs/cost.md for why they differ).")
    if per_layer:
        layers = Table(title="Per layer (dense forward FLOPs per sample; training FLOPs per method)")
        for col in ("layer", "shape", "x runs", "fwd FLOPs", *report.methods):
            layers.add_column(col, justify="left" if col == "layer" else "right")
        for lay in report.layers:
            layers.add_row(lay.name, "x".join(map(str, lay.shape)), str(lay.runs), f"{lay.forward_flops:.3e}",
                           *[f"{mc.layer_train_flops[lay.name]:.2e}" for mc in report.methods.values()])
        console.print(layers)


def print_run(result: RunCost) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    table = Table(title=f"Run {result.run_dir} ({result.method}): per-layer inference operations per sample")
    for col in ("layer", "input", "spike rate", "density", "nnz", "ops", "op", "training FLOPs"):
        table.add_column(col, justify="left" if col in ("layer", "input", "op") else "right")
    for row in result.layers:
        rate = "-" if row["input_spike_rate"] is None else f"{row['input_spike_rate']:.4f}"
        table.add_row(row["name"], row["input"], rate, f"{row['density']:.4f}", f"{row['nnz']:,}",
                      f"{row['ops']:.3e}", row["op"].upper(), f"{row['train_flops']:.3e}")
    console.print(table)
    a, e, s = result.assumptions, result.energy_pj, result.synaptic_ops
    console.print(f"training FLOPs (recorded masks) {result.train_flops:.4e}; schedule model "
                  f"{result.predicted_train_flops:.4e}; mean density {result.mean_density:.4f}, final "
                  f"{result.final_density:.4f}; {a['mask_updates']} mask updates, {a['steps']} steps")
    console.print(f"per sample: {s['ac']:.3e} AC + {s['mac']:.3e} MAC -> {e['snn'] / 1e6:.4f} uJ "
                  f"(dense non-spiking equivalent {s['dense_mac']:.3e} MAC -> {e['dense_ann'] / 1e6:.4f} uJ)")
    console.print(f"[dim]Energy per op: {a['energy_ac_pj']} pJ AC, {a['energy_mac_pj']} pJ MAC "
                  f"({a['energy_source']}); {a['spike_rates']}.[/dim]")
    if result.spike_rates:
        console.print("spike rates: " + ", ".join(f"{k} {v:.4f}" for k, v in result.spike_rates.items()))


def write_plot(report: CostReport, path: Path) -> None:
    """Two panels against training epochs: sparsity (log density axis) and cumulative FLOPs; written atomically."""
    from ndsnn_cli.atomic import write_bytes
    from ndsnn_cli.plots import png_bytes

    if path.suffix.lower() != ".png":
        raise UserError(f"--plot {path}: the plot is a PNG file (name it *.png)")
    write_bytes(path, png_bytes(cost_figure(report), dpi=110))


def cost_figure(report: CostReport) -> Any:
    from ndsnn_cli.plots import log_density_axis, pyplot, spread_ticks

    fig, (ax_d, ax_f) = pyplot().subplots(1, 2, figsize=(12, 4.5))
    for name, mc in report.methods.items():
        c = mc.curve
        ax_d.step(c["epochs"], [c["density"][0], *c["density"]], where="pre", label=name)
        ax_f.plot(c["epochs"], c["flops"], label=name)
    initial = report.assumptions["ndsnn_initial_sparsity"] if "ndsnn" in report.methods else 0.0
    round_numbers = [s for s in (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999) if s < report.sparsity]
    log_density_axis(ax_d, "y", spread_ticks([0.0, report.sparsity, initial], round_numbers),
                     label="sparsity of sparse layers (log density)")
    ax_d.set(xlabel="training epochs", title=f"{report.arch}, sparsity {report.sparsity:g}")
    ax_f.set(xlabel="training epochs", ylabel="cumulative training FLOPs", yscale="log", title="training FLOPs")
    ax_d.legend()
    fig.tight_layout()
    return fig


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"
