"""`ndsnn export --format c`: a checkpoint or run directory -> a verified directory of C sources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ndsnn_cli.export.c.build import find_compiler, write_directory
from ndsnn_cli.export.c.generate import generate_sources
from ndsnn_cli.export.c.verify import failure_reason, verification_images, verify_sources
from ndsnn_cli.export.exporters import ExportOptions, ExportResult, ExportVerificationError


def export_c(source: str | Path, out: str | Path | None = None, *, dtype: str = "fp32", run_verify: bool = True,
             dense: bool = False, verify_images: int = 256) -> tuple[Path, dict[str, Any]]:
    """Checkpoint (or run dir) -> a directory of C sources, verified against the reference runtime when a
    compiler exists; raises ExportVerificationError (nothing written) on disagreement."""
    from ndsnn_cli.export.source import load_source

    loaded = load_source(source)
    folded, masks, recipe, contract, info = loaded.folded, loaded.masks, loaded.recipe, loaded.contract, loaded.info
    description = f"{recipe.model.arch} on {info.name}, recipe sha256 {recipe.sha256()[:12]}"
    sources = generate_sources(folded, masks, contract=contract, timesteps=recipe.model.timesteps,
                               num_classes=info.num_classes, dtype=dtype, dense=dense, description=description)
    report: dict[str, Any] = {"dtype": dtype, "dense": dense, "flash_bytes": sources.flash_bytes,
                              "ram_bytes": sources.ram_bytes, "layers": sources.layers}
    compiler = find_compiler() if run_verify else None
    if compiler is not None:
        images = verification_images(recipe, contract, verify_images)
        report["verify"] = verify_sources(sources, folded, masks, recipe.model.timesteps, contract, images,
                                          compiler)
        if not report["verify"]["passed"]:
            raise ExportVerificationError("the C build differs from the reference runtime beyond tolerance", report,
                                          failure_reason(report["verify"]))
    target = Path(out) if out is not None else loaded.output(None, "c").with_name("c")  # runs/x/export/c/
    report["bytes"] = write_directory(target, sources.files)
    return target, report


def export_result(source: str | Path, out: str | Path | None, options: ExportOptions) -> ExportResult:
    """`export_c` as the exporter registry's common result."""
    path, report = export_c(source, out, dtype=options.dtype, run_verify=options.verify)
    summary = [f"flash {report['flash_bytes']:,} bytes of const data (+ code), RAM {report['ram_bytes']:,} bytes "
               f"static, {options.dtype} values; build: make -C {path} && {path}/demo IMAGES.f32"]
    notes = []
    check = report.get("verify")
    if check is None:
        notes.append("verification skipped: " + ("--no-verify" if not options.verify else "no C compiler found"))
    else:
        for label, entry in check["images"].items():
            line = (f"verify {label}: {entry['same_predictions']}/{entry['samples']} same predictions as the "
                    f"{options.dtype} reference runtime, max |logit diff| {entry['max_abs_logit_diff']:.3g}")
            if "accuracy_c" in entry:
                line += f", accuracy C {entry['accuracy_c']:.2%} vs reference {entry['accuracy_reference']:.2%}"
            if (fp32 := entry.get("fp32_reference")) is not None:
                line += (f"; vs fp32: {fp32['same_predictions']}/{fp32['samples']} same predictions, accuracy "
                         f"{fp32['accuracy_fp32']:.2%}")
            summary.append(line)
    return ExportResult(path, "c", {k: v for k, v in report.items() if k != "layers"}, summary=summary, notes=notes)
