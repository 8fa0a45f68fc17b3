"""The exporter registry: every format names a module with `export_result`, and the CLI offers each one."""

from __future__ import annotations

import importlib

from typer.testing import CliRunner

from ndsnn_cli.cli import app
from ndsnn_cli.export.exporters import EXPORTERS, ExportOptions, ExportResult, export


def test_every_registered_format_has_an_exporter_and_appears_in_the_cli_help() -> None:
    help_text = CliRunner().invoke(app, ["export", "--help"]).output
    for name, exporter in EXPORTERS.items():
        assert exporter.format == name and name in help_text
        assert callable(importlib.import_module(exporter.module).export_result)


def test_unknown_format_is_a_user_error_listing_the_registry() -> None:
    import pytest

    from ndsnn_cli.errors import UserError

    with pytest.raises(UserError, match="--format tflite: unknown \\(known: csr, onnx, nir, c\\)"):
        export("tflite", "run", None, ExportOptions())


def test_result_json_is_path_format_then_the_details_in_order(tmp_path) -> None:
    result = ExportResult(tmp_path / "m.x", "fmt", {"bytes": 3, "nodes": 2})
    assert list(result.to_json()) == ["path", "format", "bytes", "nodes"] and result.size_bytes == 3


def test_the_help_lists_come_from_the_registries_and_agree_with_each_format() -> None:
    """--format and --dtype help are built from EXPORTERS; each exporter's dtypes are its module's own table,
    and --target's help names every C target (that list lives with the torch-importing C code)."""
    from ndsnn_cli.export.c.cortex_m4 import TARGETS
    from ndsnn_cli.export.c.generate import DTYPES
    from ndsnn_cli.formats.csr import VALUE_DTYPES

    assert EXPORTERS["csr"].dtypes == tuple(VALUE_DTYPES)
    assert EXPORTERS["c"].dtypes == DTYPES
    help_text = " ".join(CliRunner().invoke(app, ["export", "--help"], terminal_width=400).output.split())
    for exporter in EXPORTERS.values():
        assert f"{exporter.format}: {exporter.description}" in help_text
        if exporter.dtypes != ("fp32",):
            assert f"{exporter.format}: {', '.join(exporter.dtypes)}" in help_text
    assert all(target in help_text for target in TARGETS)
    assert "one of: csr, onnx, nir, c" in help_text
