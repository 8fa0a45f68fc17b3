"""Untrusted files: every rule of the validator broken alone (a crafted corpus), then random byte and
tensor-value mutations of a good artefact and a good checkpoint. Every file goes through the real CLI
(`ndsnn run`, `inspect`, `export`) in a child process, so a segfault or a hang is seen, not hidden.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_jobs import run_cli_jobs
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ndsnn_cli.export import csr
from ndsnn_cli.export.csr import JSON_KEYS
from ndsnn_cli.rundir import RUN_CHECKPOINT

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------- helpers (fixture `good`: conftest.py)


def decode(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata with the JSON keys decoded) of safetensors bytes."""
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    strings = header.get("__metadata__") or {}
    return dict(load_safetensors(data)), {k: json.loads(v) if k in JSON_KEYS else v for k, v in strings.items()}


def encode(tensors: dict[str, torch.Tensor], metadata: dict[str, Any], **raw_strings: str) -> bytes:
    """safetensors bytes; `raw_strings` replace metadata entries verbatim (e.g. broken JSON)."""
    strings = {k: json.dumps(v) if k in JSON_KEYS else str(v) for k, v in metadata.items()}
    strings.update(raw_strings)
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata=strings)


# ---------------------------------------------------------------------------------- crafted corpus

Mutation = Callable[[dict[str, torch.Tensor], dict[str, Any]], None]


def _sparse_name(t: dict[str, torch.Tensor]) -> str:
    """The first CSR parameter with a row of at least two stored columns (a conv weight here)."""
    return next(k.removesuffix(".crow_indices") for k in sorted(t) if k.endswith(".crow_indices"))


def _csr(part: str, edit: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]) -> Mutation:
    def mutate(t: dict[str, torch.Tensor], m: dict[str, Any]) -> None:
        name = _sparse_name(t)
        parts = {key.rpartition(".")[2]: v for key, v in t.items() if key.rpartition(".")[0] == name}
        t[f"{name}.{part}"] = edit(t[f"{name}.{part}"].clone(), parts)
    return mutate


def _set(index: int, value: Any) -> Callable[[torch.Tensor, dict], torch.Tensor]:
    def edit(x: torch.Tensor, parts: dict) -> torch.Tensor:
        x[index] = value
        return x
    return edit


def _two_in_a_row(parts: dict[str, torch.Tensor]) -> int:
    counts = parts["crow_indices"][1:] - parts["crow_indices"][:-1]
    return int(parts["crow_indices"][int((counts >= 2).nonzero()[0])])


def _swap_in_row(x: torch.Tensor, parts: dict) -> torch.Tensor:
    i = _two_in_a_row(parts)
    x[i], x[i + 1] = x[i + 1].clone(), x[i].clone()
    return x


def _dup_in_row(x: torch.Tensor, parts: dict) -> torch.Tensor:
    i = _two_in_a_row(parts)
    x[i + 1] = x[i]
    return x


def _meta(key: str, value: Any) -> Mutation:
    def mutate(t: dict[str, torch.Tensor], m: dict[str, Any]) -> None:
        target = m
        *path, last = key.split(".")
        for step in path:
            target = target[step]
        target[last] = value
    return mutate


def _graph(edit: Callable[[list[dict[str, Any]]], None]) -> Mutation:
    def mutate(t: dict[str, torch.Tensor], m: dict[str, Any]) -> None:
        edit(m["graph"])
    return mutate


def _first_op(kind: str, graph: list[dict[str, Any]]) -> dict[str, Any]:
    return next(op for op in graph if op["op"] == kind)


def _drop(name_of: Callable[[dict[str, torch.Tensor]], str]) -> Mutation:
    def mutate(t: dict[str, torch.Tensor], m: dict[str, Any]) -> None:
        del t[name_of(t)]
    return mutate


def _tensor(key: str, edit: Callable[[torch.Tensor], torch.Tensor]) -> Mutation:
    def mutate(t: dict[str, torch.Tensor], m: dict[str, Any]) -> None:
        t[key] = edit(t[key].clone())
    return mutate


def _nan_first(x: torch.Tensor) -> torch.Tensor:
    x.view(-1)[0] = float("nan")
    return x


# (id, mutation of (tensors, metadata), what the one error line must contain). One rule broken per file.
ARTEFACT_CASES: list[tuple[str, Mutation, str]] = [
    ("crow_not_monotone", _csr("crow_indices", lambda x, p: _set(1, int(x[2]) + 1)(x, p)), "non-decreasing"),
    ("crow_first_not_zero", _csr("crow_indices", _set(0, 1)), "crow[0] = 1 must be 0"),
    ("crow_last_beyond_values", _csr("crow_indices", lambda x, p: _set(-1, int(x[-1]) + 1)(x, p)), "crow[-1]"),
    ("values_shorter_than_crow", _csr("values", lambda x, p: x[:-1]), "crow[-1]"),
    ("col_negative", _csr("col_indices", _set(0, -1)), "col_indices: must be in [0,"),
    ("col_beyond_width", _csr("col_indices", lambda x, p: _set(0, math.prod(p["shape"][1:].tolist()))(x, p)),
     "col_indices: must be in [0,"),
    ("col_unsorted_in_row", _csr("col_indices", _swap_in_row), "strictly increasing within each row"),
    ("col_duplicate_in_row", _csr("col_indices", _dup_in_row), "strictly increasing within each row"),
    ("shape_negative", _csr("shape", lambda x, p: _set(1, -int(x[1]))(x, p)), "every size must be positive"),
    ("shape_rows_mismatch", _csr("shape", lambda x, p: _set(0, int(x[0]) + 1)(x, p)), "must be rows + 1"),
    ("shape_huge", _csr("shape", _set(0, 2**40)), "elements exceed"),
    ("shape_int32", _csr("shape", lambda x, p: x.to(torch.int32)), "must be int64"),
    ("crow_2d", _csr("crow_indices", lambda x, p: x.reshape(1, -1)), "must be 1-D"),
    ("crow_float", _csr("crow_indices", lambda x, p: x.float()), "must be int32 or int64"),
    ("col_int64", _csr("col_indices", lambda x, p: x.to(torch.int64)), "must be torch.int16"),
    ("values_fp16_in_fp32_file", _csr("values", lambda x, p: x.half()), "must be the artefact's dtype"),
    ("values_nan", _csr("values", lambda x, p: _nan_first(x)), "holds NaN or inf"),
    ("values_missing", _drop(lambda t: f"{_sparse_name(t)}.values"), ".values: missing"),
    ("crow_missing", _drop(lambda t: f"{_sparse_name(t)}.crow_indices"), ".crow_indices: missing"),
    ("bias_missing", _drop(lambda t: next(k for k in sorted(t) if k.endswith("6.bias"))), "missing (needed by"),
    ("bias_nan", _tensor("body.6.bias", _nan_first), "body.6.bias: holds NaN or inf"),
    ("bias_wrong_shape", _tensor("body.6.bias", lambda x: x[:-1]), "body.6.bias: shape"),
    ("bn_wrong_shape", _tensor("body.2.running_mean", lambda x: x[:-1]), "body.2.running_mean: shape"),
    ("timesteps_1e9", _meta("timesteps", 10**9), "timesteps: = 1000000000 must be in [1, 1024]"),
    ("timesteps_string", _meta("timesteps", "5"), "timesteps: must be an integer"),
    ("version_future", _meta("version", 99), "newer than this ndsnn"),
    ("version_string", _meta("version", "2"), "version: must be an integer"),
    ("dtype_unknown", _meta("dtype", "fp8"), "dtype: = 'fp8'"),
    ("num_classes_zero", _meta("dataset.num_classes", 0), "dataset.num_classes"),
    ("num_classes_mismatch", _meta("dataset.num_classes", 11), "not [11] logits"),
    ("image_size_huge", _meta("dataset.image_size", 10**6), "dataset.image_size"),
    ("in_channels_mismatch", _meta("dataset.in_channels", 3), "input.shape"),
    ("input_missing", lambda t, m: m.pop("input"), "input: must be a JSON object"),
    ("input_std_zero", _meta("input.std", [0.0]), "input.std: = 0.0 must be > 0"),
    ("input_mean_nan", _meta("input.mean", [float("nan")]), "input.mean: must be a finite number"),
    ("input_layout", _meta("input.layout", "NHWC"), "input.layout"),
    ("graph_unknown_op", _graph(lambda g: g.insert(0, {"op": "softmax"})), "graph[0].op"),
    ("graph_not_a_list", _meta("graph", {"op": "conv2d"}), "graph: must be a list"),
    ("graph_no_repeat", _graph(lambda g: g.remove({"op": "repeat_timesteps"})), "exactly one repeat_timesteps"),
    ("graph_stride_zero", _graph(lambda g: _first_op("conv2d", g).update(stride=[0, 1])), "stride: = 0"),
    ("graph_stride_string", _graph(lambda g: _first_op("conv2d", g).update(stride="1")), "list of two integers"),
    ("graph_groups_wrong", _graph(lambda g: _first_op("conv2d", g).update(groups=2)), "does not fit"),
    ("graph_weight_swapped", _graph(lambda g: _first_op("linear", g).update(weight="body.8.weight")),
     "does not fit"),
    ("graph_tau_zero", _graph(lambda g: _first_op("lif", g).update(tau=0)), "tau: = 0 must be > 0"),
    ("graph_pool_padding", _graph(lambda g: _first_op("maxpool2d", g).update(padding=[2, 2])), "at most half"),
    ("graph_kernel_too_big", _graph(lambda g: _first_op("maxpool2d", g).update(kernel=[64, 64], stride=[64, 64])),
     "does not fit"),
]



def _append(byte: int) -> Callable[[torch.Tensor, dict], torch.Tensor]:
    return lambda x, p: torch.cat([x, torch.tensor([byte], dtype=x.dtype)])


def _past_row_end(x: torch.Tensor, parts: dict) -> torch.Tensor:
    """The gap stream re-encoded with the last weight of the first non-empty row moved to column `cols`."""
    columns = csr.decoded(parts)["col_indices"].clone()
    crow = parts["crow_indices"].to(torch.int64)
    row = int((crow[1:] > crow[:-1]).nonzero()[0])
    columns[int(crow[row + 1]) - 1] = math.prod(parts["shape"][1:].tolist())
    return csr.encode_gaps(crow, columns)


def _escape_at_row_end(x: torch.Tensor, parts: dict) -> torch.Tensor:
    """The final byte of the first non-empty row's last gap turned into an escape (the row ends open)."""
    crow = parts["crow_indices"].to(torch.int64)
    row = int((crow[1:] > crow[:-1]).nonzero()[0])
    final = (x != 255).nonzero().squeeze(1)[int(crow[row + 1]) - 1]
    x[final] = 255
    return x


def _add_part(part: str, make: Callable[[dict[str, torch.Tensor], str], torch.Tensor]) -> Mutation:
    def mutate(t: dict[str, torch.Tensor], m: dict[str, Any]) -> None:
        name = _sparse_name(t)
        t[f"{name}.{part}"] = make(t, name)
    return mutate


# The int8 artefact with gap-coded columns (version 3): the encoded stream is checked before it is decoded.
INT8_GAP_CASES: list[tuple[str, Mutation, str]] = [
    ("gaps_past_row_end", _csr("col_gaps", _past_row_end), ".col_gaps: gaps of row"),
    ("gaps_escape_at_end", _csr("col_gaps", _append(255)), ".col_gaps: ends inside an escape"),
    ("gaps_escape_at_row_end", _csr("col_gaps", _escape_at_row_end), ".col_gaps: encodes"),
    ("gaps_byte_missing", _csr("col_gaps", lambda x, p: x[:-1]), ".col_gaps: encodes"),
    ("gaps_byte_extra", _csr("col_gaps", _append(0)), ".col_gaps: encodes"),
    ("gaps_empty", _csr("col_gaps", lambda x, p: x[:0]), ".col_gaps: encodes 0 gaps"),
    ("gaps_int16", _csr("col_gaps", lambda x, p: x.to(torch.int16)), ".col_gaps: dtype torch.int16 must be"),
    ("gaps_and_plain_columns", _add_part("col_indices", lambda t, n: csr.decoded(
        {k.rpartition(".")[2]: v for k, v in t.items() if k.rpartition(".")[0] == n})["col_indices"].to(torch.int16)),
     ".col_indices: a CSR parameter has exactly one of"),
    ("int8_value_minus_128", _csr("values", _set(0, -128)), ".values: int8 values must be in [-127, 127]"),
    ("int8_values_as_float", _csr("values", lambda x, p: x.float()), ".values: dtype torch.float32 must be"),
    ("scales_nan", _csr("scales", lambda x, p: _nan_first(x)), ".scales: must be finite and > 0"),
    ("scales_inf", _csr("scales", _set(0, float("inf"))), ".scales: must be finite and > 0"),
    ("scales_zero", _csr("scales", _set(0, 0.0)), ".scales: must be finite and > 0"),
    ("scales_negative", _csr("scales", _set(0, -0.5)), ".scales: must be finite and > 0"),
    ("scales_short", _csr("scales", lambda x, p: x[:-1]), ".scales: must be float32 of length rows"),
    ("scales_fp16", _csr("scales", lambda x, p: x.half()), ".scales: must be float32 of length rows"),
    ("scales_missing", _drop(lambda t: f"{_sparse_name(t)}.scales"), ".scales: missing"),
    ("int8_in_version_2", _meta("version", 2), "version: 2 has no int8 values"),
    ("bias_int8", _tensor("body.6.bias", lambda x: x.to(torch.int8)), "body.6.bias: dtype torch.int8 must be"),
]
# Rules of version 3 broken in the plain fp32 artefact.
FP32_V3_CASES: list[tuple[str, Mutation, str]] = [
    ("scales_in_fp32_file", _add_part("scales", lambda t, n: torch.ones(int(t[f"{n}.shape"][0]))),
     ".scales: only int8 artefacts have scales"),
]



def _second_pool_ceil(t: dict[str, torch.Tensor], m: dict[str, Any]) -> None:
    """The body's max-pool on the 14 x 14 map as kernel 3, stride 3, padding 1, ceil_mode: torch gives 5 x 5 (its
    last window would start in the padding), the plain ceiling 6 x 6; the linear after it is rebuilt for 6 x 6
    (32 * 36 = 1152 inputs), the shape a validator without torch's rule accepts and the runtime cannot run."""
    pools = [op for op in m["graph"] if op["op"] == "maxpool2d"]
    pools[1].update(kernel=[3, 3], stride=[3, 3], padding=[1, 1], ceil_mode=True)
    weight = torch.randn(128, 32 * 36)
    for part, tensor in csr.to_csr(weight, torch.ones_like(weight, dtype=torch.bool), torch.float32, "plain").items():
        t[f"body.6.weight.{part}"] = tensor


def _encoder_blown_up(t: dict[str, torch.Tensor], m: dict[str, Any]) -> None:
    """A consistent graph that asks for 16 x 2074 x 2074 = 68.8 M activations per image: the encoder conv padded
    by 1024, and its max-pool's window widened to 148 so the rest of the network sees 14 x 14 again (255 KB)."""
    _first_op("conv2d", m["graph"]).update(padding=[1024, 1024])
    _first_op("maxpool2d", m["graph"]).update(kernel=[148, 148], stride=[148, 148])


# Issue 28: values that pass every type rule but are silently wrong, and graphs the runtime cannot run as stated.
SEMANTIC_CASES: list[tuple[str, Mutation, str]] = [
    ("bias_float8", _tensor("body.6.bias", lambda x: x.to(torch.float8_e4m3fn)),
     "body.6.bias: dtype torch.float8_e4m3fn must be the artefact's dtype torch.float32"),
    ("bn_variance_negative", _tensor("body.2.running_var", lambda x: -x - 1), "body.2.running_var: holds a negative"),
    ("input_std_denormal", _meta("input.std", [1e-45]), "input.std: = 1e-45 must be in [0.001, 1000]"),
    ("input_mean_huge", _meta("input.mean", [1e30]), "input.mean: = 1e+30 must be in [-1000, 1000]"),
    ("graph_v_threshold_zero", _graph(lambda g: _first_op("lif", g).update(v_threshold=0)),
     "v_threshold: = 0 must be > 0"),
    ("graph_lif_before_repeat", _graph(lambda g: g.insert(0, {"op": "lif", "tau": 2.0, "v_threshold": 1.0})),
     "graph: a lif op before repeat_timesteps"),
    ("graph_maxpool_ceil_mode", _second_pool_ceil, "does not fit graph[10] linear on 800 input features"),
    ("graph_activation_per_image", _encoder_blown_up, "68,823,616 elements per image, more than 67,108,864"),
    ("recipe_over_1mb", _meta("recipe", "#" * (1 << 20) + "\n"), "recipe: 1,048,577 characters: more than"),
]
INT8_SEMANTIC_CASES: list[tuple[str, Mutation, str]] = [
    ("scales_1e38", _csr("scales", lambda x, p: _set(0, 1e38)(x.float(), p)),  # fp32: bf16 would round 1e38
     ".scales: = 1e+38: scale x 127 overflows float32"),
]


def _deep_header(data: bytes) -> bytes:
    """The safetensors header itself with a 100,000-deep list in it (the library refuses it; the reader must too)."""
    length = int.from_bytes(data[:8], "little")
    header = data[8:8 + length].rstrip(b" ")[:-1] + b',"deep":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + data[8 + length:]


RAW_CASES: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("truncated", lambda b: b[: len(b) // 2], "truncated or corrupt"),
    ("header_length_huge", lambda b: (2**60).to_bytes(8, "little") + b[8:], "not a readable safetensors"),
    ("header_offsets_tampered", lambda b: b.replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1),
     "not a readable safetensors"),
    ("metadata_bad_json", lambda b: _retag(b, "graph", "[{"), "corrupt artefact metadata"),
    ("metadata_deep_json", lambda b: _retag(b, "graph", "[" * 100_000), "corrupt artefact metadata"),
    ("empty_file", lambda b: b"", "not a readable safetensors"),
    # issue 28: the header is read and checked before the data, with JSON bounds
    ("header_covers_less_than_file", lambda b: b + bytes(1 << 20), "the header's tensors end at byte"),
    ("header_deep_json", _deep_header, "header: JSON nested too deep"),
    ("metadata_int_5000_digits", lambda b: _retag(b, "timesteps", "1" * 5000),
     "corrupt artefact metadata (holds an integer of 5,000 digits"),
]


def _retag(data: bytes, key: str, text: str) -> bytes:
    return encode(*decode(data), **{key: text})


def _ckpt(edit: Callable[[dict[str, torch.Tensor], dict[str, Any]], None]) -> Callable[[bytes], bytes]:
    def mutate(data: bytes) -> bytes:
        tensors, strings = dict(load_safetensors(data)), json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        meta = json.loads(strings["__metadata__"]["ndsnn"])
        edit(tensors, meta)
        return save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata={"ndsnn": json.dumps(meta)})
    return mutate


def _ckpt_tensor(key: str, edit: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[bytes], bytes]:
    return _ckpt(lambda t, m: t.__setitem__(key, edit(t[key].clone())))


def _ckpt_meta(key: str, value: Any) -> Callable[[bytes], bytes]:
    return _ckpt(lambda t, m: m.__setitem__(key, value))


def _rename(t: dict[str, torch.Tensor], old: str, new: str) -> None:
    t[new] = t.pop(old)


# (id, mutation of the file bytes, expected text, commands: "inspect" and/or "export")
CHECKPOINT_CASES: list[tuple[str, Callable[[bytes], bytes], str, tuple[str, ...]]] = [
    ("mask_wrong_shape", _ckpt_tensor("mask::body.1.weight", lambda x: x.reshape(1, -1)),
     "matches no model weight", ("inspect", "export")),
    ("mask_value_2", _ckpt_tensor("mask::body.1.weight", lambda x: x.to(torch.uint8) * 2),
     "must be bool or uint8 0/1", ("inspect", "export")),
    ("mask_float", _ckpt_tensor("mask::body.1.weight", lambda x: x.float()), "must be bool or uint8",
     ("inspect", "export")),
    ("weight_nan", _ckpt_tensor("model::body.1.weight", _nan_first), "holds NaN or inf", ("inspect", "export")),
    ("step_negative", _ckpt_meta("step", -1), "step: = -1", ("inspect", "export")),
    ("epoch_huge", _ckpt_meta("epoch", 10**12), "epoch: = 1000000000000", ("inspect", "export")),
    ("version_string", _ckpt_meta("version", "1"), "version: must be an integer", ("inspect", "export")),
    ("recipe_not_text", _ckpt_meta("recipe", 5), "recipe: must be the recipe's TOML", ("inspect", "export")),
    ("rng_float", _ckpt_tensor("rng::torch", lambda x: x.float()), "RNG state must be a 1-D uint8",
     ("inspect", "export")),
    ("optim_key_malformed", _ckpt(lambda t, m: _rename(t, next(k for k in t if k.startswith("optim::")),
                                                        "optim::x::momentum_buffer")),
     "optimizer entries are named", ("inspect", "export")),
    ("weight_missing", _ckpt(lambda t, m: t.pop("model::body.6.bias")), "model::body.6.bias: missing", ("export",)),
    ("weight_wrong_shape", _ckpt(lambda t, m: (t.__setitem__("model::body.6.weight", t["model::body.6.weight"][:-1]),
                                               t.__setitem__("mask::body.6.weight", t["mask::body.6.weight"][:-1]))),
     "must be the model's", ("export",)),
    ("meta_not_object", _ckpt(lambda t, m: (m.clear())), "not an ndsnn checkpoint", ("export",)),
    ("truncated", lambda b: b[:-100], "truncated or corrupt", ("inspect", "export")),
    # issue 28: every tensor's dtype against its role, values that would be silently wrong, bounded metadata
    ("weight_float8", _ckpt_tensor("model::body.6.weight", lambda x: x.to(torch.float8_e4m3fn)),
     "model::body.6.weight: dtype torch.float8_e4m3fn is not one a model tensor has", ("inspect", "export")),
    ("weight_uint64", _ckpt_tensor("model::body.6.bias", lambda x: torch.full_like(x, 2**63, dtype=torch.uint64)),
     "model::body.6.bias: dtype torch.uint64 is not one a model tensor has", ("inspect", "export")),
    ("weight_complex", _ckpt_tensor("model::body.6.bias", lambda x: x.to(torch.complex64) * (1 + 1j)),
     "model::body.6.bias: dtype torch.complex64 is not one a model tensor has", ("inspect", "export")),
    ("bn_variance_negative", _ckpt_tensor("model::body.2.running_var", lambda x: -x - 1),
     "model::body.2.running_var: holds a negative variance", ("inspect", "export")),
    ("mask_over_bias", _ckpt(lambda t, m: t.__setitem__("mask::body.6.bias", torch.ones(t["model::body.6.bias"].shape,
                                                                                         dtype=torch.bool))),
     "mask::body.6.bias: masks a tensor of 1 dimension(s)", ("inspect", "export")),
    ("rng_key_malformed", _ckpt(lambda t, m: t.__setitem__("rng::cuda::x", torch.zeros(16, dtype=torch.uint8))),
     "rng::cuda::x: RNG entries are rng::torch and rng::cuda::<device index>", ("inspect", "export")),
    ("recipe_deep_toml", _ckpt_meta("recipe", "a = " + "[" * 5000 + "]" * 5000 + "\n"), "TOML nested too deep",
     ("export",)),
    ("recipe_over_1mb", _ckpt_meta("recipe", "#" * (1 << 20) + "\n"), "recipe: 1,048,577 characters",
     ("inspect", "export")),
    ("meta_int_5000_digits", lambda b: save_safetensors(dict(load_safetensors(b)), metadata={
        "ndsnn": '{"format": "ndsnn-checkpoint", "version": ' + "1" * 5000 + "}"}),
     "corrupt checkpoint metadata (holds an integer of 5,000 digits", ("inspect", "export")),
]


def _expect_one_line(result: dict[str, Any], file: Path, expect: str) -> None:
    stderr = result["stderr"]
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert result["code"] == 2, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"error: {file}"), lines[0]
    assert expect in lines[0], lines[0]


def test_crafted_corpus_is_one_line_exit_2_for_run_inspect_and_export(good: dict[str, Path]) -> None:
    """≥ 30 files, each breaking one rule (CSR invariants, dtypes, graph shapes, bounded metadata,
    truncation, header tampering): `ndsnn run` and `ndsnn inspect` (and `export` for checkpoints) exit 2
    with one line naming the file and the rule; never a traceback, never a signal."""
    work = good["work"] / "crafted"
    work.mkdir()
    data, int8 = good["artefact"].read_bytes(), good["int8"].read_bytes()
    files, jobs = {}, []
    cases = [(c, data) for c in ARTEFACT_CASES + FP32_V3_CASES + SEMANTIC_CASES]
    cases += [(c, int8) for c in INT8_GAP_CASES + INT8_SEMANTIC_CASES]
    for (case_id, mutate, expect), source in cases:
        tensors, metadata = decode(source)
        mutate(tensors, metadata)
        files[case_id] = (work / f"{case_id}.safetensors", expect)
        files[case_id][0].write_bytes(encode(tensors, metadata))
    for case_id, mutate_bytes, expect in RAW_CASES:
        files[case_id] = (work / f"{case_id}.safetensors", expect)
        files[case_id][0].write_bytes(mutate_bytes(data))
    for case_id, (path, _) in files.items():
        jobs += [{"id": f"{case_id}@run", "argv": ["run", str(path), "--input", str(good["images"])]},
                 {"id": f"{case_id}@inspect", "argv": ["inspect", str(path)]}]
    checkpoint = good["checkpoint"].read_bytes()
    for case_id, mutate_bytes, expect, commands in CHECKPOINT_CASES:
        path = work / f"ckpt_{case_id}.safetensors"
        path.write_bytes(mutate_bytes(checkpoint))
        files[f"ckpt_{case_id}"] = (path, expect)
        argvs = {"inspect": ["inspect", str(path)],
                 "export": ["export", str(path), "--format", "csr", "-o", str(work / f"{case_id}.out")]}
        jobs += [{"id": f"ckpt_{case_id}@{c}", "argv": argvs[c]} for c in commands]
    assert len(files) >= 30
    jobs.append({"id": "good-int8@run", "argv": ["run", str(good["int8"]), "--input", str(good["images"]), "--json"]})
    results, _ = run_cli_jobs(jobs, work, timeout=1200)
    assert results["good-int8@run"]["code"] == 0, results["good-int8@run"]["stderr"]  # the unbroken file runs
    jobs.pop()
    for job in jobs:
        case_id = job["id"].partition("@")[0]
        _expect_one_line(results[job["id"]], files[case_id][0], files[case_id][1])
    assert not list(work.glob("*.out")), "an export from a broken checkpoint wrote a file"


# --------------------------------------------------------------------------------- random mutations

EXTREMES = [0, -1, 1, 2, 7, 127, 128, 255, 32767, -32768, 2**31 - 1, -(2**31), 2**40, -(2**40),
            float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 0.5]


def _mutate_tensor_value(rng: random.Random, data: bytes) -> bytes:
    """One element of one tensor set to an extreme (clamped to the dtype), or one tensor's dtype swapped."""
    tensors = dict(load_safetensors(data))
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    strings = header.get("__metadata__") or {}
    key = rng.choice(sorted(tensors))
    tensor = tensors[key].clone()
    if rng.random() < 0.15:
        tensor = tensor.to(rng.choice([torch.int16, torch.int32, torch.int64, torch.float16, torch.float32,
                                       torch.uint8, torch.bool]))
    elif tensor.numel():
        value = rng.choice(EXTREMES)
        if not tensor.is_floating_point():
            if isinstance(value, float) and not math.isfinite(value):
                value = 0
            info = torch.iinfo(tensor.dtype) if tensor.dtype != torch.bool else None
            value = int(value) if info is None else max(info.min, min(info.max, int(value)))
        tensor.view(-1)[rng.randrange(tensor.numel())] = value
    tensors[key] = tensor.contiguous()
    return save_safetensors(tensors, metadata=strings)


def _mutate_metadata(rng: random.Random, data: bytes) -> bytes:
    """One artefact metadata value replaced by something of another type or size."""
    tensors, metadata = decode(data)
    key = rng.choice(sorted(metadata))
    target, name = metadata, key
    while isinstance(target[name], dict) and target[name] and rng.random() < 0.7:
        target, name = target[name], rng.choice(sorted(target[name]))
    target[name] = rng.choice([None, -1, 0, 10**12, "x", [], {}, [1, 2], 1.5, float("nan"), True])
    return encode(tensors, metadata)


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """Random byte flips (in the header or the data), a truncation, or inserted bytes."""
    raw = bytearray(data)
    header_end = 8 + int.from_bytes(data[:8], "little")
    choice = rng.random()
    if choice < 0.1:
        return bytes(raw[: rng.randrange(len(raw))])
    if choice < 0.15:
        at = rng.randrange(len(raw))
        return bytes(raw[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))) + raw[at:])
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(header_end) if rng.random() < 0.5 else rng.randrange(header_end, len(raw))
        raw[at] = rng.randrange(256)
    return bytes(raw)


ARTEFACT_MUTATIONS = 300
CHECKPOINT_MUTATIONS = 200


@pytest.mark.slow  # about 30 s on an idle 2-core machine; CI runs it
def test_random_mutations_never_crash_or_hang(good: dict[str, Path]) -> None:
    """500 random mutations (seed 0) of two good artefacts (fp32 plain columns, int8 gap-coded; `ndsnn run`) and a
    good checkpoint (`ndsnn export`):
    each exits 0 with a result or 2 with one line; the child process never dies, never hangs."""
    rng = random.Random(0)
    work = good["work"] / "fuzz"
    work.mkdir()
    artefacts = [good["artefact"].read_bytes(), good["int8"].read_bytes()]  # plain fp32; int8 with col_gaps
    checkpoint = good["checkpoint"].read_bytes()
    jobs = []
    for i in range(ARTEFACT_MUTATIONS):
        kind = rng.choice(["bytes", "tensor", "tensor", "metadata"])
        mutate = {"bytes": _mutate_bytes, "tensor": _mutate_tensor_value, "metadata": _mutate_metadata}[kind]
        mutated = mutate(rng, artefacts[i % 2])
        path = work / f"a{i:03d}_{kind}.safetensors"
        path.write_bytes(mutated)
        jobs.append({"id": path.name, "argv": ["run", str(path), "--input", str(good["images"]), "--json"]})
    for i in range(CHECKPOINT_MUTATIONS):
        kind = rng.choice(["bytes", "tensor"])
        mutated = _mutate_bytes(rng, checkpoint) if kind == "bytes" else _mutate_tensor_value(rng, checkpoint)
        path = work / f"c{i:03d}_{kind}.safetensors"
        path.write_bytes(mutated)
        jobs.append({"id": path.name, "argv": ["export", str(path), "--format", "csr", "-o", str(work / "out.csr"),
                                               "--json"]})
    results, cpu_seconds = run_cli_jobs(jobs, work, timeout=1500)
    codes = {0: 0, 2: 0}
    for job in jobs:
        result = results[job["id"]]
        assert result["code"] in (0, 2), (job["id"], result["stderr"][-3000:])
        assert "Traceback" not in result["stderr"], (job["id"], result["stderr"][-3000:])
        if result["code"] == 2:
            assert len(result["stderr"].strip().splitlines()) == 1, (job["id"], result["stderr"])
        else:
            json.loads(result["stdout"])  # a whole result
        assert result["seconds"] < 120, (job["id"], result["seconds"])  # wall time: a hang, not a slow machine
        codes[result["code"]] += 1
    assert codes[2] > 100 and codes[0] > 20, codes  # both outcomes exercised
    assert cpu_seconds < 60, cpu_seconds  # CPU time of the child, all 500 files (wall time depends on the load)


# ----------------------------------------------------------------------------- structural mutations


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]), data[8 + length:]


def _join(header: dict[str, Any], body: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


def _nest(rng: random.Random, data: bytes) -> bytes:
    """One metadata string wrapped in 65 to 100,000 levels of JSON lists."""
    header, body = _split(data)
    strings = header["__metadata__"]
    key = rng.choice(sorted(strings))
    depth = rng.choice([65, 1000, 100_000])
    strings[key] = "[" * depth + json.dumps(strings[key]) + "]" * depth
    return _join(header, body)


def _huge_length(rng: random.Random, data: bytes) -> bytes:
    """A metadata string beyond a bound (a 2 MB recipe; a 17 MB header), or an op list of 20,000 ops."""
    header, body = _split(data)
    strings = header["__metadata__"]
    choice = rng.random()
    if choice < 0.3:
        strings["recipe"] = "#" * (2 << 20)
    elif choice < 0.4:
        strings["recipe"] = "#" * (17 << 20)
    elif "graph" in strings:
        strings["graph"] = json.dumps(json.loads(strings["graph"]) * (20_000 // len(json.loads(strings["graph"]))))
    else:
        strings["ndsnn"] = json.dumps({**json.loads(strings["ndsnn"]), "recipe": "x" * (2 << 20)})
    return _join(header, body)


STRUCTURAL_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64, torch.uint64, torch.uint32, torch.uint16,
                     torch.bfloat16, torch.int8, torch.float64, torch.bool]


def _swap_dtype(rng: random.Random, data: bytes) -> bytes:
    """One tensor converted to a dtype no role allows (float8, complex, unsigned) or another role's."""
    header, _ = _split(data)
    tensors = dict(load_safetensors(data))
    key = rng.choice(sorted(tensors))
    tensors[key] = tensors[key].to(rng.choice(STRUCTURAL_DTYPES)).contiguous()
    return save_safetensors(tensors, metadata=header.get("__metadata__"))


# same item size, other meaning: the library reads the bytes as the header says
PUNS = {"F32": ["I32", "U32"], "I32": ["F32", "U32"], "I64": ["F64", "U64"], "F16": ["BF16", "I16"], "I16": ["F16"],
        "U8": ["I8", "BOOL", "F8_E4M3"], "BOOL": ["U8", "I8"], "I8": ["U8", "F8_E5M2"], "F64": ["I64"]}


def _lying_header(rng: random.Random, data: bytes) -> bytes:
    """The header lies about one tensor: its dtype (same size), its shape (same or other count), its data
    offsets; or the header's own length is off by a few bytes."""
    header, body = _split(data)
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    entry = header[name]
    choice = rng.random()
    if choice < 0.3 and entry["dtype"] in PUNS:
        entry["dtype"] = rng.choice(PUNS[entry["dtype"]])
    elif choice < 0.55:
        numel = math.prod(entry["shape"])
        entry["shape"] = rng.choice([[numel], [1, numel], [numel, 1], list(reversed(entry["shape"])), [numel + 1],
                                     [2**31, 2**31], []])
    elif choice < 0.8:
        shift = rng.choice([-8, -1, 1, 8, 2**40])
        entry["data_offsets"] = [max(0, entry["data_offsets"][0] + shift), max(0, entry["data_offsets"][1] + shift)]
    else:
        raw = _join(header, body)
        length = int.from_bytes(raw[:8], "little") + rng.choice([-16, -8, -1, 1, 8, 16])
        return length.to_bytes(8, "little") + raw[8:]
    return _join(header, body)


STRUCTURAL = {"nest": _nest, "length": _huge_length, "dtype": _swap_dtype, "header": _lying_header}
STRUCTURAL_ARTEFACTS = 150
STRUCTURAL_CHECKPOINTS = 60


@pytest.mark.slow  # about 20 s on an idle 2-core machine; CI runs it
def test_structural_mutations_never_crash_hang_or_blow_up(good: dict[str, Path]) -> None:
    """210 structural mutations (seed 1) of the good artefacts (`ndsnn run`) and checkpoint (`ndsnn export`):
    JSON nested up to 100,000 deep, strings and op lists beyond their bounds, dtypes no role allows, headers that
    lie about a tensor's dtype, shape or place. Each exits 0 with a whole result or 2 with one line, and the
    CLI process never grows past 2 GiB (a small file cannot ask for gigabytes)."""
    rng = random.Random(1)
    work = good["work"] / "structural"
    work.mkdir()
    artefacts = [good["artefact"].read_bytes(), good["int8"].read_bytes()]
    checkpoint = good["checkpoint"].read_bytes()
    jobs = []
    for i in range(STRUCTURAL_ARTEFACTS + STRUCTURAL_CHECKPOINTS):
        kind = rng.choice(sorted(STRUCTURAL))
        is_artefact = i < STRUCTURAL_ARTEFACTS
        path = work / f"{'a' if is_artefact else 'c'}{i:03d}_{kind}.safetensors"
        path.write_bytes(STRUCTURAL[kind](rng, artefacts[i % 2] if is_artefact else checkpoint))
        argv = (["run", str(path), "--input", str(good["images"]), "--json"] if is_artefact else
                ["export", str(path), "--format", "csr", "-o", str(work / "out.csr"), "--json"])
        jobs.append({"id": path.name, "argv": argv})
    results, cpu_seconds = run_cli_jobs(jobs, work, timeout=1500)
    codes = {0: 0, 2: 0}
    for job in jobs:
        result = results[job["id"]]
        assert result["code"] in (0, 2) and "Traceback" not in result["stderr"], (job["id"], result["stderr"][-3000:])
        if result["code"] == 2:
            assert len(result["stderr"].strip().splitlines()) == 1, (job["id"], result["stderr"])
        else:
            json.loads(result["stdout"])
        assert result["seconds"] < 120, (job["id"], result["seconds"])
        codes[result["code"]] += 1
    assert codes[2] > 100, codes
    peak, first = max((r["peak_rss_mb"], r["id"]) for r in results.values())
    assert peak < 2048, f"the CLI process grew to {peak:.0f} MB (first there at {first})"
    assert cpu_seconds < 60, cpu_seconds


# ------------------------------------------------------------------------------- resume and cost RUN


def test_resume_from_a_checkpoint_whose_optimizer_state_does_not_fit_exits_2(good: dict[str, Path],
                                                                              run_main) -> None:
    run = good["work"] / "resume"
    import shutil

    shutil.copytree(good["checkpoint"].parents[1], run)
    target = run / RUN_CHECKPOINT
    key = next(k for k in load_safetensors(target.read_bytes()) if k.startswith("optim::") and "momentum" in k)
    target.write_bytes(_ckpt_tensor(key, lambda x: x.reshape(-1)[:3].clone())(target.read_bytes()))
    before = target.read_bytes()
    code, _, err = run_main("train", str(run / "recipe.toml"), "--out", str(run), "--resume", "-q")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{key}: shape [3] must be its parameter's" in err
    assert target.read_bytes() == before


@pytest.mark.parametrize(("field", "value", "expect"), [
    ("epochs", 10**12, "epochs: = 1000000000000 must be in [1, 100000]"),
    ("steps", "many", "steps: must be an integer (got str)"),
])
def test_cost_run_on_a_tampered_summary_exits_2(good: dict[str, Path], run_main, field: str, value: Any,
                                                 expect: str) -> None:
    import shutil

    run = good["work"] / f"cost_{field}"
    shutil.copytree(good["checkpoint"].parents[1], run)
    summary = json.loads((run / "summary.json").read_text())
    summary[field] = value
    (run / "summary.json").write_text(json.dumps(summary))
    code, out, err = run_main("cost", str(run))
    assert code == 2 and err.strip() == f"error: {run / 'summary.json'}: {expect}", err
