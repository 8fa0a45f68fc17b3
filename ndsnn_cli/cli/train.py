"""`ndsnn train RECIPE.toml`: train one SNN with one method into a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ndsnn_cli import limits as L
from ndsnn_cli.cli.app import app
from ndsnn_cli.cli.process import keep_freed_memory

if TYPE_CHECKING:
    from ndsnn_cli.recipe import Recipe
    from ndsnn_cli.sparse.methods import MaskUpdate


@app.command()
def train(
    recipe_path: Annotated[Path, typer.Argument(metavar="RECIPE.toml", help="Recipe file (see recipes/).")],
    out: Annotated[Path | None, typer.Option("--out", "-o",
                                             help="Run directory (default: runs/<recipe name>).")] = None,
    resume: Annotated[bool, typer.Option("--resume",
                                         help="Continue the run from its last checkpoint.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON instead of a table.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    nproc: Annotated[int, typer.Option("--nproc", min=1, max=L.MAX_PROCESSES,
                                       help="Train with N processes on this machine "
                                       "(DistributedDataParallel via torchrun; batch_size is per process).")] = 1,
) -> None:
    """Train one spiking network with the recipe's sparse method (ndsnn, rigl, set, lth, static, gmp, dense).

    \b
    Examples:
      ndsnn train recipes/quickstart.toml --out runs/quick
      ndsnn train recipes/quickstart.toml --nproc 2   (two processes, the same as
        torchrun --nproc-per-node 2 -m ndsnn_cli train recipes/quickstart.toml)
    """
    import json
    import os

    from ndsnn_cli.recipe import load_recipe

    recipe = load_recipe(recipe_path)  # before the torch import, so a bad recipe fails instantly
    keep_freed_memory()

    from ndsnn_cli.rundir import default_run_dir
    from ndsnn_cli.train import train as run_training

    run_dir = out or default_run_dir(recipe)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(_launch_torchrun(nproc, recipe_path, run_dir, resume, json_output, quiet))
    rank = int(os.environ.get("RANK", "0") or 0)
    try:
        with RichTrainProgress(enabled=not quiet and not json_output and rank == 0) as progress:
            summary = run_training(recipe, run_dir, resume=resume, callbacks=progress)
    except Exception:
        if rank != 0:  # rank 0 reports (errors are shared across ranks); the others leave quietly
            raise typer.Exit(2) from None
        raise
    if rank != 0:
        return
    if json_output:
        typer.echo(json.dumps(summary, indent=2))
    else:
        print_summary(summary, run_dir)


def _launch_torchrun(nproc: int, recipe_path: Path, run_dir: Path, resume: bool, json_output: bool,
                     quiet: bool) -> int:
    """Re-run this command under `torch.distributed.run` with `nproc` local processes; its exit code."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "ndsnn_cli", "train", str(recipe_path), "--out", str(run_dir)]
    argv += ["--resume"] * resume + ["--json"] * json_output + ["--quiet"] * quiet
    code = subprocess.call(argv)
    return 2 if code == 1 else code  # torchrun exits 1 when a rank failed; ranks fail on bad input (2)


class RichTrainProgress:
    """Epoch and batch progress bars with running loss/accuracy, and one line per epoch."""

    def __init__(self, enabled: bool = True) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.enabled = enabled
        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console, disable=not enabled, transient=False)
        self.steps_task: Any = None
        self.steps_per_epoch = 1

    def __enter__(self) -> RichTrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def on_run_start(self, recipe: Recipe, total_steps: int, steps_per_epoch: int, start_step: int) -> None:
        self.steps_per_epoch = steps_per_epoch
        if self.steps_task is not None:
            self.progress.remove_task(self.steps_task)
        label = f"{recipe.name} [{recipe.sparsity.method}]"
        self.steps_task = self.progress.add_task(label, total=total_steps, completed=start_step, info="")

    def on_step(self, step: int, epoch: int, loss: float, accuracy: float) -> None:
        self.progress.update(self.steps_task, completed=step,
                             info=f"epoch {epoch + 1} loss {loss:.4f} acc {accuracy:.2%}")

    def on_epoch_end(self, record: dict[str, Any]) -> None:
        self.progress.update(self.steps_task, completed=record["step"])
        if self.enabled:
            self.progress.console.print(epoch_line(record), highlight=False, markup=False)

    def on_mask_update(self, update: MaskUpdate) -> None:
        pass

    def on_kernels(self, step: int, layers: dict[str, str]) -> None:
        if self.enabled:
            by_kernel: dict[str, list[str]] = {}
            for name, kernel in layers.items():
                if kernel != "dense":
                    by_kernel.setdefault(kernel, []).append(name.removesuffix(".weight"))
            sparse = sum(len(names) for names in by_kernel.values())
            where = "; ".join(f"{kernel}: {', '.join(names)}" for kernel, names in by_kernel.items()) or "none"
            self.progress.console.print(f"step {step}: sparse kernels on {sparse}/{len(layers)} layers ({where})",
                                        highlight=False, markup=False)

    def on_warning(self, message: str) -> None:
        from rich.markup import escape

        self.console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)

    def on_round_start(self, index: int, rounds: int, sparsity: float) -> None:
        if self.enabled:
            self.progress.console.print(f"[bold]LTH round {index + 1}/{rounds}[/bold]: sparsity {sparsity:.4f}")


def epoch_line(record: dict[str, Any]) -> str:
    """One line per epoch that fits an 80-column terminal (79 characters at 3-digit epochs and a loss above 10)."""
    return (f"epoch {record['epoch']:>3}  train loss {record['train_loss']:.3f} {record['train_accuracy']:6.2%}"
            f"  test loss {record['test_loss']:.3f} {record['test_accuracy']:6.2%}"
            f"  sparsity {record['sparsity']:.4f}")


def next_commands(run_dir: Path, summary: dict[str, Any]) -> list[str]:
    """What to try after a run: deploy it, run the artefact, count its cost, compare methods on the task;
    shell lines (a long one continued with a backslash) that fit 80 columns for the usual run paths."""
    run, artefact = str(run_dir), f"{run_dir.name}.safetensors"
    commands = [f"ndsnn export {run} --format csr -o {artefact}", f"ndsnn run {artefact} --dataset-test",
                f"ndsnn cost {run}"]
    if summary["method"] != "lth":
        commands += [f"ndsnn prune-compare {run}/recipe.toml \\",
                     "    --methods ndsnn,rigl,set,lth,dense --sparsities 0.9,0.99"]
    return commands


def _flops_rows(run_dir: Path) -> list[tuple[str, str]]:
    """Training FLOPs of the run relative to dense / LTH training of the same recipe; none where the cost
    model cannot say (it names its reason in `ndsnn cost RUN`)."""
    from ndsnn_cli.cost import cost_beside_baselines
    from ndsnn_cli.errors import UserError

    try:
        cost = cost_beside_baselines(run_dir)
    except UserError:
        return []
    rows = [("training FLOPs", f"{cost['train_flops']:.3g}")]
    for baseline, ratio in cost["relative"].items():
        if ratio is not None:
            rows.append((f"training FLOPs vs {'LTH' if baseline == 'lth' else baseline}", f"{ratio:.2%}"))
    return rows


def print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary['name']} ({summary['method']}, {summary['arch']} on {summary['dataset']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("test accuracy", f"{summary['test_accuracy']:.2%}")
    table.add_row("best test accuracy", f"{summary['best_test_accuracy']:.2%}")
    table.add_row("sparsity (sparse layers)", f"{summary['sparsity']['sparsity']:.4f}")
    table.add_row("non-zero weights", f"{summary['sparsity']['nnz']:,} / {summary['sparsity']['numel']:,}")
    if "rounds" in summary:
        table.add_row("LTH rounds", f"{len(summary['rounds'])} x {summary['round_epochs']} epochs")
    for metric, value in _flops_rows(run_dir):
        table.add_row(metric, value)
    table.add_row("wall time", f"{summary['wall_time_s']:.1f} s")
    if "time_split" in summary:
        split = summary["time_split"]
        table.add_row("training time (steps)", f"{summary['train_wall_s']:.1f} s")
        table.add_row("time split", ", ".join(f"{phase.replace('_', ' ')} {seconds:.1f} s"
                                              for phase, seconds in split.items() if seconds >= 0.05))
    table.add_row("run directory", str(run_dir))
    console = Console()
    console.print(table)
    console.print("next:", highlight=False)
    for command in next_commands(run_dir, summary):
        console.print(f"  {command}", highlight=False, markup=False, soft_wrap=True)
