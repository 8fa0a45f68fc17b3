"""The Typer application every command module registers on (one home, so the commands and the package
that collects them do not import each other in a circle)."""

from __future__ import annotations

from typing import Annotated

import typer

from ndsnn_cli import __version__

app = typer.Typer(
    name="ndsnn",
    help="Train sparse spiking neural networks from scratch (NDSNN, RigL, SET, LTH, ...) and ship them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: typer's rich help imports rich.markdown (+0.17 s per --help)
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ndsnn {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """ndsnn: sparse spiking neural network training (NDSNN, DAC 2023) and export."""
