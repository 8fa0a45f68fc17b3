"""ONNX export: T unrolled, BN folded, LIF as elementwise ONNX ops, verified against PyTorch with onnxruntime.

Inputs: `images` [B, C, H, W] (dynamic batch) as a device has them: float pixels in [0, 1]; the training
normalisation `(x - mean) / std` is the graph's first two ops (Sub, Div), and `metadata_props`
`ndsnn.input` states the contract. Outputs: `logits` [B, classes] = per-step logits summed over T
(argmax = the prediction, as in training), and `logits_per_step` [T, B, classes].
The file is written only after `onnx.checker` and (by default) verification pass.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ndsnn_cli.errors import UserError
from ndsnn_cli.export.contract import normalisation
from ndsnn_cli.export.exporters import ExportOptions, ExportResult, ExportVerificationError

# Verification: both sides run the same folded fp32 weights; only kernel summation order differs,
# so logits agree to float rounding unless a membrane sits within rounding of the threshold.
LOGIT_ATOL = 1e-4
LOGIT_RTOL = 1e-4
OPSET = 17


class TraceableLIF(nn.Module):
    """The LIF forward in plain tensor ops (no autograd.Function), so the exporter unrolls it over T."""

    def __init__(self, timesteps: int, tau: float, v_threshold: float) -> None:
        super().__init__()
        self.timesteps, self.tau, self.v_threshold = timesteps, tau, v_threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_seq = x.reshape(self.timesteps, -1, *x.shape[1:])
        v = torch.zeros_like(x_seq[0])
        spikes = []
        for t in range(self.timesteps):
            h = v + (x_seq[t] - v) / self.tau
            s = (h >= self.v_threshold).to(x.dtype)
            v = h * (1 - s)
            spikes.append(s)
        return torch.stack(spikes).reshape(x.shape)


class _ExportWrapper(nn.Module):
    """Raw images in: normalise exactly as training's `Normalize` (subtract, then divide, in float32),
    run the model, return (summed logits, per-step logits)."""

    def __init__(self, model: nn.Module, contract: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        mean, std = normalisation(contract)
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_step = self.model((images - self.mean) / self.std)
        return per_step.sum(0), per_step


def export_model(model: nn.Module, contract: dict[str, Any]) -> nn.Module:
    """A copy of a (folded) SpikingNet with the graph's LIF ops made traceable, taking raw images per the
    input `contract` and returning (summed logits, per-step logits)."""
    import copy

    from ndsnn_cli.export import graph

    model = copy.deepcopy(model).eval()
    for op in graph.walk(graph.network_graph(model)):
        if isinstance(op, graph.LIF):
            parent_name, _, attribute = op.name.rpartition(".")
            parent = model.get_submodule(parent_name)
            timesteps = getattr(parent, attribute).timesteps
            setattr(parent, attribute, TraceableLIF(timesteps, op.tau, op.v_threshold))
    return _ExportWrapper(model, contract).eval()


def _to_sparse_initializers(proto: Any, masks: dict[str, torch.Tensor]) -> int:
    """Move masked weights into COO sparse initializers (mask positions, linear indices). Returns how many."""
    import numpy as np
    from onnx import helper, numpy_helper

    moved = 0
    kept = []
    for init in proto.graph.initializer:
        mask = masks.get(init.name.removeprefix("model."))  # the export wrapper prefixes "model."
        if mask is not None:
            dense = numpy_helper.to_array(init)
            indices = np.flatnonzero(mask.reshape(-1).numpy()).astype(np.int64)
            values = numpy_helper.from_array(dense.reshape(-1)[indices], init.name)
            proto.graph.sparse_initializer.append(
                helper.make_sparse_tensor(values, numpy_helper.from_array(indices, f"{init.name}.indices"),
                                          list(dense.shape)))
            moved += 1
        else:
            kept.append(init)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return moved


def verify(model_bytes: bytes, reference: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """onnxruntime vs PyTorch on each named input batch: max |logit diff| and prediction agreement."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    report: dict[str, Any] = {"atol": LOGIT_ATOL, "rtol": LOGIT_RTOL, "passed": True, "inputs": {}}
    for label, images in inputs.items():
        with torch.no_grad():
            expected = reference(images)[0]
        got = torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
        diff = (got - expected).abs()
        within = bool((diff <= LOGIT_ATOL + LOGIT_RTOL * expected.abs()).all())
        same_predictions = int((got.argmax(-1) == expected.argmax(-1)).sum())
        report["inputs"][label] = {"samples": images.shape[0], "max_abs_diff": float(diff.max()),
                                   "same_predictions": same_predictions}
        report["passed"] &= within and same_predictions == images.shape[0]
    return report


def export_onnx(source: str | Path, out: str | Path | None = None, *, run_verify: bool = True,
                sparse_initializers: bool = False, real_samples: int = 64) -> tuple[Path, dict[str, Any]]:
    """Checkpoint (or run dir) -> verified .onnx; raises ExportVerificationError (no file written) on mismatch."""
    import onnx

    from ndsnn_cli.export.source import load_source, write_checked

    loaded = load_source(source)
    meta = loaded.header(loaded.folded, bn_folded=True)
    wrapper = export_model(loaded.folded, loaded.contract)
    info = meta["dataset"]
    example = torch.rand(2, info["in_channels"], info["image_size"], info["image_size"])
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (example,), buffer, input_names=["images"],
                          output_names=["logits", "logits_per_step"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"},
                                        "logits_per_step": {1: "batch"}})
    proto = onnx.load_from_string(buffer.getvalue())
    props = {"ndsnn.format": "ndsnn-onnx", "ndsnn.timesteps": str(meta["timesteps"]), "ndsnn.arch": meta["arch"],
             "ndsnn.sparsity": f"{meta['sparsity']['sparsity']:.6f}",
             "ndsnn.layer_sparsity": json.dumps({k: v["sparsity"] for k, v in meta["sparsity"]["layers"].items()}),
             "ndsnn.recipe_sha256": meta["recipe_sha256"], "ndsnn.neuron": json.dumps(meta["neuron"]),
             "ndsnn.dataset": json.dumps(meta["dataset"]), "ndsnn.input": json.dumps(meta["input"]),
             "ndsnn.outputs": "logits=[B,C] summed over T; "
             "logits_per_step=[T,B,C]", "ndsnn.version": meta["ndsnn_version"]}
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "ndsnn"
    onnx.checker.check_model(proto, full_check=True)
    # ONNX shape inference does not type sparse initializers, so the sparse form gets the structural check.
    moved = _to_sparse_initializers(proto, loaded.masks) if sparse_initializers else 0
    if moved:
        onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    report: dict[str, Any] = {"sparse_initializers": moved, "metadata_props": props,
                              "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if run_verify:
        report["verify"] = verify(data, wrapper, _verify_inputs(loaded.recipe, info, real_samples))
        if not report["verify"]["passed"]:
            raise ExportVerificationError("onnxruntime output differs from PyTorch beyond tolerance", report,
                                          json.dumps(report["verify"]["inputs"]))
    return write_checked(loaded.output(out, "onnx"), data), report


def _verify_inputs(recipe: Any, info: dict[str, Any], real_samples: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = {"random": torch.rand(8, info["in_channels"], info["image_size"], info["image_size"],
                                   generator=generator)}  # pixels in [0, 1], as the input contract says
    try:
        from ndsnn_cli.data.loading import raw_test_set

        test = raw_test_set(recipe.data)
        count = min(real_samples, len(test))
        inputs["test"] = torch.stack([test[i][0] for i in range(count)])
    except UserError:
        pass  # data set not on this machine: random inputs only (the report says which ran)
    return inputs


def export_result(source: str | Path, out: str | Path | None, options: ExportOptions) -> ExportResult:
    """`export_onnx` as the exporter registry's common result: the report, verify lines, a note on COO."""
    path, report = export_onnx(source, out, run_verify=options.verify,
                               sparse_initializers=options.sparse_initializers)
    check = report.get("verify")
    summary = [f"verify {label}: {c['same_predictions']}/{c['samples']} same predictions, max |logit diff| "
               f"{c['max_abs_diff']:.3g} (tolerance {check['atol']:g} + {check['rtol']:g}*|logit|)"
               for label, c in check["inputs"].items()] if check else []
    notes = [f"{report['sparse_initializers']} weights stored as sparse (COO) initializers; onnxruntime and most "
             "runtimes densify them on load (smaller file, same compute)"] if options.sparse_initializers else []
    return ExportResult(path, "onnx", report, summary=summary, notes=notes)
