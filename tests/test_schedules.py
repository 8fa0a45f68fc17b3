"""Schedules are pure functions of the step, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest

from ndsnn_cli.recipe import Recipe
from ndsnn_cli.sparse.methods import build_method
from ndsnn_cli.sparse.schedules import (
    SparseSchedule,
    drop_fraction_at,
    is_update_step,
    lth_round_sparsities,
    sparsity_at,
)

COS45 = math.sqrt(2) / 2


@pytest.mark.parametrize(("step", "expected"), [
    (0, 0.5),            # before/at t0: initial
    (25, 0.73125),       # 0.9 - 0.4 * 0.75**3 = 0.9 - 0.16875
    (50, 0.85),          # 0.9 - 0.4 * 0.125
    (75, 0.89375),       # 0.9 - 0.4 * 0.015625
    (100, 0.9),          # t1: final
    (150, 0.9),          # after t1: final
])
def test_cubic_ramp_from_zero(step: int, expected: float) -> None:
    assert sparsity_at(step, 0.5, 0.9, 0, 100) == pytest.approx(expected, abs=1e-15)


def test_cubic_ramp_with_a_late_start() -> None:
    assert sparsity_at(10, 0.0, 0.8, 20, 60) == 0.0
    assert sparsity_at(20, 0.0, 0.8, 20, 60) == 0.0
    assert sparsity_at(30, 0.0, 0.8, 20, 60) == pytest.approx(0.8 - 0.8 * 0.75 ** 3, abs=1e-15)  # 0.4625
    assert sparsity_at(40, 0.0, 0.8, 20, 60) == pytest.approx(0.7, abs=1e-15)
    assert sparsity_at(60, 0.0, 0.8, 20, 60) == 0.8


@pytest.mark.parametrize(("step", "expected"), [
    (0, 0.5),
    (25, 0.005 + 0.495 * (1 + COS45) / 2),   # 0.42750893...
    (50, 0.2525),                            # cos(pi/2) = 0
    (75, 0.005 + 0.495 * (1 - COS45) / 2),   # 0.07749107...
    (100, 0.005),
    (130, 0.005),
])
def test_cosine_drop_fraction(step: int, expected: float) -> None:
    assert drop_fraction_at(step, 0.5, 0.005, 100) == pytest.approx(expected, abs=1e-15)


def test_drop_fraction_hand_values() -> None:
    assert drop_fraction_at(25, 0.5, 0.005, 100) == pytest.approx(0.4275089283, abs=1e-10)
    assert drop_fraction_at(75, 0.5, 0.005, 100) == pytest.approx(0.0774910717, abs=1e-10)
    assert drop_fraction_at(5, 0.3, 0.0, 0) == 0.0  # no update window: the minimum


def test_update_steps_are_positive_multiples_before_the_end() -> None:
    assert [s for s in range(0, 50) if is_update_step(s, 10, 35)] == [10, 20, 30]
    assert [s for s in range(0, 50) if is_update_step(s, 10, 40)] == [10, 20, 30]
    schedule = SparseSchedule(0.5, 0.9, 0, 20, 35, 10, 0.5, 0.005, "gradient")
    assert list(schedule.update_steps()) == [10, 20, 30]
    assert [s for s in range(50) if schedule.is_update_step(s)] == [10, 20, 30]
    assert schedule.sparsity(10) == pytest.approx(0.9 - 0.4 * 0.125)
    assert SparseSchedule(0.9, 0.9, 0, 0, 35, 10, 0.5, 0.005, "none").drop_fraction_at(10) == 0.0


def test_a_ramp_also_updates_at_its_end_step() -> None:
    # dT = 10 does not divide t1 = 25: without an update at t1 the last ramp update (step 20) would
    # leave the mask at s(20) = 0.9 - 0.4 * 0.2**3 = 0.8968 forever.
    ramp = SparseSchedule(0.5, 0.9, 0, 25, 35, 10, 0.5, 0.005, "gradient")
    assert ramp.update_steps() == [10, 20, 25, 30]
    assert [s for s in range(50) if ramp.is_update_step(s)] == [10, 20, 25, 30]
    assert ramp.sparsity(25) == 0.9
    gmp_to_the_end = SparseSchedule(0.0, 0.9, 0, 25, 26, 10, 0.0, 0.0, "none")  # t1 = t_end (GMP's t_end + 1)
    assert gmp_to_the_end.update_steps() == [10, 20, 25]
    fixed = SparseSchedule(0.9, 0.9, 0, 25, 35, 10, 0.5, 0.005, "gradient")  # no ramp: no extra update
    assert fixed.update_steps() == [10, 20, 30]


def test_lth_rounds_for_90_percent_at_25_percent_per_round() -> None:
    rounds = lth_round_sparsities(0.9, 0.25)
    # 1 - 0.75**8 = 0.89989 < 0.9, so a 9th round prunes the last 0.01% (clamped to 0.9)
    assert rounds == pytest.approx([0.0] + [1 - 0.75 ** r for r in range(1, 9)] + [0.9], abs=1e-12)
    assert rounds[:4] == pytest.approx([0.0, 0.25, 0.4375, 0.578125], abs=1e-15)
    assert len(rounds) == 10
    assert rounds[-1] == 0.9


def test_lth_rounds_for_99_percent_at_25_percent_per_round() -> None:
    rounds = lth_round_sparsities(0.99, 0.25)
    # ln(0.01) / ln(0.75) = 16.008: 16 geometric rounds reach 0.98998, a 17th is clamped to 0.99
    assert rounds == pytest.approx([0.0] + [1 - 0.75 ** r for r in range(1, 17)] + [0.99], abs=1e-12)
    assert len(rounds) == 18
    assert rounds[-1] == 0.99
    assert all(a < b for a, b in zip(rounds, rounds[1:], strict=False))


def test_lth_rounds_when_the_rate_hits_the_target_exactly() -> None:
    assert lth_round_sparsities(0.5, 0.5) == [0.0, 0.5]
    assert lth_round_sparsities(0.75, 0.5) == [0.0, 0.5, 0.75]


def test_method_schedules_convert_epochs_to_steps() -> None:
    recipe = Recipe().replace(train={"epochs": 4}, sparsity={
        "method": "ndsnn", "initial": 0.6, "final": 0.95, "update_every_steps": 5,
        "ramp_start_epoch": 0.5, "ramp_end_epoch": 2.0, "update_end_epoch": 3.0})
    schedule = build_method(recipe, 10).schedule
    assert schedule == SparseSchedule(0.6, 0.95, 5, 20, 30, 5, 0.5, 0.005, "gradient")
    rigl = build_method(recipe.replace(sparsity={"method": "rigl", "initial": 0.5}), 10).schedule
    assert rigl == SparseSchedule(0.95, 0.95, 0, 0, 30, 5, 0.5, 0.005, "gradient")
    set_ = build_method(recipe.replace(sparsity={"method": "set", "initial": 0.5}), 10).schedule
    assert set_.grow == "random" and set_.initial_sparsity == set_.final_sparsity == 0.95
    gmp = build_method(recipe.replace(sparsity={"method": "gmp", "initial": 0.5}), 10).schedule
    assert gmp == SparseSchedule(0.0, 0.95, 5, 20, 30, 5, 0.0, 0.0, "none")
    static = build_method(recipe.replace(sparsity={"method": "static", "initial": 0.5}), 10).schedule
    assert static.grow == "none" and list(static.update_steps()) == []
    assert build_method(recipe.replace(sparsity={"method": "dense", "initial": 0.5}), 10).schedule is None
