"""Deployable artefacts: CSR-packed safetensors (`csr`), ONNX (`onnx`) and a reference sparse runtime.

Kept import-light on purpose: `runtime` must load without the training code, and importing this
package runs this file first.
"""


def inspect_file(path: str) -> dict:
    """What a checkpoint, CSR artefact, ONNX or NIR file holds: kind, format, per-layer shape/density/nnz/bytes."""
    from pathlib import Path

    from ndsnn_cli.errors import UserError

    file = Path(path)
    if file.is_dir():
        from ndsnn_cli.rundir import RUN_CHECKPOINT

        if (file / RUN_CHECKPOINT).is_file():  # a run directory
            file = file / RUN_CHECKPOINT
    if not file.is_file():
        raise UserError(f"{file}: no such file")
    if file.suffix == ".onnx":
        return _inspect_onnx(file)
    if file.suffix == ".nir":
        from ndsnn_cli.export.nir import inspect_nir

        return inspect_nir(file)
    from ndsnn_cli.checkpoint import load_checkpoint, read_metadata
    from ndsnn_cli.export.csr import load_raw, split_csr
    from ndsnn_cli.formats.csr import CSR_FORMAT

    header_format = _safetensors_format(file)
    if header_format == CSR_FORMAT:
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
                "bytes": file.stat().st_size, "recipe": _recipe_summary(meta.get("recipe", "")),
                "recipe_sha256": meta.get("recipe_sha256"), "timesteps": meta.get("timesteps"),
                "bn_folded": meta.get("bn_folded"), "dtype": meta.get("dtype"),
                "sparsity": meta.get("sparsity", {}).get("sparsity"), "layers": layers}
    if not read_metadata(file):
        raise UserError(f"{file}: not an ndsnn checkpoint or artefact (no ndsnn metadata)")
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
            "bytes": file.stat().st_size, "recipe": _recipe_summary(meta.get("recipe", "")),
            "epoch": meta.get("epoch"), "step": meta.get("step"),
            "sparsity": 1 - active / numel if numel else 0.0, "layers": layers}


def _prod(shape: list) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _safetensors_format(file) -> str | None:
    import json

    from ndsnn_cli.errors import UserError

    raw = file.read_bytes()
    try:
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        return (header.get("__metadata__") or {}).get("format")
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise UserError(f"{file}: not a readable safetensors file (bad header)") from None


def _recipe_summary(toml: str) -> dict:
    import tomllib

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

    from ndsnn_cli.errors import UserError

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
