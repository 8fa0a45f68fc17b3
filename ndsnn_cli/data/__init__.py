"""Data sets: the catalog of what each one is, without loading it (and without importing torch).

A model's input shape and `ndsnn cost` need only this; `ndsnn_cli.data.loading` builds the actual
(train, test) sets and the deterministic loaders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from ndsnn_cli.errors import UserError


class DataConfig(Protocol):
    """What the data package reads of recipe.DataConfig (duck-typed, so it stands alone).

    Read-only properties, so a frozen dataclass satisfies it.
    """

    @property
    def dataset(self) -> str: ...
    @property
    def root(self) -> str: ...  # "" = the data set's default location
    @property
    def download(self) -> bool: ...
    @property
    def augment(self) -> bool: ...
    @property
    def cutout(self) -> bool: ...
    @property
    def train_limit(self) -> int: ...  # 0 = all, else the first N training images
    @property
    def test_limit(self) -> int: ...


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a cost estimate need to know about a data set without loading it."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    train_size: int  # nominal number of training images, before train_limit
    mean: tuple[float, ...] | None = None  # per-channel mean/std of the training pixels in [0, 1]: the
    std: tuple[float, ...] | None = None   # normalisation training applies (None: none, e.g. synthetic)


SYNTHETIC_TRAIN_SIZE = 2048
SYNTHETIC_TEST_SIZE = 512

# Every data set `ndsnn_cli.data.loading` can build (a test checks each has a builder).
DATASETS: dict[str, DatasetInfo] = {info.name: info for info in (
    DatasetInfo("fashion-mnist", 10, 1, 28, 60000, (0.2860,), (0.3530,)),
    DatasetInfo("mnist", 10, 1, 28, 60000, (0.1307,), (0.3081,)),
    DatasetInfo("cifar10", 10, 3, 32, 50000, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    DatasetInfo("cifar100", 100, 3, 32, 50000, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    DatasetInfo("tinyimagenet", 200, 3, 64, 100000, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
    DatasetInfo("synthetic", 10, 1, 28, SYNTHETIC_TRAIN_SIZE),
)}


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(sorted(DATASETS))
        raise UserError(f"[data] dataset: unknown dataset {name!r} (known: {known})") from None


def input_contract(name: str) -> dict[str, object]:
    """How a deployed model takes images (DESIGN §6): float pixels in [0, 1], NCHW, then the training
    normalisation (x - mean) / std per channel — which every export target applies inside or states."""
    info = dataset_info(name)
    channels = info.in_channels
    return {"layout": "NCHW", "range": [0.0, 1.0], "shape": [channels, info.image_size, info.image_size],
            "mean": list(info.mean or (0.0,) * channels), "std": list(info.std or (1.0,) * channels)}


def train_size(cfg: DataConfig) -> int:
    """Training images a recipe uses (the data set's nominal size, or `train_limit` when smaller)."""
    size = dataset_info(cfg.dataset).train_size
    return min(cfg.train_limit, size) if cfg.train_limit else size


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> tuple[int, bool]:
    """(optimizer steps per epoch, drop_last) for one rank's share of an epoch.

    A last batch of a single sample is dropped: BatchNorm cannot normalise one sample in training.
    """
    share = math.ceil(num_samples / world_size)
    drop_last = share % batch_size == 1
    return (share // batch_size if drop_last else math.ceil(share / batch_size)), drop_last
