"""Export formats, named once: `EXPORTERS[format]` says which module writes it, and every exporter
returns one `ExportResult` that the CLI renders (JSON or a summary) without knowing the format.

Import-light on purpose (the CLI lists the formats at start-up): a format's module, with torch,
onnx or nir behind it, is imported only when that format is exported.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ndsnn_cli.errors import UserError


@dataclass(frozen=True)
class ExportOptions:
    """Every exporter gets all options and reads the ones that apply to its format."""

    dtype: str = "fp32"  # csr: value dtype
    fold_bn: bool = False  # csr: fold BatchNorm (onnx and nir always fold)
    verify: bool = True  # onnx: onnxruntime against PyTorch before writing
    sparse_initializers: bool = False  # onnx: masked weights as COO initializers
    dt: float | None = None  # nir: simulation step in seconds (None: the exporter's default, 1e-4)
    target: str = "host"  # c: host demo, or cortex-m4 / a part class (bare-metal firmware, QEMU, budget)
    flash: str | None = None  # c: flash budget ("256K", "1M", bytes)
    ram: str | None = None  # c: RAM budget


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote. `details` are the format's JSON fields in output order (with "bytes");
    `summary` lines follow the "wrote" line on screen; `notes` go to stderr (not in the JSON)."""

    path: Path
    format: str
    details: dict[str, Any]
    summary: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        return self.details["bytes"]

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.format, **self.details}


class ExportVerificationError(Exception):
    """The exported model disagrees with PyTorch beyond the tolerance; carries the report (exit 1, no file)."""

    def __init__(self, message: str, report: dict[str, Any], detail: str) -> None:
        super().__init__(message)
        self.report, self.detail = report, detail


@dataclass(frozen=True)
class Exporter:
    """A format, the module whose `export_result(source, out, options) -> ExportResult` writes it, what it
    is (the CLI help shows it) and the value dtypes it takes (`--dtype`; tests check them against the
    format's own tables)."""

    format: str
    module: str
    description: str
    dtypes: tuple[str, ...] = ("fp32",)


EXPORTERS: dict[str, Exporter] = {e.format: e for e in (
    Exporter("csr", "ndsnn_cli.export.csr", "CSR-packed safetensors artefact (the reference runtime's input)",
             ("fp32", "fp16", "bf16", "int8")),
    Exporter("onnx", "ndsnn_cli.export.onnx", "ONNX, T unrolled, BN folded, verified with onnxruntime"),
    Exporter("nir", "ndsnn_cli.export.nir", "NIR graph (HDF5) for neuromorphic toolchains"),
    Exporter("c", "ndsnn_cli.export.c", "portable C99 sparse spiking runtime (a directory), verified against "
             "the reference runtime", ("fp32", "int8")),
)}


def formats_help() -> str:
    """`--format`'s help, from the registry: each format and what it writes."""
    return "; ".join(f"{e.format}: {e.description}" for e in EXPORTERS.values()) + "."


def dtypes_help() -> str:
    """`--dtype`'s help, from the registry: the value dtypes of each format that takes more than fp32."""
    takes = [f"{e.format}: {', '.join(e.dtypes)}" for e in EXPORTERS.values() if e.dtypes != ("fp32",)]
    return f"Value dtype ({'; '.join(takes)}; int8 with per-row scales; other formats: fp32)."


def export(format: str, source: str | Path, out: str | Path | None, options: ExportOptions) -> ExportResult:
    """Checkpoint or run directory -> a file in `format`; an unknown format is a UserError."""
    if format not in EXPORTERS:
        raise UserError(f"--format {format}: unknown (known: {', '.join(EXPORTERS)})")
    module = importlib.import_module(EXPORTERS[format].module)
    return module.export_result(source, out, options)
