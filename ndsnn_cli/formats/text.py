"""JSON and TOML as ndsnn reads them from files it did not write itself: bounded before they are used.

A recipe, a run's summary.json and metrics.jsonl, an artefact's or a checkpoint's metadata all arrive as
text that anybody may have edited. Python's parsers accept more than ndsnn can use: nesting until the
interpreter's recursion limit (a RecursionError), integers of any length (a ValueError beyond 4300
digits, and slow arithmetic below), files of any size read whole. Here every text has a byte limit, a
nesting limit (`limits.MAX_NESTING`) and an integer-length limit (`limits.MAX_INT_DIGITS`); a text that
breaks one is a `TextError` whose message says which, for the caller to put after the file's name.

Torch-free and light: the recipe reads through it at start-up.
"""

from __future__ import annotations

import json
import os
import stat
import tomllib
from pathlib import Path
from typing import Any

from ndsnn_cli import limits as L


class TextError(ValueError):
    """Text that is not what it claims or exceeds a bound; the message is the reason, without the file."""


def regular_file_size(path: str | os.PathLike[str]) -> int:
    """The size of a regular file; a FIFO or a device, which have no size, is refused (/dev/zero would be
    read forever)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise TextError(f"cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise TextError("is not a regular file")
    return info.st_size


def read_file_bytes(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """A regular file's bytes, refused before reading when it is larger than `max_bytes`."""
    size = regular_file_size(path)
    if size > max_bytes:
        raise TextError(f"is {size:,} bytes, more than the {max_bytes:,} this file may have")
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while we read
        raise TextError(f"is more than the {max_bytes:,} bytes this file may have")
    return data


def read_text_file(path: str | os.PathLike[str], max_bytes: int) -> str:
    """A regular file of at most `max_bytes`, decoded as UTF-8."""
    return decode_utf8(read_file_bytes(path, max_bytes))


def decode_utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise TextError("is not a UTF-8 text file") from None


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > L.MAX_INT_DIGITS:
        raise TextError(f"holds an integer of {len(text.lstrip('-')):,} digits (at most {L.MAX_INT_DIGITS})")
    return int(text)


def parse_json(text: str | bytes, max_bytes: int = L.MAX_JSON_FILE_BYTES) -> Any:
    """`json.loads` with a size, a nesting and an integer-length bound; bytes must be UTF-8."""
    if len(text) > max_bytes:
        raise TextError(f"JSON of {len(text):,} bytes exceeds {max_bytes:,}")
    if isinstance(text, bytes):
        text = decode_utf8(text)
    try:
        value = json.loads(text, parse_int=_bounded_int)
    except RecursionError:
        raise TextError(f"JSON nested too deep (at most {L.MAX_NESTING} levels)") from None
    except json.JSONDecodeError as exc:
        raise TextError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    check_nesting(value, "JSON")
    return value


def parse_toml(text: str, max_bytes: int = L.MAX_RECIPE_BYTES) -> dict[str, Any]:
    """`tomllib.loads` with a size, a nesting and an integer-length bound. A syntax error keeps tomllib's
    message (`TOML syntax error: ...`)."""
    if len(text) > max_bytes:
        raise TextError(f"is {len(text):,} characters, more than the {max_bytes:,} a recipe may have")
    try:
        value = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TextError(f"TOML syntax error: {exc}") from None
    except RecursionError:
        raise TextError(f"TOML nested too deep (at most {L.MAX_NESTING} levels)") from None
    except ValueError as exc:  # an integer beyond Python's 4300-digit conversion limit
        raise TextError(f"TOML value out of range ({str(exc).split(':')[0][:60]})") from None
    check_nesting(value, "TOML")
    return value


def check_nesting(value: Any, what: str) -> None:
    """At most `MAX_NESTING` levels of lists/objects and no integer longer than `MAX_INT_DIGITS` (walked
    without recursion, so a value built any way at all is measured, not overflowed)."""
    stack = [(value, 1)]
    limit = 10**L.MAX_INT_DIGITS
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > L.MAX_NESTING:
                raise TextError(f"{what} nested deeper than {L.MAX_NESTING} levels")
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
        elif isinstance(item, int) and not isinstance(item, bool) and not -limit < item < limit:
            raise TextError(f"{what} holds an integer of more than {L.MAX_INT_DIGITS} digits")


def show(value: Any, width: int = 40) -> str:
    """`repr(value)` cut to `width` characters, safe for an integer of any length (whose repr may raise)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**L.MAX_INT_DIGITS:
        return f"<an integer of more than {L.MAX_INT_DIGITS} digits>"
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except (OSError, ValueError):
        return False
