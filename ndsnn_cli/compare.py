"""prune-compare: train every (method, sparsity, seed) of one recipe and tabulate test accuracy and cost.

Each run is a plain `ndsnn train` run directory `OUT/<method>-s<sparsity>-seed<k>/`, so the grid is
resumable for free: a run with summary.json is done and skipped, a run with a checkpoint resumes.
Dense runs once per seed (sparsity 0). The core never prints: progress goes to an `on_event` callable.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ndsnn_cli.errors import UserError
from ndsnn_cli.recipe import METHODS, Recipe, load_recipe, parse_recipe, with_method

Event = Callable[[str, str, dict[str, Any]], None]  # (run key, status, info)


@dataclass(frozen=True)
class RunSpec:
    """One cell-sample of the grid: its recipe and its run directory."""

    method: str
    sparsity: float  # 0.0 for dense
    seed: int
    recipe: Recipe
    run_dir: Path
    label: str = ""  # the table row: the method, or e.g. "rigl-pub" for a baseline at its published settings
    budgets: tuple[str, ...] = ("epochs",)  # the budgets (equal_cost.BUDGETS) whose tables this run is in
    length: str = ""  # "" at the recipe's length, "-e<epochs>" (LTH "-r<epochs per round>") at another

    @property
    def row(self) -> str:
        return self.label or self.method

    @property
    def key(self) -> str:
        return run_key(self.row, self.sparsity, self.seed) + self.length


@dataclass
class Plan:
    runs: list[RunSpec]
    notes: list[str] = field(default_factory=list)  # assumptions shown on screen and in the reports
    budgets: list[str] = field(default_factory=lambda: ["epochs"])
    reference: str = "ndsnn"  # --budget-ref: the row whose cost the other budgets match
    missing: dict[tuple[str, str, float], str] = field(default_factory=dict)  # (budget, row, sparsity) -> why


def run_key(method: str, sparsity: float, seed: int) -> str:
    return f"{method}-s{sparsity:g}-seed{seed}"


def parse_methods(text: str) -> list[str]:
    """`"ndsnn,rigl"` -> ["ndsnn", "rigl"]; an unknown name is a UserError listing the known ones."""
    methods = [m.strip().lower() for m in text.split(",") if m.strip()]
    if not methods:
        raise UserError("--methods is empty (known: " + ", ".join(METHODS) + ")")
    for method in methods:
        if method not in METHODS:
            raise UserError(f"--methods: unknown method '{method}' (known: {', '.join(METHODS)})")
    return list(dict.fromkeys(methods))


def apply_overrides(base: Recipe, overrides: Sequence[str]) -> Recipe:
    """`--set sparsity.init=dense`: TOML values (`0.5`, `true`, `["a"]`), bare words as strings; each
    validated like a recipe file's key, the error naming the option."""
    import tomllib

    tables: dict[str, dict[str, Any]] = {}
    for item in overrides:
        where, sep, text = item.partition("=")
        table, dot, key = where.strip().partition(".")
        if not sep or not dot or not key:
            raise UserError(f"--set {item!r}: expected TABLE.KEY=VALUE, e.g. sparsity.init=dense")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        tables.setdefault(table, {})[key] = value
    if not tables:
        return base
    try:
        return base.replace(**{t: v for t, v in tables.items()})
    except (KeyError, TypeError):
        raise UserError(f"--set: unknown table in {', '.join(tables)} (known: model, data, train, sparsity)") from None
    except UserError as exc:
        raise UserError(f"--set: {exc}") from None


def parse_sparsities(text: str) -> list[float]:
    values = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise UserError(f"--sparsities: '{part}' is not a number") from None
        if not 0 < value < 1:
            raise UserError(f"--sparsities: {part} must be in (0, 1)")
        values.append(value)
    if not values:
        raise UserError("--sparsities is empty (e.g. 0.9,0.95,0.98,0.99)")
    return sorted(set(values))


def run_recipe(base: Recipe, method: str, sparsity: float, seed: int) -> tuple[Recipe, list[str]]:
    """The base recipe with method, final sparsity and seed set; LTH keys set for lth and unset for others."""
    renamed = base.replace(name=f"{base.name}-{run_key(method, sparsity, seed)}", seed=seed)
    return with_method(renamed, method, **({} if method == "dense" else {"final": sparsity}))


# ---------------------------------------------------------------- baselines at their published settings

BASELINES = ("same", "published", "both")  # --baselines: the recipe's shared settings, the papers', or both
PUBLISHED_METHODS = ("rigl", "set", "lth")
RIGL_DELTA_T_STEPS = 100        # RigL (Evci et al., ICML 2020): ΔT = 100 ...
RIGL_EPOCH_STEPS = 391          # ... on CIFAR-10 at batch 128 (50,000 / 128 = 391 steps an epoch)
RIGL_DROP_FRACTION = 0.3        # α, cosine-decayed to 0 at t_end = 75% of training
SET_DROP_FRACTION = 0.3         # SET (Mocanu et al., 2018): ζ = 0.3 once per epoch, all training long


def published_recipe(recipe: Recipe, first_layer: str) -> tuple[Recipe, list[str]]:
    """A rigl/set/lth run recipe switched to its authors' schedule, scaled to the run's length.

    RigL's ΔT is 100 steps of a 391-step epoch; a shorter epoch keeps RigL's updates per epoch
    (ΔT = round(100 * steps_per_epoch / 391)). RigL and SET keep the first layer dense (RigL's
    `first_layer_sparsity = 0`), grow at zero and drop by magnitude, as ndsnn already does.
    """
    from ndsnn_cli.data import batches_per_epoch, train_size
    from ndsnn_cli.recipe import LTH_MAX_REWIND_EPOCH, LTH_PRUNE_RATE

    sp, epochs = recipe.sparsity, recipe.train.epochs
    steps_per_epoch, _ = batches_per_epoch(train_size(recipe.data), recipe.data.batch_size)
    dense_first = sorted({*sp.dense, first_layer})
    if sp.method == "rigl":
        every = RIGL_DELTA_T_STEPS if steps_per_epoch >= RIGL_EPOCH_STEPS else max(
            1, round(RIGL_DELTA_T_STEPS * steps_per_epoch / RIGL_EPOCH_STEPS))
        how = ("100 steps" if every == RIGL_DELTA_T_STEPS else
               f"{every} steps: RigL's 100 of a 391-step epoch, scaled to this run's {steps_per_epoch}-step epoch")
        changes = {"update_every_steps": every, "drop_fraction": RIGL_DROP_FRACTION, "drop_fraction_min": 0.0,
                   "grow": "gradient", "update_end_epoch": 0.75 * epochs, "dense": dense_first}
        note = (f"rigl-pub: RigL's published schedule: ΔT = {how}; α = 0.3 cosine-decayed to 0 at t_end = 75% of "
                f"training; gradient growth at zero, magnitude drop, ERK with {first_layer} dense")
    elif sp.method == "set":
        changes = {"update_every_steps": steps_per_epoch, "drop_fraction": SET_DROP_FRACTION,
                   "drop_fraction_min": SET_DROP_FRACTION, "grow": "random", "update_end_epoch": float(epochs),
                   "dense": dense_first}
        note = (f"set-pub: SET's published schedule: ζ = 0.3 at every epoch end ({steps_per_epoch} steps) through "
                f"training, magnitude drop, random growth at zero (as RigL's SET code; Mocanu's original draws "
                f"grown weights from the init distribution), ERK with {first_layer} dense")
    elif sp.method == "lth":
        round_epochs = sp.round_epochs or epochs
        rewind = min(LTH_MAX_REWIND_EPOCH, round_epochs // 10)
        changes = {"prune_rate": LTH_PRUNE_RATE, "rewind_epoch": rewind}
        note = (f"lth: LTH-SNN's published settings: prune {LTH_PRUNE_RATE:g} of the remaining weights per round, "
                f"late rewinding to epoch min({LTH_MAX_REWIND_EPOCH}, round epochs // 10) = {rewind}"
                + (" (rounds this short have no later epoch: it rewinds to initialisation)" if rewind == 0 else ""))
    else:
        return recipe, []
    return recipe.replace(sparsity=changes), [note]


def first_sparse_layer(recipe: Recipe) -> str:
    """The model's first conv/linear weight (RigL and SET keep it dense at their published settings)."""
    from ndsnn_cli.build import build_model
    from ndsnn_cli.sparse.masks import sparse_parameter_names

    return sparse_parameter_names(build_model(recipe))[0]


def _variants(base: Recipe, method: str, sparsity: float, seed: int, baselines: str,
              first_layer: str) -> list[tuple[Recipe, str, list[str]]]:
    """The (recipe, row label, notes) runs of one method at one sparsity and seed: its shared-settings run,
    its published-settings run (`rigl-pub`, ...), or both, per `baselines`."""
    recipe, notes = run_recipe(base, method, sparsity, seed)
    if baselines == "same" or method not in PUBLISHED_METHODS:
        return [(recipe, method, notes)]
    published, pub_notes = published_recipe(recipe, first_layer)
    label = method if published.to_toml() == recipe.to_toml() else f"{method}-pub"
    published = published.replace(name=f"{base.name}-{run_key(label, sparsity, seed)}")
    pub = (published, label, [n for n in notes if not n.startswith("lth: the recipe")] + pub_notes)
    return [pub] if baselines == "published" or label == method else [(recipe, method, notes), pub]


def _variant(base: Recipe, method: str, label: str, sparsity: float, seed: int, first_layer: str) -> Recipe:
    """The run recipe of row `label` (a method, or `<method>-pub` for its published settings)."""
    baselines = "published" if label.endswith("-pub") else "same"
    found = [r for r, lab, _ in _variants(base, method, sparsity, seed, baselines, first_layer) if lab == label]
    if not found:  # lth at published settings when the recipe's own are LTH-SNN's: the row is "lth"
        found = [r for r, _, _ in _variants(base, method, sparsity, seed, baselines, first_layer)]
    return found[0]


def parse_reference(text: str) -> tuple[str, str]:
    """`--budget-ref`: a method (`ndsnn`) or a published baseline's row (`rigl-pub`) -> (method, row)."""
    label = text.strip().lower()
    method = label.removesuffix("-pub")
    if method not in METHODS or (label != method and method not in PUBLISHED_METHODS):
        known = [*METHODS, *(f"{m}-pub" for m in PUBLISHED_METHODS)]
        raise UserError(f"--budget-ref: unknown '{text}' (known: {', '.join(known)})")
    return method, label


def plan_runs(base: Recipe, methods: Sequence[str], sparsities: Sequence[float], seeds: int,
              out: str | Path, baselines: str = "same", budgets: Sequence[str] = ("epochs",),
              budget_ref: str = "ndsnn",
              seconds_per_step: dict[tuple[str, float], float] | None = None) -> Plan:
    """Every (method, sparsity, seed) run of every budget; dense once per seed. Seeds are base.seed, + 1, ...

    `baselines`: "same" runs every method with the recipe's shared settings; "published" runs RigL, SET
    and LTH at their papers' settings (rows `rigl-pub`, `set-pub`; LTH keeps its row when the recipe
    already uses LTH-SNN's settings); "both" runs the two side by side. Other methods run once either way.
    `budgets` (equal_cost.BUDGETS): "epochs" trains the recipe's length; "flops", "steps" and "wall" scale each
    row's length to cost what `budget_ref` costs at the recipe's length at each sparsity (`equal_cost`). A run
    two budgets agree on trains once. "wall" needs `seconds_per_step[(row, sparsity)]` (measured on the
    epochs-budget runs, `measured_seconds_per_step`); rows without one wait in `plan.missing`.
    """
    from ndsnn_cli import equal_cost

    if seeds < 1:
        raise UserError(f"--seeds {seeds} must be >= 1")
    if baselines not in BASELINES:
        raise UserError(f"--baselines: unknown '{baselines}' (known: {', '.join(BASELINES)})")
    unknown = [b for b in budgets if b not in equal_cost.BUDGETS]
    if unknown or not budgets:
        raise UserError(f"--budget: unknown '{','.join(unknown)}' (known: {', '.join(equal_cost.BUDGETS)})")
    ref_method, ref_label = parse_reference(budget_ref)
    if "wall" in budgets and "epochs" not in budgets:
        raise UserError("--budget wall measures each method's seconds per step on its runs at the recipe's length: "
                        "add epochs (e.g. --budget epochs,wall)")
    out = Path(out)
    plan = Plan([], budgets=list(budgets), reference=ref_label)
    wants_first = (baselines != "same" and set(methods) & {"rigl", "set"}) or ref_label in ("rigl-pub", "set-pub")
    first_layer = first_sparse_layer(base) if wants_first else ""
    for method in methods:
        for sparsity in ([0.0] if method == "dense" else sparsities):
            for seed in range(base.seed, base.seed + seeds):
                for recipe, label, notes in _variants(base, method, sparsity, seed, baselines, first_layer):
                    plan.notes += [n for n in notes if n not in plan.notes]
                    plan.runs.append(RunSpec(method, sparsity, seed, recipe, out / run_key(label, sparsity, seed),
                                             "" if label == method else label, budgets=()))
    if "lth" in methods:
        from ndsnn_cli.sparse.schedules import lth_round_sparsities

        lth = next(r.recipe for r in plan.runs if r.method == "lth")
        round_epochs = lth.sparsity.round_epochs or lth.train.epochs
        counts = ", ".join(f"{s:g}: {len(lth_round_sparsities(s, lth.sparsity.prune_rate))}" for s in sparsities)
        plan.notes.append(f"lth: {round_epochs} epoch(s) per round, rewind to epoch {lth.sparsity.rewind_epoch}, "
                          f"prune_rate {lth.sparsity.prune_rate:g}; rounds incl. the dense one per sparsity: {counts}")
    recipe_runs = list(plan.runs)
    for budget in budgets:
        _plan_budget(plan, budget, base, recipe_runs, out, (ref_method, ref_label), first_layer,
                     seconds_per_step or {})
    plan.runs = [r for r in plan.runs if r.budgets]
    return plan


def _plan_budget(plan: Plan, budget: str, base: Recipe, recipe_runs: list[RunSpec], out: Path,
                 ref: tuple[str, str], first_layer: str, seconds_per_step: dict[tuple[str, float], float]) -> None:
    """Tag or add the runs of one budget: each row's length fitted to the reference's cost per sparsity."""
    from ndsnn_cli import equal_cost

    lines: dict[float, list[str]] = {}
    rows = list(dict.fromkeys((s.row, s.method, s.sparsity) for s in recipe_runs))
    for row, method, sparsity in rows:
        specs = [s for s in recipe_runs if s.row == row and s.sparsity == sparsity]
        if budget == "epochs":
            _tag(plan, specs, budget)
            model = equal_cost.cost_model(specs[0].recipe)
            lines.setdefault(sparsity, []).append(_length_text(row, specs[0].recipe, model))
            continue
        if method == "dense":
            plan.missing[(budget, row, sparsity)] = "dense trains at the recipe's length only (no reference at 0)"
            continue
        try:
            fit = _fit_row(budget, base, method, row, sparsity, specs[0].recipe, ref, first_layer, seconds_per_step)
        except equal_cost.NoFit as exc:
            plan.missing[(budget, row, sparsity)] = str(exc)
            lines.setdefault(sparsity, []).append(f"{row} not run ({exc})")
            continue
        if fit.epochs == equal_cost.length_epochs(specs[0].recipe):
            _tag(plan, specs, budget)
        else:
            _tag(plan, [_scaled_spec(plan, base, spec, fit.epochs, first_layer, out) for spec in specs], budget)
        model = equal_cost.cost_model(fit.recipe)
        lines.setdefault(sparsity, []).append(_length_text(row, fit.recipe, model) + f", {fit.ratio:.2f}x the budget")
    plan.notes.append(_budget_note(budget, ref[1], lines))


def _fit_row(budget: str, base: Recipe, method: str, row: str, sparsity: float, recipe: Recipe,
             ref: tuple[str, str], first_layer: str, seconds_per_step: dict[tuple[str, float], float]) -> Any:
    """The length of `row` at `sparsity` whose `budget` cost is nearest the reference's (equal_cost.fit_length)."""
    from ndsnn_cli import equal_cost

    ref_recipe = _variant(base, ref[0], ref[1], sparsity, base.seed, first_layer)
    if budget == "wall":
        ref_key = (ref[1], 0.0 if ref[0] == "dense" else sparsity)
        cells = dict.fromkeys((ref_key, (row, sparsity)))  # the reference's own row: named once
        missing = [f"{r} at {s:g}" for r, s in cells if (r, s) not in seconds_per_step]
        if missing:
            raise equal_cost.NoFit("waits for the recipe-length runs of " + " and ".join(missing)
                                   + " to measure seconds per step")
        target = equal_cost.measure_for("wall", seconds_per_step[ref_key])(ref_recipe)
        measure = equal_cost.measure_for("wall", seconds_per_step[(row, sparsity)])
    else:
        measure = equal_cost.measure_for(budget)
        target = measure(ref_recipe)
    unit = "epoch per round" if method == "lth" else "epoch"

    def make(epochs: int) -> Recipe:
        return _variant(equal_cost.with_length(base, method, epochs), method, row, sparsity, base.seed, first_layer)

    return equal_cost.fit_length(make, measure, target or 0.0, equal_cost.length_epochs(recipe), unit)


def _scaled_spec(plan: Plan, base: Recipe, spec: RunSpec, epochs: int, first_layer: str, out: Path) -> RunSpec:
    """The run of `spec`'s row and seed at another length (`-e<epochs>`, LTH `-r<epochs per round>`); one
    RunSpec per run directory, shared by the budgets that pick it."""
    from ndsnn_cli import equal_cost

    length = f"-{'r' if spec.method == 'lth' else 'e'}{epochs}"
    key = spec.key + length
    existing = next((r for r in plan.runs if r.key == key), None)
    if existing is not None:
        return existing
    recipe = _variant(equal_cost.with_length(base, spec.method, epochs), spec.method, spec.row, spec.sparsity,
                      spec.seed, first_layer).replace(name=f"{base.name}-{key}")
    scaled = RunSpec(spec.method, spec.sparsity, spec.seed, recipe, out / key, spec.label, budgets=(), length=length)
    plan.runs.append(scaled)
    return scaled


def measured_seconds_per_step(plan: Plan, summaries: dict[str, dict[str, Any]]) -> dict[tuple[str, float], float]:
    """(row, sparsity) -> seconds per optimizer step, mean over the seeds of its finished recipe-length runs.

    A run's seconds: summary.json `train_wall_s` (training only) where the trainer records it, else
    `wall_time_s` (training plus per-epoch evaluation); its steps: the cost model's (LTH: every round).
    """
    from ndsnn_cli import equal_cost

    per_cell: dict[tuple[str, float], list[float]] = {}
    for spec in plan.runs:
        summary = summaries.get(spec.key)
        model = equal_cost.cost_model(spec.recipe)
        if spec.length or summary is None or model is None or not model.steps:
            continue
        seconds = float(summary.get("train_wall_s", summary["wall_time_s"]))
        per_cell.setdefault((spec.row, spec.sparsity), []).append(seconds / model.steps)
    return {cell: statistics.fmean(values) for cell, values in per_cell.items()}


def _tag(plan: Plan, specs: list[RunSpec], budget: str) -> None:
    for spec in specs:
        index = next(i for i, r in enumerate(plan.runs) if r.key == spec.key)
        if budget not in plan.runs[index].budgets:
            plan.runs[index] = dataclasses.replace(plan.runs[index], budgets=(*plan.runs[index].budgets, budget))


def _length_text(row: str, recipe: Recipe, model: Any) -> str:
    from ndsnn_cli import equal_cost

    epochs = equal_cost.length_epochs(recipe)
    unit = "epoch(s) per round" if recipe.sparsity.method == "lth" else "epoch(s)"
    cost = "cost model n/a" if model is None else f"{model.steps} steps, {model.flops:.3g} FLOPs"
    return f"{row} {epochs} {unit} ({cost})"


def _budget_note(budget: str, reference: str, lines: dict[float, list[str]]) -> str:
    from ndsnn_cli import equal_cost

    head = ("budget epochs (the recipe's length for every method)" if budget == "epochs" else
            f"budget {budget} (each row trained the whole epochs nearest {reference}'s "
            f"{equal_cost.BUDGET_UNITS[budget]} at the recipe's length, per sparsity)")
    if budget == "wall":
        head += (" [seconds per step measured on each row's recipe-length runs: summary train_wall_s where "
                 "recorded, else wall_time_s (training + evaluation), over the cost model's steps; mean over seeds]")
    from ndsnn_cli.compare_report import format_sparsity

    return head + ": " + "; ".join(f"at {format_sparsity(s)}: " + ", ".join(parts) for s, parts in lines.items())


def run_status(spec: RunSpec) -> str:
    """done (summary.json), partial (started, resumable) or pending."""
    if (spec.run_dir / "summary.json").exists():
        return "done"
    return "partial" if (spec.run_dir / "recipe.toml").exists() else "pending"


def check_run_dirs(plan: Plan) -> None:
    """Refuse to resume or report a run directory that holds a different recipe (stale or foreign results)."""
    for spec in plan.runs:
        existing = spec.run_dir / "recipe.toml"
        if existing.exists():
            previous = load_recipe(existing, str(existing))
            if previous.to_toml() != spec.recipe.to_toml():
                raise UserError(f"{spec.run_dir}: holds a run of a different recipe; use another --out "
                                "or remove that directory")


class _EventCallbacks:
    """TrainCallbacks that forward progress as (key, status, info) events."""

    def __init__(self, key: str, emit: Event) -> None:
        self.key, self.emit = key, emit
        self.round = ""

    def on_run_start(self, recipe: Recipe, total_steps: int, steps_per_epoch: int, start_step: int) -> None:
        self.total = total_steps
        self.emit(self.key, "running", {"step": start_step, "total": total_steps, "round": self.round})

    def on_step(self, step: int, epoch: int, loss: float, accuracy: float) -> None:
        self.emit(self.key, "running", {"step": step, "total": self.total, "round": self.round,
                                        "epoch": epoch + 1, "loss": loss})

    def on_epoch_end(self, record: dict[str, Any]) -> None:
        self.emit(self.key, "running", {"step": record["step"], "total": self.total, "round": self.round,
                                        "epoch": record["epoch"], "test_accuracy": record["test_accuracy"]})

    def on_mask_update(self, update: Any) -> None: ...

    def on_kernels(self, step: int, layers: dict[str, str]) -> None: ...

    def on_warning(self, message: str) -> None:
        self.emit(self.key, "warning", {"message": message})

    def on_round_start(self, index: int, rounds: int, sparsity: float) -> None:
        self.round = f"round {index + 1}/{rounds}"


def _train_one(spec: RunSpec, emit: Event) -> dict[str, Any]:
    from ndsnn_cli.train import train

    emit(spec.key, "running", {})
    return train(spec.recipe, spec.run_dir, resume=True, callbacks=_EventCallbacks(spec.key, emit))


_worker_queue: Any = None


def _init_worker(queue: Any, threads: int) -> None:
    global _worker_queue
    import torch

    _worker_queue = queue
    torch.set_num_threads(threads)


def _worker_run(recipe_toml: str, method: str, sparsity: float, seed: int, run_dir: str,
                label: str) -> dict[str, Any]:
    spec = RunSpec(method, sparsity, seed, parse_recipe(recipe_toml), Path(run_dir), label)
    return _train_one(spec, lambda key, status, info: _worker_queue.put((key, status, info)))


def execute(plan: Plan, *, jobs: int = 1, on_event: Event | None = None) -> dict[str, str]:
    """Train every run that is not done (resuming partial ones); returns key -> done/failed: message.

    `jobs` > 1 trains in that many spawned processes, each with cores // jobs torch threads (a recipe's
    own `train.threads`, if set, wins). A failed run does not stop the others.
    """
    emit = on_event or (lambda key, status, info: None)
    results: dict[str, str] = {}
    todo = []
    for spec in plan.runs:
        if run_status(spec) == "done":
            results[spec.key] = "done"
            emit(spec.key, "done", {"skipped": True})
        else:
            todo.append(spec)
    if jobs <= 1:
        for spec in todo:
            results[spec.key] = _run_guarded(lambda s=spec: _train_one(s, emit), spec.key, emit)
        return results

    import multiprocessing
    import queue as queue_module
    from concurrent.futures import ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")  # fork after torch's thread pools start can deadlock
    events = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(events, threads)) as pool:
        futures = {pool.submit(_worker_run, s.recipe.to_toml(), s.method, s.sparsity, s.seed, str(s.run_dir),
                               s.label): s
                   for s in todo}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.2)
            _drain(events, emit, queue_module)
            for future in finished:
                spec = futures[future]
                results[spec.key] = _run_guarded(future.result, spec.key, emit)
        _drain(events, emit, queue_module)
    return results


def _drain(events: Any, emit: Event, queue_module: Any) -> None:
    while True:
        try:
            emit(*events.get_nowait())
        except queue_module.Empty:
            return


def _run_guarded(fn: Callable[[], Any], key: str, emit: Event) -> str:
    try:
        fn()
    except Exception as exc:  # one failed run (diverged, bad data, ...) must not stop the grid
        message = (str(exc).splitlines() or [type(exc).__name__])[0]
        emit(key, "failed", {"error": message})
        return f"failed: {message}"
    emit(key, "done", {})
    return "done"


# ---------------------------------------------------------------- results


def training_flops_for_run(recipe: Recipe, run_dir: Path) -> float | None:
    """The single hook to the project's FLOPs model: `ndsnn cost`'s prediction for the run's recipe.

    The model (not the run's recorded masks) so that LTH, whose realised cost `cost.run_cost` does not
    cover, is counted the same way as the methods it is the baseline for. None where it cannot say.
    """
    from ndsnn_cli import equal_cost

    return equal_cost.training_flops(recipe)


def read_summaries(plan: Plan) -> dict[str, dict[str, Any]]:
    """key -> summary.json of every finished run of the plan."""
    found = {}
    for spec in plan.runs:
        path = spec.run_dir / "summary.json"
        if path.exists():
            from ndsnn_cli.validate import check_run_summary, read_json_file

            found[spec.key] = check_run_summary(path, read_json_file(path))
    return found


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(plan: Plan, summaries: dict[str, dict[str, Any]], *,
              flops: Callable[[RunSpec], float | None] | None = None) -> dict[str, Any]:
    """Per budget, mean ± sample std (n - 1; 0 for one seed) of test accuracy per (row, sparsity), best per
    column, wall time, training time (summary `train_wall_s`: steps only, evaluation aside; None unless every
    finished run records it), optimizer steps and training FLOPs (the `ndsnn cost` model), the latter also
    relative to LTH at the recipe's length at the same sparsity (when LTH is among the rows)."""
    flops = flops or (lambda spec: training_flops_for_run(spec.recipe, spec.run_dir))
    methods = list(dict.fromkeys(s.row for s in plan.runs))
    columns = sorted({s.sparsity for s in plan.runs})
    cells: list[dict[str, Any]] = []
    for budget in plan.budgets:
        for method in methods:
            for sparsity in columns:
                specs = [s for s in plan.runs if s.row == method and s.sparsity == sparsity and budget in s.budgets]
                why = plan.missing.get((budget, method, sparsity))
                if specs or why:
                    cells.append(_cell(budget, method, sparsity, specs, summaries, flops, why))
    for budget in plan.budgets:
        for sparsity in columns:
            column = [c for c in cells if c["budget"] == budget and c["sparsity"] == sparsity]
            best = max((c["accuracy_mean"] for c in column if c["accuracy_mean"] is not None), default=None)
            for c in column:
                c["best"] = c["accuracy_mean"] is not None and c["accuracy_mean"] == best
    for c in cells:
        lth = next((x["training_flops"] for x in cells if x["method"] in ("lth", "lth-pub") and x["budget"] == "epochs"
                    and x["sparsity"] == c["sparsity"]), None)
        c["flops_vs_lth"] = c["training_flops"] / lth if c["training_flops"] is not None and lth else None
    share = any(c["flops_vs_lth"] is not None for c in cells)  # the report's % of LTH table, when it has one
    notes = list(plan.notes) + ["training FLOPs: the `ndsnn cost` model (ndsnn_cli.cost.method_cost) of each "
                                "run's recipe" + ("; % of LTH: against LTH at the recipe's length at the same "
                                                  "sparsity" if share else "")]
    return {"budgets": list(plan.budgets), "reference": plan.reference, "methods": methods, "sparsities": columns,
            "cells": cells, "notes": notes}


def _mean_if_all(values: list[Any]) -> Any:
    """The mean of a cell's per-run values (numbers, or dicts of numbers: their mean per key); None unless
    every finished run records one (summaries of older runs lack `train_wall_s` and `time_split`)."""
    if not values or any(v is None for v in values):
        return None
    if isinstance(values[0], dict):
        return {key: statistics.fmean(float(v.get(key, 0.0)) for v in values) for key in values[0]}
    return statistics.fmean(float(v) for v in values)


def _cell(budget: str, method: str, sparsity: float, specs: list[RunSpec], summaries: dict[str, dict[str, Any]],
          flops: Callable[[RunSpec], float | None], missing: str | None) -> dict[str, Any]:
    from ndsnn_cli import equal_cost

    done = [(s, summaries[s.key]) for s in specs if s.key in summaries]
    accuracies = [float(summary["test_accuracy"]) for _, summary in done]
    walls = [float(summary["wall_time_s"]) for _, summary in done]
    realised = [float(summary["sparsity"]["sparsity"]) for _, summary in done]
    run_flops = [flops(s) for s, _ in done] if done else []
    model = equal_cost.cost_model(specs[0].recipe) if specs else None
    return {"budget": budget, "method": method, "sparsity": sparsity, "runs": len(specs), "done": len(done),
            "seeds": [s.seed for s, _ in done], "run_dirs": [s.key for s in specs], "test_accuracy": accuracies,
            "accuracy_mean": statistics.fmean(accuracies) if accuracies else None,
            "accuracy_std": _std(accuracies) if accuracies else None,
            "realised_sparsity_mean": statistics.fmean(realised) if realised else None,
            "wall_time_s_mean": statistics.fmean(walls) if walls else None,
            "train_wall_s_mean": _mean_if_all([summary.get("train_wall_s") for _, summary in done]),
            "time_split_mean": _mean_if_all([summary.get("time_split") for _, summary in done]),
            "epochs": done[0][1].get("total_epochs", done[0][1]["epochs"]) if done else None,
            "length_epochs": equal_cost.length_epochs(specs[0].recipe) if specs else None,
            "steps": model.steps if model else None,
            "training_flops": (statistics.fmean(run_flops)
                               if run_flops and all(f is not None for f in run_flops) else None),
            "missing": missing}
