"""Building and running the generated C: the host compiler, the host demo, and writing the output
directory as a whole (atomically)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ndsnn_cli.errors import UserError
from ndsnn_cli.export.c.generate import CFLAGS, CSources

# what a build in an exported directory leaves beside the sources: replaced with it on a re-export
BUILD_OUTPUTS = ("demo", "firmware.elf", "results.bin")


def find_compiler() -> str | None:
    """$CC, else cc, gcc or clang on PATH; None when the machine has no C compiler."""
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return next((found for name in candidates if (found := shutil.which(name))), None)


def write_sources(sources: CSources, directory: Path) -> None:
    """The files into a scratch `directory` (a build's, not the export's: that is `write_directory`)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in sources.files.items():
        (directory / name).write_text(text, encoding="utf-8")


def compile_demo(sources: CSources, directory: Path, compiler: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """Write the files into `directory` and build `demo` with the strict flags; a compiler error is a UserError."""
    write_sources(sources, directory)
    demo = directory / "demo"
    command = [compiler, *CFLAGS, *extra_flags, "-o", str(demo), "main.c", "ndsnn_model.c", "ndsnn_kernels.c"]
    done = subprocess.run(command, cwd=directory, capture_output=True, text=True, check=False)
    if done.returncode:
        raise UserError(f"C target: {' '.join(command)} failed: {done.stderr.strip()[:2000]}")
    return demo


def run_demo(demo: Path, images: torch.Tensor, env: dict[str, str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions [N], summed logits [N, classes]) of `demo -l` on float images [N, C, H, W]."""
    with tempfile.TemporaryDirectory(prefix="ndsnn-c-") as tmp:
        path = Path(tmp) / "images.f32"
        path.write_bytes(images.float().contiguous().numpy().astype("<f4").tobytes())
        done = subprocess.run([str(demo), "-l", str(path)], capture_output=True, text=True, check=False,
                              env={**os.environ, **(env or {})})
    if done.returncode:
        raise UserError(f"C target: the demo failed (exit {done.returncode}): {done.stderr.strip()[:2000]}")
    rows = [line.split() for line in done.stdout.splitlines()]
    predictions = torch.tensor([int(row[0]) for row in rows])
    logits = torch.tensor([[float(v) for v in row[1:]] for row in rows], dtype=torch.float32)
    return predictions, logits


def write_directory(target: Path, files: dict[str, str]) -> int:
    """All files written into a new directory beside `target`, which is then renamed onto it: a failure
    part-way leaves nothing behind, and a reader sees the old directory or the whole new one. An existing
    `target` is replaced only when it is empty or holds nothing but a C export's own files and build
    outputs (never a user's other files). Returns the bytes written."""
    from ndsnn_cli.atomic import current_umask, write_text

    if target.exists() and not target.is_dir():
        raise UserError(f"{target}: the C target writes a directory, and this is a file")
    if target.is_dir():
        _check_replaceable(target, files)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise UserError(f"{target}: cannot write output ({exc.strerror or exc})") from None
    try:
        staging.chmod(0o777 & ~current_umask())  # what mkdir gives, not mkdtemp's private 0700
        for name, text in files.items():
            write_text(staging / name, text)
        _swap_in(staging, target)
    except OSError as exc:
        raise UserError(f"{target}: cannot write output ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed onto target
    return sum(len(text.encode("utf-8")) for text in files.values())


def _check_replaceable(target: Path, files: dict[str, str]) -> None:
    foreign = sorted(entry.name for entry in target.iterdir()
                     if not entry.is_file() or entry.is_symlink()
                     or not (entry.name in files or entry.name in BUILD_OUTPUTS or entry.suffix == ".o"))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"{target}: holds files a C export does not write ({shown}); export into a new or "
                        "empty directory, or one a C export wrote")


def _swap_in(staging: Path, target: Path) -> None:
    """rename(staging, target); an existing target is moved aside first and removed after (or put back)."""
    if not target.exists():
        os.rename(staging, target)
        return
    aside = staging.with_suffix(".old")
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)
