"""The `ndsnn` command: a thin Typer layer that parses, calls the core and renders with rich.

Heavy imports (torch, onnx) happen inside the commands, and help is click's plain text, so
`ndsnn --help` answers instantly.
A `UserError` from anywhere becomes one line on stderr and exit code 2; no traceback.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ndsnn_cli import __version__
from ndsnn_cli.errors import UserError

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


from ndsnn_cli.cli import compare as _compare_cmd  # noqa: E402,F401  (registers the command)
from ndsnn_cli.cli import cost as _cost_cmd  # noqa: E402,F401  (registers the command)
from ndsnn_cli.cli import export as _export_cmd  # noqa: E402,F401  (registers export, inspect, run)
from ndsnn_cli.cli import train as _train_cmd  # noqa: E402,F401  (registers the command)


def main() -> None:
    try:
        app(standalone_mode=False)
    except UserError as exc:
        typer.echo(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here with standalone_mode=False
        try:
            from click import BadParameter, ClickException
        except ModuleNotFoundError:  # typer >= 0.2x vendors click as typer._click
            from typer._click.exceptions import BadParameter, ClickException

        if isinstance(exc, BadParameter):  # an option out of its range: one line with the bound, like UserError
            typer.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(2)
        if isinstance(exc, ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
