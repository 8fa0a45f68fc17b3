"""Loggers: `[train] loggers` names the registry's loggers; TensorBoard event files hold the run's curves."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ndsnn_cli.errors import UserError
from ndsnn_cli.loggers import LOGGERS, TB_DIR
from ndsnn_cli.recipe import Recipe, RecipeError, TrainConfig, parse_recipe
from ndsnn_cli.rundir import read_metrics
from ndsnn_cli.train import train
from ndsnn_cli.trainer import TrainCallbacks, learning_rate

# tiny recipe: 4 steps per epoch, 2 epochs; NDSNN updates masks after steps 1 to 5
NDSNN = {"method": "ndsnn", "initial": 0.5, "final": 0.9, "update_every_steps": 1,
         "ramp_end_epoch": 1.0, "update_end_epoch": 1.5}
WITH_TB = {"loggers": ["jsonl", "tensorboard"], "log_every_steps": 1}


def read_events(run_dir: Path) -> Any:  # tensorboard's EventAccumulator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / TB_DIR))
    events.Reload()
    return events


def steps(events: Any, tag: str) -> list[int]:
    return [e.step for e in events.Scalars(tag)]


def test_recipe_logger_choices_are_the_registry() -> None:
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "loggers")
    assert field.metadata["choices"] == tuple(LOGGERS) == ("jsonl", "tensorboard")
    assert parse_recipe("").train.loggers == ["jsonl"]


@pytest.mark.parametrize("loggers, message", [
    ('["jsonl", "tensorbord"]', 'r.toml: [train] loggers = ["jsonl", "tensorbord"]: "tensorbord" is not one of '
                                "jsonl, tensorboard (did you mean 'tensorboard'?)"),
    ('["tensorboard"]', 'r.toml: [train] loggers = ["tensorboard"] must include "jsonl": metrics.jsonl is the '
                        "run's record that resume, cost and prune-compare read"),
])
def test_a_bad_loggers_list_is_a_one_line_recipe_error(loggers: str, message: str) -> None:
    with pytest.raises(RecipeError) as error:
        parse_recipe(f"[train]\nloggers = {loggers}\n", "r.toml")
    assert str(error.value) == message and error.value.key == "loggers"


def test_tensorboard_without_its_package_names_the_extra(tiny_recipe: Callable[..., Recipe], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import (and find_spec) see no package
    with pytest.raises(UserError) as error:
        train(tiny_recipe(train=WITH_TB), tmp_path / "run")
    assert str(error.value) == ('tiny.toml: [train] loggers: "tensorboard" needs the tensorboard package, which is '
                                "not installed: pip install 'ndsnn[tensorboard]' (or pip install tensorboard)")
    assert not (tmp_path / "run").exists()  # before the run directory is touched


def test_tensorboard_event_file_holds_every_curve_at_its_steps(tiny_recipe: Callable[..., Recipe],
                                                                tmp_path: Path) -> None:
    recipe = tiny_recipe(sparsity=NDSNN, train=WITH_TB)
    summary = train(recipe, tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    epochs = [r for r in records if r["kind"] == "epoch"]
    updates = [r for r in records if r["kind"] == "mask_update"]
    assert len(list((tmp_path / "run" / TB_DIR).glob("events.out.tfevents.*"))) == 1
    events = read_events(tmp_path / "run")

    # per step: loss and the learning rate the step used
    assert steps(events, "train/loss") == steps(events, "train/lr") == list(range(1, 9))
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx(
        [learning_rate(recipe, s - 1, 8, 4) for s in range(1, 9)], rel=1e-6)
    # per epoch: the metrics.jsonl records (the source of truth), per-layer densities and spike rates
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "sparsity"):
        assert steps(events, f"epoch/{key}") == [4, 8]
        assert [e.value for e in events.Scalars(f"epoch/{key}")] == pytest.approx([r[key] for r in epochs], rel=1e-6)
    layers = summary["sparsity"]["layers"]
    for name, layer in layers.items():
        assert steps(events, f"density/{name}") == [4, 8]
        assert events.Scalars(f"density/{name}")[-1].value == pytest.approx(1 - layer["sparsity"], rel=1e-6)
    for name in summary["spike_rates"]:
        assert steps(events, f"spike_rate/{name}") == [4, 8]
    # per mask update: target and realised sparsity, dropped/grown overall and per layer
    update_steps = [r["step"] for r in updates]
    assert update_steps == [1, 2, 3, 4, 5]
    for tag in ("mask/target_sparsity", "mask/sparsity", "mask/drop_fraction", "mask/dropped", "mask/grown",
                *(f"mask_{what}/{name}" for what in ("dropped", "grown") for name in layers)):
        assert steps(events, tag) == update_steps, tag
    assert [e.value for e in events.Scalars("mask/grown")] == [r["grown"] for r in updates]
    # the recipe, as text
    (text,) = events.Tensors("recipe/text_summary")
    assert 'method = "ndsnn"' in text.tensor_proto.string_val[0].decode()


class Kill(Exception):
    pass


class KillAtStep6(TrainCallbacks):
    def on_step(self, step: int, epoch: int, loss: float, accuracy: float) -> None:
        if step == 6:  # after the epoch-1 checkpoint (step 4): steps 5 and 6 are logged, then lost
            raise Kill


def test_a_resumed_run_shows_each_step_once(tiny_recipe: Callable[..., Recipe], tmp_path: Path) -> None:
    recipe = tiny_recipe(train=WITH_TB)
    with pytest.raises(Kill):
        train(recipe, tmp_path / "run", callbacks=KillAtStep6())
    train(recipe, tmp_path / "run", resume=True)
    events = read_events(tmp_path / "run")  # two event files; the second purges steps > 4 of the first
    assert steps(events, "train/loss") == list(range(1, 9))
    assert steps(events, "epoch/test_accuracy") == [4, 8]
    assert len(events.Tensors("recipe/text_summary")) == 1


def test_only_rank_0_writes_logs(tiny_recipe: Callable[..., Recipe], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-zero rank trains the whole run and writes nothing; rank 0, on the same recipe, writes both logs
    (so the first half cannot pass by a run that never got as far as logging)."""
    from ndsnn_cli import distributed

    recipe = tiny_recipe(train=WITH_TB)
    with monkeypatch.context() as patch:
        patch.setattr(distributed, "is_main", lambda: False)  # this process plays rank 1
        summary = train(recipe, tmp_path / "rank1")
    assert summary["steps"] == 8 and summary["epochs"] == 2  # it trained to the end
    assert not (tmp_path / "rank1" / TB_DIR).exists()
    assert not (tmp_path / "rank1" / "metrics.jsonl").exists()
    assert not (tmp_path / "rank1" / "summary.json").exists()
    train(recipe, tmp_path / "rank0")
    assert (tmp_path / "rank0" / TB_DIR).is_dir()
    assert [r["step"] for r in read_metrics(tmp_path / "rank0") if r["kind"] == "epoch"] == [4, 8]
