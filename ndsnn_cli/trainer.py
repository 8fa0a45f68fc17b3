"""The trainer: one loop for every method (set up, train epoch by epoch, evaluate and checkpoint after
each, summarise), resume, AMP, DDP. LTH's rounds call it once per round (lth.py).

The core never prints: progress goes to a `TrainCallbacks` object the CLI supplies.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ndsnn_cli import __version__, distributed
from ndsnn_cli.atomic import write_json
from ndsnn_cli.build import build_training_model
from ndsnn_cli.checkpoint import (
    Checkpoint,
    load_checkpoint,
    optimizer_from_tensors,
    restore_rng,
    save_checkpoint,
)
from ndsnn_cli.data import batches_per_epoch
from ndsnn_cli.data.loading import build_datasets, for_training, make_loader
from ndsnn_cli.errors import UserError
from ndsnn_cli.evaluation import dead_layers, evaluate, predict, probe, spike_rates, spiking_loss
from ndsnn_cli.kernels.execution import SparseExecution
from ndsnn_cli.loggers import METRICS, Loggers
from ndsnn_cli.recipe import Recipe
from ndsnn_cli.rundir import RUN_CHECKPOINT, read_metrics, truncate_metrics
from ndsnn_cli.snn.models import SpikingNet
from ndsnn_cli.sparse import active_sgd
from ndsnn_cli.sparse.active_sgd import ActiveWeightSGD
from ndsnn_cli.sparse.masks import Masks, sparse_parameter_names
from ndsnn_cli.sparse.methods import MaskUpdate, SparseMethod, build_method
from ndsnn_cli.sparse.schedules import static_schedule
from ndsnn_cli.validate import check_checkpoint_fits, read_json_file


class TrainCallbacks:
    """Progress hooks; the default does nothing (the CLI renders them with rich)."""

    def on_run_start(self, recipe: Recipe, total_steps: int, steps_per_epoch: int, start_step: int) -> None: ...
    def on_step(self, step: int, epoch: int, loss: float, accuracy: float) -> None: ...
    def on_epoch_end(self, record: dict[str, Any]) -> None: ...
    def on_mask_update(self, update: MaskUpdate) -> None: ...
    def on_round_start(self, index: int, rounds: int, sparsity: float) -> None: ...
    def on_warning(self, message: str) -> None: ...
    def on_kernels(self, step: int, layers: dict[str, str]) -> None: ...


class TrainingDiverged(UserError):
    """A NaN/inf loss or weight; the last good checkpoint is kept."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError('[train] device = "cuda" but no CUDA device is available (use "auto" or "cpu")')
    return torch.device(name)


def build_optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    t = recipe.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=t.nesterov,
                               weight_decay=t.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)


def learning_rate(recipe: Recipe, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Linear warm-up then cosine (or constant) decay; a pure function of the step, so resume is exact."""
    t = recipe.train
    warmup = round(t.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return t.lr * (step + 1) / warmup
    if t.lr_schedule == "constant":
        return t.lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    return t.lr * 0.5 * (1 + math.cos(math.pi * progress))


TIME_PHASES = ("setup", "data", "step", "mask_update", "evaluation", "checkpoint")
TRAIN_PHASES = ("data", "step", "mask_update")  # a run's training time: what a step costs, evaluation aside
TIME_SPLIT_FILE = "time_split.json"  # the split up to the last checkpoint, read back on resume


@dataclass
class TimeSplit:
    """Where a run's wall time goes, in seconds per phase, summed over resumes (`TIME_SPLIT_FILE`).

    `data`: waiting for a batch and moving it to the device; `step`: forward, backward, optimizer;
    `mask_update`: the method's drop/grow and the kernel rebuild; `evaluation`: test set and spike rates
    after each epoch; `checkpoint`: saving. On CUDA a phase ends at its host-side return (kernels are
    asynchronous): the per-step `loss.item()` synchronises, so step time is right to within one step.
    """

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIME_PHASES, 0.0))

    @contextlib.contextmanager
    def phase(self, name: str) -> Any:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    @property
    def train_s(self) -> float:
        return sum(self.seconds[p] for p in TRAIN_PHASES)

    def restore(self, saved: Any) -> None:
        """Add the split saved with the checkpoint resumed from (untrusted: values that are not finite
        non-negative seconds are skipped; without the file the split counts from the resume)."""
        if isinstance(saved, dict):
            for name in TIME_PHASES:
                value = saved.get(name)
                if isinstance(value, int | float) and math.isfinite(value) and value >= 0:
                    self.seconds[name] += float(value)


@dataclass
class _RunState:
    epoch: int = 0            # epochs fully done
    step: int = 0             # optimizer steps done
    batch_in_epoch: int = 0   # batches of `epoch` already done (mid-epoch checkpoints)
    loss_sum: float = 0.0     # running sums of the current epoch's training metrics
    correct: int = 0
    seen: int = 0
    best_accuracy: float = 0.0


@dataclass(frozen=True)
class RoundStart:
    """How one training run starts. Plain runs use the defaults; LTH round 0 saves the weights to rewind
    to (`rewind` = (epoch, path)), later rounds start from those weights with their pruned mask."""

    epochs: int | None = None                               # None: recipe.train.epochs
    initial_state: dict[str, torch.Tensor] | None = None    # rewound weights
    initial_masks: dict[str, torch.Tensor] | None = None    # the round's static mask
    rewind: tuple[int, Path] | None = None


@dataclass
class Run:
    """Everything one training loop needs, built once by `_setup`; the loop only reads and steps it."""

    recipe: Recipe
    run_dir: Path
    callbacks: TrainCallbacks
    start: RoundStart
    device: torch.device
    train_set: Any
    test_set: Any
    model: SpikingNet
    train_model: nn.Module          # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    method: SparseMethod
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype
    state: _RunState
    epochs: int
    steps_per_epoch: int
    total_steps: int
    drop_last: bool
    started: float
    loggers: Loggers = field(default_factory=Loggers)  # rank 0's metrics.jsonl (+ tensorboard); none elsewhere
    clock: TimeSplit = field(default_factory=TimeSplit)
    kernels: SparseExecution | None = None   # sparse-kernel dispatch of the sparse layers (None: no masks)
    active_sgd: ActiveWeightSGD | None = None  # SGD on the sparse layers' active weights (None: no masks/SGD)
    settled: frozenset[str] = frozenset()     # layers the last step updated at active weights only

    @property
    def main(self) -> bool:
        return distributed.is_main()

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / RUN_CHECKPOINT

    def checkpoint(self) -> None:
        """Save everything a resume needs (rank 0); never overwrite a good checkpoint with NaN weights."""
        check_weights_finite(self.model, self.state.step, self.checkpoint_path)
        if not self.main:
            return
        with self.clock.phase("checkpoint"):
            self._save_checkpoint()
        # beside the checkpoint, not in it: checkpoints of a resumed and an uninterrupted run stay bit-identical
        write_json(self.run_dir / TIME_SPLIT_FILE, dict(self.clock.seconds))

    def _save_checkpoint(self) -> None:
        state = self.state
        tensors, method_meta = self.method.state_dict()
        meta = {"recipe": self.recipe.to_toml(), "epoch": state.epoch, "step": state.step,
                "batch_in_epoch": state.batch_in_epoch, "loss_sum": state.loss_sum, "correct": state.correct,
                "seen": state.seen, "best_accuracy": state.best_accuracy, "method": method_meta,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}
        save_checkpoint(self.checkpoint_path, model=self.model, optimizer=self.optimizer, extra_tensors=tensors,
                        meta=meta)


def train_once(recipe: Recipe, run_dir: Path, *, resume: bool, callbacks: TrainCallbacks,
                start: RoundStart | None = None, datasets: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """One training run: set up, train epoch by epoch (evaluating and checkpointing after each), summarise."""
    run = _setup(recipe, run_dir, resume, callbacks, start or RoundStart(), datasets)
    # the sparse layers' forwards are swapped for the run only: restored on any exit, a raise included
    with contextlib.closing(run.loggers), run.kernels if run.kernels is not None else contextlib.nullcontext():
        callbacks.on_run_start(recipe, run.total_steps, run.steps_per_epoch, run.state.step)
        last_record: dict[str, Any] = {}
        for epoch in range(run.state.epoch, run.epochs):
            _train_epoch(run, epoch)
            last_record = _end_epoch(run, epoch)
        return _finish(run, last_record)


def _setup(recipe: Recipe, run_dir: Path, resume: bool, callbacks: TrainCallbacks, start: RoundStart,
           datasets: tuple[Any, Any] | None) -> Run:
    """Device, data, model, optimizer, sparse method and AMP; then resume from the checkpoint if asked."""
    started = time.perf_counter()
    t = recipe.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    torch.manual_seed(recipe.seed)
    if distributed.active() and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    train_set, test_set = for_training(recipe.data, datasets or build_datasets(recipe.data))
    world = distributed.world_size()
    # batch_size is per rank: each rank trains on its 1/world share of every epoch
    steps_per_epoch, drop_last = batches_per_epoch(len(train_set), recipe.data.batch_size, world)
    epochs = start.epochs or t.epochs
    model = build_training_model(recipe, device)
    if start.initial_state is not None:
        model.load_state_dict(start.initial_state)
    optimizer = build_optimizer(recipe, model)
    if start.initial_masks is not None:
        method = SparseMethod("lth", static_schedule(recipe.sparsity.final), recipe.sparsity.distribution,
                              tuple(recipe.sparsity.dense), recipe.seed)
        method.setup(model, initial_masks=start.initial_masks)
    else:
        method = build_method(recipe, steps_per_epoch)
        method.setup(model)
    scaler = torch.amp.GradScaler("cuda", enabled=t.amp and device.type == "cuda")
    run = Run(recipe, run_dir, callbacks, start, device, train_set, test_set, model, model, optimizer, method,
              scaler, torch.float16 if device.type == "cuda" else torch.bfloat16, _RunState(), epochs,
              steps_per_epoch, steps_per_epoch * epochs, drop_last, started)
    _resume_or_start(run, resume)
    _setup_kernels(run)  # on the masks the run (re)starts from; before the loggers record them
    if method.masks is not None and active_sgd.supports(optimizer):
        run.active_sgd = ActiveWeightSGD(optimizer, method.masks.params, method.masks.masks)
    if distributed.active():
        run.train_model = _wrap_ddp(model, device)
    if start.rewind is not None and start.rewind[0] == 0 and run.state.step == 0:
        save_weights(start.rewind[1], model)
    _open_loggers(run)
    run.clock.seconds["setup"] += time.perf_counter() - started
    return run


def _setup_kernels(run: Run) -> None:
    """Per-layer kernel dispatch (`[train] sparse_kernels`), decided on the masks the run starts from."""
    if run.method.masks is None:
        return
    t = run.recipe.train
    run.kernels = SparseExecution(run.model, run.method.masks, t.sparse_kernels, run.device.type, t.sparse_layout)
    run.callbacks.on_kernels(run.state.step, run.kernels.rebuild())


def _resume_or_start(run: Run, resume: bool) -> None:
    """Restore the checkpoint (and cut metrics.jsonl back to it), or start a fresh metrics log."""
    if resume and run.checkpoint_path.exists():
        checkpoint = load_checkpoint(run.checkpoint_path)
        masks = sparse_parameter_names(run.model, run.method.dense) if run.method.schedule is not None else None
        check_checkpoint_fits(run.checkpoint_path, checkpoint.tensors, run.model, resume_meta=checkpoint.meta,
                              optimizer=run.optimizer, mask_names=masks)
        run.state = _restore(checkpoint, run.model, run.optimizer, run.method, run.scaler)
        with contextlib.suppress(UserError, OSError):  # bookkeeping only: an unreadable file restarts the split
            run.clock.restore(read_json_file(run.run_dir / TIME_SPLIT_FILE))
        if run.main:
            truncate_metrics(run.metrics_path, run.state.step, run.state.epoch)
    elif run.main and run.metrics_path.exists():
        run.metrics_path.unlink()
    if distributed.sum_values(run.state.step)[0] != run.state.step * distributed.world_size():
        raise UserError(f"{run.checkpoint_path}: ranks resumed from different steps; "
                        "multi-node runs need the run directory on a shared file system")


def _open_loggers(run: Run) -> None:
    """Rank 0's loggers, opened at the (resumed) step; a fresh run logs its recipe and realised start."""
    if not run.main:
        return
    run.loggers = Loggers.open(run.recipe.train.loggers, run.run_dir, run.state.step)
    if run.state.step == 0:
        run.loggers.log_text("recipe", run.recipe.to_toml(), 0)
        if run.method.masks is not None:  # the realised start, for `cost RUN`
            run.loggers.log_record({"kind": "mask_init", "step": 0, "layers": run.method.masks.nnz(),
                                    "kernels": run.kernels.assignment()})


def _train_epoch(run: Run, epoch: int) -> None:
    """The optimizer steps of one epoch (from `batch_in_epoch` on, after a mid-epoch resume)."""
    recipe, state = run.recipe, run.state
    run.model.train()
    loader = make_loader(run.train_set, recipe.data.batch_size, shuffle=True, seed=recipe.seed, epoch=epoch,
                         start_batch=state.batch_in_epoch, num_workers=recipe.data.num_workers,
                         drop_last=run.drop_last, distributed_rank=distributed.rank(),
                         world_size=distributed.world_size())
    batches = iter(loader)
    while True:
        with run.clock.phase("data"):
            pair = next(batches, None)
            if pair is None:
                break
            images, labels = pair[0].to(run.device, non_blocking=True), pair[1].to(run.device, non_blocking=True)
        with run.clock.phase("step"):
            batch_loss, correct, batch = _train_step(run, epoch, images, labels)
        with run.clock.phase("mask_update"):
            update = run.method.after_step(state.step, run.optimizer, run.settled)
            if update is not None:
                _after_mask_update(run, update)
        state.batch_in_epoch += 1
        state.loss_sum += batch_loss
        state.correct += int(correct)
        state.seen += int(batch)
        if state.step % recipe.train.log_every_steps == 0 or state.batch_in_epoch == run.steps_per_epoch:
            lr = learning_rate(recipe, state.step - 1, run.total_steps, run.steps_per_epoch)
            run.loggers.log_scalars({"train/loss": batch_loss / batch, "train/lr": lr}, state.step)
            run.callbacks.on_step(state.step, epoch, state.loss_sum / state.seen, state.correct / state.seen)
        if recipe.train.checkpoint_every_steps and state.step % recipe.train.checkpoint_every_steps == 0:
            run.checkpoint()


def _train_step(run: Run, epoch: int, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
    """Forward, backward and optimizer step (the sparse method's mask step follows, in `_train_epoch`);
    (loss sum, correct, batch) summed over ranks."""
    t, state, optimizer, scaler = run.recipe.train, run.state, run.optimizer, run.scaler
    lr = learning_rate(run.recipe, state.step, run.total_steps, run.steps_per_epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if run.kernels is not None:  # a gradient-growth update follows this step: it ranks every weight's gradient
        run.kernels.set_dense_weight_grad(run.method.needs_dense_gradient(state.step + 1))
        run.kernels.before_step()
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=t.amp):
        logits = run.train_model(images)
    loss = spiking_loss(logits, labels, t.label_smoothing)
    correct = int((predict(logits.detach()) == labels).sum())
    # summed over ranks, so every rank sees the same numbers and stops together on NaN
    batch_loss, correct, batch = distributed.sum_values(loss.item() * labels.shape[0], correct, labels.shape[0])
    if not math.isfinite(batch_loss):
        raise TrainingDiverged(f"loss is {batch_loss / batch} at step {state.step + 1} (epoch {epoch + 1}); "
                               f"the last good checkpoint is {run.checkpoint_path}")
    optimizer.zero_grad(set_to_none=False)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if t.max_grad_norm > 0:
        clip_active_gradients(run.model, run.method.masks, t.max_grad_norm)
    if run.active_sgd is not None and not scaler.is_enabled():
        run.settled = run.active_sgd.step()
    else:
        scaler.step(optimizer)
        run.settled = frozenset()
    scaler.update()
    state.step += 1
    calibration = run.kernels.after_step(state.step) if run.kernels is not None else None
    if calibration is not None:  # `sparse_kernels = "calibrate"`: a probe's per-layer times and choices
        run.loggers.log_record(calibration)
    return batch_loss, correct, batch


def _after_mask_update(run: Run, update: MaskUpdate) -> None:
    """Masks changed: keep ranks identical, log the update, rebuild the sparse layouts (and re-decide
    each layer's kernel at its new density: logged in the update's record when a choice changed)."""
    # identical on every rank already (all-reduced gradients, same seeded generator); cheap insurance
    distributed.broadcast_tensors(run.method.masks.masks.values())
    run.method.masks.apply(run.optimizer)
    record = update.to_record()
    before = run.kernels.assignment()
    if run.kernels.rebuild() != before:  # logged only when a layer's kernel changed
        record["kernels"] = run.kernels.assignment()
        run.callbacks.on_kernels(update.step, record["kernels"])
    run.loggers.log_record(record)
    run.callbacks.on_mask_update(update)


def _end_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """Evaluate, log the epoch record, save the LTH rewind point when due, checkpoint; the record."""
    recipe, state = run.recipe, run.state
    check_weights_finite(run.model, state.step, run.checkpoint_path)
    distributed.broadcast_tensors(run.model.buffers())  # BN statistics: each rank updated its own
    with run.clock.phase("evaluation"):
        test_loss, test_accuracy = evaluate(run.model, run.test_set, recipe, run.device)
        rates = spike_rates(run.model, probe(run.test_set, run.device))
    if epoch == 0:
        _warn_dead_layers(run.model, run.method, rates, state.step, run.loggers, run.callbacks)
    state.best_accuracy = max(state.best_accuracy, test_accuracy)
    record = {"kind": "epoch", "epoch": epoch + 1, "step": state.step,
              "lr": learning_rate(recipe, state.step - 1, run.total_steps, run.steps_per_epoch),
              "train_loss": state.loss_sum / max(1, state.seen),
              "train_accuracy": state.correct / max(1, state.seen),
              "test_loss": test_loss, "test_accuracy": test_accuracy,
              "sparsity": run.method.masks.sparsity() if run.method.masks else 0.0,
              "layer_density": _realised_masks(recipe, run.model, run.method).layer_densities(),
              "spike_rates": rates}
    run.loggers.log_record(record)
    state.epoch, state.batch_in_epoch, state.loss_sum, state.correct, state.seen = epoch + 1, 0, 0.0, 0, 0
    rewind = run.start.rewind
    if rewind is not None and rewind[0] == epoch + 1:
        # Before the checkpoint: a kill in between redoes this epoch and rewrites the same weights.
        save_weights(rewind[1], run.model)
    run.checkpoint()
    run.callbacks.on_epoch_end(record)
    return record


def _finish(run: Run, last_record: dict[str, Any]) -> dict[str, Any]:
    """The summary (summary.json on rank 0); a resumed finished run reports from its metrics."""
    if not last_record:
        last_record = [r for r in read_metrics(run.run_dir) if r["kind"] == "epoch"][-1]
    summary = _summary(run.recipe, run.model, run.method, run.test_set, run.device, last_record, run.state,
                       run.epochs, time.perf_counter() - run.started)
    summary["train_wall_s"] = run.clock.train_s
    summary["time_split"] = dict(run.clock.seconds)
    summary["sparse_kernels"] = (run.kernels.summary() if run.kernels is not None
                                 else {"mode": run.recipe.train.sparse_kernels, "layers": {}})
    if distributed.active():
        distributed.broadcast_tensors(run.model.buffers())
        tensors = [*run.model.state_dict().values(), *(run.method.masks.masks.values() if run.method.masks else [])]
        summary.update(world_size=distributed.world_size(), ranks_in_sync=distributed.in_sync(tensors))
    if run.main:
        write_json(run.run_dir / "summary.json", summary)
    distributed.barrier()
    return summary


def _wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel: all-reduces (averages) gradients, so every rank takes the same step."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _restore(checkpoint: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer, method: SparseMethod,
             scaler: torch.amp.GradScaler) -> _RunState:
    meta = checkpoint.meta
    model.load_state_dict(checkpoint.model_state)
    optimizer_from_tensors(optimizer, checkpoint.tensors, meta["optimizer"])
    method.load_state_dict(model, checkpoint.tensors)
    if meta.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(meta["scaler"])
    restore_rng(checkpoint)
    return _RunState(meta["epoch"], meta["step"], meta["batch_in_epoch"], meta["loss_sum"], meta["correct"],
                     meta["seen"], meta["best_accuracy"])


def clip_active_gradients(model: nn.Module, masks: Masks | None, max_norm: float) -> None:
    """Clip to `max_norm` measured on the active weights' gradients only.

    Inactive weights are zero but keep their dense gradients (growth ranks them); counted in the norm,
    they would clip a 99%-sparse model ~100x harder than asked. All gradients get the same factor, so
    the growth ranking is unchanged.
    """
    active_mask = {id(p): masks.masks[n] for n, p in masks.params.items()} if masks else {}
    grads = [(p.grad, active_mask.get(id(p))) for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    norm = torch.linalg.vector_norm(torch.stack([(g * m if m is not None else g).norm() for g, m in grads]))
    factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for grad, _ in grads:
        grad.mul_(factor)


def check_weights_finite(model: nn.Module, step: int, checkpoint_path: Path) -> None:
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise TrainingDiverged(f"weight {name} holds NaN/inf after step {step}; "
                                   f"the last good checkpoint is {checkpoint_path}")


def _warn_dead_layers(model: SpikingNet, method: SparseMethod, rates: dict[str, float], step: int, loggers: Loggers,
                      callbacks: TrainCallbacks) -> None:
    """The dead-layer guard: a silent LIF layer at the first evaluation is named, with its density."""
    dead = dead_layers(model, method.masks, rates)
    if not dead:
        return
    loggers.log_record({"kind": "dead_layers", "step": step, "epoch": 1, "layers": dead})
    for name, info in dead.items():
        callbacks.on_warning(f"LIF layer {name} fired at rate {info['spike_rate']:.2g} at the first evaluation "
                             f"(fed by {info['weight']} at density {info['density']:.4f}): it passes almost no "
                             f"gradient; {_dead_layer_hint(method, info['weight'])}")


def _dead_layer_hint(method: SparseMethod, weight: str) -> str:
    """What to change: sparse-aware init where the run has it off, else the layer's density."""
    if method.init != "scaled":
        return 'try [sparsity] init = "scaled" or a lower sparsity'
    return f'init is already "scaled": try a lower sparsity, or keep {weight} dense ([sparsity] dense)'



def _realised_masks(recipe: Recipe, model: SpikingNet, method: SparseMethod) -> Masks:
    """The method's masks; for a dense run, all-ones masks over the would-be sparse layers."""
    names = sparse_parameter_names(model, recipe.sparsity.dense)
    return method.masks or Masks.for_model(
        model, names, {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n in names})


def _summary(recipe: Recipe, model: SpikingNet, method: SparseMethod, test_set: torch.utils.data.Dataset,
             device: torch.device, last: dict[str, Any], state: _RunState, epochs: int,
             wall_time_s: float) -> dict[str, Any]:
    masks = _realised_masks(recipe, model, method)
    images = probe(test_set, device)
    return {
        "name": recipe.name, "method": recipe.sparsity.method, "arch": recipe.model.arch,
        "dataset": recipe.data.dataset, "timesteps": recipe.model.timesteps, "seed": recipe.seed,
        "epochs": epochs, "steps": state.step, "test_accuracy": last["test_accuracy"],
        "best_test_accuracy": state.best_accuracy, "test_loss": last["test_loss"],
        "train_accuracy": last["train_accuracy"], "sparsity": masks.report(),
        "spike_rates": spike_rates(model, images), "wall_time_s": wall_time_s, "device": str(device),
        "torch_version": torch.__version__, "ndsnn_version": __version__, "recipe_sha256": recipe.sha256(),
    }


def save_weights(path: Path, model: nn.Module) -> None:
    save_checkpoint(path, model=model, optimizer=None, extra_tensors={}, meta={"kind": "rewind"})
