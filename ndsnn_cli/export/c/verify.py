"""Verification of a C build: compiled with the host compiler and compared with the reference runtime
(`runtime.SparseNetwork`, what `ndsnn run` uses) on the same images.

fp32: the C code and the reference runtime run the same folded fp32 weights in another summation order,
so logits agree to float rounding, unless a membrane sits within rounding of the threshold and one spike
flips. Criteria: >= 99.9% identical predictions and >= 99% of images with every logit within
LOGIT_ATOL + LOGIT_RTOL * |logit|.

int8 is checked for its arithmetic and for its quantisation, apart:
- arithmetic: against the reference runtime on the same int8 weights (scale * q, what `ndsnn run` reads
  from an int8 CSR artefact), the fp32 criteria above;
- quantisation: every stored weight within half a step of its fp32 value and each row's largest one at
  +-127 (exact properties of the symmetric round-to-nearest quantiser), and, on labelled images, the
  accuracy drop against the fp32 reference at most INT8_ACCURACY_POINTS beyond sampling noise:
  drop <= 0.5 points + INT8_Z * sqrt(discordant) / N (a one-sided McNemar bound; discordant = images
  that exactly one of the two gets right). A weakly trained model flips many near-tied images either
  way, so its accuracy moves by a few images by chance; a broken int8 path loses far more than that.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ndsnn_cli.errors import UserError
from ndsnn_cli.export import graph
from ndsnn_cli.export.c.build import compile_demo, run_demo
from ndsnn_cli.export.c.generate import CSources
from ndsnn_cli.formats.csr import CSR_FORMAT, CSR_VERSION

LOGIT_ATOL = 1e-3
LOGIT_RTOL = 1e-3
MIN_SAME_PREDICTIONS = 0.999
MIN_LOGITS_WITHIN = 0.99
INT8_ACCURACY_POINTS = 0.5
INT8_Z = 3.0
INT8_MAX_ERROR_STEPS = 0.5 + 1e-3  # |scale * q - w| / scale, with float32 rounding of w / scale


def reference_network(model: Any, masks: dict[str, torch.Tensor], timesteps: int, contract: dict[str, Any],
                      dtype: str = "fp32") -> Any:
    """The reference runtime (`ndsnn run`) on the same folded weights, built from the packed CSR tensors
    and the header a CSR export writes (validated like any artefact; it normalises inside, per `contract`).
    `dtype` int8: the int8 artefact's weights (the same quantiser as the C target's), dequantised at load."""
    from safetensors.torch import load as load_safetensors

    from ndsnn_cli.export.csr import pack
    from ndsnn_cli.export.runtime import SparseNetwork
    from ndsnn_cli.export.source import artefact_header

    ops = graph.network_graph(model)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    last = [op for op in graph.walk(ops) if isinstance(op, graph.Linear | graph.Conv2d)][-1]
    channels, size = contract["shape"][0], contract["shape"][1]
    header = artefact_header(model, masks, contract=contract, timesteps=timesteps, bn_folded=True,
                             dataset={"num_classes": int(state[last.weight].shape[0]), "in_channels": channels,
                                      "image_size": size})
    packed = load_safetensors(pack(state, masks, header, dtype))
    metadata = {**header, "format": CSR_FORMAT, "version": CSR_VERSION, "dtype": dtype}
    return SparseNetwork(packed, metadata)


def compare(c_out: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor],
            labels: torch.Tensor | None) -> dict[str, Any]:
    """Agreement of one image set: same predictions, max |logit diff|, images within tolerance, accuracies."""
    (c_pred, c_logits), (ref_pred, ref_logits) = c_out, reference
    diff = (c_logits - ref_logits).abs()
    within = (diff <= LOGIT_ATOL + LOGIT_RTOL * ref_logits.abs()).all(1)
    report = {"samples": len(c_pred), "same_predictions": int((c_pred == ref_pred).sum()),
              "max_abs_logit_diff": float(diff.max()) if diff.numel() else 0.0,
              "logits_within_tolerance": int(within.sum())}
    if labels is not None:
        report["accuracy_c"] = float((c_pred == labels).float().mean())
        report["accuracy_reference"] = float((ref_pred == labels).float().mean())
    return report


def compare_to_fp32(c_pred: torch.Tensor, fp32_pred: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """The int8 build's predictions against the fp32 reference's on labelled images: accuracies, the images
    exactly one of them gets right (discordant), and the accuracy drop allowed (INT8_ACCURACY_POINTS beyond
    INT8_Z standard errors of the drop, McNemar)."""
    c_right, fp32_right = c_pred == labels, fp32_pred == labels
    samples, discordant = len(labels), int((c_right != fp32_right).sum())
    return {"samples": samples, "same_predictions": int((c_pred == fp32_pred).sum()),
            "accuracy_c": float(c_right.float().mean()), "accuracy_fp32": float(fp32_right.float().mean()),
            "discordant": discordant,
            "allowed_drop": INT8_ACCURACY_POINTS / 100 + INT8_Z * math.sqrt(discordant) / max(samples, 1)}


def _arithmetic_agrees(entry: dict[str, Any]) -> bool:
    """>= 99.9% same predictions and >= 99% of images with every logit within tolerance."""
    return entry["same_predictions"] >= math.ceil(MIN_SAME_PREDICTIONS * entry["samples"]) and \
        entry["logits_within_tolerance"] >= math.ceil(MIN_LOGITS_WITHIN * entry["samples"])


def quantisation_sound(layers: list[dict[str, Any]]) -> bool:
    """Every int8 weight within INT8_MAX_ERROR_STEPS of its fp32 value; every nonzero row's peak at 127."""
    checks = [layer["quantisation"] for layer in layers if "quantisation" in layer]
    return all(q["max_error_steps"] <= INT8_MAX_ERROR_STEPS and q["rows_at_127"] == q["rows"] for q in checks)


def passes(report: dict[str, Any], dtype: str, layers: list[dict[str, Any]] | None = None) -> bool:
    """Every image set agrees with the reference runtime on the same weights (fp32 or int8) to rounding;
    int8 also: a sound quantiser (`layers`) and, on labelled sets, an accuracy drop against fp32 within
    `allowed_drop`."""
    if any(not _arithmetic_agrees(entry) or _int8_drop_too_large(entry) for entry in report.values()):
        return False
    return dtype != "int8" or quantisation_sound(layers or [])


def _int8_drop_too_large(entry: dict[str, Any]) -> bool:
    fp32 = entry.get("fp32_reference")
    return fp32 is not None and fp32["accuracy_fp32"] - fp32["accuracy_c"] > fp32["allowed_drop"]


# a build that runs images: float pixels [N, C, H, W] -> (predictions, summed logits, costs of the run)
Runner = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]


def verify_sources(sources: CSources, model: Any, masks: dict[str, torch.Tensor], timesteps: int,
                   contract: dict[str, Any], images: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
                   compiler: str, devices: dict[str, Runner] | None = None) -> dict[str, Any]:
    """Compile the host demo, run it (and every `devices` build, e.g. the Cortex-M4 firmware under QEMU) and
    the reference runtime on each image set ([0, 1] pixels, labels or None): the reference on the build's
    own weights (fp32, or int8 dequantised), and for int8 the fp32 one too. `report["images"]` holds the
    host build's comparisons, `report[device]["images"]` each device's (same criteria)."""
    nets = {dtype: reference_network(model, masks, timesteps, contract, dtype) for dtype in {"fp32", sources.dtype}}
    report: dict[str, Any] = {"compiler": compiler, "dtype": sources.dtype, "images": {}}
    with tempfile.TemporaryDirectory(prefix="ndsnn-c-build-") as tmp:
        demo = compile_demo(sources, Path(tmp), compiler)
        runners: dict[str, Runner] = {"host": lambda pixels: (*run_demo(demo, pixels), {}), **(devices or {})}
        for label, (pixels, labels) in images.items():
            logits = {dtype: torch.cat([net(pixels[i:i + 64]).sum(0) for i in range(0, len(pixels), 64)])
                      for dtype, net in nets.items()}
            for name, runner in runners.items():
                predictions, c_logits, costs = runner(pixels)
                entry = {**compare((predictions, c_logits), (logits[sources.dtype].argmax(-1), logits[sources.dtype]),
                                   labels), **costs}
                if sources.dtype == "int8" and labels is not None:
                    entry["fp32_reference"] = compare_to_fp32(predictions, logits["fp32"].argmax(-1), labels)
                (report if name == "host" else report.setdefault(name, {"images": {}}))["images"][label] = entry
    if sources.dtype == "int8":
        report["quantisation"] = {layer["name"]: layer["quantisation"] for layer in sources.layers}
    for name in devices or {}:
        report[name]["passed"] = passes(report[name]["images"], sources.dtype, sources.layers)
    report["passed"] = passes(report["images"], sources.dtype, sources.layers) and all(
        report[name]["passed"] for name in devices or {})
    return report


def failure_reason(report: dict[str, Any]) -> str:
    """One line for a refused export: what was measured on which images, and what the user can do."""
    sets = [("", report["images"])] + [(f"{name} ", report[name]["images"]) for name in ("cortex-m4",)
                                        if name in report]
    failed = [(f"{prefix}{label}", entry) for prefix, entries in sets for label, entry in entries.items()
              if not _arithmetic_agrees(entry) or _int8_drop_too_large(entry)]
    parts = [_measured(label, entry, report["dtype"]) for label, entry in failed]
    bad = [name for name, q in report.get("quantisation", {}).items()
           if q["max_error_steps"] > INT8_MAX_ERROR_STEPS or q["rows_at_127"] != q["rows"]]
    if bad:
        parts.append(f"int8 weights of {', '.join(bad)} off by more than half a step or not scaled to 127")
    bug = bad or not all(_arithmetic_agrees(entry) for _, entry in failed)
    advice = ("that is a bug in ndsnn's C target or int8 quantiser: please report it with the --json output" if bug
              else "int8 loses more accuracy than sampling noise explains: train the run further (small logit "
              "margins flip under int8), or export --dtype fp32")
    return "; ".join(parts) + f"; {advice}, or pass --no-verify to write it unchecked"


def _measured(label: str, entry: dict[str, Any], dtype: str) -> str:
    line = (f"{label} images ({entry['samples']}): {entry['same_predictions']} same predictions and "
            f"{entry['logits_within_tolerance']} logits within tolerance vs the {dtype} reference runtime (need "
            f"{math.ceil(MIN_SAME_PREDICTIONS * entry['samples'])} and "
            f"{math.ceil(MIN_LOGITS_WITHIN * entry['samples'])})")
    if (fp32 := entry.get("fp32_reference")) is not None:
        line += (f", accuracy int8 C {fp32['accuracy_c']:.2%} vs fp32 reference {fp32['accuracy_fp32']:.2%} "
                 f"({fp32['discordant']} images decided differently; drop allowed {fp32['allowed_drop']:.2%})")
    return line


def verification_images(recipe: Any, contract: dict[str, Any], count: int) -> dict[str, tuple[torch.Tensor, Any]]:
    """The recipe's first `count` test images as [0, 1] pixels (with labels) when the data set is on this
    machine, plus 8 uniform random images."""
    shape = tuple(contract["shape"])
    generator = torch.Generator().manual_seed(0)
    images: dict[str, tuple[torch.Tensor, Any]] = {"random": (torch.rand(8, *shape, generator=generator), None)}
    try:
        from ndsnn_cli.data.loading import raw_test_set

        test = raw_test_set(recipe.replace(data={"train_limit": 1, "test_limit": count}).data)
    except UserError:
        return images  # data set not here: random images only (the report says which ran)
    pairs = [test[i] for i in range(min(count, len(test)))]
    images["test"] = (torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs]))
    return images
