"""The single writer for files the project produces: temp file + fsync + rename, never half-written.

Files get the mode a plain `open()` would give them (0o666 minus the user's umask: 0644 under umask 022),
not mkstemp's private 0600, so an exported model is readable by whoever the umask says may read it.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` so that a reader sees either the old file or the whole new one."""
    target = Path(path)
    if os.path.lexists(target) and not (target.is_file() or target.is_symlink()):
        # a FIFO, a socket or a device (an `-o /dev/null` run as root would replace the device node)
        raise OSError(errno.EEXIST, "exists and is not a regular file", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # before any byte is written: never a moment of a wrong mode
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc), else by a set-and-restore."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # the only portable read; a thread creating a file in between would get 022
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append one line with a single write + fsync, so a crash leaves at most a missing last line."""
    with open(path, "ab") as handle:
        handle.write((line.rstrip("\n") + "\n").encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
