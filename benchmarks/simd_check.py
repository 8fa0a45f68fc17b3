"""Does numba vectorise the kernels' batch-innermost loops for this host's widest SIMD? Read the assembly.

    python -m benchmarks.simd_check

Each numba kernel is run once on small batch-last operands (so its specialisation exists: uint8 spike
inputs and fp32 maps, as training calls it), then its generated x86 assembly is searched for packed
single-precision arithmetic (`v...ps` with an xmm / ymm / zmm operand) and the byte-to-float widening
(`vpmovzxbd` / `vcvtdq2ps`) the uint8 inputs need. Prints, per kernel, the count of each width and the
host's CPU name, numba's target and whether the CPU has AVX-512. LLVM's default tuning for AVX-512 Intel
cores prefers 256-bit vectors (`prefer-vector-width=256`): ymm on such a host is LLVM's choice, not a
failure to vectorise; scalar-only (`vmulss`/`vaddss` and no `ps`) would be. "any ymm/zmm" counts every
instruction on a 256/512-bit register (the pooling kernels select with integer compares and masks).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

PACKED = re.compile(r"\bv(?:fmadd|fmsub|fnmadd|mul|add|sub|max|min|cmp|blendv)\w*ps\s+.*?%?(xmm|ymm|zmm)\d+")
SCALAR = re.compile(r"\bv(?:fmadd\w*|mul|add)ss\b")
WIDE = re.compile(r"%(ymm|zmm)\d+")
WIDEN = re.compile(r"\b(?:vpmovzxbd|vcvtdq2ps)\b\s+.*?%?(xmm|ymm|zmm)\d+")


def _cpu() -> tuple[str, bool]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    return name, " avx512f" in text


def _run_bn_lif(channels: int, size: int, batch: int) -> None:
    """BN + LIF forward and backward on numba through its autograd wrapper (T = 2)."""
    import torch
    from torch import nn

    from ndsnn_cli.kernels.bn_lif import batch_norm_lif
    from ndsnn_cli.snn.neuron import LIF

    x = torch.randn(channels, size, size, batch, requires_grad=True)
    lif = LIF(timesteps=2)
    batch_norm_lif(x, nn.BatchNorm2d(channels), lif, impl="numba").sum().backward()


def _run_kernels() -> dict[str, object]:
    """Call each kernel once so numba compiles the specialisations training uses; {name: dispatcher}."""
    from ndsnn_cli.kernels import bn_lif_numba, numba_cpu, pool_numba

    c, h, n = 8, 6, 32
    spikes = (np.random.default_rng(0).random((c, h, h, n)) < 0.2).astype(np.uint8)
    maps = np.random.default_rng(1).random((c, h, h, n), dtype=np.float32)
    rowptr = np.arange(0, 2 * c + 1, 2, dtype=np.int64)
    taps = np.zeros(2 * c, dtype=np.int64)
    values = np.ones(2 * c, dtype=np.float32)
    out = np.empty((c, h, h, n), dtype=np.float32)
    bias = np.zeros(c, dtype=np.float32)
    numba_cpu.conv_forward(spikes, out, bias, rowptr, taps, taps + 1, taps + 1, values, 1, 1)
    numba_cpu.conv_input_grad(maps, out, rowptr, taps, taps + 1, taps + 1, values, 1, 1)
    numba_cpu.conv_weight_grad(maps, spikes, values.copy(), rowptr, taps, taps + 1, taps + 1, 1, 1)
    numba_cpu.conv_forward_rows(spikes, out, bias, rowptr, taps, taps + 1, taps + 1, values, 1, 1)
    numba_cpu.conv_input_grad_rows(maps, out, rowptr, taps, taps + 1, taps + 1, values, 1)
    numba_cpu.conv_weight_grad_rows(maps, spikes, values.copy(), rowptr, taps, taps + 1, taps + 1, 1, 1)
    pooled = np.empty((c, h // 2, h // 2, n), dtype=np.float32)
    corner = np.empty(pooled.shape, dtype=np.uint8)
    pool_numba.max_pool_forward(spikes.astype(np.float32), pooled, corner)
    pool_numba.max_pool_backward(pooled, corner, out)
    _run_bn_lif(c, h, n)
    kernels = {"conv_forward": numba_cpu.conv_forward, "conv_input_grad": numba_cpu.conv_input_grad,
               "conv_weight_grad": numba_cpu.conv_weight_grad, "conv_forward_rows": numba_cpu.conv_forward_rows,
               "conv_input_grad_rows": numba_cpu.conv_input_grad_rows,
               "conv_weight_grad_rows": numba_cpu.conv_weight_grad_rows,
               "max_pool_forward": pool_numba.max_pool_forward, "max_pool_backward": pool_numba.max_pool_backward}
    kernels.update({name: getattr(bn_lif_numba, name) for name in ("bn_lif_forward", "bn_lif_backward")})
    return kernels


def main() -> None:
    os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp()  # compiled afresh: numba cannot inspect cached code
    import numba

    name, avx512 = _cpu()
    import llvmlite.binding

    target = numba.config.CPU_NAME or f"host = {llvmlite.binding.get_host_cpu_name()}"
    print(f"CPU {name}; AVX-512F {'yes' if avx512 else 'no'}; numba {numba.__version__}, target {target}")
    print(f"  {'kernel':<22} packed fp: {'xmm':>4} {'ymm':>4} {'zmm':>4}  scalar fp  any ymm/zmm  u8->f32 widening")
    for kernel_name, kernel in _run_kernels().items():
        packed, widen, wide, scalar = Counter(), Counter(), Counter(), 0
        for asm in kernel.inspect_asm().values():
            for line in asm.splitlines():
                if match := PACKED.search(line):
                    packed[match.group(1)] += 1
                elif SCALAR.search(line):
                    scalar += 1
                if match := WIDE.search(line):
                    wide[match.group(1)] += 1
                if match := WIDEN.search(line):
                    widen[match.group(1)] += 1
        print(f"  {kernel_name:<22}            {packed['xmm']:>4} {packed['ymm']:>4} {packed['zmm']:>4}  {scalar:>9}  "
              f"{wide['ymm'] + wide['zmm']:>11}  "
              + (", ".join(f"{w} {k}" for k, w in sorted(widen.items())) or "-"))


if __name__ == "__main__":
    main()
