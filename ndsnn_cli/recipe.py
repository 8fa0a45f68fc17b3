"""Recipes: a TOML file validated once into typed, frozen dataclasses.

Every key is checked (unknown keys get a "did you mean", types, ranges, cross-field rules) and each
error is one line naming the file, the table and the key, e.g.
`quickstart.toml: [sparsity] final = 1.2 must be in [0, 1)`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ndsnn_cli import limits as L
from ndsnn_cli.errors import UserError
from ndsnn_cli.formats.text import TextError, parse_toml, read_text_file, show
from ndsnn_cli.kernels import SPARSE_KERNEL_MODES, SPARSE_LAYOUTS
from ndsnn_cli.loggers import LOGGER_NAMES
from ndsnn_cli.snn import LIF_BACKENDS, SURROGATE_NAMES
from ndsnn_cli.sparse import METHODS


class RecipeError(UserError):
    """A recipe problem, located by file, table and key."""

    def __init__(self, source: str, table: str, key: str | None, message: str) -> None:
        where = f"[{table}] " if table else ""
        where += f"{key} " if key else ""
        super().__init__(f"{source}: {where}{message}".rstrip())
        self.table, self.key = table, key


def _spec(*, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
          hi_open: bool = False, choices: tuple[str, ...] | None = None, doc: str = "") -> dict[str, Any]:
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices, "doc": doc}


def _f(default: Any, **spec: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=_spec(**spec))
    return field(default=default, metadata=_spec(**spec))


@dataclass(frozen=True)
class ModelConfig:
    arch: str = _f("scnn", doc="model registry name (ndsnn_cli.snn.models)")
    timesteps: int = _f(5, lo=1, hi=L.MAX_TIMESTEPS, doc="simulation time steps T (the paper's 5)")
    tau: float = _f(4.0 / 3.0, lo=1.0, lo_open=True, doc="LIF membrane time constant")
    v_threshold: float = _f(1.0, lo=0.0, lo_open=True)
    surrogate: str = _f("atan", choices=SURROGATE_NAMES)
    surrogate_alpha: float = _f(2.0, lo=0.0, lo_open=True)
    lif_backend: str = _f("fused", choices=LIF_BACKENDS,
                          doc="fused: custom autograd that stores one tensor per layer; reference: plain loop")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _f("fashion-mnist")
    root: str = _f("", doc="data folder; empty = the data set's default location")
    download: bool = _f(False)
    batch_size: int = _f(128, lo=1, hi=L.MAX_BATCH_SIZE)
    eval_batch_size: int = _f(512, lo=1, hi=L.MAX_BATCH_SIZE,
                              doc="test images per loader batch (on the CPU the model sees ~256 samples per call)")
    num_workers: int = _f(0, lo=0, hi=L.MAX_WORKERS)
    augment: bool = _f(True)
    cutout: bool = _f(False)
    train_limit: int = _f(0, lo=0, hi=L.MAX_SAMPLES, doc="use only the first N training images (0 = all)")
    test_limit: int = _f(0, lo=0, hi=L.MAX_SAMPLES)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _f(3, lo=1, hi=L.MAX_EPOCHS)
    optimizer: str = _f("sgd", choices=("sgd", "adam"))
    lr: float = _f(0.1, lo=0.0, lo_open=True)
    momentum: float = _f(0.9, lo=0.0, hi=1.0, hi_open=True)
    nesterov: bool = _f(False)
    weight_decay: float = _f(5e-4, lo=0.0)
    lr_schedule: str = _f("cosine", choices=("cosine", "constant"))
    warmup_epochs: float = _f(0.0, lo=0.0, hi=L.MAX_EPOCHS)
    label_smoothing: float = _f(0.0, lo=0.0, hi=1.0, hi_open=True)
    amp: bool = _f(False, doc="mixed precision (bf16 on CPU, fp16 + GradScaler on CUDA)")
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))
    checkpoint_every_steps: int = _f(0, lo=0, hi=L.MAX_STEPS, doc="0 = checkpoint at each epoch end only")
    log_every_steps: int = _f(50, lo=1, hi=L.MAX_STEPS)
    max_grad_norm: float = _f(0.0, lo=0.0, doc="clip the global gradient norm (0 = off)")
    threads: int = _f(0, lo=0, hi=L.MAX_THREADS, doc="torch CPU threads (0 = torch's default)")
    loggers: list[str] = _f(["jsonl"], choices=LOGGER_NAMES,
                            doc='metrics.jsonl (always) plus e.g. "tensorboard" (<run_dir>/tb/; the tensorboard extra)')
    sparse_kernels: str = _f("auto", choices=SPARSE_KERNEL_MODES,
                             doc="sparse conv/linear kernels: auto = compiled kernel on CPU below the measured "
                                 "crossover density; calibrate = each layer timed both ways on the run's own "
                                 "steps, its faster path kept (metrics: kernel_calibration); on = every sparse "
                                 "layer; off = masked dense")
    sparse_layout: str = _f("batch-last", choices=SPARSE_LAYOUTS,
                            doc="activations between layers on the kernels: per-layer = transposed in and out "
                                "of each sparse layer; batch-last = kept in the kernels' layout through "
                                "BN + LIF, pooling and the residual add")


@dataclass(frozen=True)
class SparsityConfig:
    method: str = _f("dense", choices=METHODS)
    final: float = _f(0.9, lo=0.0, hi=1.0, hi_open=True, doc="final sparsity s_f")
    initial: float = _f(0.5, lo=0.0, hi=1.0, hi_open=True, doc="NDSNN initial sparsity s_i")
    distribution: str = _f("erk", choices=("erk", "uniform", "global"))
    dense: list[str] = _f([], doc="parameter names (or prefixes) kept dense")
    update_every_steps: int = _f(100, lo=1, hi=L.MAX_STEPS, doc="dT: steps between mask updates")
    ramp_start_epoch: float = _f(0.0, lo=0.0, hi=L.MAX_EPOCHS, doc="t0: the sparsity ramp starts")
    ramp_end_epoch: float = _f(-1.0, hi=L.MAX_EPOCHS,
                               doc="t1: the ramp reaches `final` (-1 = 75% of `update_end_epoch`)")
    update_end_epoch: float = _f(-1.0, hi=L.MAX_EPOCHS, doc="t_end: masks freeze (-1 = 75% of training)")
    drop_fraction: float = _f(0.5, lo=0.0, hi=1.0, doc="d0: initial drop fraction")
    drop_fraction_min: float = _f(0.005, lo=0.0, hi=1.0, doc="d_min: final drop fraction")
    grow: str = _f("gradient", choices=("gradient", "random"))
    init: str = _f("scaled", choices=("scaled", "dense"),
                   doc="scaled: rescale a new sparse mask's weights to their active fan-in; dense: keep dense init")
    prune_rate: float = _f(-1.0, doc="LTH: fraction of remaining weights pruned per round")
    rewind_epoch: int = _f(-1, hi=L.MAX_EPOCHS, doc="LTH: epoch whose weights each round rewinds to")
    round_epochs: int = _f(0, lo=0, hi=L.MAX_EPOCHS, doc="LTH: epochs per round (0 = train.epochs)")


@dataclass(frozen=True)
class Recipe:
    name: str = "run"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    source: str = field(default="<recipe>", compare=False)

    def to_toml(self) -> str:
        return to_toml(self)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_toml().encode()).hexdigest()

    def replace(self, **tables: dict[str, Any]) -> Recipe:
        """A copy with some keys changed, validated like a file: `replace(sparsity={"final": 0.99})`."""
        raw = to_dict(self)
        for table, values in tables.items():
            if table in ("name", "seed"):
                raw[table] = values
            else:
                raw[table].update(values)
        return from_dict(raw, self.source)


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig,
                             "sparsity": SparsityConfig}
TOP_KEYS = {"name": str, "seed": int}


def load_recipe(path: str | Path, source: str | None = None) -> Recipe:
    """Read and validate a recipe file; every problem is a RecipeError naming the file (`source`, default its
    name) and key."""
    path = Path(path)
    source = source or path.name
    if not path.is_file():
        raise RecipeError(str(path), "", None, "recipe file not found")
    try:
        text = read_text_file(path, L.MAX_RECIPE_BYTES)
    except TextError as exc:
        raise RecipeError(source, "", None, str(exc)) from None
    return parse_recipe(text, source)


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """A recipe from TOML text (a file's, or one embedded in a checkpoint or artefact), bounded in size,
    nesting and integer length (`formats.text.parse_toml`)."""
    try:
        raw = parse_toml(text)
    except TextError as exc:
        raise RecipeError(source, "", None, str(exc)) from None
    return from_dict(raw, source)


def from_dict(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    known = list(TOP_KEYS) + list(SECTIONS)
    for key in raw:
        if key not in known:
            raise RecipeError(source, "", key, f"is not a recipe key{_did_you_mean(key, known)}")
    top: dict[str, Any] = {}
    for key, kind in TOP_KEYS.items():
        if key in raw:
            top[key] = _check_type(source, "", key, raw[key], kind)
    if "seed" in top:
        _check_range(source, "", "seed", top["seed"], _spec(lo=0, hi=L.MAX_SEED))
    if "name" in top:
        _check_run_name(source, top["name"])
    sections = {}
    for table, cls in SECTIONS.items():
        values = raw.get(table, {})
        if not isinstance(values, dict):
            raise RecipeError(source, "", table, "must be a table ([" + table + "])")
        sections[table] = _build_section(source, table, cls, values)
    recipe = Recipe(**top, **sections, source=source)
    _check_cross_fields(recipe)
    return recipe


def _build_section(source: str, table: str, cls: type, values: dict[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise RecipeError(source, table, key, f"is not a key of [{table}]{_did_you_mean(key, list(fields))}")
        spec = fields[key]
        value = _check_type(source, table, key, value, spec.type)
        _check_range(source, table, key, value, spec.metadata)
        kwargs[key] = value
    return cls(**kwargs)


_TYPE_NAMES = {"int": int, "float": float, "bool": bool, "str": str, "list[str]": list}


def _check_type(source: str, table: str, key: str, value: Any, declared: Any) -> Any:
    kind = _TYPE_NAMES.get(declared, declared) if isinstance(declared, str) else declared
    shown = _show(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise RecipeError(source, table, key, f"= {shown} must be true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(source, table, key, f"= {shown} must be an integer")
        return value
    if kind is float:
        return _check_real(source, table, key, value, shown)
    if kind is str:
        if not isinstance(value, str):
            raise RecipeError(source, table, key, f"= {shown} must be a string")
        return value
    if kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RecipeError(source, table, key, f"= {shown} must be a list of strings")
        return list(value)
    raise TypeError(f"unsupported recipe type {declared!r}")


def _check_real(source: str, table: str, key: str, value: Any, shown: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecipeError(source, table, key, f"= {shown} must be a number")
    if not math.isfinite(value):
        raise RecipeError(source, table, key, f"= {shown} must be a finite number")
    if abs(value) > L.MAX_REAL:  # every real constant is computed with in float32 (torch: lr 1e39 cannot be)
        raise RecipeError(source, table, key, f"= {shown} is beyond {L.MAX_REAL:g}: recipe numbers must fit float32")
    return float(value)


def _check_range(source: str, table: str, key: str, value: Any, spec: Any) -> None:
    if not spec:
        return
    choices = spec.get("choices")
    if choices and isinstance(value, list):  # a list key: every item a choice
        for item in value:
            if item not in choices:
                raise RecipeError(source, table, key, f"= {_show(value)}: \"{item}\" is not one of "
                                                      f"{', '.join(choices)}{_did_you_mean(item, list(choices))}")
    elif choices and value not in choices:
        hint = _did_you_mean(str(value), list(choices))
        raise RecipeError(source, table, key, f"= {_show(value)} must be one of {', '.join(choices)}{hint}")
    lo, hi = spec.get("lo"), spec.get("hi")
    below = lo is not None and (value <= lo if spec["lo_open"] else value < lo)
    above = hi is not None and (value >= hi if spec["hi_open"] else value > hi)
    if below or above:
        if lo is not None and hi is not None:
            rng = f"{'(' if spec['lo_open'] else '['}{_num(lo)}, {_num(hi)}{')' if spec['hi_open'] else ']'}"
            raise RecipeError(source, table, key, f"= {_show(value)} must be in {rng}")
        op = (">" if spec["lo_open"] else ">=") if lo is not None else ("<" if spec["hi_open"] else "<=")
        raise RecipeError(source, table, key, f"= {_show(value)} must be {op} {_num(lo if lo is not None else hi)}")


# A run's name is the folder `train` creates under runs/ (`prune-compare` adds "-<method>-<sparsity>-s<seed>"):
# exactly one path component (no "/", no NUL, not "." or ".."), short enough for any file system's 255 bytes.
MAX_NAME_BYTES = 200


def _check_run_name(source: str, name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name or len(name.encode()) > MAX_NAME_BYTES:
        raise RecipeError(source, "", "name", f"= {_show(name)} must be a plain folder name: 1 to {MAX_NAME_BYTES} "
                                              "bytes, no / or NUL, not . or .. (the run goes to runs/<name>)")


def _check_cross_fields(recipe: Recipe) -> None:
    """Rules that involve several keys; defaults that depend on other keys stay as written (-1)."""
    train = recipe.train
    if "jsonl" not in train.loggers:
        raise RecipeError(recipe.source, "train", "loggers",
                          f"= {_show(train.loggers)} must include \"jsonl\": metrics.jsonl is "
                          "the run's record that resume, cost and prune-compare read")
    _check_schedule(recipe)
    _check_lth(recipe)


def _check_schedule(recipe: Recipe) -> None:
    """The drop fraction's range and the ramp's epochs: t0 < t1 <= t_end <= epochs."""
    src, sp, train = recipe.source, recipe.sparsity, recipe.train
    if sp.method == "ndsnn" and sp.initial > sp.final:
        raise RecipeError(src, "sparsity", "initial", f"= {_num(sp.initial)} must be <= final ({_num(sp.final)}): "
                                                      "NDSNN ramps sparsity up from initial to final")
    if sp.drop_fraction_min > sp.drop_fraction:
        raise RecipeError(src, "sparsity", "drop_fraction_min", f"= {_num(sp.drop_fraction_min)} must be <= "
                                                                f"drop_fraction ({_num(sp.drop_fraction)})")
    t0, t1, t_end = sparse_epochs(recipe)
    if sp.update_end_epoch != -1 and not 0 < sp.update_end_epoch <= train.epochs:
        raise RecipeError(src, "sparsity", "update_end_epoch",
                          f"= {_num(sp.update_end_epoch)} must be in (0, train.epochs = {train.epochs}]")
    if sp.ramp_end_epoch != -1 and sp.ramp_end_epoch < 0:
        raise RecipeError(src, "sparsity", "ramp_end_epoch",
                          f"= {_num(sp.ramp_end_epoch)} must be >= 0 (or -1 for the default)")
    if sp.method in ("ndsnn", "gmp"):
        if t1 > t_end:
            raise RecipeError(src, "sparsity", "ramp_end_epoch", f"= {_num(t1)} must be <= update_end_epoch "
                                                                 f"({_num(t_end)})")
        if t0 >= t1:
            raise RecipeError(src, "sparsity", "ramp_start_epoch", f"= {_num(t0)} must be < ramp_end_epoch "
                                                                   f"({_num(t1)})")


def _check_lth(recipe: Recipe) -> None:
    """LTH needs its prune rate and rewind epoch (in range); every other method must not set them."""
    src, sp = recipe.source, recipe.sparsity
    if sp.method != "lth":
        if sp.prune_rate != -1 or sp.rewind_epoch != -1:
            key = "prune_rate" if sp.prune_rate != -1 else "rewind_epoch"
            raise RecipeError(src, "sparsity", key, f"only applies to method = \"lth\" (method is \"{sp.method}\")")
        return
    if sp.prune_rate == -1:
        raise RecipeError(src, "sparsity", "prune_rate", "is required for method = \"lth\" (e.g. 0.25: prune 25% "
                                                         "of the remaining weights per round)")
    if not 0 < sp.prune_rate < 1:
        raise RecipeError(src, "sparsity", "prune_rate", f"= {_num(sp.prune_rate)} must be in (0, 1)")
    epochs = sp.round_epochs or recipe.train.epochs
    if sp.rewind_epoch == -1:
        raise RecipeError(src, "sparsity", "rewind_epoch", "is required for method = \"lth\" "
                                                           "(0 = rewind to initialisation)")
    if not 0 <= sp.rewind_epoch < epochs:
        raise RecipeError(src, "sparsity", "rewind_epoch",
                          f"= {sp.rewind_epoch} must be in [0, {epochs}) (the epochs of a round)")


def sparse_epochs(recipe: Recipe) -> tuple[float, float, float]:
    """(t0, t1, t_end) in epochs with the defaults resolved: t_end 75% of training, t1 75% of t_end."""
    sp = recipe.sparsity
    t_end = sp.update_end_epoch if sp.update_end_epoch != -1 else 0.75 * recipe.train.epochs
    t1 = sp.ramp_end_epoch if sp.ramp_end_epoch != -1 else 0.75 * t_end
    return sp.ramp_start_epoch, t1, t_end


LTH_PRUNE_RATE = 0.25  # LTH-SNN: prune 25% of the remaining weights per round
LTH_MAX_REWIND_EPOCH = 20  # LTH-SNN rewinds to epoch 20 (of 300); shorter rounds use round_epochs // 10


def with_method(base: Recipe, method: str, **sparsity: Any) -> tuple[Recipe, list[str]]:
    """`base` switched to another method (for `cost` and `prune-compare`), plus notes on what was assumed.

    Keys that only apply to LTH are reset for other methods; LTH gets the recipe's own settings or
    LTH-SNN's defaults; NDSNN's initial sparsity is clamped to the final one.
    """
    sp, notes = base.sparsity, []
    changes: dict[str, Any] = {"method": method, "prune_rate": -1.0, "rewind_epoch": -1, **sparsity}
    final = changes.get("final", sp.final)
    if method == "ndsnn" and sp.initial > final:
        changes["initial"] = final
        notes.append(f"ndsnn at sparsity {final:g}: initial sparsity {sp.initial:g} > final, clamped to {final:g}")
    if method == "lth":
        round_epochs = sp.round_epochs or base.train.epochs
        if sp.prune_rate != -1 and sp.rewind_epoch != -1:
            changes["prune_rate"], changes["rewind_epoch"] = sp.prune_rate, sp.rewind_epoch
        else:
            changes["prune_rate"] = LTH_PRUNE_RATE
            changes["rewind_epoch"] = min(LTH_MAX_REWIND_EPOCH, round_epochs // 10)
            notes.append(f"lth: the recipe has no LTH settings; using LTH-SNN defaults prune_rate = "
                         f"{LTH_PRUNE_RATE:g}, rewind_epoch = min({LTH_MAX_REWIND_EPOCH}, {round_epochs} // 10) "
                         f"= {changes['rewind_epoch']}")
    return base.replace(sparsity=changes), notes


def to_dict(recipe: Recipe) -> dict[str, Any]:
    out: dict[str, Any] = {"name": recipe.name, "seed": recipe.seed}
    for table in SECTIONS:
        out[table] = dataclasses.asdict(getattr(recipe, table))
    return out


def to_toml(recipe: Recipe) -> str:
    """Canonical TOML for a recipe (all keys), so a run directory records exactly what ran."""
    raw = to_dict(recipe)
    lines = [f"name = {_toml_value(raw['name'])}", f"seed = {raw['seed']}"]
    for table in SECTIONS:
        lines += ["", f"[{table}]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in raw[table].items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # JSON's string escapes are all valid TOML basic-string escapes; TOML also forbids a raw DEL.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _show(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value[:60] + ("..." if len(value) > 60 else ""), ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _num(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return _toml_value(value)
    return show(value, 60)


def _num(value: float | None) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
