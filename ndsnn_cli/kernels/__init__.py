"""Sparse execution of conv and linear layers during training: a registry of kernels and one pure rule.

Each registered kernel computes a layer's forward at its active weights only, the input gradient
through the transposed sparse weight and the weight gradient at the mask's positions (the dense
weight gradient only when a drop-and-grow update needs it). `choose` decides, once per mask update
and per layer, which kernel runs (or "dense": the masked-dense torch path). No torch import here, so
the recipe can name the modes without loading it; implementations live in the submodules.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Collection
from dataclasses import dataclass

SPARSE_KERNEL_MODES = ("auto", "calibrate", "on", "off")
CALIBRATE = "calibrate"
DENSE = "dense"
BATCH_LAST = "batch-last"
# Where activations live between layers on the kernels: "per-layer" transposes in and out of every sparse
# layer; "batch-last" keeps them in the kernels' [C, H, W, N] layout through BN + LIF, pooling and the
# residual add (`kernels.batch_last`).
SPARSE_LAYOUTS = ("per-layer", BATCH_LAST)


@dataclass(frozen=True)
class KernelInfo:
    """One sparse kernel: its implementation, where it runs, what it needs, and the density below which it
    beats dense. `factory` ("module:Class") names a class following `protocol.SparseKernel`, imported only
    when a layer first runs it (`execution.create_kernel`): the recipe and CLI read this table without torch
    or numba. A new kernel is its module plus one entry in `KERNELS`."""

    name: str
    factory: str                  # "package.module:Class", constructed with no arguments
    devices: tuple[str, ...]      # torch device types its inputs, buffers and layout may live on
    requires: str | None          # a module that must be importable (an optional dependency)
    crossover_density: float      # auto mode: sparse when a layer's density is at or below this
    auto: bool                    # auto mode may pick it (measured faster than dense somewhere)


# Crossovers measured on the 2-core development machine (benchmarks/sparse_step.py, fwd + both grads,
# VGG-16 shapes, batch 160 = 32 x T5, spike rate 0.15, layout transposes included): the numba kernel ran
# at 0.68-0.93x dense at density 0.15 on the shapes measured (64->64 @32, 128->128 @16, 256->256 @8,
# 512->512 @2), at 0.91-1.09x at 0.20 and 1.31-1.40x at 0.30 (0.46x on 512->512 @2); so 0.15.
# The pure-torch kernel (torch.sparse per kernel offset) is the always-available fallback for "on";
# plain torch.sparse ops measured 0.7-5.4x *slower* than dense at 99% (issue 14), so auto skips it.
# Order is preference: "on" and "auto" take the first kernel that is available and fits.
KERNELS: dict[str, KernelInfo] = {k.name: k for k in (
    KernelInfo("numba", "ndsnn_cli.kernels.numba_cpu:NumbaKernel", ("cpu",), "numba", 0.15, True),
    KernelInfo("torch-sparse", "ndsnn_cli.kernels.torch_sparse:TorchSparseKernel", ("cpu",), None, 0.0, False),
)}


def available_kernels() -> tuple[str, ...]:
    """Kernels whose optional dependency is importable here (no import is done), in preference order."""
    return tuple(name for name, info in KERNELS.items()
                 if info.requires is None or importlib.util.find_spec(info.requires) is not None)


def choose(mode: str, density: float, device_type: str, available: Collection[str],
           crossover: float | None = None) -> str:
    """The kernel a layer at `density` runs: a name from KERNELS, or "dense".

    off -> dense. on -> the first available kernel for the device, dense if none. auto -> the first
    available kernel that auto may pick, for the device, with the layer at or below its crossover
    density (`crossover`, the layer's measured one, in place of the registry's when given); else dense.
    calibrate -> as auto (`kernels.calibration` supplies the measured crossovers). Under autocast the
    kernels still compute in fp32 (`execution.sparse_forward`).
    """
    if mode not in SPARSE_KERNEL_MODES:
        raise ValueError(f"unknown sparse_kernels mode {mode!r} (known: {', '.join(SPARSE_KERNEL_MODES)})")
    if mode == "off":
        return DENSE
    for name, info in KERNELS.items():
        if name not in available or device_type not in info.devices:
            continue
        if mode == "on":
            return name
        if info.auto and density <= (info.crossover_density if crossover is None else crossover):
            return name
    return DENSE
