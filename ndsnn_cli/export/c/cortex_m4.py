"""The C target on a Cortex-M4: bare-metal firmware for QEMU's `mps2-an386` board (a Cortex-M4 with an FPU),
run under emulation to verify and time the exported model on the ISA it is written for, and its fit in a
part's flash and RAM.

`add_firmware` puts the start-up (`ndsnn_m4_startup.c`: vector table, reset, FPU on, semihosting), the
verification main (`ndsnn_m4_main.c`: images in, predictions, logits, timer ticks and stack use out, over
ARM semihosting), a linker script for the board and the Makefile rules beside the model. The model files
do not depend on them: a vendor start-up links ndsnn_model.c + ndsnn_kernels.c unchanged.

`CortexM4` builds that firmware with the stated flags and runs it under `qemu-system-arm -icount shift=0`,
where one instruction retires per virtual nanosecond, so the board's 25 MHz timer counts instructions
(40 per tick; a calibration loop of known length in every run checks it). Instructions are a proxy for
cycles: a Cortex-M4 retires most instructions in one cycle, loads, branches and divides take more.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ndsnn_cli.errors import UserError
from ndsnn_cli.export.c.generate import CFLAGS, CSources, makefile, render, template_text

ARM_FLAGS = ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16")
LINK_FLAGS = ("-nostartfiles", "-T", "ndsnn_m4.ld", "-Wl,--gc-sections")
MODEL_SOURCES = ("ndsnn_model.c", "ndsnn_kernels.c")
FIRMWARE_SOURCES = ("ndsnn_m4_startup.c", "ndsnn_m4_main.c", *MODEL_SOURCES)
FIRMWARE_FILES = ("ndsnn_m4.h", "ndsnn_m4_startup.c", "ndsnn_m4_main.c")
QEMU_ARGS = ("-M", "mps2-an386", "-display", "none", "-monitor", "none", "-serial", "none", "-icount", "shift=0",
             "-semihosting-config")
SEMIHOSTING = "enable=on,target=native"
PACKAGES = "gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm"
STACK_BYTES = 16384  # the firmware's stack region (the model's own use is measured, and far smaller)
TIMEOUT_S = 600  # one QEMU run at most; it ends by itself (semihosting exit) well before on the tests' models
CALIBRATION_INSNS = 2_000_000  # ndsnn_m4_main.c: NDSNN_CALIBRATION_INSNS
MAGIC = 0x4E53444E  # "NDSN"
KIB, MIB = 1024, 1024 * 1024


@dataclass(frozen=True)
class Part:
    """A flash / RAM budget (bytes) a build must fit, named for a class of Cortex-M4 parts."""

    name: str
    description: str
    flash: int
    ram: int


PARTS = {part.name: part for part in (
    Part("mps2-an386", "QEMU's Cortex-M4 board (4 MiB code SSRAM, 4 MiB data SSRAM)", 4 * MIB, 4 * MIB),
    Part("stm32f407", "STM32F4-class Cortex-M4F (STM32F405/407/417): 1 MiB flash, 192 KiB SRAM", MIB, 192 * KIB),
    Part("stm32f411", "mid-size Cortex-M4F (STM32F411): 512 KiB flash, 128 KiB SRAM", 512 * KIB, 128 * KIB),
    Part("stm32l432", "small Cortex-M4F (STM32L432): 256 KiB flash, 64 KiB SRAM", 256 * KIB, 64 * KIB),
)}
# --target: the host demo alone, or the Cortex-M4 firmware too (cortex-m4 is the emulated board; a part
# name also checks that part's budget)
TARGETS = ("host", "cortex-m4", *PARTS)


def target_part(target: str) -> Part | None:
    """The budget `--target` names (None for host); an unknown name is a UserError."""
    if target not in TARGETS:
        raise UserError(f"--target {target}: unknown (known: {', '.join(TARGETS)})")
    return None if target == "host" else PARTS["mps2-an386" if target == "cortex-m4" else target]


def parse_bytes(option: str, text: str | None) -> int | None:
    """'192K', '1M', '65536' (K = 1024) -> bytes; None stays None; anything else is a UserError."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d{1,12})\s*([kKmM]?)(i?[bB])?\s*", text)
    if not match or int(match.group(1)) == 0:
        raise UserError(f"{option} {text!r}: give a positive size in bytes, e.g. 262144, 256K or 1M")
    return int(match.group(1)) * {"": 1, "k": KIB, "m": MIB}[match.group(2).lower()]


def with_firmware(sources: CSources) -> CSources:
    """`sources` with the firmware files beside the model's, and the Makefile with their rules."""
    files = {**sources.files, **{name: template_text(f"cortex-m4/{name}") for name in FIRMWARE_FILES}}
    files["ndsnn_m4.ld"] = render("cortex-m4/ndsnn_m4.ld", {
        "FLASH_ORIGIN": "0x00000000", "FLASH_LENGTH": "4M", "RAM_ORIGIN": "0x20000000", "RAM_LENGTH": "4M",
        "STACK_BYTES": STACK_BYTES})
    rules = render("cortex-m4/rules.mk", {"ARM_FLAGS": " ".join(ARM_FLAGS), "LINK_FLAGS": " ".join(LINK_FLAGS),
                                          "QEMU": " ".join(("qemu-system-arm", *QEMU_ARGS, SEMIHOSTING))})
    files["Makefile"] = makefile(rules)
    return dataclasses.replace(sources, files=files)


def fit(report: dict[str, Any], part: Part | None, flash: int | None, ram: int | None) -> dict[str, Any]:
    """Flash and RAM of the model against the budget (`flash` / `ram` bytes, else the part's) and against
    every named part class. Measured: the model objects' `arm-none-eabi-size` (text + data; bss + data) and
    the stack the inference used under QEMU; without the toolchain, the generator's const data and static
    buffers (code and stack not counted). The verification firmware's own start-up and main are not counted."""
    size = report.get("cortex_m4_size")
    runs = report.get("verify", {}).get("cortex-m4", {}).get("images", {}).values()
    stack = max((entry["stack_bytes"] for entry in runs), default=None)
    if size is not None:
        used_flash, used_ram = size["flash"], size["ram"] + (stack or 0)
        measured = "arm-none-eabi-size of the model objects" + (
            f" + {stack:,} B of stack measured under QEMU" if stack is not None else " (stack not measured)")
    else:
        used_flash, used_ram = report["flash_bytes"], report["ram_bytes"]
        measured = "the generator's const data and static buffers (code and stack not counted: no arm-none-eabi-gcc)"
    named = [part.name] if part is not None else []
    budget = {"name": " with ".join(named + (["--flash/--ram"] if flash or ram else [])),
              "flash": flash or (part.flash if part is not None else None),
              "ram": ram or (part.ram if part is not None else None)}
    over = [f"{what} {used:,} B > {limit:,} B" for what, used, limit in
            (("flash", used_flash, budget["flash"]), ("RAM", used_ram, budget["ram"])) if limit and used > limit]
    return {"flash_bytes": used_flash, "ram_bytes": used_ram, "stack_bytes": stack, "measured": measured,
            "budget": budget, "fits": not over, "reason": f"{', '.join(over)} ({budget['name']})" if over else "",
            "parts": parts_fitting(used_flash, used_ram)}


def parts_fitting(flash: int, ram: int) -> dict[str, bool]:
    """Whether `flash` and `ram` bytes fit each named part class."""
    return {name: flash <= part.flash and ram <= part.ram for name, part in PARTS.items()}


def fit_line(fit: dict[str, Any]) -> str:
    """One summary line: what the model needs and which part classes it fits."""
    parts = ", ".join(f"{name} {'yes' if fits else 'no'}" for name, fits in fit["parts"].items())
    return (f"Cortex-M4 fit: flash {fit['flash_bytes']:,} B, RAM {fit['ram_bytes']:,} B ({fit['measured']}); "
            f"fits {parts}")


@dataclass(frozen=True)
class Toolchain:
    cc: str
    size: str
    qemu: str | None  # None: the firmware builds (sizes) but cannot run here


def find_toolchain() -> Toolchain | str:
    """arm-none-eabi-gcc/-size (and qemu-system-arm when present), or why not (one line)."""
    cc, size = shutil.which("arm-none-eabi-gcc"), shutil.which("arm-none-eabi-size")
    if cc is None or size is None:
        return f"arm-none-eabi-gcc not found (Debian: apt-get install --no-install-recommends {PACKAGES})"
    libc = subprocess.run([cc, *ARM_FLAGS, "-print-file-name=libc.a"], capture_output=True, text=True, check=False)
    if not Path(libc.stdout.strip()).is_absolute():  # the firmware links newlib's memset / memcpy
        return "newlib for arm-none-eabi not found (Debian: apt-get install libnewlib-arm-none-eabi)"
    return Toolchain(cc, size, shutil.which("qemu-system-arm"))


def _run(command: list[str], cwd: Path, what: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"Cortex-M4: {what} did not finish within {timeout:.0f} s") from None
    if done.returncode:
        detail = " ".join((done.stderr or done.stdout).split())[:2000]
        raise UserError(f"Cortex-M4: {what} failed (exit {done.returncode}): {detail}")
    return done


@dataclass
class CortexM4:
    """The firmware of one C build, compiled in `directory` (which holds the sources) with `toolchain`."""

    directory: Path
    toolchain: Toolchain
    elf: Path = field(init=False)

    def __post_init__(self) -> None:
        command = [self.toolchain.cc, *CFLAGS, *ARM_FLAGS, *LINK_FLAGS, "-o", "firmware.elf", *FIRMWARE_SOURCES]
        _run(command, self.directory, "compiling the firmware")
        self.elf = self.directory / "firmware.elf"

    def model_sizes(self) -> dict[str, int]:
        """text, data, bss of the model's objects alone (what a firmware links; start-up and main not
        counted): flash = text + data, static RAM = bss + data."""
        objects = []
        for name in MODEL_SOURCES:
            obj = name.replace(".c", ".m4.o")
            _run([self.toolchain.cc, *CFLAGS, *ARM_FLAGS, "-c", name, "-o", obj], self.directory, f"compiling {name}")
            objects.append(obj)
        lines = _run([self.toolchain.size, *objects], self.directory, "arm-none-eabi-size").stdout.splitlines()
        text, data, bss = (sum(int(line.split()[i]) for line in lines[1:]) for i in range(3))
        return {"text": text, "data": data, "bss": bss, "flash": text + data, "ram": bss + data}

    def run(self, images: torch.Tensor, timeout: float = TIMEOUT_S) -> tuple[torch.Tensor, torch.Tensor,
                                                                              dict[str, Any]]:
        """(predictions, summed logits, costs) of the firmware under QEMU on float images [N, C, H, W]:
        costs are instructions per inference (from the timer, calibrated) and the stack bytes it used."""
        if self.toolchain.qemu is None:
            raise UserError(f"Cortex-M4: qemu-system-arm not found (Debian: apt-get install {PACKAGES})")
        with tempfile.TemporaryDirectory(prefix="ndsnn-m4-") as tmp:
            (Path(tmp) / "images.f32").write_bytes(images.float().contiguous().numpy().astype("<f4").tobytes())
            _run([self.toolchain.qemu, *QEMU_ARGS, f"{SEMIHOSTING},arg=firmware,arg=images.f32,arg=results.bin",
                  "-kernel", str(self.elf.resolve())], Path(tmp), "the QEMU run", timeout)
            raw = (Path(tmp) / "results.bin").read_bytes()
        return _parse_results(raw, len(images))


def _parse_results(raw: bytes, count: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """RESULTS.bin (ndsnn_m4_main.c): per image int32 class, logits, ticks, stack bytes; the trailer."""
    trailer = np.frombuffer(raw[-12:], "<u4") if len(raw) >= 12 else np.zeros(3, np.uint32)
    classes = (len(raw) - 12) // 4 // max(count, 1) - 3  # the record's size says how many logits
    record = np.dtype([("predicted", "<i4"), ("logits", "<f4", (max(classes, 1),)), ("ticks", "<u4"),
                       ("stack", "<u4")])
    if trailer[0] != MAGIC or trailer[1] != count or classes < 1 or len(raw) != count * record.itemsize + 12:
        raise UserError(f"Cortex-M4: the firmware's results are incomplete ({len(raw)} bytes for {count} images)")
    rows = np.frombuffer(raw[:-12], record)
    per_tick = CALIBRATION_INSNS / max(int(trailer[2]), 1)
    instructions = rows["ticks"].astype(np.float64) * per_tick
    costs = {"instructions_per_tick": per_tick, "instructions_median": float(np.median(instructions)),
             "instructions_min": float(instructions.min()), "instructions_max": float(instructions.max()),
             "stack_bytes": int(rows["stack"].max())}
    return (torch.from_numpy(rows["predicted"].astype(np.int64)), torch.from_numpy(rows["logits"].copy()), costs)
