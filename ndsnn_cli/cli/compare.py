"""`ndsnn prune-compare RECIPE.toml`: every (method, sparsity, seed) of one recipe, one comparison table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ndsnn_cli import limits as L
from ndsnn_cli.cli.app import app
from ndsnn_cli.cli.process import keep_freed_memory

if TYPE_CHECKING:
    from ndsnn_cli.compare import Plan


@app.command("prune-compare")
def prune_compare(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE.toml",
                                                help="Base recipe: model, data, epochs, optimizer.")],
    methods: Annotated[str, typer.Option("--methods",
                                         help="Comma-separated: ndsnn, rigl, set, lth, gmp, static, dense.")
                       ] = "ndsnn,rigl,set,lth,dense",
    sparsities: Annotated[str, typer.Option("--sparsities", help="Comma-separated final sparsities in (0, 1).")
                          ] = "0.9,0.95,0.98,0.99",
    seeds: Annotated[int, typer.Option("--seeds", min=1, max=L.MAX_PROCESSES,
                                       help="Seeds per cell: recipe seed, seed + 1, ...")] = 1,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: runs/compare-<name>).")
                   ] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, max=L.MAX_PROCESSES,
                                      help="Runs in parallel processes (cores/N threads each).")
                    ] = 1,
    report_only: Annotated[bool, typer.Option("--report-only", help="Only render the table from existing runs.")
                           ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result table as JSON.")] = False,
    baselines: Annotated[str, typer.Option("--baselines", help="RigL, SET and LTH at the recipe's shared settings "
                                           "(same), at their papers' settings (published), or both.")] = "same",
    budget: Annotated[str, typer.Option("--budget", help="Comma-separated: epochs (the recipe's length for every "
                                        "method), flops, steps, wall (each method trained as long as costs what "
                                        "--budget-ref costs, per sparsity): one set of tables per budget.")
                      ] = "epochs",
    budget_ref: Annotated[str, typer.Option("--budget-ref", help="The method (or e.g. rigl-pub) whose cost at the "
                                            "recipe's length the other budgets match.")] = "ndsnn",
    overrides: Annotated[list[str] | None, typer.Option("--set", metavar="TABLE.KEY=VALUE",
                                                        help="Change a recipe key for every run, e.g. "
                                                             "--set sparsity.init=dense (repeatable).")] = None,
) -> None:
    """Train every method at every sparsity and seed with the same recipe, then compare test accuracy and cost.

    Resumable: finished runs (summary.json) are skipped, interrupted ones resume from their checkpoint.
    Writes results.csv/.json/.md/.png into the output folder.

    \b
    Examples:
      ndsnn prune-compare recipes/compare-fmnist.toml --methods ndsnn,rigl,lth,dense \\
        --sparsities 0.9,0.99 --seeds 2 --out runs/cmp
      ndsnn prune-compare recipes/compare-fmnist.toml --methods ndsnn,rigl,set --baselines both
      ndsnn prune-compare recipes/compare-fmnist.toml --methods set,rigl --set sparsity.init=dense
      ndsnn prune-compare recipes/compare-fmnist.toml --methods ndsnn,rigl,set --budget epochs,flops
    """
    import json

    from rich.console import Console

    from ndsnn_cli import compare, compare_report
    from ndsnn_cli.equal_cost import parse_budgets
    from ndsnn_cli.recipe import load_recipe

    base = compare.apply_overrides(load_recipe(recipe_path), overrides or [])
    keep_freed_memory()
    budgets = parse_budgets(budget)
    compare.parse_reference(budget_ref)
    out_dir = out or Path(os.environ.get("NDSNN_RUNS", "runs")) / f"compare-{base.name}"

    def make_plan(measured: dict[tuple[str, float], float] | None = None) -> Plan:
        return compare.plan_runs(base, compare.parse_methods(methods), compare.parse_sparsities(sparsities), seeds,
                                 out_dir, baselines, budgets, budget_ref, measured)

    plan = make_plan()
    compare.check_run_dirs(plan)
    console = Console(stderr=True)
    quiet = json_output
    if not quiet:
        for note in plan.notes:
            console.print(f"[dim]note:[/dim] {note}")
    results: dict[str, str] = {}
    if not report_only:
        with LiveOverview(plan, enabled=not quiet) as live:
            results = compare.execute(plan, jobs=jobs, on_event=live.on_event)
    if "wall" in budgets:  # the wall budget's lengths come from the seconds per step the runs above measured
        plan = make_plan(compare.measured_seconds_per_step(plan, compare.read_summaries(plan)))
        compare.check_run_dirs(plan)
        if not report_only:
            with LiveOverview(plan, enabled=not quiet) as live:
                results.update(compare.execute(plan, jobs=jobs, on_event=live.on_event))
    summaries = compare.read_summaries(plan)
    if report_only and not summaries:
        from ndsnn_cli.errors import UserError

        raise UserError(f"{out_dir}: no finished runs of this grid to report (run without --report-only)")
    table = compare.aggregate(plan, summaries)
    paths = compare_report.write_reports(table, out_dir)
    if json_output:
        typer.echo(json.dumps(compare_report.json_safe(table), indent=2))
    else:
        print_tables(table)
        Console().print("written: " + ", ".join(str(p) for p in paths.values()))
    failed = {k: v for k, v in results.items() if v != "done"}
    if failed:
        for key, status in failed.items():
            console.print(f"[red]{key}[/red]: {status}")
        raise typer.Exit(1)


class LiveOverview:
    """One row per run (status, progress, accuracy) and an overall progress bar, live-updated."""

    def __init__(self, plan: Plan, enabled: bool = True) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from ndsnn_cli.compare import run_status

        self.enabled = enabled
        self.console = Console(stderr=True)
        self.rows: dict[str, dict[str, Any]] = {}
        for spec in plan.runs:
            partial = run_status(spec) == "partial"
            self.rows[spec.key] = {"status": "pending", "info": "resumes" if partial else "", "acc": ""}
        self.progress = Progress(TextColumn("[bold]runs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=self.console)
        self.task = self.progress.add_task("runs", total=len(plan.runs))
        self.live: Any = None

    def __enter__(self) -> LiveOverview:
        if self.enabled:
            from rich.live import Live

            self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.__exit__(*exc)
            if not self.console.is_terminal:  # a log file: end the progress line before the tables
                self.console.print()

    def on_event(self, key: str, status: str, info: dict[str, Any]) -> None:
        row = self.rows[key]
        if status == "warning":  # e.g. a dead LIF layer: printed above the live table, the run goes on
            from rich.markup import escape

            self.console.print(f"[yellow]warning:[/yellow] {key}: {escape(info['message'])}", highlight=False)
            return
        row["status"] = status
        if status == "running" and "total" in info:
            steps = f"step {info['step']}/{info['total']}"
            row["info"] = f"{info['round']} {steps}".strip() if info.get("round") else steps
        if "test_accuracy" in info:
            row["acc"] = f"{info['test_accuracy']:.2%}"
        if status == "failed":
            row["info"] = info.get("error", "")
        if status == "done":
            row["info"] = "skipped (done)" if info.get("skipped") else "done"
        self.progress.update(self.task, completed=sum(r["status"] in ("done", "failed") for r in self.rows.values()))
        if self.live is not None:
            self.live.update(self._render())

    def _render(self) -> Any:
        from rich.console import Group
        from rich.table import Table

        colors = {"pending": "dim", "running": "yellow", "done": "green", "failed": "red"}
        table = Table(show_header=True, header_style="bold", box=None)
        for name in ("run", "status", "progress", "last test acc"):
            table.add_column(name)
        for key, row in self.rows.items():
            table.add_row(key, f"[{colors[row['status']]}]{row['status']}", row["info"], row["acc"])
        return Group(table, self.progress)


def print_tables(table: dict[str, Any]) -> None:
    """The report's tables (compare_report.report_tables, as in results.md), its verdicts and notes."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from ndsnn_cli.compare_report import frontier_text, report_tables, verdicts

    console = Console()
    for spec in report_tables(table):
        title = f"{spec.section}: {spec.title}" + (" (* = best)" if spec.kind == "accuracy" else "")
        t = Table(title=escape(title))
        t.add_column("method")
        for column in spec.columns:
            t.add_column(column, justify="right")
        for row, cells in spec.rows:
            t.add_row(escape(row), *[f"[bold]{escape(text)} *[/bold]" if best else escape(text)
                                     for text, best in cells])
        console.print(t)
    for sentence in verdicts(table):
        console.print(sentence, highlight=False)
    for line in frontier_text(table):
        console.print(f"non-dominated {line}", highlight=False)
    for note in table["notes"]:
        console.print(f"[dim]note:[/dim] {escape(note)}", highlight=False)
