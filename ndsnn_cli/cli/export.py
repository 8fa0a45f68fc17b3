"""`ndsnn export`, `ndsnn inspect`, `ndsnn run`: deployable artefacts, what a file holds, and running one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ndsnn_cli import limits as L
from ndsnn_cli.cli.app import app
from ndsnn_cli.errors import UserError
from ndsnn_cli.export.exporters import EXPORTERS, dtypes_help, formats_help


@app.command(help=f"""Export a trained run as one of: {", ".join(EXPORTERS)} (see --format).

    \b
    Examples:
      ndsnn export runs/quick --format csr --fold-bn -o quick.safetensors
      ndsnn export runs/quick --format onnx -o quick.onnx
      ndsnn export runs/quick --format nir -o quick.nir   (BN folded; dt 1e-4 s; max-pooling of spikes only)
      ndsnn export runs/quick --format c --dtype int8 -o quick_c/   (make -C quick_c && quick_c/demo X.f32)
      ndsnn export runs/quick --format c --dtype int8 --target stm32l432 -o quick_m4/   (runs on QEMU's M4)
    """)
def export(
    source: Annotated[Path, typer.Argument(metavar="RUN_OR_CKPT", help="Run directory or checkpoint .safetensors.")],
    format: Annotated[str, typer.Option("--format", "-f", help=formats_help())] = "csr",
    out: Annotated[Path | None, typer.Option("--out", "-o",
                                             help="Output file (default: <run>/export/last.<ext>).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help=dtypes_help())] = "fp32",
    fold_bn: Annotated[bool, typer.Option("--fold-bn",
                                          help="CSR: fold BatchNorm into the preceding conv/linear.")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify",
                                         help="ONNX: check onnxruntime against PyTorch; C: the build against "
                                         "the reference runtime (and under QEMU for a Cortex-M4 target).")] = True,
    sparse_initializers: Annotated[bool, typer.Option(
        "--sparse-initializers", help="ONNX: store masked weights as sparse (COO) initializers.")] = False,
    dt: Annotated[float | None, typer.Option(
        "--dt", metavar="SECONDS", help="NIR: simulation step in seconds; time constants are written as "
        "steps x dt (default 1e-4, the step snnTorch and SpikingJelly simulate).")] = None,
    target: Annotated[str, typer.Option(
        "--target", help="C: host (demo), cortex-m4 (+ bare-metal firmware, verified and timed under QEMU "
        "mps2-an386) or a part class: stm32f407, stm32f411, stm32l432 (cortex-m4 + that part's budget).")] = "host",
    flash: Annotated[str | None, typer.Option("--flash", metavar="SIZE", help="C: flash budget (e.g. 256K, 1M); "
                                              "exit 2 when the model does not fit.")] = None,
    ram: Annotated[str | None, typer.Option("--ram", metavar="SIZE", help="C: RAM budget (e.g. 64K).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    from ndsnn_cli.export.exporters import ExportOptions, ExportVerificationError, export

    options = ExportOptions(dtype=dtype, fold_bn=fold_bn, verify=verify, sparse_initializers=sparse_initializers,
                            dt=dt, target=target, flash=flash, ram=ram)
    try:
        result = export(format, source, out, options)
    except ExportVerificationError as exc:
        if json_output:
            typer.echo(json.dumps({"error": str(exc), **exc.report}, indent=2))
        typer.echo(f"error: {exc}: {exc.detail}; no file written", err=True)
        raise typer.Exit(1) from None
    if json_output:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    from rich.console import Console

    console = Console()
    console.print(f"wrote [bold]{result.path}[/bold] ({result.size_bytes:,} bytes, {result.format})")
    for line in result.summary:
        console.print(f"  {line}")


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="Checkpoint, CSR artefact, .onnx or .nir file.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print as JSON instead of a table.")] = False,
) -> None:
    """Show what a checkpoint or artefact holds: format, recipe, per-layer shape, density, nnz and bytes.

    The file is validated first (CSR invariants, shapes against the layer graph, bounded metadata); a
    broken one exits 2 with one line naming the tensor and the rule it breaks.

    \b
    Example:
      ndsnn inspect runs/quick/export/last.csr.safetensors
    """
    from ndsnn_cli.export.inspect import inspect_file

    info = inspect_file(str(file))
    if json_output:
        typer.echo(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    recipe = info.get("recipe") or {}
    title = f"{info['file']}: {info['kind']} {info['format']} (version {info['version']}), {info['bytes']:,} bytes"
    table = Table(title=title)
    for column in ("layer", "shape", "storage", "dtype", "columns", "nnz", "density", "bytes"):
        table.add_column(column, justify="right" if column in ("nnz", "density", "bytes") else "left")
    for layer in info["layers"]:  # columns: a CSR layer's index encoding (int16, int32 or gaps-u8)
        table.add_row(layer["name"], "x".join(map(str, layer["shape"])), layer["storage"], layer["dtype"],
                      layer.get("indices", ""), f"{layer['nnz']:,}", f"{layer['density']:.4f}", f"{layer['bytes']:,}")
    console = Console()
    console.print(table)
    if recipe:
        console.print(f"recipe {recipe.get('name')}: {recipe.get('arch')} on {recipe.get('dataset')}, "
                      f"T={recipe.get('timesteps')}, method {recipe.get('method')} "
                      f"(final sparsity {recipe.get('final_sparsity')}), {recipe.get('epochs')} epochs")
    if info.get("sparsity") is not None:
        console.print(f"overall sparsity of sparse layers: {float(info['sparsity']):.4f}")
    if info.get("dt") is not None:
        console.print(f"NIR time step dt = {info['dt']:g} s (tau = steps x dt; snnTorch and SpikingJelly "
                      "simulate at 1e-4 s by default)")


@app.command()
def run(
    artefact: Annotated[Path, typer.Argument(metavar="ARTEFACT", help="An ndsnn-csr .safetensors artefact.")],
    input_file: Annotated[Path | None, typer.Option(
        "--input", help="Raw images: a PNG/JPEG file, or a .npy/.pt tensor [B,C,H,W] of pixels in [0, 1] or uint8 "
                        "(.pt may be {'images': ..., 'labels': ...}); the artefact normalises them.")] = None,
    dataset_test: Annotated[bool, typer.Option("--dataset-test", help="Run the recipe's test set.")] = False,
    data_root: Annotated[Path | None, typer.Option(
        "--data-root", help="--dataset-test: the data folder (default: the data set's own location; the artefact's "
                            "embedded recipe never chooses a folder, nor downloads).")] = None,
    limit: Annotated[int, typer.Option("--limit", min=0, max=L.MAX_SAMPLES, help="At most N images (0 = all).")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=L.MAX_BATCH_SIZE,
                                            help="Images per runtime call.")] = 256,
    json_output: Annotated[bool, typer.Option("--json", help="Print predictions/accuracy as JSON.")] = False,
) -> None:
    """Run a CSR artefact with the reference sparse runtime (no training code) on raw images, print predictions.

    \b
    Examples:
      ndsnn run quick.safetensors --dataset-test --limit 1000
      ndsnn run quick.safetensors --input shoe.png
    """
    import torch

    from ndsnn_cli.export.inputs import read_images
    from ndsnn_cli.export.runtime import load_network

    if (input_file is None) == (not dataset_test):
        raise UserError("give exactly one of --input FILE (.png/.jpg/.npy/.pt) or --dataset-test")
    net = load_network(artefact)
    images, labels = (read_images(input_file, net.metadata["input"], net.metadata["dataset"]["num_classes"])
                      if input_file is not None else _test_set(net.metadata, limit, data_root))
    if limit:
        images, labels = images[:limit], (labels[:limit] if labels is not None else None)
    predictions = torch.cat([net.predict(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    result: dict[str, Any] = {"samples": len(images), "predictions": predictions.tolist()}
    if labels is not None:
        result["accuracy"] = float((predictions == labels).float().mean())
    if json_output:
        typer.echo(json.dumps(result))
        return
    shown = ", ".join(map(str, result["predictions"][:20])) + (" ..." if len(images) > 20 else "")
    typer.echo(f"predictions ({len(images)}): {shown}")
    if "accuracy" in result:
        typer.echo(f"accuracy: {result['accuracy']:.2%}")


def _test_set(metadata: dict[str, Any], limit: int, data_root: Path | None) -> tuple[Any, Any]:
    """The embedded recipe's test set, read from `data_root` or the data set's default location: the file
    names the data set, but where ndsnn reads, creates folders and downloads is the user's choice."""
    import torch

    from ndsnn_cli.data.loading import raw_test_set
    from ndsnn_cli.recipe import parse_recipe

    if not isinstance(metadata.get("recipe"), str):
        raise UserError("artefact: no recipe in its metadata, so no test set to run (use --input)")
    recipe = parse_recipe(metadata["recipe"], "artefact recipe")
    recipe = recipe.replace(data={"test_limit": limit, "train_limit": 1, "download": False,
                                  "root": str(data_root) if data_root is not None else ""})
    test = raw_test_set(recipe.data)  # pixels in [0, 1]: the artefact normalises, as a device's input
    pairs = [test[i] for i in range(len(test))]
    return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
