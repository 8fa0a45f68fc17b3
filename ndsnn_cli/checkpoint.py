"""Checkpoints: one safetensors file (weights, masks, optimizer state, RNG) + JSON metadata. No pickle.

The format (name, version, tensor keys) is `ndsnn_cli.formats.checkpoint`; every rule a file must keep
is `ndsnn_cli.validate.check_checkpoint`, which `load_checkpoint` runs before returning anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ndsnn_cli import __version__
from ndsnn_cli import limits as L
from ndsnn_cli.atomic import write_bytes
from ndsnn_cli.errors import UserError
from ndsnn_cli.formats.checkpoint import FORMAT, METADATA_KEY, VERSION
from ndsnn_cli.formats.safetensors import Header
from ndsnn_cli.formats.safetensors import read_header as safetensors_header
from ndsnn_cli.formats.text import TextError, parse_json
from ndsnn_cli.validate import check_checkpoint


@dataclass
class Checkpoint:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k.removeprefix(prefix): v for k, v in self.tensors.items() if k.startswith(prefix)}

    @property
    def model_state(self) -> dict[str, torch.Tensor]:
        return self.prefixed("model::")

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return self.prefixed("mask::")


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (per-parameter buffers) and JSON (everything else)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim::{index}::{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}::{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim::"):
            _, index, name = key.split("::", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split("::", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    extra_tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write everything needed to resume bit-identically, atomically."""
    tensors = {f"model::{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()})
    tensors["rng::torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng::cuda::{i}"] = state
    full_meta = {"format": FORMAT, "version": VERSION, "ndsnn_version": __version__, **meta}
    if optimizer is not None:
        optim_tensors, optim_meta = optimizer_to_tensors(optimizer)
        tensors.update(optim_tensors)
        full_meta["optimizer"] = optim_meta
    data = save_safetensors_canonical(tensors, {METADATA_KEY: json.dumps(full_meta)})
    return write_bytes(path, data)


def save_safetensors_canonical(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes that depend only on the tensors and metadata: the library writes `__metadata__`
    from a hash map, in an order that changes from process to process; here its keys are sorted."""
    raw = save_safetensors(tensors, metadata=metadata)
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the library pads the header with spaces to 8-byte alignment too
    return len(text).to_bytes(8, "little") + text + raw[8 + header_len:]


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a checkpoint (`ndsnn_cli.validate`); a missing, truncated, foreign or
    inconsistent file is a one-line UserError."""
    tensors, strings = read_safetensors(path, "checkpoint")
    meta = parse_metadata(path, strings.get(METADATA_KEY, "{}"))
    check_checkpoint(path, tensors, meta)
    return Checkpoint(tensors, meta)


def parse_metadata(path: str | Path, text: str) -> Any:
    """The checkpoint's `ndsnn` JSON, bounded (`formats.text.parse_json`); what it must hold is the validator's."""
    try:
        return parse_json(text, L.MAX_HEADER_BYTES)
    except TextError as exc:
        raise UserError(f"{path}: corrupt checkpoint metadata ({exc})") from None


def read_header(path: str | Path) -> Header:
    """The checked safetensors header alone (`formats.safetensors.read_header`): a few bytes read, not the file."""
    try:
        return safetensors_header(path)
    except TextError as exc:
        raise UserError(f"{path}: not a readable safetensors file (truncated or corrupt: {exc})") from None


def read_safetensors(path: str | Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and `__metadata__` strings of a safetensors file; missing/truncated/corrupt -> one-line UserError.
    The header is read and checked first, so the data is read only when the header describes it exactly."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    header = read_header(path)
    if header.file_bytes > L.MAX_SAFETENSORS_BYTES:
        raise UserError(f"{path}: {header.file_bytes:,} bytes: larger than a {what} may be "
                        f"({L.MAX_SAFETENSORS_BYTES:,})")
    raw = path.read_bytes()
    try:
        # sorted: safetensors returns its own order, which differs between processes; everything
        # derived from a file (masks, an export's metadata and bytes) must not
        tensors = dict(sorted(load_safetensors(raw).items()))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a readable safetensors file (truncated or corrupt: {reason})") from None
    return tensors, header.metadata


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The `ndsnn` JSON of any safetensors file written by this project ({} if there is none), from the header."""
    meta = parse_metadata(path, read_header(path).metadata.get(METADATA_KEY, "{}"))
    return meta if isinstance(meta, dict) else {}


def restore_rng(checkpoint: Checkpoint) -> None:
    torch.set_rng_state(checkpoint.tensors["rng::torch"])
    cuda_keys = sorted((k for k in checkpoint.tensors if k.startswith("rng::cuda::")),
                       key=lambda k: int(k.split("::")[2]))
    cuda_states = [checkpoint.tensors[k] for k in cuda_keys]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
