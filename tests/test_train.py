"""Trainer: resume is bit-identical (epoch and mid-epoch), LTH runs its rounds, bad files are UserErrors."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ndsnn_cli.checkpoint import load_checkpoint
from ndsnn_cli.errors import UserError
from ndsnn_cli.lth import prune_global_magnitude
from ndsnn_cli.recipe import Recipe
from ndsnn_cli.rundir import RUN_CHECKPOINT, read_metrics
from ndsnn_cli.sparse.budget import active_count
from ndsnn_cli.sparse.schedules import lth_round_sparsities
from ndsnn_cli.train import train
from ndsnn_cli.trainer import TrainCallbacks

# tiny recipe: 256 images / batch 64 = 4 steps per epoch, 2 epochs. NDSNN updates after every step
# from step 1 to 5 (ramp ends at step 4, masks freeze at step 6).
NDSNN = {"method": "ndsnn", "initial": 0.5, "final": 0.9, "update_every_steps": 1,
         "ramp_end_epoch": 1.0, "update_end_epoch": 1.5}


class Interrupt(Exception):
    """Stands in for a kill: raised from a callback after the trainer wrote its checkpoint."""


class StopAfterEpoch(TrainCallbacks):
    def on_epoch_end(self, record: dict) -> None:
        if record["epoch"] == 1:
            raise Interrupt


class StopAtStep(TrainCallbacks):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, step: int, epoch: int, loss: float, accuracy: float) -> None:
        if step == self.step:
            raise Interrupt


def checkpoint_bytes(run_dir: Path) -> bytes:
    return (run_dir / RUN_CHECKPOINT).read_bytes()


def assert_same_run(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a / RUN_CHECKPOINT), load_checkpoint(b / RUN_CHECKPOINT)
    assert ca.tensors.keys() == cb.tensors.keys()
    for key in ca.tensors:  # weights, masks, optimizer state, RNG: bit-identical
        assert torch.equal(ca.tensors[key], cb.tensors[key]), key
    assert ca.meta == cb.meta
    assert (a / "metrics.jsonl").read_bytes() == (b / "metrics.jsonl").read_bytes()
    assert checkpoint_bytes(a) == checkpoint_bytes(b)


@pytest.fixture
def ndsnn_recipe(tiny_recipe: Callable[..., Recipe]) -> Recipe:
    return tiny_recipe(sparsity=NDSNN, train={"log_every_steps": 1})


@pytest.fixture
def full_run(ndsnn_recipe: Recipe, tmp_path: Path) -> Path:
    run_dir = tmp_path / "full"
    summary = train(ndsnn_recipe, run_dir)
    assert summary["steps"] == 8
    updates = [r for r in read_metrics(run_dir) if r["kind"] == "mask_update"]
    assert [r["step"] for r in updates] == [1, 2, 3, 4, 5]
    return run_dir


def test_resume_after_one_epoch_is_bit_identical(ndsnn_recipe: Recipe, full_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "split"
    with pytest.raises(Interrupt):
        train(ndsnn_recipe, run_dir, callbacks=StopAfterEpoch())
    assert load_checkpoint(run_dir / RUN_CHECKPOINT).meta["step"] == 4
    assert not (run_dir / "summary.json").exists()
    summary = train(ndsnn_recipe, run_dir, resume=True)
    assert summary["steps"] == 8
    assert_same_run(full_run, run_dir)
    full = json.loads((full_run / "summary.json").read_text())
    assert summary["test_accuracy"] == full["test_accuracy"]
    assert summary["sparsity"] == full["sparsity"]


def test_resume_from_a_mid_epoch_checkpoint_is_bit_identical(ndsnn_recipe: Recipe, tmp_path: Path) -> None:
    recipe = ndsnn_recipe.replace(train={"checkpoint_every_steps": 3})
    full = tmp_path / "full"
    train(recipe, full)
    run_dir = tmp_path / "split"
    # Stop during step 4, the last step of epoch 1, after its mask update was logged but before the
    # epoch-end checkpoint: the newest checkpoint is step 3's mid-epoch one.
    with pytest.raises(Interrupt):
        train(recipe, run_dir, callbacks=StopAtStep(4))
    meta = load_checkpoint(run_dir / RUN_CHECKPOINT).meta
    assert (meta["step"], meta["epoch"], meta["batch_in_epoch"]) == (3, 0, 3)
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2, 3, 4]  # mask_init, then the updates
    # the log holds a record past the checkpoint; resume must cut it, not repeat it
    train(recipe, run_dir, resume=True)
    assert_same_run(full, run_dir)


def test_resume_mid_ramp_with_random_growth_is_bit_identical(tiny_recipe: Callable[..., Recipe],
                                                             tmp_path: Path) -> None:
    recipe = tiny_recipe(sparsity={**NDSNN, "grow": "random"}, train={"log_every_steps": 1,
                                                                       "checkpoint_every_steps": 1})
    full = tmp_path / "full"
    train(recipe, full)
    run_dir = tmp_path / "split"
    with pytest.raises(Interrupt):
        train(recipe, run_dir, callbacks=StopAtStep(3))  # checkpoint of step 2, inside the ramp
    assert load_checkpoint(run_dir / RUN_CHECKPOINT).meta["step"] == 2
    train(recipe, run_dir, resume=True)
    assert_same_run(full, run_dir)


def test_final_sparsity_is_exact_per_layer(full_run: Path) -> None:
    summary = json.loads((full_run / "summary.json").read_text())
    checkpoint = load_checkpoint(full_run / RUN_CHECKPOINT)
    assert summary["sparsity"]["layers"].keys() == checkpoint.masks.keys()
    for name, layer in summary["sparsity"]["layers"].items():
        mask = checkpoint.masks[name]
        assert layer["nnz"] == int(mask.sum())
        assert not checkpoint.model_state[name][~mask.bool()].any()  # weights are zero outside the mask
    total = summary["sparsity"]["numel"]
    # ERK rounding moves the total by at most half a weight per layer
    assert abs(summary["sparsity"]["nnz"] - 0.1 * total) <= len(summary["sparsity"]["layers"]) / 2


def test_lth_keeps_layers_listed_as_dense_dense_in_every_round(tiny_recipe: Callable[..., Recipe],
                                                                 tmp_path: Path) -> None:
    recipe = tiny_recipe(sparsity={"method": "lth", "final": 0.5, "prune_rate": 0.5, "rewind_epoch": 0,
                                   "dense": ["encoder.1"]})
    summary = train(recipe, tmp_path / "lth")
    assert list(summary["sparsity"]["layers"]) == ["body.1.weight"]
    final = load_checkpoint(tmp_path / "lth" / RUN_CHECKPOINT)
    assert set(final.masks) == {"body.1.weight"}
    assert bool((final.model_state["encoder.1.weight"] != 0).all())


def test_lth_runs_every_round_into_round_folders(tiny_recipe: Callable[..., Recipe], tmp_path: Path) -> None:
    recipe = tiny_recipe(sparsity={"method": "lth", "final": 0.5, "prune_rate": 0.5, "rewind_epoch": 1})
    assert lth_round_sparsities(0.5, 0.5) == [0.0, 0.5]
    summary = train(recipe, tmp_path / "lth")
    assert [r["target_sparsity"] for r in summary["rounds"]] == [0.0, 0.5]
    # LTH-SNN: the dense round trains all epochs, later rounds the ones after the rewind epoch
    assert [r["epochs"] for r in summary["rounds"]] == [2, 1]
    assert summary["total_epochs"] == 3
    # the last round's checkpoint is also the run's, so export/inspect/cost RUN find it
    run = tmp_path / "lth"
    assert (run / RUN_CHECKPOINT).read_bytes() == (run / "round_01" / RUN_CHECKPOINT).read_bytes()
    assert sorted(p.name for p in (tmp_path / "lth").glob("round_*")) == ["round_00", "round_01"]
    round0 = load_checkpoint(tmp_path / "lth" / "round_00" / RUN_CHECKPOINT)
    round1 = load_checkpoint(tmp_path / "lth" / "round_01" / RUN_CHECKPOINT)
    assert round0.masks == {}  # round 0 trains dense
    names = list(round1.masks)
    total = sum(round1.masks[n].numel() for n in names)
    assert sum(int(round1.masks[n].sum()) for n in names) == active_count(total, 0.5)
    assert summary["rounds"][1]["sparsity"] == 1 - active_count(total, 0.5) / total
    # round 1's mask is the global magnitude pruning of round 0's final weights
    expected = prune_global_magnitude({n: round0.model_state[n] for n in names}, None, 0.5)
    assert all(torch.equal(round1.masks[n].bool(), expected[n]) for n in names)
    assert (tmp_path / "lth" / "rewind.safetensors").exists()
    assert json.loads((tmp_path / "lth" / "summary.json").read_text())["method"] == "lth"
    # LTH's time split is its rounds' together
    rounds = [json.loads((run / f"round_0{i}" / "summary.json").read_text()) for i in (0, 1)]
    for phase, seconds in summary["time_split"].items():
        assert seconds == pytest.approx(sum(r["time_split"][phase] for r in rounds)), phase
    assert summary["train_wall_s"] == pytest.approx(sum(r["train_wall_s"] for r in rounds))


def test_truncated_checkpoint_is_a_user_error(ndsnn_recipe: Recipe, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupt):
        train(ndsnn_recipe, run_dir, callbacks=StopAfterEpoch())
    path = run_dir / RUN_CHECKPOINT
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"not a readable safetensors file \(truncated or corrupt"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="truncated or corrupt"):
        train(ndsnn_recipe, run_dir, resume=True)
    path.write_bytes(b"\x05")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_checkpoint(path)


def test_foreign_safetensors_file_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"not an ndsnn checkpoint \(format is None, expected 'ndsnn-checkpoint'\)"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_training_into_an_existing_run_needs_resume(tiny_recipe: Callable[..., Recipe], tmp_path: Path) -> None:
    recipe = tiny_recipe(train={"epochs": 1})
    run_dir = tmp_path / "run"
    train(recipe, run_dir)
    before = (run_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        train(recipe, run_dir)
    with pytest.raises(UserError, match="recipe that differs"):
        train(recipe.replace(seed=1), run_dir, resume=True)
    assert (run_dir / "metrics.jsonl").read_bytes() == before  # nothing touched


def test_amp_bf16_on_cpu_trains(tiny_recipe: Callable[..., Recipe], tmp_path: Path) -> None:
    recipe = tiny_recipe(model={"arch": "scnn"}, train={"amp": True, "epochs": 1},
                         sparsity={"method": "rigl", "final": 0.8, "update_every_steps": 1, "update_end_epoch": 1.0})
    summary = train(recipe, tmp_path / "amp")
    records = read_metrics(tmp_path / "amp")
    epoch = [r for r in records if r["kind"] == "epoch"][0]
    assert math.isfinite(epoch["train_loss"]) and math.isfinite(epoch["test_loss"])
    assert [r["step"] for r in records if r["kind"] == "mask_update"] == [1, 2, 3]
    assert summary["device"] == "cpu"
    checkpoint = load_checkpoint(tmp_path / "amp" / RUN_CHECKPOINT)
    assert all(v.dtype == torch.float32 for k, v in checkpoint.model_state.items() if k.endswith("weight"))
    total = summary["sparsity"]["numel"]
    assert abs(summary["sparsity"]["nnz"] - 0.2 * total) <= len(summary["sparsity"]["layers"]) / 2


def test_gradient_clipping_measures_only_the_active_weights() -> None:
    from ndsnn_cli.sparse.masks import Masks
    from ndsnn_cli.trainer import clip_active_gradients

    layer = torch.nn.Linear(4, 2, bias=False)
    layer.weight.grad = torch.tensor([[3.0, 100.0, 0.0, 0.0], [4.0, 100.0, 0.0, 0.0]])
    mask = torch.tensor([[True, False, False, False], [True, False, False, False]])
    clip_active_gradients(layer, Masks({"weight": layer.weight}, {"weight": mask}), max_norm=1.0)
    # the active gradients (3, 4) have norm 5: everything is scaled by 1/5, inactive ones included
    assert torch.allclose(layer.weight.grad, torch.tensor([[0.6, 20.0, 0.0, 0.0], [0.8, 20.0, 0.0, 0.0]]), atol=1e-5)


def test_a_last_batch_of_one_sample_is_dropped_so_batchnorm_can_train(tiny_recipe: Callable[..., Recipe],
                                                                        tmp_path: Path) -> None:
    summary = train(tiny_recipe(data={"train_limit": 129, "batch_size": 64}), tmp_path / "run")
    assert summary["steps"] == 2 * 2  # 129 = 2 x 64 + 1: two steps per epoch, the single sample dropped


class Warnings(TrainCallbacks):
    def __init__(self) -> None:
        self.messages: list[str] = []

    def on_warning(self, message: str) -> None:
        self.messages.append(message)


def test_a_silent_lif_layer_at_the_first_evaluation_is_named_with_its_density(tiny_recipe: Callable[..., Recipe],
                                                                             tmp_path: Path) -> None:
    recipe = tiny_recipe(model={"v_threshold": 1000.0}, sparsity={"method": "static", "final": 0.9})
    callbacks = Warnings()
    train(recipe, tmp_path / "dead", callbacks=callbacks)
    records = [r for r in read_metrics(tmp_path / "dead") if r["kind"] == "dead_layers"]
    assert len(records) == 1 and records[0]["epoch"] == 1 and records[0]["step"] == 4
    layer = records[0]["layers"]["body.0"]
    checkpoint = load_checkpoint(tmp_path / "dead" / RUN_CHECKPOINT)
    # the mlp's LIF body.0 is fed by encoder.1 (its hidden linear layer)
    assert layer["weight"] == "encoder.1.weight" and layer["spike_rate"] == 0.0
    assert layer["density"] == float(checkpoint.masks["encoder.1.weight"].float().mean())
    assert len(callbacks.messages) == 1
    assert "body.0" in callbacks.messages[0] and f"{layer['density']:.4f}" in callbacks.messages[0]
    # init is already "scaled" (the default): the hint names the other remedies, not the one in use
    assert 'init is already "scaled"' in callbacks.messages[0] and "encoder.1.weight dense" in callbacks.messages[0]
    dense_init = tiny_recipe(model={"v_threshold": 1000.0},
                             sparsity={"method": "static", "final": 0.9, "init": "dense"})
    callbacks = Warnings()
    train(dense_init, tmp_path / "dead-dense-init", callbacks=callbacks)
    assert 'try [sparsity] init = "scaled"' in callbacks.messages[0]


def test_a_firing_network_records_no_dead_layers(tiny_recipe: Callable[..., Recipe], tmp_path: Path) -> None:
    callbacks = Warnings()
    train(tiny_recipe(), tmp_path / "alive", callbacks=callbacks)
    assert callbacks.messages == []
    assert not [r for r in read_metrics(tmp_path / "alive") if r["kind"] == "dead_layers"]


def test_lth_rounds_start_from_the_rewound_weights_with_their_round_mask(tiny_recipe: Callable[..., Recipe],
                                                                        tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Round r >= 1 starts from rewind.safetensors times round r's mask, across 4 rounds."""
    from ndsnn_cli.sparse.methods import SparseMethod

    starts: list[dict[str, torch.Tensor]] = []
    original_setup = SparseMethod.setup

    def recording_setup(self: SparseMethod, model: torch.nn.Module, initial_masks: dict | None = None) -> None:
        original_setup(self, model, initial_masks)
        starts.append({n: p.detach().clone() for n, p in model.state_dict().items()})

    monkeypatch.setattr(SparseMethod, "setup", recording_setup)
    recipe = tiny_recipe(sparsity={"method": "lth", "final": 0.875, "prune_rate": 0.5, "rewind_epoch": 1})
    summary = train(recipe, tmp_path / "lth")
    assert [r["target_sparsity"] for r in summary["rounds"]] == [0.0, 0.5, 0.75, 0.875]
    assert len(starts) == 4
    rewound = load_checkpoint(tmp_path / "lth" / "rewind.safetensors").model_state
    previous = load_checkpoint(tmp_path / "lth" / "round_00" / RUN_CHECKPOINT)
    for index in (1, 2, 3):
        final = load_checkpoint(tmp_path / "lth" / f"round_{index:02d}" / RUN_CHECKPOINT)
        masks = {n: m.bool() for n, m in final.masks.items()}
        names = list(masks)
        # the round's mask prunes the previous round's final weights (within its mask) by global magnitude
        expected = prune_global_magnitude({n: previous.model_state[n] for n in names},
                                          {n: previous.masks[n].bool() for n in names} if previous.masks else None,
                                          summary["rounds"][index]["target_sparsity"])
        assert all(torch.equal(masks[n], expected[n]) for n in names)
        for name, value in starts[index].items():
            want = rewound[name] * masks[name] if name in masks else rewound[name]
            assert torch.equal(value, want.to(value.dtype)), (index, name)
        assert not torch.equal(starts[index][names[0]], final.model_state[names[0]])  # and it then trained
        previous = final


def test_summary_splits_the_wall_time_by_phase_and_the_split_survives_a_resume(ndsnn_recipe: Recipe,
                                                                               tmp_path: Path) -> None:
    """summary.json's `time_split` has every phase, `train_wall_s` is its training share (data + step + mask
    updates, evaluation aside), and a resumed run adds the seconds before the interruption (time_split.json)."""
    from ndsnn_cli.trainer import TIME_PHASES, TIME_SPLIT_FILE

    whole = train(ndsnn_recipe, tmp_path / "whole")
    split = whole["time_split"]
    assert list(split) == list(TIME_PHASES)
    assert all(seconds > 0 for seconds in split.values()), split  # 8 steps, 5 mask updates, 2 evaluations
    assert whole["train_wall_s"] == pytest.approx(split["data"] + split["step"] + split["mask_update"])
    assert sum(split.values()) <= whole["wall_time_s"] + 1e-6

    run_dir = tmp_path / "split"
    with pytest.raises(Interrupt):
        train(ndsnn_recipe, run_dir, callbacks=StopAfterEpoch())
    before = json.loads((run_dir / TIME_SPLIT_FILE).read_text())
    assert before["step"] > 0 and before["evaluation"] > 0
    resumed = train(ndsnn_recipe, run_dir, resume=True)
    for phase in ("setup", "data", "step", "evaluation"):  # this process's seconds plus the first one's
        assert resumed["time_split"][phase] > before[phase], phase
    assert resumed["train_wall_s"] > before["data"] + before["step"] + before["mask_update"]


def test_a_garbled_time_split_file_does_not_stop_a_resume(ndsnn_recipe: Recipe, tmp_path: Path) -> None:
    from ndsnn_cli.trainer import TIME_SPLIT_FILE

    run_dir = tmp_path / "run"
    with pytest.raises(Interrupt):
        train(ndsnn_recipe, run_dir, callbacks=StopAfterEpoch())
    (run_dir / TIME_SPLIT_FILE).write_text('{"step": -5, "data": "x", "evaluation": 1e400')
    summary = train(ndsnn_recipe, run_dir, resume=True)
    assert summary["steps"] == 8 and all(0 <= s < 60 for s in summary["time_split"].values())
