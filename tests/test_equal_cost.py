"""Equal-cost budgets (`equal_cost`, `prune-compare --budget`): the fitted lengths, schedules and notes.

No training here: the plans are checked against the `ndsnn cost` model that prices them, on the tiny MLP
recipe (2048 synthetic images at batch 32: 64 steps an epoch).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_toml

from ndsnn_cli import compare, equal_cost
from ndsnn_cli.errors import UserError
from ndsnn_cli.recipe import Recipe, parse_recipe
from ndsnn_cli.sparse.schedules import lth_round_sparsities

STEPS_PER_EPOCH = 64


def base_recipe(epochs: int = 3, **sparsity: Any) -> Recipe:
    return parse_recipe(tiny_toml(data={"batch_size": 32, "train_limit": 0}, train={"epochs": epochs},
                                  sparsity=sparsity or {"method": "dense"}))


def specs_of(plan: compare.Plan, row: str, sparsity: float, budget: str) -> list[compare.RunSpec]:
    return [s for s in plan.runs if s.row == row and s.sparsity == sparsity and budget in s.budgets]


def flops_at(base: Recipe, method: str, sparsity: float, epochs: int) -> float:
    recipe = compare.run_recipe(equal_cost.with_length(base, method, epochs), method, sparsity, base.seed)[0]
    flops = equal_cost.training_flops(recipe)
    assert flops is not None
    return flops


# ---------------------------------------------------------------- parsing and refusing


def test_budgets_parse_in_order_without_repeats_and_unknown_ones_are_user_errors() -> None:
    assert equal_cost.parse_budgets(" epochs, FLOPS ,epochs") == ["epochs", "flops"]
    with pytest.raises(UserError, match=r"--budget: unknown 'joules' \(known: epochs, flops, steps, wall\)"):
        equal_cost.parse_budgets("epochs,joules")
    with pytest.raises(UserError, match="--budget is empty"):
        equal_cost.parse_budgets(" , ")
    with pytest.raises(UserError, match=r"--budget-ref: unknown 'gmp-pub'"):
        compare.parse_reference("gmp-pub")
    assert compare.parse_reference("RigL-pub") == ("rigl", "rigl-pub")
    with pytest.raises(UserError, match="add epochs"):  # wall measures seconds per step on the epochs runs
        compare.plan_runs(base_recipe(), ["ndsnn", "rigl"], [0.9], 1, "out", budgets=["wall"])


@pytest.mark.parametrize(("args", "message"), [
    (("--budget", "flops,joules"), "--budget: unknown 'joules' (known: epochs, flops, steps, wall)"),
    (("--budget", "flops", "--budget-ref", "nope"), "--budget-ref: unknown 'nope'"),
])
def test_bad_budget_options_exit_2_with_one_line(tmp_path: Path, run_main: Any, args: tuple[str, ...],
                                                 message: str) -> None:
    recipe_path = tmp_path / "r.toml"
    recipe_path.write_text(tiny_toml())
    code, out, err = run_main("prune-compare", str(recipe_path), *args, "--out", str(tmp_path / "o"))
    assert code == 2 and message in err and "Traceback" not in err + out
    assert not (tmp_path / "o").exists()  # refused before any run directory is made


# ---------------------------------------------------------------- schedules and fitting


def test_schedule_keeps_its_fraction_of_training_and_lth_scales_per_round() -> None:
    base = base_recipe(4, method="ndsnn", ramp_start_epoch=0.0, ramp_end_epoch=2.0, update_end_epoch=3.0,
                       update_every_steps=10)
    longer = equal_cost.with_length(base, "ndsnn", 10)
    sp = longer.sparsity
    assert longer.train.epochs == 10
    assert (sp.ramp_start_epoch, sp.ramp_end_epoch, sp.update_end_epoch) == (0.0, 5.0, 7.5)
    assert sp.update_every_steps == 10  # ΔT stays in steps
    fractions = equal_cost.with_length(base_recipe(4, method="rigl"), "rigl", 12).sparsity
    assert (fractions.ramp_end_epoch, fractions.update_end_epoch) == (-1.0, -1.0)  # already fractions of training
    lth = equal_cost.with_length(base, "lth", 2)
    assert (lth.sparsity.round_epochs, lth.train.epochs) == (2, 4)
    assert equal_cost.length_epochs(compare.run_recipe(lth, "lth", 0.9, 0)[0]) == 2


def test_fit_length_takes_the_whole_epochs_nearest_the_target_in_ratio() -> None:
    base = base_recipe(3)

    def make(epochs: int) -> Recipe:
        return base.replace(train={"epochs": epochs})

    def measure(recipe: Recipe) -> float:
        return 10.0 * recipe.train.epochs

    for target, epochs in [(35.0, 4), (34.0, 3), (30.0, 3), (12.0, 1), (8.5, 1), (14.1, 1), (14.2, 2), (630.0, 63)]:
        fit = equal_cost.fit_length(make, measure, target, start_epochs=3)
        # nearest in ratio: |log(cost/target)| no larger than either neighbour's
        assert fit.epochs == epochs, target
        assert fit.ratio == pytest.approx(10.0 * epochs / target)
        for other in (epochs - 1, epochs + 1):
            if other >= 1:
                assert abs(math.log(fit.ratio)) <= abs(math.log(10.0 * other / target)) + 1e-12
    with pytest.raises(equal_cost.NoFit, match=r"shortest schedule \(1 epoch\) costs 1.43x the budget"):
        equal_cost.fit_length(make, measure, 7.0, start_epochs=3)  # 1 epoch: > FIT_TOLERANCE x the target
    with pytest.raises(equal_cost.NoFit, match=r"192 epochs \(64x the recipe's\) still cost"):
        equal_cost.fit_length(make, measure, 1e6, start_epochs=3)
    with pytest.raises(equal_cost.NoFit, match="reference's cost is not known"):
        equal_cost.fit_length(make, measure, 0.0, start_epochs=3)


# ---------------------------------------------------------------- plans at equal cost


def test_flops_budget_trains_each_method_the_epochs_nearest_the_references_flops(tmp_path: Path) -> None:
    base = base_recipe(3)
    methods, sparsities = ["ndsnn", "rigl", "set", "gmp", "lth", "dense"], [0.9, 0.99]
    plan = compare.plan_runs(base, methods, sparsities, 2, tmp_path, budgets=["epochs", "flops"])
    for sparsity in sparsities:
        reference = specs_of(plan, "ndsnn", sparsity, "flops")
        assert [s.length for s in reference] == ["", ""]  # the reference is its own recipe-length runs
        assert all(s.budgets == ("epochs", "flops") for s in reference)  # trained once, in both tables
        target = equal_cost.training_flops(reference[0].recipe)
        assert target == flops_at(base, "ndsnn", sparsity, 3)
        for method in ("rigl", "set", "gmp"):
            runs = specs_of(plan, method, sparsity, "flops")
            assert [s.seed for s in runs] == [0, 1]
            epochs = equal_cost.length_epochs(runs[0].recipe)
            assert all(s.recipe.train.epochs == epochs for s in runs)
            realised = abs(math.log(flops_at(base, method, sparsity, epochs) / target))
            for other in (epochs - 1, epochs + 1):
                if other >= 1:
                    assert realised <= abs(math.log(flops_at(base, method, sparsity, other) / target)), (method, other)
            if epochs != 3:
                assert runs[0].run_dir == tmp_path / f"{method}-s{sparsity:g}-seed0-e{epochs}"
                assert runs[0].budgets == ("flops",) and runs[0].recipe.name.endswith(f"seed0-e{epochs}")
        # RigL and SET hold the final sparsity from step 0: far cheaper per epoch, so they train longer
        assert specs_of(plan, "rigl", sparsity, "flops")[0].recipe.train.epochs > 3
        assert specs_of(plan, "set", sparsity, "flops")[0].recipe.train.epochs > 3
        # LTH's shortest schedule (1 epoch a round) costs several times NDSNN's 3 epochs: reported, not run
        assert not specs_of(plan, "lth", sparsity, "flops")
        assert plan.missing[("flops", "lth", sparsity)].startswith("its shortest schedule (1 epoch per round) costs")
    assert plan.missing[("flops", "dense", 0.0)].startswith("dense trains at the recipe's length only")
    note = next(n for n in plan.notes if n.startswith("budget flops"))
    assert "lth not run (its shortest schedule" in note
    rigl99 = specs_of(plan, "rigl", 0.99, "flops")[0].recipe
    model = equal_cost.cost_model(rigl99)
    assert model is not None and f"rigl {rigl99.train.epochs} epoch(s) ({model.steps} steps, {model.flops:.3g} FLOPs)" \
        in note
    assert len({s.key for s in plan.runs}) == len(plan.runs) == len({s.run_dir for s in plan.runs})


def test_steps_budget_keeps_every_method_at_the_recipes_length_and_fits_lth_per_round(tmp_path: Path) -> None:
    plan = compare.plan_runs(base_recipe(3), ["ndsnn", "rigl", "set"], [0.9], 1, tmp_path, budgets=["epochs", "steps"])
    assert [(s.key, s.budgets) for s in plan.runs] == [(f"{m}-s0.9-seed0", ("epochs", "steps"))
                                                      for m in ("ndsnn", "rigl", "set")]
    # 40 epochs of NDSNN = 2560 steps. LTH to 0.5 has 4 rounds (the dense one included); LTH-SNN rewinds the
    # 3 later rounds to epoch min(20, e // 10) = 1, so e epochs a round cost e + 3 (e - 1) epochs of steps:
    # e = 10 -> 2368 steps (0.925x), e = 11 -> 2624 (1.025x), the nearer
    base = base_recipe(40)
    rounds = len(lth_round_sparsities(0.5, 0.25))
    assert rounds == 4
    plan = compare.plan_runs(base, ["ndsnn", "lth"], [0.5], 1, tmp_path, budgets=["epochs", "steps"])
    (lth,) = specs_of(plan, "lth", 0.5, "steps")
    assert lth.length == "-r11" and lth.recipe.sparsity.round_epochs == 11 and lth.recipe.train.epochs == 40
    assert lth.recipe.sparsity.rewind_epoch == 1
    model = equal_cost.cost_model(lth.recipe)
    assert model is not None and model.steps == (11 + (rounds - 1) * 10) * STEPS_PER_EPOCH == 2624
    assert "lth 11 epoch(s) per round (2624 steps" in next(n for n in plan.notes if n.startswith("budget steps"))


def test_budget_ref_can_be_a_published_baseline(tmp_path: Path) -> None:
    base = base_recipe(3)
    plan = compare.plan_runs(base, ["ndsnn", "rigl"], [0.9], 1, tmp_path, baselines="published",
                             budgets=["epochs", "flops"], budget_ref="rigl-pub")
    (reference,) = specs_of(plan, "rigl-pub", 0.9, "flops")
    assert reference.length == "" and plan.reference == "rigl-pub"
    target = equal_cost.training_flops(reference.recipe)
    (ndsnn,) = specs_of(plan, "ndsnn", 0.9, "flops")
    # RigL's published setting keeps the MLP's large first layer dense: it costs more than NDSNN an epoch here
    epochs = equal_cost.length_epochs(ndsnn.recipe)
    assert target is not None and epochs > 3 and ndsnn.key == f"ndsnn-s0.9-seed0-e{epochs}"
    realised = abs(math.log(flops_at(base, "ndsnn", 0.9, epochs) / target))
    assert realised <= min(abs(math.log(flops_at(base, "ndsnn", 0.9, e) / target)) for e in (epochs - 1, epochs + 1))
    assert any(n.startswith("budget flops (each row trained the whole epochs nearest rigl-pub's training FLOPs")
               for n in plan.notes)


def test_wall_budget_uses_measured_seconds_per_step_train_wall_first(tmp_path: Path) -> None:
    base = base_recipe(3)
    plan = compare.plan_runs(base, ["ndsnn", "rigl"], [0.9], 2, tmp_path, budgets=["epochs", "wall"])
    assert plan.missing[("wall", "rigl", 0.9)] == ("waits for the recipe-length runs of ndsnn at 0.9 and rigl at 0.9 "
                                                   "to measure seconds per step")
    assert plan.missing[("wall", "ndsnn", 0.9)] == ("waits for the recipe-length runs of ndsnn at 0.9 "
                                                    "to measure seconds per step")  # the reference named once
    steps = 3 * STEPS_PER_EPOCH
    summaries = {  # train_wall_s (training only) where recorded; the older summaries' wall_time_s otherwise
        "ndsnn-s0.9-seed0": {"train_wall_s": 9.6, "wall_time_s": 20.0},
        "ndsnn-s0.9-seed1": {"wall_time_s": 19.2},
        "rigl-s0.9-seed0": {"train_wall_s": 4.8, "wall_time_s": 12.0},
        "rigl-s0.9-seed1": {"train_wall_s": 4.8, "wall_time_s": 12.0},
    }
    measured = compare.measured_seconds_per_step(plan, summaries)
    assert measured[("ndsnn", 0.9)] == pytest.approx((9.6 + 19.2) / 2 / steps)
    assert measured[("rigl", 0.9)] == pytest.approx(4.8 / steps)
    wall = compare.plan_runs(base, ["ndsnn", "rigl"], [0.9], 2, tmp_path, budgets=["epochs", "wall"],
                             seconds_per_step=measured)
    assert not wall.missing
    # RigL's step is 3x faster than NDSNN's measured mean: 9 epochs cost NDSNN's 3
    assert [s.key for s in specs_of(wall, "rigl", 0.9, "wall")] == ["rigl-s0.9-seed0-e9", "rigl-s0.9-seed1-e9"]
    assert [s.key for s in specs_of(wall, "ndsnn", 0.9, "wall")] == ["ndsnn-s0.9-seed0", "ndsnn-s0.9-seed1"]
