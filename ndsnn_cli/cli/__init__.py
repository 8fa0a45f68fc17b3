"""The `ndsnn` command: a thin Typer layer that parses, calls the core and renders with rich.

Heavy imports (torch, onnx) happen inside the commands, and help is click's plain text, so
`ndsnn --help` answers instantly.
A `UserError` from anywhere becomes one line on stderr and exit code 2; no traceback.
"""

from __future__ import annotations

import errno
import sys

import typer

from ndsnn_cli.cli import compare as _compare_cmd  # noqa: F401  (registers the command)
from ndsnn_cli.cli import cost as _cost_cmd  # noqa: F401  (registers the command)
from ndsnn_cli.cli import export as _export_cmd  # noqa: F401  (registers export, inspect, run)
from ndsnn_cli.cli import train as _train_cmd  # noqa: F401  (registers the command)
from ndsnn_cli.cli.app import app
from ndsnn_cli.errors import UserError

# OSErrors that say a path the user gave cannot be used (not a failure of ndsnn): exit 2 with one line.
PATH_ERRORS = (errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS,
               errno.EEXIST)


def main() -> None:
    try:
        code = app(standalone_mode=False)  # click returns a command's typer.Exit(n) code here instead of exiting
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
    except OSError as exc:
        if exc.errno not in PATH_ERRORS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""  # a path the user gave, too long or not reachable
        typer.echo(f"error: {where:.300}{exc.strerror or exc}", err=True)
        sys.exit(2)
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
    if isinstance(code, int) and not isinstance(code, bool) and code:
        sys.exit(code)
