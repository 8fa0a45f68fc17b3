"""`ndsnn inspect`: what a checkpoint, CSR artefact, ONNX model or NIR graph holds (kind, format, per-layer
shape, density, nnz, bytes), each read through its own validated loader."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ndsnn_cli import limits as L
from ndsnn_cli.checkpoint import load_checkpoint, read_header, read_metadata
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
    if read_header(file).metadata.get("format") == CSR_FORMAT:  # the header alone, not the file
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
                       "indices": "gaps-u8" if "col_gaps" in parts else "flat-u8" if "flat_gaps" in parts
                       else str(parts["col_indices"].dtype).removeprefix("torch.")})
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


def recipe_summary(toml: str) -> dict:
    """A few keys of an embedded recipe, for show only: bounded parsing, tables that are not tables and values
    that are not scalars are left out ({} for text that is not TOML), since inspect shows a file as it is."""
    from ndsnn_cli.formats.text import TextError, parse_toml

    try:
        raw = parse_toml(toml)
    except TextError:
        return {}

    def get(table: str, key: str) -> object:
        section = raw.get(table) if table else raw
        value = section.get(key) if isinstance(section, dict) else None
        return value if isinstance(value, str | int | float | bool) else None

    return {"name": get("", "name"), "arch": get("model", "arch"), "timesteps": get("model", "timesteps"),
            "dataset": get("data", "dataset"), "method": get("sparsity", "method"),
            "final_sparsity": get("sparsity", "final"), "epochs": get("train", "epochs")}


def _inspect_onnx(file) -> dict:
    import onnx
    from onnx import numpy_helper

    if file.stat().st_size > L.MAX_ONNX_BYTES:
        raise UserError(f"{file}: {file.stat().st_size:,} bytes: more than an ONNX file may have "
                        f"({L.MAX_ONNX_BYTES:,})")
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
    _check_nir_size(file)
    try:
        nir_graph = nir.read(file)
    except Exception as exc:  # h5py and NIR raise many types for a file that is not a NIR graph
        raise UserError(f"{file}: not a readable NIR file ({type(exc).__name__})") from None
    meta = dict(nir_graph.metadata or {})
    layers = [_node_row(name, node) for name, node in nir_graph.nodes.items()
              if not isinstance(node, nir.Input | nir.Output)]
    recipe = meta.get("recipe", "")
    return {"file": str(file), "kind": "nir", "format": str(meta.get("format", "nir"))[:80],
            "version": _meta_number(file, meta, "version", int) or 1, "bytes": file.stat().st_size,
            "recipe": recipe_summary(recipe) if isinstance(recipe, str) else {},
            "recipe_sha256": str(meta["recipe_sha256"])[:80] if "recipe_sha256" in meta else None,
            "timesteps": _meta_number(file, meta, "timesteps", int), "dt": _meta_number(file, meta, "dt", float),
            "sparsity": _meta_number(file, meta, "sparsity", float), "layers": layers}


def _check_nir_size(file: Path) -> None:
    """The datasets of the HDF5 file, uncompressed, fit `MAX_NIR_BYTES`, measured from their headers before
    `nir.read` decompresses them (a 190 KB file of gzip-compressed zeros can claim 6.4 GB)."""
    import h5py

    sizes: list[int] = []

    def visit(_name: str, item: Any) -> None:
        if isinstance(item, h5py.Dataset):
            sizes.append(math.prod(item.shape or ()) * item.dtype.itemsize)

    try:
        with h5py.File(file, "r") as handle:
            handle.visititems(visit)
    except Exception as exc:  # not HDF5, truncated, ...: h5py raises OSError and others
        raise UserError(f"{file}: not a readable NIR file ({type(exc).__name__})") from None
    if sum(sizes) > L.MAX_NIR_BYTES:
        raise UserError(f"{file}: its arrays hold {sum(sizes):,} bytes uncompressed, more than the "
                        f"{L.MAX_NIR_BYTES:,} a NIR file may")


def _meta_number(file: Path, meta: dict[str, Any], key: str, kind: type) -> Any:
    """A numeric graph-metadata entry (HDF5 gives numpy scalars); a string or an array there is refused."""
    if key not in meta:
        return None
    value = meta[key]
    if isinstance(value, np.generic) and value.shape == ():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{file}: metadata {key}: must be a finite number (got {value!r:.40})")
    return kind(value)


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
