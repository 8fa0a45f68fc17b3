"""Sparse methods on a small spiking CNN with real gradients: the drop-and-grow bookkeeping is exact."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from ndsnn_cli.evaluation import spiking_loss
from ndsnn_cli.recipe import Recipe
from ndsnn_cli.snn.models import NeuronConfig, create_model
from ndsnn_cli.sparse import methods
from ndsnn_cli.sparse.masks import layer_counts
from ndsnn_cli.sparse.methods import MaskUpdate, SparseMethod, build_method, drop_and_grow
from ndsnn_cli.sparse.schedules import SparseSchedule

STEPS_PER_EPOCH = 10
TOTAL_STEPS = 30
# t0 = 0, t1 = step 10, t_end = step 20, updates every 2 steps: ramp updates 2..10, exploration 12..18.
BASE = Recipe().replace(seed=3, train={"epochs": 3}, sparsity={
    "initial": 0.5, "final": 0.9, "update_every_steps": 2, "ramp_end_epoch": 1.0, "update_end_epoch": 2.0})


@dataclass
class Step:
    step: int
    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor]
    update: MaskUpdate | None
    weights_before: dict[str, torch.Tensor]   # after the optimizer step, before the mask update
    momentum_before: dict[str, torch.Tensor]


def run(method_name: str, **sparsity: object) -> tuple[SparseMethod, list[Step]]:
    """Train a tiny spiking CNN on fixed random data for 30 SGD steps, recording every mask step."""
    recipe = BASE.replace(sparsity={"method": method_name, **sparsity})
    torch.manual_seed(0)
    model = create_model("scnn", num_classes=10, in_channels=1, image_size=8, neuron=NeuronConfig(timesteps=2))
    method = build_method(recipe, STEPS_PER_EPOCH)
    method.setup(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(16, 1, 8, 8, generator=generator) * 2
    labels = torch.randint(0, 10, (16,), generator=generator)
    history = []
    for step in range(1, TOTAL_STEPS + 1):
        before = {n: m.clone() for n, m in method.masks.masks.items()}
        optimizer.zero_grad()
        spiking_loss(model(images), labels).backward()
        optimizer.step()
        grads = {n: p.grad.clone() for n, p in method.masks.params.items()}
        weights_before, momentum_before = weights_and_momentum(method, optimizer)
        update = method.after_step(step, optimizer)
        history.append(Step(step, before, {n: m.clone() for n, m in method.masks.masks.items()}, grads,
                            *weights_and_momentum(method, optimizer), update, weights_before, momentum_before))
    return method, history


def weights_and_momentum(method: SparseMethod, optimizer: torch.optim.Optimizer
                         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return ({n: p.detach().clone() for n, p in method.masks.params.items()},
            {n: optimizer.state[p]["momentum_buffer"].clone() for n, p in method.masks.params.items()})


@pytest.fixture(scope="module")
def ndsnn() -> tuple[SparseMethod, list[Step]]:
    return run("ndsnn")


@pytest.fixture(scope="module")
def rigl() -> tuple[SparseMethod, list[Step]]:
    return run("rigl")


def nnz(masks: dict[str, torch.Tensor]) -> dict[str, int]:
    return {n: int(m.sum()) for n, m in masks.items()}


def expected_counts(method: SparseMethod, sparsity: float) -> dict[str, int]:
    return layer_counts(method.masks.params, 1 - sparsity, method.distribution)


def test_ndsnn_starts_at_the_initial_sparsity_with_exact_erk_counts(ndsnn: tuple[SparseMethod, list[Step]]) -> None:
    method, history = ndsnn
    assert nnz(history[0].before) == expected_counts(method, 0.5)
    assert [h.step for h in history if h.update] == [2, 4, 6, 8, 10, 12, 14, 16, 18]


def test_ndsnn_drops_more_than_it_grows_until_final_sparsity(ndsnn: tuple[SparseMethod, list[Step]]) -> None:
    method, history = ndsnn
    ramp = [h for h in history if h.update and h.step <= 10]
    assert len(ramp) == 5
    for h in ramp:
        before, after = nnz(h.before), nnz(h.after)
        for name, layer in h.update.layers.items():
            # per layer: dropped - grown is exactly the fall of the active count
            assert layer["dropped"] - layer["grown"] == before[name] - after[name]
            assert layer["active"] == after[name]
        assert h.update.dropped - h.update.grown == sum(before.values()) - sum(after.values())
        assert h.update.dropped > h.update.grown > 0
        # the realised per-layer count is the distribution's exact count at the scheduled sparsity
        assert after == expected_counts(method, h.update.target_sparsity)
        assert h.update.sparsity == pytest.approx(1 - sum(after.values()) / sum(m.numel() for m in h.after.values()))
    targets = [h.update.target_sparsity for h in ramp]
    assert targets == pytest.approx([0.9 - 0.4 * (1 - s / 10) ** 3 for s in (2, 4, 6, 8, 10)], abs=1e-15)
    assert nnz(ramp[-1].after) == expected_counts(method, 0.9)


@pytest.mark.parametrize("method_name", ["ndsnn", "gmp"])
def test_ramp_reaches_final_sparsity_when_update_interval_does_not_divide_ramp_end(method_name: str) -> None:
    method, history = run(method_name, update_every_steps=3)  # t1 = 10: updates at 3, 6, 9, 10 (t1), 12, ...
    assert [h.step for h in history if h.update] == [3, 6, 9, 10, 12, 15, 18]
    at_t1 = next(h for h in history if h.step == 10)
    assert at_t1.update.target_sparsity == 0.9
    assert nnz(history[-1].after) == expected_counts(method, 0.9)


def test_ndsnn_explores_at_fixed_sparsity_after_ramp_end(ndsnn: tuple[SparseMethod, list[Step]]) -> None:
    method, history = ndsnn
    explore = [h for h in history if h.update and 10 < h.step < 20]
    assert [h.step for h in explore] == [12, 14, 16, 18]
    final_counts = expected_counts(method, 0.9)
    for h in explore:
        assert h.update.dropped == h.update.grown > 0
        assert all(layer["dropped"] == layer["grown"] for layer in h.update.layers.values())
        assert nnz(h.after) == final_counts
    assert any(not torch.equal(h.before[n], h.after[n]) for h in explore for n in h.after)  # masks do move


def test_ndsnn_masks_are_frozen_after_update_end(ndsnn: tuple[SparseMethod, list[Step]]) -> None:
    _, history = ndsnn
    frozen = [h for h in history if h.step >= 19]
    assert all(h.update is None for h in frozen)
    for h in frozen:
        assert all(torch.equal(h.after[n], frozen[0].before[n]) for n in h.after)


def test_grown_weights_and_momentum_are_zero_right_after_the_update(ndsnn: tuple[SparseMethod, list[Step]]) -> None:
    _, history = ndsnn
    newly_active_total = 0
    for h in (h for h in history if h.update):
        for name in h.after:
            newly = h.after[name] & ~h.before[name]
            newly_active_total += int(newly.sum())
            assert torch.equal(h.weights[name][newly], torch.zeros(int(newly.sum())))
            assert torch.equal(h.momentum[name][newly], torch.zeros(int(newly.sum())))
            # and everything outside the mask is zero as well
            assert not h.weights[name][~h.after[name]].any()
            assert not h.momentum[name][~h.after[name]].any()
    assert newly_active_total > 0


def test_grown_positions_have_the_largest_gradient_among_inactive(ndsnn: tuple[SparseMethod, list[Step]]) -> None:
    _, history = ndsnn
    checked = 0
    for h in (h for h in history if h.update):
        for name in h.after:
            newly = h.after[name] & ~h.before[name]
            if not newly.any():
                continue
            score = h.grads[name].abs()
            # every position left inactive scores no higher than any position that grew
            assert score[newly].min() >= score[~h.after[name]].max()
            checked += 1
    assert checked >= 10


def test_drops_are_the_smallest_magnitudes() -> None:
    weight = torch.tensor([0.9, -0.1, 0.5, 0.0, -0.7, 0.2, 0.0, 0.0])
    mask = torch.tensor([True, True, True, False, True, True, False, False])
    scores = torch.tensor([0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 1.0, 2.0])
    # k = 5 active, k' = 4, d = 0.5: g = ceil(2) = 2 grow, 5 - 4 + 2 = 3 drop (0.1, 0.2, 0.5)
    change = drop_and_grow(weight, mask, 4, 0.5, scores)
    assert change.dropped == 3
    assert change.grown.tolist() == [False, False, False, True, False, False, False, True]
    assert change.mask.tolist() == [True, False, False, True, True, False, False, True]
    gmp = drop_and_grow(weight, mask, 3, 0.5, None)
    assert gmp.dropped == 2 and not gmp.grown.any()
    assert gmp.mask.tolist() == [True, False, True, False, True, False, False, False]


def test_random_growth_differs_from_gradient_growth_and_is_seeded(ndsnn: tuple[SparseMethod, list[Step]]) -> None:
    _, gradient = ndsnn
    _, random_a = run("ndsnn", grow="random")
    _, random_b = run("ndsnn", grow="random")
    assert all(torch.equal(a.after[n], b.after[n]) for a, b in zip(random_a, random_b, strict=True) for n in a.after)
    assert any(not torch.equal(a.after[n], g.after[n]) for a, g in zip(random_a, gradient, strict=True)
               for n in a.after)
    # both keep the same counts: growth rule changes positions, never the schedule
    assert [nnz(a.after) for a in random_a] == [nnz(g.after) for g in gradient]


def test_rigl_keeps_the_exact_count_and_moves_the_mask(rigl: tuple[SparseMethod, list[Step]]) -> None:
    method, history = rigl
    counts = expected_counts(method, 0.9)
    assert nnz(history[0].before) == counts
    updates = [h for h in history if h.update]
    assert len(updates) == 9
    for h in history:
        assert nnz(h.after) == counts
    for h in updates:
        assert h.update.dropped == h.update.grown > 0
        assert h.update.target_sparsity == 0.9
        for name in h.after:
            newly = h.after[name] & ~h.before[name]
            if newly.any():
                assert h.grads[name].abs()[newly].min() >= h.grads[name].abs()[~h.after[name]].max()
    assert any(not torch.equal(h.before[n], h.after[n]) for h in updates for n in h.after)


def test_set_grows_at_random_with_the_exact_count(rigl: tuple[SparseMethod, list[Step]]) -> None:
    method, history = run("set")
    _, rigl_history = rigl
    counts = expected_counts(method, 0.9)
    assert all(nnz(h.after) == counts for h in history)
    updates = [h for h in history if h.update]
    assert all(h.update.dropped == h.update.grown > 0 for h in updates)
    # random growth picks some positions whose gradient is below an inactive one's
    beaten = sum(
        int(h.grads[n].abs()[h.after[n] & ~h.before[n]].min() < h.grads[n].abs()[~h.after[n]].max())
        for h in updates for n in h.after if (h.after[n] & ~h.before[n]).any())
    assert beaten > 0
    assert any(not torch.equal(a.after[n], b.after[n])
               for a, b in zip(history, rigl_history, strict=True) for n in a.after)


def test_gmp_never_grows_and_follows_the_cubic_ramp() -> None:
    method, history = run("gmp")
    assert all(bool(m.all()) for m in history[0].before.values())  # dense start
    updates = [h for h in history if h.update]
    for h in updates:
        assert h.update.grown == 0
        assert all(layer["grown"] == 0 for layer in h.update.layers.values())
        assert not any((h.after[n] & ~h.before[n]).any() for n in h.after)  # a pruned weight never returns
        assert h.update.dropped == sum(nnz(h.before).values()) - sum(nnz(h.after).values())
        assert h.update.target_sparsity == pytest.approx(0.9 * (1 - (1 - min(h.step, 10) / 10) ** 3), abs=1e-15)
        if h.step <= 10:
            assert nnz(h.after) == expected_counts(method, h.update.target_sparsity)
            assert h.update.dropped > 0
    assert nnz(history[-1].after) == expected_counts(method, 0.9)


def test_static_mask_never_changes() -> None:
    method, history = run("static")
    counts = expected_counts(method, 0.9)
    assert all(h.update is None for h in history)
    first = history[0].before
    assert nnz(first) == counts
    assert all(torch.equal(h.after[n], first[n]) for h in history for n in first)
    assert all(not h.weights[n][~first[n]].any() for h in history for n in first)


def test_dense_method_has_no_masks() -> None:
    method = build_method(BASE, STEPS_PER_EPOCH)
    model = create_model("mlp", num_classes=10, in_channels=1, image_size=8)
    method.setup(model)
    assert method.masks is None
    assert method.after_step(2, torch.optim.SGD(model.parameters(), lr=0.1)) is None


def test_realised_sparsity_is_exact_per_layer(ndsnn: tuple[SparseMethod, list[Step]]) -> None:
    method, _ = ndsnn
    report = method.masks.report()
    counts = expected_counts(method, 0.9)
    for name, layer in report["layers"].items():
        assert layer["nnz"] == counts[name] == int(method.masks.masks[name].sum())
        assert not method.masks.params[name][~method.masks.masks[name]].any()
        assert layer["sparsity"] == 1 - counts[name] / layer["numel"]
    total = sum(layer["numel"] for layer in report["layers"].values())
    assert report["sparsity"] == 1 - sum(counts.values()) / total
    assert abs(sum(counts.values()) - 0.1 * total) <= len(counts) / 2


AmpStep = tuple[int, dict[str, torch.Tensor], MaskUpdate | None]  # (step, masks before it, its update)


def amp_run(sparsity: dict[str, object], overflow_at: Callable[[SparseSchedule], set[int]],
            last_step: Callable[[SparseSchedule], int]) -> tuple[SparseMethod, list[AmpStep]]:
    """Train as AMP does: at the `overflow_at` steps a gradient holds inf and the optimizer step is skipped."""
    recipe = BASE.replace(sparsity=sparsity)
    torch.manual_seed(0)
    model = create_model("scnn", num_classes=10, in_channels=1, image_size=8, neuron=NeuronConfig(timesteps=2))
    method = build_method(recipe, STEPS_PER_EPOCH)
    method.setup(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    images, labels = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    overflows, history = overflow_at(method.schedule), []
    for step in range(1, last_step(method.schedule) + 1):
        optimizer.zero_grad()
        spiking_loss(model(images), labels).backward()
        if step in overflows:
            next(iter(method.masks.params.values())).grad[0].fill_(float("inf"))
        else:
            optimizer.step()
        before = {n: m.clone() for n, m in method.masks.masks.items()}
        history.append((step, before, method.after_step(step, optimizer)))
    return method, history


def test_an_update_skipped_for_non_finite_gradients_runs_at_the_next_finite_step() -> None:
    """AMP skips steps with inf gradients; the ramp's update at t1 must still happen, one step later."""
    method, history = amp_run({"method": "ndsnn"}, lambda s: {s.ramp_end_step}, lambda s: s.ramp_end_step + 1)
    ramp_end = method.schedule.ramp_end_step
    assert history[ramp_end - 1][2] is None
    update = history[-1][2]
    assert update is not None and update.step == ramp_end + 1 and not method.pending_update
    assert nnz(method.masks.masks) == expected_counts(method, 0.9)


@pytest.mark.parametrize("method_name", ["set", "rigl", "ndsnn", "gmp"])
def test_weights_active_before_and_after_an_update_keep_their_value_and_momentum(method_name: str) -> None:
    """Regression: an update used to zero positions it dropped and regrew at once (still active)."""
    _, history = run(method_name)
    kept_total = 0
    for h in (h for h in history if h.update):
        for name in h.after:
            kept = h.before[name] & h.after[name]
            kept_total += int(kept.sum())
            assert torch.equal(h.weights[name][kept], h.weights_before[name][kept]), (h.step, name)
            assert torch.equal(h.momentum[name][kept], h.momentum_before[name][kept]), (h.step, name)
    assert kept_total > 0


@pytest.mark.parametrize("method_name", ["set", "rigl", "ndsnn", "gmp"])
def test_update_records_count_only_positions_that_left_or_entered_the_mask(method_name: str) -> None:
    method, history = run(method_name)
    updates = [h for h in history if h.update]
    assert [h.step for h in updates] == [s for s in method.schedule.update_steps() if s <= len(history)]
    assert sum(h.update.dropped for h in updates) > 0  # the records below describe real mask changes
    assert (sum(h.update.grown for h in updates) > 0) == (method_name != "gmp")
    for h in updates:
        for name, layer in h.update.layers.items():
            assert layer["dropped"] == int((h.before[name] & ~h.after[name]).sum())
            assert layer["grown"] == int((h.after[name] & ~h.before[name]).sum())
        assert h.update.dropped == sum(layer["dropped"] for layer in h.update.layers.values())
        assert h.update.grown == sum(layer["grown"] for layer in h.update.layers.values())


@pytest.mark.parametrize("method_name", ["set", "rigl", "ndsnn"])
def test_a_layer_that_erk_makes_dense_is_untouched_by_updates(method_name: str) -> None:
    """At s = 0.5 ERK keeps the small encoder conv fully dense: updates must neither move nor wipe it."""
    method, history = run(method_name, final=0.5, initial=0.5)
    dense_layers = [n for n, m in history[0].before.items() if bool(m.all())]
    assert "encoder.0.weight" in dense_layers
    updates = [h for h in history if h.update]
    assert updates
    for h in updates:
        for name in dense_layers:
            assert bool(h.after[name].all())
            assert h.update.layers[name]["dropped"] == h.update.layers[name]["grown"] == 0
            assert torch.equal(h.weights[name], h.weights_before[name])
            assert torch.equal(h.momentum[name], h.momentum_before[name])


def test_an_update_postponed_to_update_end_is_dropped_there_masks_stay_frozen() -> None:
    """An exploration update postponed by an AMP-skipped step must not run at or after t_end."""
    # rigl updates every 2 steps before t_end = 20: the last update step (18) and the one after overflow
    method, history = amp_run({"method": "rigl"}, lambda s: {s.update_end_step - 2, s.update_end_step - 1},
                              lambda s: s.update_end_step + 2)
    end = method.schedule.update_end_step
    assert method.schedule.is_update_step(end - 2) and not method.schedule.is_update_step(end - 1)
    assert [update for _, _, update in history[end - 3:]] == [None] * 5  # steps end-2 .. end+2
    masks_before_last_update = history[end - 3][1]
    assert all(torch.equal(masks_before_last_update[n], m) for n, m in method.masks.masks.items())
    assert not method.pending_update


def test_a_ramp_update_postponed_past_update_end_still_reaches_the_final_sparsity() -> None:
    """t1 = t_end: the ramp's last update, postponed, runs once after t_end and only prunes."""
    method, history = amp_run({"method": "ndsnn", "ramp_end_epoch": 2.0}, lambda s: {s.update_end_step},
                              lambda s: s.update_end_step + 1)
    end = method.schedule.update_end_step
    assert method.schedule.ramp_end_step == end
    _, before, update = history[-1]
    assert update is not None and update.step == end + 1 and update.grown == 0
    assert not any((method.masks.masks[n] & ~before[n]).any() for n in before)  # nothing entered
    assert nnz(method.masks.masks) == expected_counts(method, 0.9)


@pytest.mark.parametrize("case", ["random", "ties", "sample-misleads", "short"])
def test_largest_is_exactly_the_top_k(case: str) -> None:
    """`largest` (a threshold from a strided sample, then top-k of what passes it) picks the same values as
    torch.topk over the whole tensor, including when the sample misleads it (it then ranks everything)."""
    generator = torch.Generator().manual_seed(3)
    n, k = 2_400_000, 2_354
    if case == "random":
        scores = torch.rand(n, generator=generator)
    elif case == "ties":  # many equal values at the boundary, -inf where weights are kept
        scores = torch.randint(0, 50, (n,), generator=generator).float()
        scores[torch.randperm(n, generator=generator)[:24_000]] = -math.inf
    elif case == "sample-misleads":  # the sampled positions hold the largest values: fewer than k pass the cut
        scores = torch.rand(n, generator=generator)
        scores[:: n // methods.SAMPLE] = 2.0
        k = 100_000
    else:
        n, k, scores = 1000, 30, torch.rand(1000, generator=generator)
    picked = methods.largest(scores, k)
    assert picked.numel() == k and picked.unique().numel() == k
    expected = torch.topk(scores, k).values
    assert torch.equal(scores[picked].sort(descending=True).values, expected)
