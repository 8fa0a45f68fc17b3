"""Multi-process training helpers: init from torchrun's environment, rank queries, broadcasts, sync checks.

`torchrun --nproc-per-node N -m ndsnn_cli train RECIPE` starts N copies of the CLI; each one calls
`init_from_env` (a no-op for a plain single process). Only rank 0 writes files; every collective
here is a no-op when there is a single process, so the trainer calls them unconditionally.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from ndsnn_cli.errors import UserError

T = TypeVar("T")
_OWNED = False  # True when init_from_env created the process group (so shutdown destroys it)


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"WORLD_SIZE = {os.environ['WORLD_SIZE']!r} is not an integer") from None


def env_rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def init_from_env(device: str = "auto") -> bool:
    """Join the process group described by RANK/WORLD_SIZE/MASTER_ADDR/LOCAL_RANK; True if distributed.

    Backend: nccl when training on CUDA, gloo on CPU. Each process on a node takes GPU LOCAL_RANK.
    """
    global _OWNED
    if active():
        return True
    if env_world_size() <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UserError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set: launch with torchrun "
                        "(or `ndsnn train --nproc N`)")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    _OWNED = True
    return True


def shutdown() -> None:
    """Leave the process group if `init_from_env` created it."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_main() -> bool:
    """Rank 0: the only process that writes files or prints."""
    return rank() == 0


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite every tensor in place with rank `src`'s value (bool tensors included)."""
    if not active():
        return
    device = _comm_device()
    for tensor in tensors:
        wire = tensor.detach().to(device, torch.uint8 if tensor.dtype == torch.bool else tensor.dtype)
        dist.broadcast(wire, src)
        with torch.no_grad():
            tensor.copy_(wire.to(tensor.device, tensor.dtype))


def sum_values(*values: float) -> list[float]:
    """Sum a few numbers over all ranks (float64; NaN anywhere gives NaN everywhere)."""
    if not active():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def fingerprint(tensors: Iterable[torch.Tensor]) -> int:
    """A 62-bit hash of the bytes of `tensors` (order matters), for cheap cross-rank equality checks."""
    digest = hashlib.blake2b(digest_size=8)
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 2


def in_sync(tensors: Iterable[torch.Tensor]) -> bool:
    """True when every rank holds bit-identical `tensors` (min and max of the fingerprints agree)."""
    if not active():
        return True
    value = fingerprint(tensors)
    low = torch.tensor([value], dtype=torch.int64, device=_comm_device())
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return bool(low.item() == high.item())


def on_main(fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 only; a UserError there is raised on every rank (so none waits forever).

    Returns fn's result on rank 0 and None elsewhere.
    """
    if not active():
        return fn()
    result, message = None, None
    if is_main():
        try:
            result = fn()
        except UserError as exc:
            message = str(exc)
        except BaseException as exc:
            _share([f"rank 0 failed: {type(exc).__name__}: {exc}"])
            raise
    shared = _share([message])
    if shared[0] is not None:
        raise UserError(shared[0])
    return result


def _share(objects: list[object]) -> list[object]:
    dist.broadcast_object_list(objects, src=0, device=_comm_device())
    return objects
