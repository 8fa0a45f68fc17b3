"""Training FLOPs per method (DESIGN §5): per-layer dense FLOPs x the density schedule the trainer runs.

FLOPs follow `torch.utils.flop_counter` (2 per multiply-accumulate, conv and linear weights only; BN,
LIF, pooling and the optimizer are not counted). A layer's dense forward cost per sample is F_l x
runs_l, where runs_l = T for layers in the time-unrolled body and 1 for the once-run encoder. A
training step costs forward + input gradient + weight gradient = 3x forward at the layer's density,
except the first weight layer, whose input is the image: it needs no input gradient (2x). A
gradient-growth update (RigL, NDSNN) reuses that step's backward pass but needs the dense weight
gradient there: the step pays F instead of d x F for the weight-gradient pass of each sparse layer.
The density of every layer at every step comes from `schedules.method_schedule` and
`budget.shape_counts` / `budget.target_counts`, i.e. the very functions the trainer calls. Nothing
here imports torch unless a model's layer table must be traced (`cost_layers.json` ships them).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ndsnn_cli import atomic
from ndsnn_cli.data import DATASETS, batches_per_epoch, dataset_info
from ndsnn_cli.data import train_size as recipe_train_size
from ndsnn_cli.errors import UserError
from ndsnn_cli.limits import MAX_COST_STEPS
from ndsnn_cli.recipe import METHODS, Recipe, load_recipe, sparse_epochs, with_method
from ndsnn_cli.rundir import read_metrics
from ndsnn_cli.sparse.budget import check_dense_entries, is_kept_dense, shape_counts, target_counts
from ndsnn_cli.sparse.schedules import lth_round_epochs, lth_round_sparsities, method_schedule

# Display order: the two references (dense, LTH) first, static last, the rest in registry order.
METHOD_ORDER = ("dense", "lth", *(m for m in METHODS if m not in ("dense", "lth", "static")), "static")
PAPER_NDSNN_OF_LTH = {"resnet19": 0.4089, "vgg16": 0.3135}  # DAC 2023, CIFAR-10; shown, never fitted
ENERGY_AC_PJ = 0.9   # 45 nm, 32-bit float add (Horowitz, ISSCC 2014)
ENERGY_MAC_PJ = 4.6  # 45 nm, 32-bit float multiply (3.7) + add (0.9)
LAYER_TABLES = Path(__file__).with_name("cost_layers.json")
MODELS_SOURCE = Path(__file__).parent / "snn" / "models.py"


@dataclass(frozen=True)
class LayerFlops:
    """One conv/linear weight: dense forward FLOPs per sample per time step, and how often it runs."""

    name: str                 # parameter name, e.g. "body.1.conv1.weight"
    kind: str                 # "conv" | "linear"
    shape: tuple[int, ...]
    numel: int
    flops_per_run: int        # dense forward FLOPs per sample for one run (one time step)
    runs: int                 # T in the body, 1 in the encoder
    needs_input_grad: bool    # False for the first layer: its input is the image
    sparse: bool              # False when the recipe keeps it dense
    input_source: str         # "image" | "analog" | "spikes:<LIF module>" (for synaptic operations)

    @property
    def forward_flops(self) -> int:
        return self.flops_per_run * self.runs

    @property
    def train_factor(self) -> int:
        return 3 if self.needs_input_grad else 2


def trace_layers(arch: str, *, num_classes: int, in_channels: int, image_size: int) -> dict[str, Any]:
    """The registry model's conv/linear layers and parameter names, from one zero image traced through it.

    A CPU trace at T = 1 (FLOPs are per time step); a meta-device trace would import torch's compiler
    stack. Returns plain JSON-ready data: {"parameters": [...], "layers": [{name, kind, shape,
    flops_per_run, encoder, needs_input_grad, input_source}, ...]}.
    """
    import torch
    from torch import nn

    from ndsnn_cli.snn.models import NeuronConfig, create_model

    model = create_model(arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                         neuron=NeuronConfig(timesteps=1, backend="reference"))
    model.eval()  # BatchNorm1d refuses a batch of one in training mode; eval changes no conv/linear FLOPs
    images = torch.zeros(1, in_channels, image_size, image_size)
    sources: dict[int, str] = {id(images): "image"}
    keep: list[torch.Tensor] = [images]  # keeps ids unique while tracing
    calls: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []
    names = {module: name for name, module in model.named_modules()}
    lif_type = type(model.lif_layers()[0]) if model.lif_layers() else None
    passthrough = (nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if list(module.children()):
            return
        src = sources.get(id(inputs[0]), "analog") if inputs else "analog"
        if lif_type is not None and isinstance(module, lif_type):
            sources[id(output)] = f"spikes:{names[module]}"
        elif isinstance(module, passthrough) and (src.startswith("spikes:") or src == "image"):
            sources[id(output)] = src
        else:
            sources[id(output)] = "analog"
        keep.append(output)
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Linear):
            calls.append((names[module], module, inputs[0], output))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    layers = []
    for index, (name, module, inp, out) in enumerate(calls):
        weight = module.weight
        per_output = math.prod(weight.shape[1:])  # (C_in/groups) x kernel, or in_features
        src = sources.get(id(inp), "analog")
        layers.append({"name": f"{name}.weight", "kind": "linear" if isinstance(module, nn.Linear) else "conv",
                       "shape": list(weight.shape),
                       "flops_per_run": 2 * (out.numel() // out.shape[0]) * per_output,  # out is [B] or [T*B], B = 1
                       "encoder": name.startswith("encoder"),
                       "needs_input_grad": not (index == 0 and src == "image"), "input_source": src})
    return {"parameters": [name for name, _ in model.named_parameters()], "layers": layers}


def _table_key(arch: str, num_classes: int, in_channels: int, image_size: int) -> str:
    return f"{arch}:{num_classes}x{in_channels}x{image_size}"


def models_digest() -> str:
    """Identifies the model definitions the shipped layer tables were traced from."""
    return hashlib.sha256(MODELS_SOURCE.read_bytes()).hexdigest()


def _shipped_tables() -> dict[str, Any] | None:
    """`cost_layers.json` when it was traced from the current model definitions, else None."""
    return _read_tables(LAYER_TABLES)


@functools.cache
def _read_tables(path: Path) -> dict[str, Any] | None:
    """Read and checked once per process and path (a `prune-compare` report costs every run)."""
    try:
        shipped = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return shipped["tables"] if shipped.get("models_sha256") == models_digest() else None


def shipped_layer_table(arch: str, **shape: int) -> dict[str, Any] | None:
    """The traced table for (arch, classes, channels, size) from `cost_layers.json`, if it is current.

    Loading it instead of tracing keeps torch out of `ndsnn cost`, which then answers in well under a
    second after start-up. A table traced from other model definitions is ignored (and a test fails).
    """
    tables = _shipped_tables() or {}
    return tables.get(_table_key(arch, shape["num_classes"], shape["in_channels"], shape["image_size"]))


def known_models() -> list[str]:
    """Registry model names, from the shipped tables when current (no torch), else from the registry."""
    tables = _shipped_tables()
    if tables is not None:
        return sorted({key.split(":")[0] for key in tables})
    from ndsnn_cli.snn.models import MODELS

    return sorted(MODELS)


def write_layer_tables(path: Path = LAYER_TABLES) -> dict[str, Any]:
    """Trace every registry model at every catalogued data set shape into `path` (atomically)."""
    from ndsnn_cli.snn.models import MODELS

    shapes = sorted({(i.num_classes, i.in_channels, i.image_size) for i in DATASETS.values()})
    tables = {}
    for arch in sorted(MODELS):
        for classes, channels, size in shapes:
            tables[_table_key(arch, classes, channels, size)] = trace_layers(
                arch, num_classes=classes, in_channels=channels, image_size=size)
    shipped = {"models_sha256": models_digest(), "tables": tables}
    atomic.write_text(path, json.dumps(shipped, indent=1) + "\n")
    return shipped


def layer_flops(arch: str, *, num_classes: int, in_channels: int, image_size: int, timesteps: int,
                dense: tuple[str, ...] | list[str] = ()) -> list[LayerFlops]:
    """Dense per-layer FLOPs of the registry model: the shipped table when current, else a live trace."""
    shape = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    table = shipped_layer_table(arch, **shape) or trace_layers(arch, **shape)
    check_dense_entries(dense, table["parameters"])
    return [LayerFlops(row["name"], row["kind"], tuple(row["shape"]), math.prod(row["shape"]), row["flops_per_run"],
                       1 if row["encoder"] else timesteps, row["needs_input_grad"],
                       not is_kept_dense(row["name"], dense), row["input_source"])
            for row in table["layers"]]


def model_layers(recipe: Recipe) -> list[LayerFlops]:
    info = dataset_info(recipe.data.dataset)
    return layer_flops(recipe.model.arch, num_classes=info.num_classes, in_channels=info.in_channels,
                       image_size=info.image_size, timesteps=recipe.model.timesteps, dense=recipe.sparsity.dense)


@dataclass
class Segment:
    """Steps (start, end] trained with the same per-layer active counts."""

    start: int
    end: int
    counts: dict[str, int]


@dataclass
class MethodCost:
    method: str
    train_flops: float
    mean_density: float          # sparse layers, averaged over training samples
    final_density: float
    inference_flops: float       # forward FLOPs per sample at the final masks
    total_steps: int
    total_epochs: float
    update_flops: float          # the part of train_flops spent on dense gradients at updates
    layer_train_flops: dict[str, float]
    final_counts: dict[str, int]
    curve: dict[str, list[float]] = field(default_factory=dict)  # epochs, density, cumulative FLOPs
    note: str = ""


def _samples_per_step(train_size: int, batch_size: int, epochs: int) -> np.ndarray:
    """Images per optimizer step over the whole training (one float64 per step, hence the bound)."""
    steps_per_epoch, drop_last = batches_per_epoch(train_size, batch_size)
    if steps_per_epoch * epochs > MAX_COST_STEPS:
        raise UserError(f"{epochs:,} epochs x {steps_per_epoch:,} steps per epoch (train size {train_size:,}, "
                        f"batch {batch_size:,}) = {steps_per_epoch * epochs:,} optimizer steps: must be "
                        f"<= {MAX_COST_STEPS:,}")
    per_epoch = np.full(steps_per_epoch, batch_size, dtype=np.float64)
    if not drop_last:
        per_epoch[-1] = train_size - (steps_per_epoch - 1) * batch_size
    return np.tile(per_epoch, epochs)


def _shapes(layers: list[LayerFlops]) -> dict[str, tuple[int, ...]]:
    return {lay.name: lay.shape for lay in layers if lay.sparse}


def _split(distribution: str) -> str:
    """Global magnitude needs trained weights, so the cost model splits a global budget like ERK."""
    return "erk" if distribution == "global" else distribution


def schedule_segments(recipe: Recipe, layers: list[LayerFlops], steps_per_epoch: int,
                      total_steps: int) -> tuple[list[Segment], list[int], str]:
    """Per-layer active counts over training, replaying the trainer's mask updates (methods._update)."""
    shapes = _shapes(layers)
    schedule = method_schedule(recipe, steps_per_epoch)
    if schedule is None:
        return [Segment(0, total_steps, {n: math.prod(shape) for n, shape in shapes.items()})], [], "none"
    split = _split(recipe.sparsity.distribution)
    current = shape_counts(shapes, 1 - schedule.initial_sparsity, split)
    segments, updates, start = [], [], 0
    for step in schedule.update_steps():
        if step > total_steps:
            break
        updates.append(step)
        targets = target_counts(schedule, step, current, lambda density: shape_counts(shapes, density, split))
        if targets != current:
            segments.append(Segment(start, step, current))
            current, start = targets, step
    segments.append(Segment(start, total_steps, current))
    return segments, updates, schedule.grow


def integrate(layers: list[LayerFlops], segments: list[Segment], samples: np.ndarray,
              gradient_updates: list[int], offset_epochs: float = 0.0,
              steps_per_epoch: int = 1) -> tuple[dict[str, float], float, float, dict[str, list[float]]]:
    """Sum density x 3F (2F for the first layer) x samples over segments, plus dense-gradient updates."""
    cum = np.concatenate([[0.0], np.cumsum(samples)])
    numel_sparse = sum(lay.numel for lay in layers if lay.sparse) or 1
    per_layer = {lay.name: 0.0 for lay in layers}
    density_samples = 0.0
    curve: dict[str, list[float]] = {"epochs": [offset_epochs], "density": [], "flops": [0.0]}
    running = 0.0
    for seg in segments:
        n = cum[seg.end] - cum[seg.start]
        cost_per_sample = 0.0
        for lay in layers:
            d = seg.counts[lay.name] / lay.numel if lay.sparse else 1.0
            per_layer[lay.name] += d * lay.forward_flops * lay.train_factor * n
            cost_per_sample += d * lay.forward_flops * lay.train_factor
        active = sum(seg.counts.values())
        density_samples += active / numel_sparse * n
        # curve points at every epoch end inside the segment, so a constant density still draws a ramp
        ends = [e for e in range(seg.start + 1, seg.end) if e % steps_per_epoch == 0] + [seg.end]
        for end in ends:
            curve["epochs"].append(offset_epochs + end / steps_per_epoch)
            curve["density"].append(active / numel_sparse)
            curve["flops"].append(running + cost_per_sample * (cum[end] - cum[seg.start]))
        running += cost_per_sample * n
    update_flops = 0.0
    if gradient_updates:
        steps = np.asarray(gradient_updates)
        starts = np.asarray([seg.start for seg in segments])
        which = np.searchsorted(starts, steps, side="left") - 1  # the segment holding step u (start < u <= end)
        for u, k in zip(steps, which, strict=True):
            counts = segments[max(0, int(k))].counts
            for lay in layers:
                if lay.sparse:
                    extra = (1 - counts[lay.name] / lay.numel) * lay.forward_flops * samples[u - 1]
                    per_layer[lay.name] += extra
                    update_flops += extra
    return per_layer, density_samples, update_flops, curve


def _inference_flops(layers: list[LayerFlops], counts: dict[str, int]) -> float:
    return float(sum((counts[lay.name] / lay.numel if lay.sparse else 1.0) * lay.forward_flops for lay in layers))


def method_recipe(base: Recipe, method: str) -> Recipe:
    """The base recipe switched to `method`, with the keys that only apply to other methods reset."""
    return with_method(base, method)[0]


def paper_recipe() -> Recipe:
    """The paper's CIFAR-10 setup, the base of `ndsnn cost` without a recipe."""
    return Recipe(source="ndsnn cost").replace(
        model={"arch": "resnet19", "timesteps": 5}, data={"dataset": "cifar10", "batch_size": 128},
        train={"epochs": 300}, sparsity={"final": 0.99, "initial": 0.5, "update_every_steps": 100})


def base_recipe(recipe_file: Path | None = None, *, model: str | None = None, timesteps: int | None = None,
                dataset: str | None = None, batch_size: int | None = None, epochs: int | None = None,
                sparsity: float | None = None, initial: float | None = None, update_every: int | None = None,
                ramp_start: float | None = None, ramp_end: float | None = None, update_end: float | None = None,
                distribution: str | None = None, round_epochs: int | None = None,
                prune_rate: float | None = None, rewind_epoch: int | None = None) -> Recipe:
    """The recipe every method's cost is derived from: the paper setup (or a recipe file) with the
    given settings (the `cost` command's options; None keeps the base's value) on top, as method
    "lth" with its prune rate and rewind epoch resolved.

    Each LTH key comes from the settings, else the base recipe, else LTH-SNN's default (the one
    `method_recipe(base, "lth")` picks), so every method sees one validated set of LTH settings.
    """
    from ndsnn_cli.recipe import load_recipe

    base = load_recipe(recipe_file) if recipe_file is not None else paper_recipe()
    if model is not None and model not in (known := known_models()):
        raise UserError(f"--model: unknown model '{model}' (known: {', '.join(known)})")
    pairs = {
        "model": {"arch": model, "timesteps": timesteps},
        "data": {"dataset": dataset, "batch_size": batch_size},
        "train": {"epochs": epochs},
        "sparsity": {"final": sparsity, "initial": initial, "update_every_steps": update_every,
                     "ramp_start_epoch": ramp_start, "ramp_end_epoch": ramp_end, "update_end_epoch": update_end,
                     "distribution": distribution, "round_epochs": round_epochs},
    }
    tables = {table: {k: v for k, v in keys.items() if v is not None} for table, keys in pairs.items()}
    # The cost compares every method, so the base is validated as method "dense" and LTH keys ride apart.
    tables["sparsity"].update(method="dense", prune_rate=-1.0, rewind_epoch=-1)
    own = base.sparsity
    base = base.replace(**tables)
    lth_defaults = method_recipe(base, "lth").sparsity  # base has no LTH keys now: LTH-SNN's defaults
    if prune_rate is None:
        prune_rate = own.prune_rate if own.prune_rate != -1 else lth_defaults.prune_rate
    if rewind_epoch is None:
        rewind_epoch = own.rewind_epoch
    if rewind_epoch == -1:
        rewind_epoch = lth_defaults.rewind_epoch
    checked = base.replace(sparsity={"method": "lth", "prune_rate": prune_rate, "rewind_epoch": rewind_epoch})
    method_recipe(checked, "gmp")  # validates t0 < t1 <= t_end once, with the user's keys
    return checked



def method_cost(base: Recipe, method: str, layers: list[LayerFlops], train_size: int) -> MethodCost:
    recipe = method_recipe(base, method)
    batch, epochs = recipe.data.batch_size, recipe.train.epochs
    steps_per_epoch = batches_per_epoch(train_size, batch)[0]
    note = ""
    if method == "lth":
        sp = recipe.sparsity
        round_epochs = sp.round_epochs or epochs
        per_layer = {lay.name: 0.0 for lay in layers}
        density_samples, curve = 0.0, {"epochs": [0.0], "density": [], "flops": [0.0]}
        counts: dict[str, int] = {}
        rounds = lth_round_sparsities(sp.final, sp.prune_rate)
        epochs_per_round = lth_round_epochs(round_epochs, sp.rewind_epoch, len(rounds))
        total_samples = total_steps = 0.0
        for index, sparsity in enumerate(rounds):
            samples = _samples_per_step(train_size, batch, epochs_per_round[index])
            total_samples, total_steps = total_samples + float(samples.sum()), total_steps + len(samples)
            counts = shape_counts(_shapes(layers), 1 - sparsity, _split(sp.distribution))
            seg = [Segment(0, len(samples), counts)]
            round_layer, round_density, _, round_curve = integrate(layers, seg, samples, [],
                                                                     sum(epochs_per_round[:index]), steps_per_epoch)
            for name, value in round_layer.items():
                per_layer[name] += value
            density_samples += round_density
            curve["epochs"] += round_curve["epochs"][1:]
            curve["density"] += round_curve["density"]
            curve["flops"] += [curve["flops"][-1] + f for f in round_curve["flops"][1:]]
        note = (f"{len(rounds)} rounds: {round_epochs} epochs, then {epochs_per_round[-1]} each "
                f"(from the weights rewound to epoch {sp.rewind_epoch})")
        return MethodCost(method, sum(per_layer.values()), density_samples / total_samples,
                          sum(counts.values()) / sum(lay.numel for lay in layers if lay.sparse),
                          _inference_flops(layers, counts), int(total_steps),
                          float(sum(epochs_per_round)), 0.0, per_layer, counts, curve, note)
    samples = _samples_per_step(train_size, batch, epochs)
    segments, updates, grow = schedule_segments(recipe, layers, steps_per_epoch, len(samples))
    gradient_updates = updates if grow == "gradient" else []
    per_layer, density_samples, update_flops, curve = integrate(layers, segments, samples, gradient_updates,
                                                                0.0, steps_per_epoch)
    final = segments[-1].counts
    numel_sparse = sum(lay.numel for lay in layers if lay.sparse) or 1
    if gradient_updates:
        note = f"{len(gradient_updates)} dense-gradient updates"
    return MethodCost(method, sum(per_layer.values()), density_samples / float(samples.sum()),
                      sum(final.values()) / numel_sparse, _inference_flops(layers, final), len(samples),
                      float(epochs), update_flops, per_layer, final, curve, note)


@dataclass
class CostReport:
    arch: str
    dataset: str
    sparsity: float
    assumptions: dict[str, Any]
    layers: list[LayerFlops]
    methods: dict[str, MethodCost]

    def relative(self, method: str, to: str) -> float | None:
        if to not in self.methods or self.methods[to].train_flops == 0:
            return None
        return self.methods[method].train_flops / self.methods[to].train_flops

    def to_json(self) -> dict[str, Any]:
        """Stable keys: assumptions, layers, methods (in METHOD_ORDER), paper figure where published."""
        methods = {}
        for name, mc in self.methods.items():
            methods[name] = {
                "train_flops": mc.train_flops, "relative_to_lth": self.relative(name, "lth"),
                "relative_to_dense": self.relative(name, "dense"), "mean_density": mc.mean_density,
                "final_density": mc.final_density, "inference_flops": mc.inference_flops,
                "total_steps": mc.total_steps, "total_epochs": mc.total_epochs, "update_flops": mc.update_flops,
                "note": mc.note, "layers": {n: {"train_flops": mc.layer_train_flops[n],
                                                "final_active": mc.final_counts.get(n)} for n in mc.layer_train_flops},
            }
        return {
            "arch": self.arch, "dataset": self.dataset, "sparsity": self.sparsity, "assumptions": self.assumptions,
            "layers": [{**asdict(lay), "shape": list(lay.shape), "forward_flops": lay.forward_flops,
                        "train_factor": lay.train_factor} for lay in self.layers],
            "methods": methods,
            "paper_ndsnn_relative_to_lth": PAPER_NDSNN_OF_LTH.get(self.arch) if self.dataset == "cifar10" else None,
        }


def assumptions(base: Recipe, train_size: int) -> dict[str, Any]:
    sp = base.sparsity
    lth = method_recipe(base, "lth").sparsity
    nd = method_recipe(base, "ndsnn").sparsity
    t0, t1, t_end = sparse_epochs(base)
    return {
        "dataset": base.data.dataset, "train_size": train_size, "epochs": base.train.epochs,
        "batch_size": base.data.batch_size, "steps_per_epoch": batches_per_epoch(train_size, base.data.batch_size)[0],
        "timesteps": base.model.timesteps, "final_sparsity": sp.final, "distribution": sp.distribution,
        "split_used": _split(sp.distribution), "dense_layers": list(sp.dense),
        "lth_prune_rate": lth.prune_rate, "lth_rewind_epoch": lth.rewind_epoch,
        "lth_round_epochs": lth.round_epochs or base.train.epochs,
        "lth_rounds": len(lth_round_sparsities(sp.final, lth.prune_rate)),
        "ndsnn_initial_sparsity": nd.initial, "update_every_steps": sp.update_every_steps,
        "ramp_start_epoch": t0, "ramp_end_epoch": t1, "update_end_epoch": t_end, "grow": sp.grow,
        "flops_per_mac": 2, "train_step": "3x forward (2x for the first layer: no input gradient)",
        "gradient_growth": "update step pays the dense weight gradient: F instead of d*F per sparse layer",
        "counted": "conv and linear weights only (BN, LIF, pooling, optimizer not counted)",
    }


def training_cost(base: Recipe, train_size: int | None = None,
                  methods: tuple[str, ...] = METHOD_ORDER) -> CostReport:
    """Training FLOPs of every method for the recipe's model, data and schedule settings."""
    train_size = train_size or recipe_train_size(base.data)
    layers = model_layers(base)
    results = {m: method_cost(base, m, layers, train_size) for m in methods}
    return CostReport(base.model.arch, base.data.dataset, base.sparsity.final, assumptions(base, train_size),
                      layers, results)


# ---------------------------------------------------------------------------------------------- runs


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "summary.json").is_file() or (path / "metrics.jsonl").is_file())


@dataclass
class RunCost:
    """What one finished run actually cost, from its recorded masks, and its spike-driven inference energy."""

    run_dir: str
    method: str
    train_flops: float
    predicted_train_flops: float
    mean_density: float
    final_density: float
    layers: list[dict[str, Any]]
    spike_rates: dict[str, float]
    synaptic_ops: dict[str, float]   # per sample: "ac", "mac", "dense_mac"
    energy_pj: dict[str, float]      # per sample: "snn", "dense_ann"
    assumptions: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_cost(run_dir: str | Path) -> RunCost:
    """Realised training FLOPs from metrics.jsonl mask updates, synaptic ops and energy from summary.json."""
    run_dir = Path(run_dir)
    recipe, summary = _finished_run(run_dir)
    train_size = recipe_train_size(recipe.data)
    layers = model_layers(recipe)
    steps_per_epoch = batches_per_epoch(train_size, recipe.data.batch_size)[0]
    samples = _samples_per_step(train_size, recipe.data.batch_size, summary["epochs"])[: summary["steps"]]
    predicted, _, _ = schedule_segments(recipe, layers, steps_per_epoch, len(samples))
    schedule = method_schedule(recipe, steps_per_epoch)
    segments, records = _recorded_segments(run_dir, summary, predicted[0].counts, len(samples))
    final_nnz = {n: int(v["nnz"]) for n, v in summary["sparsity"]["layers"].items()}
    if schedule is not None and final_nnz != segments[-1].counts:
        raise UserError(f"{run_dir}: summary.json sparsity.layers disagrees with the last mask update in metrics.jsonl")
    grow_updates = [r["step"] for r in records] if schedule is not None and schedule.grow == "gradient" else []
    per_layer, density_samples, _, _ = integrate(layers, segments, samples, grow_updates, 0.0, steps_per_epoch)
    predicted_flops, _, _, _ = integrate(layers, predicted, samples,
                                         list(schedule.update_steps()) if grow_updates else [], 0.0, steps_per_epoch)
    rates = {k: float(v) for k, v in summary.get("spike_rates", {}).items()}
    rows, synaptic_ops = _synaptic_ops(layers, final_nnz, rates, per_layer)
    numel_sparse = sum(lay.numel for lay in layers if lay.sparse) or 1
    return RunCost(str(run_dir), recipe.sparsity.method, sum(per_layer.values()), sum(predicted_flops.values()),
                   density_samples / float(samples.sum()), sum(final_nnz.values()) / numel_sparse,
                   rows, rates, synaptic_ops,
                   {"snn": synaptic_ops["ac"] * ENERGY_AC_PJ + synaptic_ops["mac"] * ENERGY_MAC_PJ,
                    "dense_ann": synaptic_ops["dense_mac"] * ENERGY_MAC_PJ},
                   {"train_size": train_size, "epochs": summary["epochs"], "steps": summary["steps"],
                    "batch_size": recipe.data.batch_size, "timesteps": recipe.model.timesteps,
                    "energy_ac_pj": ENERGY_AC_PJ, "energy_mac_pj": ENERGY_MAC_PJ,
                    "energy_source": "Horowitz, ISSCC 2014, 45 nm, 32-bit float",
                    "spike_rates": "summary.json spike_rates (LIF output rate on a 64-image test probe); a max-pooled "
                                   "spike map is charged the rate of the LIF before it (a lower bound)",
                    "mask_updates": len(records)})


def _finished_run(run_dir: Path) -> tuple[Recipe, dict[str, Any]]:
    """The run's recipe and validated summary.json; one-line errors for what `cost RUN` cannot read."""
    from ndsnn_cli.validate import check_summary, read_json_file

    if not is_run_dir(run_dir):
        raise UserError(f"{run_dir}: not a run directory (no summary.json or metrics.jsonl)")
    recipe_path = run_dir / "recipe.toml"
    if not recipe_path.is_file():
        raise UserError(f"{run_dir}: run directory has no recipe.toml")
    recipe = load_recipe(recipe_path, str(recipe_path))
    if recipe.sparsity.method == "lth":
        raise UserError(f"{run_dir}: realised cost of an LTH run is not supported yet; "
                        "use `ndsnn cost` on its recipe.toml for the model")
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise UserError(f"{run_dir}: run has no summary.json yet (unfinished run)")
    return recipe, check_summary(summary_path, read_json_file(summary_path))


def _recorded_segments(run_dir: Path, summary: dict[str, Any], scheduled_start: dict[str, int],
                       steps: int) -> tuple[list[Segment], list[dict[str, Any]]]:
    """The run's mask history as constant-count segments, and its validated mask-update records.

    Initial masks as set up (the `mask_init` record; runs written before it existed: the schedule's counts,
    which a `global` split only approximates), then each recorded update that changed a count.
    """
    from ndsnn_cli.validate import check_mask_records

    metrics = check_mask_records(run_dir / "metrics.jsonl", read_metrics(run_dir), summary["steps"])
    records = [r for r in metrics if r.get("kind") == "mask_update"]
    init = next((r for r in metrics if r.get("kind") == "mask_init"), None)
    current = {n: int(v) for n, v in init["layers"].items()} if init else dict(scheduled_start)
    segments, start = [], 0
    for record in records:
        new = {n: int(v["active"]) for n, v in record["layers"].items()}
        if new != current:
            segments.append(Segment(start, record["step"], current))
            current, start = new, record["step"]
    segments.append(Segment(start, steps, current))
    return segments, records


def _synaptic_ops(layers: list[LayerFlops], final_nnz: dict[str, int], rates: dict[str, float],
                  train_flops: dict[str, float]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per layer, the final model's operations per sample: accumulates where spikes feed it (scaled by the
    feeding LIF's rate), multiply-accumulates where analog values do; and the totals beside a dense ANN's."""
    ac = mac = dense_mac = 0.0
    rows = []
    for lay in layers:
        density = final_nnz.get(lay.name, lay.numel) / lay.numel if lay.sparse else 1.0
        macs = lay.forward_flops / 2 * density  # per sample, all runs
        dense_mac += lay.forward_flops / 2 / lay.runs  # a non-spiking network runs each layer once
        if lay.input_source.startswith("spikes:"):
            rate = rates.get(lay.input_source.removeprefix("spikes:"))
            ops = macs * (rate if rate is not None else 1.0)
            ac += ops
            kind = "ac"
        else:
            rate, ops, kind = None, macs, "mac"
            mac += ops
        rows.append({"name": lay.name, "input": lay.input_source, "input_spike_rate": rate,
                     "density": density, "nnz": int(round(density * lay.numel)), "numel": lay.numel,
                     "ops": ops, "op": kind, "train_flops": train_flops[lay.name]})
    return rows, {"ac": ac, "mac": mac, "dense_mac": dense_mac}


def cost_beside_baselines(run_dir: str | Path) -> dict[str, Any]:
    """A finished run's training FLOPs beside the same recipe trained dense and with LTH (the `cost` model):
    what `ndsnn train` prints under its table. Realised FLOPs from the run's masks; LTH runs: the model's."""
    run_dir = Path(run_dir)
    recipe = load_recipe(run_dir / "recipe.toml", str(run_dir / "recipe.toml"))
    train_size = recipe_train_size(recipe.data)
    layers = model_layers(recipe)
    baselines = ("dense",) if recipe.sparsity.method == "dense" else ("dense", "lth")
    flops = {m: method_cost(recipe, m, layers, train_size).train_flops for m in baselines}
    own = flops.get("lth") if recipe.sparsity.method == "lth" else run_cost(run_dir).train_flops
    return {"method": recipe.sparsity.method, "train_flops": own, "baselines": flops,
            "relative": {m: own / f if f else None for m, f in flops.items()}}


if __name__ == "__main__":  # `python -m ndsnn_cli.cost` (make layer-tables): after changing snn/models.py
    written = write_layer_tables()
    print(f"{LAYER_TABLES}: {len(written['tables'])} layer tables")
