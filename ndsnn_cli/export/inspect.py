"""`ndsnn inspect`: what a checkpoint, CSR artefact, ONNX model or NIR graph holds (kind, format, per-layer
shape, density, nnz, bytes), each read through its own validated loader."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from ndsnn_cli.checkpoint import load_checkpoint, read_metadata
from ndsnn_cli.errors import UserError
from ndsnn_cli.export.csr import load_raw, split_csr
from ndsnn_cli.formats.csr import CSR_FORMAT
from ndsnn_cli.rundir import RUN_CHECKPOINT


def inspect_file(path: str) -> dict:
    """What a checkpoint, CSR artefact, ONNX or NIR file holds: kind, format, per-layer shape/density/nnz/bytes."""
    file = Path(path)
    if file.is_dir() and (file / RUN_CHECKPOINT).is_file():  # a run directory
        file = file / RUN_CHECKPOINT
    if not file.is_file():
        raise UserError(f"{file}: no such file")
    if file.suffix == ".onnx":
        return _inspect_onnx(file)
    if file.suffix == ".nir":
        return inspect_nir(file)
    if _safetensors_format(file) == CSR_FORMAT:
        return _inspect_artefact(file)
    if not read_metadata(file):
        raise UserError(f"{file}: not an ndsnn checkpoint or artefact (no ndsnn metadata)")
    return _inspect_checkpoint(file)


def _inspect_artefact(file: Path) -> dict[str, Any]:
    tensors, meta = load_raw(file)
    sparse, plain = split_csr(tensors)
    layers = []
    for name, parts in sparse.items():
        shape = [int(s) for s in parts["shape"]]
        numel = _prod(shape)
        nnz = parts["values"].numel()
        layers.append({"name": name, "shape": shape, "storage": "csr", "nnz": nnz, "density": nnz / numel,
                       "bytes": sum(t.numel() * t.element_size() for t in parts.values()),
                       "dtype": str(parts["values"].dtype).removeprefix("torch."),
                       "indices": "gaps-u8" if "col_gaps" in parts else
                       str(parts["col_indices"].dtype).removeprefix("torch.")})
    for name, tensor in plain.items():
        layers.append({"name": name, "shape": list(tensor.shape), "storage": "dense", "nnz": tensor.numel(),
                       "density": 1.0, "bytes": tensor.numel() * tensor.element_size(),
                       "dtype": str(tensor.dtype).removeprefix("torch.")})
    return {"file": str(file), "kind": "artefact", "format": meta["format"], "version": meta["version"],
            "bytes": file.stat().st_size, "recipe": recipe_summary(meta.get("recipe", "")),
            "recipe_sha256": meta.get("recipe_sha256"), "timesteps": meta.get("timesteps"),
            "bn_folded": meta.get("bn_folded"), "dtype": meta.get("dtype"),
            "sparsity": meta.get("sparsity", {}).get("sparsity"), "layers": layers}


def _inspect_checkpoint(file: Path) -> dict[str, Any]:
    checkpoint = load_checkpoint(file)
    masks = checkpoint.masks
    layers = []
    for name, tensor in checkpoint.model_state.items():
        nnz = int(masks[name].sum()) if name in masks else tensor.numel()
        layers.append({"name": name, "shape": list(tensor.shape), "storage": "masked" if name in masks else "dense",
                       "nnz": nnz, "density": nnz / max(1, tensor.numel()),
                       "bytes": tensor.numel() * tensor.element_size(),
                       "dtype": str(tensor.dtype).removeprefix("torch.")})
    meta = checkpoint.meta
    numel = sum(int(m.numel()) for m in masks.values())
    active = sum(int(m.sum()) for m in masks.values())
    return {"file": str(file), "kind": "checkpoint", "format": meta["format"], "version": meta["version"],
            "bytes": file.stat().st_size, "recipe": recipe_summary(meta.get("recipe", "")),
            "epoch": meta.get("epoch"), "step": meta.get("step"),
            "sparsity": 1 - active / numel if numel else 0.0, "layers": layers}


def _prod(shape: list) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _safetensors_format(file: Path) -> str | None:
    raw = file.read_bytes()
    try:
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        return (header.get("__metadata__") or {}).get("format")
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise UserError(f"{file}: not a readable safetensors file (bad header)") from None


def recipe_summary(toml: str) -> dict:
    try:
        raw = tomllib.loads(toml)
    except tomllib.TOMLDecodeError:
        return {}
    return {"name": raw.get("name"), "arch": raw.get("model", {}).get("arch"),
            "timesteps": raw.get("model", {}).get("timesteps"), "dataset": raw.get("data", {}).get("dataset"),
            "method": raw.get("sparsity", {}).get("method"), "final_sparsity": raw.get("sparsity", {}).get("final"),
            "epochs": raw.get("train", {}).get("epochs")}


def _inspect_onnx(file) -> dict:
    import onnx
    from onnx import numpy_helper

    try:
        proto = onnx.load(str(file))
        onnx.checker.check_model(proto)
    except Exception as exc:  # protobuf raises its own DecodeError types; the checker its ValidationError
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{file}: not a valid ONNX model ({reason})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    layers = []
    for init in proto.graph.initializer:
        array = numpy_helper.to_array(init)
        layers.append({"name": init.name, "shape": list(array.shape), "storage": "dense",
                       "nnz": int((array != 0).sum()), "density": float((array != 0).mean()) if array.size else 1.0,
                       "bytes": array.nbytes, "dtype": str(array.dtype)})
    for sparse in proto.graph.sparse_initializer:
        values = numpy_helper.to_array(sparse.values)
        shape = list(sparse.dims)
        layers.append({"name": sparse.values.name, "shape": shape, "storage": "coo", "nnz": int(values.size),
                       "density": values.size / max(1, _prod(shape)),
                       "bytes": values.nbytes + numpy_helper.to_array(sparse.indices).nbytes,
                       "dtype": str(values.dtype)})
    return {"file": str(file), "kind": "onnx", "format": props.get("ndsnn.format", "onnx"),
            "version": f"opset {proto.opset_import[0].version}" if proto.opset_import else None,
            "bytes": file.stat().st_size, "timesteps": props.get("ndsnn.timesteps"),
            "recipe_sha256": props.get("ndsnn.recipe_sha256"), "sparsity": props.get("ndsnn.sparsity"),
            "metadata_props": props, "layers": layers}


def inspect_nir(file: Path) -> dict[str, Any]:
    """`ndsnn inspect` of a .nir file: graph metadata (dt, T, sparsity, recipe) and one row per node."""
    from ndsnn_cli.export.nir import import_nir

    nir = import_nir()
    try:
        nir_graph = nir.read(file)
    except Exception as exc:  # h5py and NIR raise many types for a file that is not a NIR graph
        raise UserError(f"{file}: not a readable NIR file ({type(exc).__name__})") from None
    meta = dict(nir_graph.metadata or {})
    layers = [_node_row(name, node) for name, node in nir_graph.nodes.items()
              if not isinstance(node, nir.Input | nir.Output)]

    def number(key: str) -> float | None:
        return float(meta[key]) if key in meta else None

    recipe = meta.get("recipe", "")
    return {"file": str(file), "kind": "nir", "format": str(meta.get("format", "nir")),
            "version": int(meta.get("version", 1)), "bytes": file.stat().st_size,
            "recipe": recipe_summary(recipe) if isinstance(recipe, str) else {},
            "recipe_sha256": str(meta["recipe_sha256"]) if "recipe_sha256" in meta else None,
            "timesteps": int(meta["timesteps"]) if "timesteps" in meta else None, "dt": number("dt"),
            "sparsity": number("sparsity"), "layers": layers}


def _node_row(name: str, node: Any) -> dict[str, Any]:
    """A node as an inspect row: its main array's shape (weight, else tau, else the output shape)."""
    arrays = {key: value for key, value in vars(node).items() if isinstance(value, np.ndarray)}
    main = arrays.get("weight", arrays.get("tau"))
    if main is None:
        shape = [int(s) for s in next(iter(node.output_type.values()), [])]
        return {"name": name, "shape": shape, "storage": type(node).__name__, "dtype": "-", "nnz": 0,
                "density": 1.0, "bytes": sum(a.nbytes for a in arrays.values())}
    storage = type(node).__name__
    if "tau" in arrays and "weight" not in arrays:
        storage += f" (tau {float(main.flat[0]):.3g} s)"
    nnz = int(np.count_nonzero(main)) if "weight" in arrays else main.size
    return {"name": name, "shape": list(main.shape), "storage": storage, "dtype": str(main.dtype), "nnz": nnz,
            "density": nnz / max(1, main.size), "bytes": sum(a.nbytes for a in arrays.values())}
