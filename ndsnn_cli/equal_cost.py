"""Equal training cost: how long each method trains so that it costs what a reference method costs.

The sparse-training literature compares methods at equal cost as well as at equal epochs (RigL, Evci et
al. ICML 2020, trains its baselines 2x and 5x longer so that FLOPs match). A budget is a measure of a run's
cost and a rule for scaling a method's training length to a target:

- `epochs`: the recipe's length for every method (LTH: `round_epochs` per round), as before;
- `steps`: equal optimizer steps (LTH's rounds summed);
- `flops`: equal training FLOPs of the `ndsnn cost` model of each method's own recipe;
- `wall`: equal seconds, from each method's measured seconds per step.

Lengths are whole epochs (the trainer's unit; LTH: whole epochs per round), the one nearest the target;
the realised ratio to the target is reported, never hidden. A method's schedule scales with its length by
its own rule: t0, t1 and t_end stay the same fractions of training (the -1 defaults already are; explicit
epochs are multiplied), ΔT stays in steps (RigL's extended runs keep ΔT = 100 and t_end = 75%), the
published baselines re-derive their settings from the scaled recipe, LTH scales every round and keeps
LTH-SNN's rewind rule. A length that cannot reach the budget (LTH's shortest schedule, 1 epoch per round,
still costs more) is reported as such, not run at another cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ndsnn_cli.errors import UserError
from ndsnn_cli.recipe import Recipe

BUDGETS = ("epochs", "flops", "steps", "wall")
BUDGET_UNITS = {"epochs": "epochs", "flops": "training FLOPs", "steps": "optimizer steps", "wall": "seconds"}
MAX_SCALE = 64        # a budget never trains a method more than 64x the recipe's epochs
FIT_TOLERANCE = 1.25  # the shortest length (1 epoch) is accepted up to 25% above the budget, no further


def parse_budgets(text: str) -> list[str]:
    """`"epochs,flops"` -> ["epochs", "flops"]; an unknown name is a UserError listing the known ones."""
    budgets = [b.strip().lower() for b in text.split(",") if b.strip()]
    if not budgets:
        raise UserError("--budget is empty (known: " + ", ".join(BUDGETS) + ")")
    for budget in budgets:
        if budget not in BUDGETS:
            raise UserError(f"--budget: unknown '{budget}' (known: {', '.join(BUDGETS)})")
    return list(dict.fromkeys(budgets))


def length_epochs(recipe: Recipe) -> int:
    """A run's training length in the unit a budget scales: epochs, or LTH's epochs per round."""
    if recipe.sparsity.method == "lth":
        return recipe.sparsity.round_epochs or recipe.train.epochs
    return recipe.train.epochs


def with_length(base: Recipe, method: str, epochs: int) -> Recipe:
    """`base` (before the method is switched in) with `method` training `epochs` (LTH: per round), its
    schedule scaled with it: explicit t0/t1/t_end epochs keep their fraction of training, ΔT its steps."""
    if method == "lth":
        return base.replace(sparsity={"round_epochs": epochs})
    factor = epochs / base.train.epochs
    sp = base.sparsity
    scaled = {key: getattr(sp, key) * factor for key in ("ramp_start_epoch", "ramp_end_epoch", "update_end_epoch")
              if getattr(sp, key) > 0}  # -1 (a fraction of training already) and 0 need no scaling
    return base.replace(train={"epochs": epochs}, sparsity=scaled)


# ---------------------------------------------------------------- the cost of one run's recipe


@dataclass(frozen=True)
class RunCostModel:
    """What the `ndsnn cost` model says one recipe costs: its optimizer steps and training FLOPs."""

    steps: int
    flops: float


_model_cache: dict[str, RunCostModel | None] = {}


def cost_model(recipe: Recipe) -> RunCostModel | None:
    """Steps and training FLOPs of the recipe's own method (`cost.method_cost`); None where the model cannot
    say (e.g. more steps than it integrates). Seed and name do not change them: cached without them."""
    key = recipe.replace(name="cost", seed=0).to_toml()
    if key not in _model_cache:
        from ndsnn_cli import cost
        from ndsnn_cli.data import train_size

        try:
            mc = cost.method_cost(recipe, recipe.sparsity.method, cost.model_layers(recipe), train_size(recipe.data))
            _model_cache[key] = RunCostModel(mc.total_steps, mc.train_flops)
        except UserError:
            _model_cache[key] = None
    return _model_cache[key]


def training_flops(recipe: Recipe) -> float | None:
    model = cost_model(recipe)
    return None if model is None else model.flops


Measure = Callable[[Recipe], float | None]


def measure_for(budget: str, seconds_per_step: float | None = None) -> Measure:
    """The cost of a recipe under `budget`: its steps, FLOPs, or steps x measured seconds per step."""
    def steps(recipe: Recipe) -> float | None:
        model = cost_model(recipe)
        return None if model is None else float(model.steps)

    if budget == "steps":
        return steps
    if budget == "flops":
        return training_flops
    if budget == "wall":
        if seconds_per_step is None:
            raise ValueError("the wall budget needs a measured seconds per step")
        return lambda recipe: None if (s := steps(recipe)) is None else s * seconds_per_step
    if budget == "epochs":
        return lambda recipe: float(length_epochs(recipe))
    raise ValueError(f"unknown budget {budget!r}")


# ---------------------------------------------------------------- fitting a length to a budget


@dataclass(frozen=True)
class Fit:
    """The whole-epoch length nearest a budget, its recipe and what it costs against the target."""

    epochs: int
    recipe: Recipe
    cost: float
    target: float

    @property
    def ratio(self) -> float:
        return self.cost / self.target


class NoFit(Exception):
    """The method's length cannot reach the budget (the reason is the message, for the report's notes)."""


def fit_length(make: Callable[[int], Recipe], measure: Measure, target: float, start_epochs: int,
               unit: str = "epoch") -> Fit:
    """The length e >= 1 (whole epochs) whose cost `measure(make(e))` is nearest `target` (in ratio).

    Cost grows with length (more steps of the same schedule, scaled), so the search doubles up, then bisects
    to the first length at or above the target and takes the nearer of it and the one before (`unit` names
    the length in messages, e.g. "epoch per round"). Raises NoFit
    where even one epoch costs more than FIT_TOLERANCE x the target, or MAX_SCALE x `start_epochs` less.
    """
    if not target > 0:
        raise NoFit("the reference's cost is not known")
    costs: dict[int, tuple[Recipe, float]] = {}

    def at(epochs: int) -> float:
        if epochs not in costs:
            try:
                recipe = make(epochs)
            except UserError as exc:
                raise NoFit(f"{epochs} epoch(s) is not a valid recipe ({exc})") from None
            value = measure(recipe)
            if value is None:
                raise NoFit(f"the cost model cannot price {epochs} epoch(s)")
            costs[epochs] = (recipe, value)
        return costs[epochs][1]

    limit = MAX_SCALE * max(1, start_epochs)
    low, high = 1, max(1, start_epochs)
    if at(1) >= target:
        high = 1
    else:
        while at(high) < target:
            if high >= limit:
                raise NoFit(f"{high} epochs ({MAX_SCALE}x the recipe's) still cost {at(high) / target:.2f}x "
                            "the budget")
            low, high = high, min(limit, 2 * high)
        while high - low > 1:  # invariant: at(low) < target <= at(high)
            mid = (low + high) // 2
            low, high = (mid, high) if at(mid) < target else (low, mid)
    best = min({low, high}, key=lambda e: abs(math.log(at(e) / target)) if at(e) > 0 else math.inf)
    if best == 1 and at(1) > FIT_TOLERANCE * target:
        raise NoFit(f"its shortest schedule (1 {unit}) costs {at(1) / target:.2f}x the budget")
    recipe, value = costs[best]
    return Fit(best, recipe, value, target)
