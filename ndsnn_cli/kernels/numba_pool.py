"""numba's thread pool, sized to torch's thread count, started without changing torch's.

numba's OpenMP pool shares libgomp with torch, and launching it (numba's first parallel call, or its first
`set_num_threads`) sets the process's OpenMP thread count to NUMBA_NUM_THREADS (all cores), which torch
then uses too: a run set to 1 thread (`[train] threads`) trained on every core from its first numba
kernel on, and its sums, so its bits, differed from a run whose pool had started before it. Every numba
kernel wrapper calls `match_torch_threads()` before launching.
"""

from __future__ import annotations

_launched = False


def match_torch_threads() -> None:
    """numba uses as many threads as torch does (never more than numba started with); the first call
    launches the pool and gives torch its own thread count back."""
    global _launched
    import numba
    import torch

    threads = torch.get_num_threads()
    wanted = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    if not _launched or numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)
    if not _launched:
        torch.set_num_threads(threads)
        _launched = True
