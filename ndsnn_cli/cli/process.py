"""Process-wide settings of the commands that train, made once before the first tensor exists."""

from __future__ import annotations

import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD = 2**31 - 1             # mallopt takes an int: return the heap's top to the kernel above 2 GiB only


def keep_freed_memory() -> bool:
    """glibc: keep freed blocks in the heap for reuse instead of giving them back to the kernel (no mmap
    for large blocks, the heap trimmed only above 2 GiB), as `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`
    would. A training step frees and re-allocates the same activation-sized buffers every step; returned to
    the kernel, each comes back as fresh pages that fault on first touch (the quickstart's NDSNN run: 65.0 s
    -> 55.4 s of training on the 2-core AMD EPYC). The peak RSS is what it would be anyway; the process just
    does not shrink after it. A user's own MALLOC_MMAP_MAX_ / MALLOC_TRIM_THRESHOLD_ wins; elsewhere (not
    Linux, musl) nothing changes. Whether the setting was made."""
    if not sys.platform.startswith("linux") or {"MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
