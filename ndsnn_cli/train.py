"""The trainer: one loop for every method, evaluation each epoch, checkpoints, resume, and the LTH driver.

A run directory holds `recipe.toml`, `metrics.jsonl` (epoch and mask-update records, deterministic so
that a resumed run matches an uninterrupted one), `checkpoints/last.safetensors` and `summary.json`
(and `tb/` with `[train] loggers = ["jsonl", "tensorboard"]`: see loggers.py).
The core never prints: progress goes to a `TrainCallbacks` object the CLI supplies.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ndsnn_cli import __version__, distributed
from ndsnn_cli.atomic import write_bytes, write_json, write_text
from ndsnn_cli.checkpoint import (
    RUN_CHECKPOINT,
    Checkpoint,
    load_checkpoint,
    optimizer_from_tensors,
    restore_rng,
    save_checkpoint,
)
from ndsnn_cli.data import batches_per_epoch, dataset_info
from ndsnn_cli.data.loading import build_datasets, make_loader
from ndsnn_cli.errors import UserError
from ndsnn_cli.kernels.execution import SparseExecution
from ndsnn_cli.loggers import METRICS, Loggers, check_available
from ndsnn_cli.recipe import Recipe, parse_recipe
from ndsnn_cli.snn.models import NeuronConfig, SpikingNet, create_model
from ndsnn_cli.sparse.budget import active_count
from ndsnn_cli.sparse.masks import Masks, global_magnitude_masks, sparse_parameter_names
from ndsnn_cli.sparse.methods import MaskUpdate, SparseMethod, build_method
from ndsnn_cli.sparse.schedules import lth_round_epochs, lth_round_sparsities, static_schedule
from ndsnn_cli.validate import check_checkpoint_fits

CHECKPOINT = RUN_CHECKPOINT  # the one definition lives in checkpoint.py; kept importable from here


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


def build_model(recipe: Recipe) -> SpikingNet:
    info = dataset_info(recipe.data.dataset)
    m = recipe.model
    neuron = NeuronConfig(m.timesteps, m.tau, m.v_threshold, m.surrogate, m.surrogate_alpha, m.lif_backend)
    return create_model(m.arch, num_classes=info.num_classes, in_channels=info.in_channels,
                        image_size=info.image_size, neuron=neuron)


def build_training_model(recipe: Recipe, device: torch.device | str = "cpu") -> SpikingNet:
    """The model as the trainer runs it: on `device`, conv weights channels-last.

    oneDNN (CPU) and cuDNN convolutions run faster on NHWC feature maps (benchmarks/README.md: 6-15%
    per training step here), and a channels-last weight makes every conv output, and so every
    spike map after it, channels-last. Values and the state_dict are unchanged (checkpoints store
    contiguous tensors); only the rounding of the convolutions may differ from an NCHW run.
    """
    return build_model(recipe).to(device, memory_format=torch.channels_last)


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


def spiking_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean over time steps of the cross-entropy of each step's logits ([T, B, C])."""
    steps = logits.shape[0]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.repeat(steps), label_smoothing=label_smoothing)


def predict(logits: torch.Tensor) -> torch.Tensor:
    return logits.sum(0).argmax(-1)


@dataclass
class _RunState:
    epoch: int = 0            # epochs fully done
    step: int = 0             # optimizer steps done
    batch_in_epoch: int = 0   # batches of `epoch` already done (mid-epoch checkpoints)
    loss_sum: float = 0.0     # running sums of the current epoch's training metrics
    correct: int = 0
    seen: int = 0
    best_accuracy: float = 0.0


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Refuse a second `ndsnn train` on the same run directory (an flock, released even on kill -9)."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"{run_dir}: another ndsnn process is training in this run directory") from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def train(recipe: Recipe, run_dir: str | Path, *, resume: bool = False,
          callbacks: TrainCallbacks | None = None) -> dict[str, Any]:
    """Train one recipe into `run_dir`; returns the summary (also written to summary.json)."""
    run_dir = Path(run_dir)
    callbacks = callbacks or TrainCallbacks()
    datasets = _check_inputs(recipe)
    distributed.init_from_env(recipe.train.device)
    try:
        if distributed.active() and recipe.sparsity.method == "lth":
            raise UserError('[sparsity] method = "lth" does not support multi-process training; use one process')
        with contextlib.ExitStack() as stack:
            def claim() -> None:  # rank 0 only: it alone writes the run directory
                stack.enter_context(run_lock(run_dir))
                _prepare_run_dir(recipe, run_dir, resume)

            distributed.on_main(claim)
            if recipe.sparsity.method == "lth":
                return _train_lth(recipe, run_dir, resume, callbacks)
            return _train_once(recipe, run_dir, resume=resume, callbacks=callbacks, datasets=datasets)
    finally:
        distributed.shutdown()


def _check_inputs(recipe: Recipe) -> tuple[Any, Any]:
    """Device, model and data problems surface before the run dir is touched, naming the recipe file."""
    from ndsnn_cli.snn.models import MODELS

    try:
        resolve_device(recipe.train.device)
        check_available(recipe.train.loggers)
        if recipe.model.arch not in MODELS:
            raise UserError(f"[model] arch = {recipe.model.arch!r} is not a known model "
                            f"(known: {', '.join(sorted(MODELS))})")
        return build_datasets(recipe.data)
    except UserError as exc:
        if str(exc).startswith(f"{recipe.source}:"):
            raise
        raise UserError(f"{recipe.source}: {exc}") from None


def _prepare_run_dir(recipe: Recipe, run_dir: Path, resume: bool) -> None:
    existing = run_dir / "recipe.toml"
    if existing.exists():
        if not resume:
            raise UserError(f"{run_dir}: already holds a run; pass --resume to continue it or --out for a new one")
        previous = parse_recipe(existing.read_text(), str(existing))
        if previous.to_toml() != recipe.to_toml():
            raise UserError(f"{run_dir}: --resume with a recipe that differs from the run's recipe.toml")
        # Temp files of a write killed mid-way (atomic.write_bytes); we hold the lock, so no writer is live.
        for stale in [*run_dir.glob(".*.tmp"), *(run_dir / CHECKPOINT.parent).glob(".*.tmp")]:
            stale.unlink(missing_ok=True)
    else:
        write_text(existing, recipe.to_toml())


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
    kernels: SparseExecution | None = None   # sparse-kernel dispatch of the sparse layers (None: no masks)

    @property
    def main(self) -> bool:
        return distributed.is_main()

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT

    def checkpoint(self) -> None:
        """Save everything a resume needs (rank 0); never overwrite a good checkpoint with NaN weights."""
        _check_weights_finite(self.model, self.state.step, self.checkpoint_path)
        if not self.main:
            return
        state = self.state
        tensors, method_meta = self.method.state_dict()
        meta = {"recipe": self.recipe.to_toml(), "epoch": state.epoch, "step": state.step,
                "batch_in_epoch": state.batch_in_epoch, "loss_sum": state.loss_sum, "correct": state.correct,
                "seen": state.seen, "best_accuracy": state.best_accuracy, "method": method_meta,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}
        save_checkpoint(self.checkpoint_path, model=self.model, optimizer=self.optimizer, extra_tensors=tensors,
                        meta=meta)


def _train_once(recipe: Recipe, run_dir: Path, *, resume: bool, callbacks: TrainCallbacks,
                start: RoundStart | None = None, datasets: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """One training run: set up, train epoch by epoch (evaluating and checkpointing after each), summarise."""
    run = _setup(recipe, run_dir, resume, callbacks, start or RoundStart(), datasets)
    try:
        callbacks.on_run_start(recipe, run.total_steps, run.steps_per_epoch, run.state.step)
        last_record: dict[str, Any] = {}
        for epoch in range(run.state.epoch, run.epochs):
            _train_epoch(run, epoch)
            last_record = _end_epoch(run, epoch)
        return _finish(run, last_record)
    finally:
        run.loggers.close()


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
    train_set, test_set = datasets or build_datasets(recipe.data)
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
    if distributed.active():
        run.train_model = _wrap_ddp(model, device)
    if start.rewind is not None and start.rewind[0] == 0 and run.state.step == 0:
        _save_weights(start.rewind[1], model)
    _open_loggers(run)
    return run


def _setup_kernels(run: Run) -> None:
    """Per-layer kernel dispatch (`[train] sparse_kernels`), decided on the masks the run starts from."""
    if run.method.masks is None:
        return
    t = run.recipe.train
    run.kernels = SparseExecution(run.model, run.method.masks, t.sparse_kernels, run.device.type)
    run.callbacks.on_kernels(run.state.step, run.kernels.rebuild())


def _resume_or_start(run: Run, resume: bool) -> None:
    """Restore the checkpoint (and cut metrics.jsonl back to it), or start a fresh metrics log."""
    if resume and run.checkpoint_path.exists():
        checkpoint = load_checkpoint(run.checkpoint_path)
        check_checkpoint_fits(run.checkpoint_path, checkpoint.tensors, run.model, resume_meta=checkpoint.meta)
        run.state = _restore(checkpoint, run.model, run.optimizer, run.method, run.scaler)
        if run.main:
            _truncate_metrics(run.metrics_path, run.state.step, run.state.epoch)
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
    for images, labels in loader:
        batch_loss, correct, batch = _train_step(run, epoch, images.to(run.device, non_blocking=True),
                                                 labels.to(run.device, non_blocking=True))
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
    """Forward, backward, optimizer step and the sparse method's mask step; (loss sum, correct, batch) over ranks."""
    t, state, optimizer, scaler = run.recipe.train, run.state, run.optimizer, run.scaler
    lr = learning_rate(run.recipe, state.step, run.total_steps, run.steps_per_epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if run.kernels is not None:  # a gradient-growth update follows this step: it ranks every weight's gradient
        run.kernels.set_dense_weight_grad(run.method.needs_dense_gradient(state.step + 1))
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
    scaler.step(optimizer)
    scaler.update()
    state.step += 1
    update = run.method.after_step(state.step, optimizer)
    if update is not None:
        _after_mask_update(run, update)
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
    _check_weights_finite(run.model, state.step, run.checkpoint_path)
    distributed.broadcast_tensors(run.model.buffers())  # BN statistics: each rank updated its own
    test_loss, test_accuracy = evaluate(run.model, run.test_set, recipe, run.device)
    rates = spike_rates(run.model, _probe(run.test_set, run.device))
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
        _save_weights(rewind[1], run.model)
    run.checkpoint()
    run.callbacks.on_epoch_end(record)
    return record


def _finish(run: Run, last_record: dict[str, Any]) -> dict[str, Any]:
    """The summary (summary.json on rank 0); a resumed finished run reports from its metrics."""
    if not last_record:
        last_record = [r for r in read_metrics(run.run_dir) if r["kind"] == "epoch"][-1]
    summary = _summary(run.recipe, run.model, run.method, run.test_set, run.device, last_record, run.state,
                       run.epochs, time.perf_counter() - run.started)
    summary["sparse_kernels"] = (run.kernels.summary() if run.kernels is not None
                                 else {"mode": run.recipe.train.sparse_kernels, "layers": {}})
    if run.kernels is not None:
        run.kernels.remove()
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


def _truncate_metrics(path: Path, step: int, epoch: int) -> None:
    """Drop records written after the checkpoint (and a torn last line) so a resumed run's log is exact.

    An epoch record can carry the checkpoint's own step (a mid-epoch checkpoint on the epoch's last
    batch, killed before the epoch-end one): it is kept only if the checkpoint counts that epoch as done.
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if record["step"] > step or (record["kind"] == "epoch" and record["epoch"] > epoch):
            break
        kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def _check_weights_finite(model: nn.Module, step: int, checkpoint_path: Path) -> None:
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise TrainingDiverged(f"weight {name} holds NaN/inf after step {step}; "
                                   f"the last good checkpoint is {checkpoint_path}")


@torch.no_grad()
def evaluate(model: nn.Module, test_set: torch.utils.data.Dataset, recipe: Recipe,
             device: torch.device) -> tuple[float, float]:
    """Test loss and accuracy (prediction = argmax of the summed per-step logits).

    Under DDP each rank scores every world_size-th image (no padding) and the sums are all-reduced.
    """
    model.eval()
    if distributed.active():
        test_set = torch.utils.data.Subset(test_set, range(distributed.rank(), len(test_set),
                                                           distributed.world_size()))
    loader = make_loader(test_set, recipe.data.eval_batch_size, shuffle=False, seed=0, epoch=0,
                         num_workers=recipe.data.num_workers)
    loss_sum, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                            enabled=recipe.train.amp):
            logits = model(images)
        loss_sum += spiking_loss(logits, labels).item() * labels.shape[0]
        correct += int((predict(logits) == labels).sum())
        seen += labels.shape[0]
    model.train()
    loss_sum, correct, seen = distributed.sum_values(loss_sum, correct, seen)
    return loss_sum / max(1, seen), correct / max(1, seen)


@torch.no_grad()
def spike_rates(model: SpikingNet, images: torch.Tensor) -> dict[str, float]:
    """Mean firing rate of every LIF layer on a batch (spikes per neuron per time step)."""
    rates: dict[str, float] = {}
    names = {module: name for name, module in model.named_modules()}
    hooks = [lif.register_forward_hook(lambda m, _i, out: rates.__setitem__(names[m], float(out.float().mean())))
             for lif in model.lif_layers()]
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return rates


DEAD_SPIKE_RATE = 1e-4  # a LIF layer firing less than this at the first evaluation passes (almost) no gradient


def dead_layers(model: SpikingNet, masks: Masks | None, rates: dict[str, float]) -> dict[str, dict[str, Any]]:
    """LIF layers whose spike rate (`spike_rates` on a probe batch) is below DEAD_SPIKE_RATE, each with the
    weight that feeds it (the nearest conv/linear before it, shortcuts aside) and that weight's density."""
    feeding, last = {}, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear) and "shortcut" not in name:
            last = f"{name}.weight"
        elif name in rates:
            feeding[name] = last
    dead = {}
    for name, rate in rates.items():
        if rate < DEAD_SPIKE_RATE:
            weight = feeding.get(name)
            density = float(masks.masks[weight].float().mean()) if masks and weight in masks.masks else 1.0
            dead[name] = {"spike_rate": rate, "weight": weight, "density": density}
    return dead


def _probe(test_set: torch.utils.data.Dataset, device: torch.device) -> torch.Tensor:
    """The first (up to) 64 test images: the fixed batch spike rates are measured on."""
    return torch.stack([test_set[i][0] for i in range(min(64, len(test_set)))]).to(device)


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
                             "gradient; try [sparsity] init = \"scaled\" or a lower sparsity")


def _realised_masks(recipe: Recipe, model: SpikingNet, method: SparseMethod) -> Masks:
    """The method's masks; for a dense run, all-ones masks over the would-be sparse layers."""
    names = sparse_parameter_names(model, recipe.sparsity.dense)
    return method.masks or Masks.for_model(
        model, names, {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n in names})


def _summary(recipe: Recipe, model: SpikingNet, method: SparseMethod, test_set: torch.utils.data.Dataset,
             device: torch.device, last: dict[str, Any], state: _RunState, epochs: int,
             wall_time_s: float) -> dict[str, Any]:
    masks = _realised_masks(recipe, model, method)
    probe = _probe(test_set, device)
    return {
        "name": recipe.name, "method": recipe.sparsity.method, "arch": recipe.model.arch,
        "dataset": recipe.data.dataset, "timesteps": recipe.model.timesteps, "seed": recipe.seed,
        "epochs": epochs, "steps": state.step, "test_accuracy": last["test_accuracy"],
        "best_test_accuracy": state.best_accuracy, "test_loss": last["test_loss"],
        "train_accuracy": last["train_accuracy"], "sparsity": masks.report(),
        "spike_rates": spike_rates(model, probe), "wall_time_s": wall_time_s, "device": str(device),
        "torch_version": torch.__version__, "ndsnn_version": __version__, "recipe_sha256": recipe.sha256(),
    }


def _save_weights(path: Path, model: nn.Module) -> None:
    save_checkpoint(path, model=model, optimizer=None, extra_tensors={}, meta={"kind": "rewind"})


def prune_global_magnitude(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None,
                           sparsity: float) -> dict[str, torch.Tensor]:
    """LTH pruning: keep the largest |w| across all sparse layers so that `sparsity` of them are zero."""
    total = sum(w.numel() for w in weights.values())
    return global_magnitude_masks(weights, masks, active_count(total, 1 - sparsity))


def _train_lth(recipe: Recipe, run_dir: Path, resume: bool, callbacks: TrainCallbacks) -> dict[str, Any]:
    """Iterative magnitude pruning with late rewinding: dense round 0, then prune, rewind, retrain."""
    sp = recipe.sparsity
    sparsities = lth_round_sparsities(sp.final, sp.prune_rate)
    epochs = sp.round_epochs or recipe.train.epochs
    round_epochs = lth_round_epochs(epochs, sp.rewind_epoch, len(sparsities))
    rewind_path = run_dir / "rewind.safetensors"
    rounds: list[dict[str, Any]] = []
    masks: dict[str, torch.Tensor] | None = None
    started = time.perf_counter()
    for index, sparsity in enumerate(sparsities):
        round_dir = run_dir / f"round_{index:02d}"
        callbacks.on_round_start(index, len(sparsities), sparsity)
        done = round_dir / "summary.json"
        if resume and done.exists():
            summary = json.loads(done.read_text())
        else:
            round_dir.mkdir(parents=True, exist_ok=True)
            round_resume = resume and (round_dir / CHECKPOINT).exists()
            if index == 0:
                start = RoundStart(epochs=epochs, rewind=(sp.rewind_epoch, rewind_path))
            else:
                start = RoundStart(epochs=round_epochs[index], initial_state=load_checkpoint(rewind_path).model_state,
                                   initial_masks=masks)
            summary = _train_once(recipe, round_dir, resume=round_resume, callbacks=callbacks, start=start)
        rounds.append({"round": index, "target_sparsity": sparsity, "sparsity": summary["sparsity"]["sparsity"],
                       "test_accuracy": summary["test_accuracy"], "epochs": round_epochs[index]})
        if index + 1 < len(sparsities):
            final = load_checkpoint(round_dir / CHECKPOINT)
            names = list(summary["sparsity"]["layers"])
            weights = {n: final.model_state[n] for n in names}
            previous = {n: final.masks[n] for n in names} if final.masks else None
            masks = prune_global_magnitude(weights, previous, sparsities[index + 1])
    summary = dict(summary)
    summary.update({"method": "lth", "rounds": rounds, "round_epochs": epochs,
                    "total_epochs": sum(round_epochs), "wall_time_s": time.perf_counter() - started})
    # The final round's checkpoint is the run's: `ndsnn export/inspect/cost RUN` find it where they look.
    write_bytes(run_dir / CHECKPOINT, (run_dir / f"round_{len(sparsities) - 1:02d}" / CHECKPOINT).read_bytes())
    write_json(run_dir / "summary.json", summary)
    return summary


def default_run_dir(recipe: Recipe) -> Path:
    return Path(os.environ.get("NDSNN_RUNS", "runs")) / recipe.name
