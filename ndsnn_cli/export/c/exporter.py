"""`ndsnn export --format c`: a checkpoint or run directory -> a verified directory of C sources, and for
a Cortex-M4 target the bare-metal firmware too, verified and timed under QEMU, and checked against a
flash / RAM budget."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ndsnn_cli.errors import UserError
from ndsnn_cli.export.c import cortex_m4
from ndsnn_cli.export.c.build import find_compiler, write_directory, write_sources
from ndsnn_cli.export.c.generate import CSources, generate_sources
from ndsnn_cli.export.c.verify import failure_reason, verification_images, verify_sources
from ndsnn_cli.export.exporters import ExportOptions, ExportResult, ExportVerificationError


def export_c(source: str | Path, out: str | Path | None = None, *, dtype: str = "fp32", run_verify: bool = True,
             dense: bool = False, verify_images: int = 256, target: str = "host", flash: int | None = None,
             ram: int | None = None) -> tuple[Path, dict[str, Any]]:
    """Checkpoint (or run dir) -> a directory of C sources, verified against the reference runtime when a
    compiler exists (and on the emulated Cortex-M4 for a Cortex-M4 target, when QEMU exists); raises
    ExportVerificationError on disagreement and UserError when the build does not fit the budget (the
    part `target` names, narrowed by `flash` / `ram` bytes). Nothing is written then."""
    from ndsnn_cli.export.source import load_source

    part = cortex_m4.target_part(target)
    loaded = load_source(source)
    folded, masks, recipe, contract, info = loaded.folded, loaded.masks, loaded.recipe, loaded.contract, loaded.info
    description = f"{recipe.model.arch} on {info.name}, recipe sha256 {recipe.sha256()[:12]}"
    sources = generate_sources(folded, masks, contract=contract, timesteps=recipe.model.timesteps,
                               num_classes=info.num_classes, dtype=dtype, dense=dense, description=description)
    if part is not None:
        sources = cortex_m4.with_firmware(sources)
    report: dict[str, Any] = {"dtype": dtype, "dense": dense, "target": target, "flash_bytes": sources.flash_bytes,
                              "ram_bytes": sources.ram_bytes, "layers": sources.layers}
    with tempfile.TemporaryDirectory(prefix="ndsnn-c-m4-") as tmp:
        firmware = _firmware(sources, Path(tmp), report) if part is not None or flash or ram else None
        if firmware is not None:
            _check_fit(report, part, flash, ram)  # flash and static RAM already: before the minutes of verification
        compiler = find_compiler() if run_verify else None
        if compiler is not None:
            devices = {"cortex-m4": firmware.run} if firmware is not None and firmware.toolchain.qemu else {}
            images = verification_images(recipe, contract, verify_images)
            report["verify"] = verify_sources(sources, folded, masks, recipe.model.timesteps, contract, images,
                                              compiler, devices)
            if not report["verify"]["passed"]:
                raise ExportVerificationError("the C build differs from the reference runtime beyond tolerance",
                                              report, failure_reason(report["verify"]))
    if part is not None or flash or ram:
        _check_fit(report, part, flash, ram)
    target_dir = Path(out) if out is not None else loaded.output(None, "c").with_name("c")  # runs/x/export/c/
    report["bytes"] = write_directory(target_dir, sources.files)
    return target_dir, report


def _check_fit(report: dict[str, Any], part: cortex_m4.Part | None, flash: int | None, ram: int | None) -> None:
    report["fit"] = cortex_m4.fit(report, part, flash, ram)
    if not report["fit"]["fits"]:
        raise UserError(f"the C build does not fit: {report['fit']['reason']}; nothing written")


def _firmware(sources: CSources, directory: Path, report: dict[str, Any]) -> cortex_m4.CortexM4 | None:
    """The Cortex-M4 build of `sources` in `directory` and its model's sizes in report["cortex_m4_size"],
    or None (report["cortex_m4_skipped"] says why) without the toolchain."""
    toolchain = cortex_m4.find_toolchain()
    if isinstance(toolchain, str):
        report["cortex_m4_skipped"] = toolchain
        return None
    write_sources(sources if "ndsnn_m4.ld" in sources.files else cortex_m4.with_firmware(sources), directory)
    firmware = cortex_m4.CortexM4(directory, toolchain)
    report["cortex_m4_size"] = firmware.model_sizes()
    if toolchain.qemu is None:
        report["cortex_m4_skipped"] = f"qemu-system-arm not found (Debian: apt-get install {cortex_m4.PACKAGES})"
    return firmware


def export_result(source: str | Path, out: str | Path | None, options: ExportOptions) -> ExportResult:
    """`export_c` as the exporter registry's common result."""
    path, report = export_c(source, out, dtype=options.dtype, run_verify=options.verify, target=options.target,
                            flash=cortex_m4.parse_bytes("--flash", options.flash),
                            ram=cortex_m4.parse_bytes("--ram", options.ram))
    summary = [f"flash {report['flash_bytes']:,} bytes of const data (+ code), RAM {report['ram_bytes']:,} bytes "
               f"static, {options.dtype} values; build: make -C {path} && {path}/demo IMAGES.f32"]
    if options.target != "host":
        summary.append(f"Cortex-M4 firmware (QEMU mps2-an386): make -C {path} qemu IMAGES=IMAGES.f32 "
                       "(results.bin); the model files link unchanged with a vendor start-up")
    notes = []
    check = report.get("verify")
    if check is None:
        notes.append("verification skipped: " + ("--no-verify" if not options.verify else "no C compiler found"))
    else:
        summary += [_verify_line(f"verify {label}", entry, options.dtype) for label, entry in check["images"].items()]
        summary += [_verify_line(f"verify on the Cortex-M4 (QEMU mps2-an386) {label}", entry, options.dtype) +
                    _cost_line(entry) for label, entry in check.get("cortex-m4", {}).get("images", {}).items()]
    if "cortex_m4_skipped" in report:
        notes.append(f"Cortex-M4 run skipped: {report['cortex_m4_skipped']}")
    if "fit" in report:
        summary.append(cortex_m4.fit_line(report["fit"]))
    return ExportResult(path, "c", {k: v for k, v in report.items() if k != "layers"}, summary=summary, notes=notes)


def _verify_line(head: str, entry: dict[str, Any], dtype: str) -> str:
    line = (f"{head}: {entry['same_predictions']}/{entry['samples']} same predictions as the {dtype} reference "
            f"runtime, max |logit diff| {entry['max_abs_logit_diff']:.3g}")
    if "accuracy_c" in entry:
        line += f", accuracy C {entry['accuracy_c']:.2%} vs reference {entry['accuracy_reference']:.2%}"
    if (fp32 := entry.get("fp32_reference")) is not None:
        line += (f"; vs fp32: {fp32['same_predictions']}/{fp32['samples']} same predictions, accuracy "
                 f"{fp32['accuracy_fp32']:.2%}")
    return line


def _cost_line(entry: dict[str, Any]) -> str:
    return (f"; {entry['instructions_median'] / 1e6:.2f} M instructions per inference (median), stack "
            f"{entry['stack_bytes']:,} bytes")
