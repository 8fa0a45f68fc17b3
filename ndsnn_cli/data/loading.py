"""Data set builders and loaders whose order and augmentation are pure functions of (seed, epoch).

`build_datasets(cfg)` turns a recipe's `[data]` table into (train, test) data sets; `make_loader`
wraps one in a DataLoader that yields the same batches on every run, after a mid-epoch resume, for
any `num_workers`, and split evenly across distributed ranks. `for_training` holds the sets whose
transform is deterministic as tensors (`MaterialisedDataset`): each sample is decoded once, not once
per epoch, and a batch is one index gather.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ndsnn_cli import atomic
from ndsnn_cli.data import SYNTHETIC_TEST_SIZE, SYNTHETIC_TRAIN_SIZE, DataConfig, dataset_info
from ndsnn_cli.errors import UserError

if TYPE_CHECKING:
    from torchvision import datasets as tv_datasets

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


Split = tuple[Dataset, Dataset]
Builder = Callable[[DataConfig], Split]

_BUILDERS: dict[str, Builder] = {}


def register_dataset(name: str) -> Callable[[Builder], Builder]:
    """Add a builder `(cfg) -> (train, test)` for the catalog entry `name` (ndsnn_cli.data.DATASETS)."""

    def decorate(builder: Builder) -> Builder:
        dataset_info(name)
        _BUILDERS[name] = builder
        return builder

    return decorate


def build_datasets(cfg: DataConfig) -> Split:
    """(train, test) for the recipe's data set, cut to the first train_limit / test_limit images.

    The train set's random augmentation draws from torch's global RNG; `make_loader` makes those
    draws a pure function of (seed, epoch, index). The test set's transform is deterministic.
    """
    dataset_info(cfg.dataset)
    train, test = _BUILDERS[cfg.dataset](cfg)
    return _first(train, cfg.train_limit), _first(test, cfg.test_limit)


def raw_test_set(cfg: DataConfig) -> Dataset:
    """The test set as a device sees it: the deterministic test pipeline without its `Normalize`, so
    pixels in [0, 1] (the export input contract; the exported model normalises inside)."""
    from torchvision import transforms as T

    _, test = build_datasets(cfg)
    base = test.dataset if isinstance(test, Subset) else test
    steps = base.transform.transforms  # every builder's test transform is a `_transforms` Compose
    base.transform = T.Compose([step for step in steps if not isinstance(step, T.Normalize)])
    return test


MATERIALISE_MAX_BYTES = 512 << 20  # a set held as tensors at most (Fashion-MNIST's 60k: 188 MB, CIFAR's test: 123 MB)


class MaterialisedDataset(Dataset):
    """A data set with a deterministic transform, every sample computed once into two tensors.

    `make_loader` gathers its batches by index in the sampler's order: the same values, bit for bit,
    as the per-sample pipeline, without decoding and transforming every image again each epoch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


def materialise(dataset: Dataset, max_bytes: int = MATERIALISE_MAX_BYTES) -> Dataset:
    """`dataset` as a `MaterialisedDataset` when its samples fit in `max_bytes`, else unchanged.
    Only for deterministic transforms: an augmented set must draw new crops every epoch."""
    count = len(dataset)  # type: ignore[arg-type]
    if isinstance(dataset, MaterialisedDataset) or count == 0:
        return dataset
    first, _ = dataset[0]
    if not isinstance(first, torch.Tensor) or first.element_size() * first.numel() * count > max_bytes:
        return dataset
    whole = _decoded_at_once(dataset)
    if whole is not None:
        return MaterialisedDataset(*whole)
    images = torch.empty((count, *first.shape), dtype=first.dtype)
    labels = torch.empty(count, dtype=torch.int64)
    for index in range(count):
        images[index], labels[index] = dataset[index]
    return MaterialisedDataset(images, labels)


MATERIALISE_CHUNK = 4096  # images per vectorised pass (a chunk of CIFAR in float32: 50 MB)


def _decoded_at_once(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(images, labels) of an MNIST-family or CIFAR set (or its first-n `Subset`) whose transform is
    exactly ToTensor [+ Normalize], computed on whole chunks of the decoded uint8 array instead of one
    PIL image at a time (Fashion-MNIST's 70k: 17 s -> well under 1 s). The same elementwise float32
    operations as the per-sample pipeline (uint8 -> float, / 255, - mean, / std), so the same bits;
    None for anything else (the caller runs the pipeline per sample)."""
    from torchvision import datasets as tv
    from torchvision import transforms as T

    base, count = dataset, len(dataset)  # type: ignore[arg-type]
    if isinstance(dataset, Subset):
        base = dataset.dataset
        if not isinstance(dataset.indices, range) or dataset.indices != range(count):
            return None
    steps = getattr(getattr(base, "transform", None), "transforms", None)
    if (type(base).__getitem__ not in (tv.MNIST.__getitem__, tv.CIFAR10.__getitem__)
            or base.target_transform is not None
            or not isinstance(base.transform, T.Compose) or not steps or type(steps[0]) is not T.ToTensor
            or any(type(step) is not T.Normalize for step in steps[1:])):
        return None
    pixels = torch.as_tensor(base.data[:count])
    pixels = pixels.unsqueeze(1) if pixels.dim() == 3 else pixels.permute(0, 3, 1, 2)  # (N, C, H, W) as ToTensor
    if pixels.dtype != torch.uint8:
        return None
    images = torch.empty(pixels.shape, dtype=torch.get_default_dtype())
    for start in range(0, count, MATERIALISE_CHUNK):
        chunk = pixels[start:start + MATERIALISE_CHUNK].to(images.dtype).div(255)
        for step in steps[1:]:
            chunk = step(chunk)  # Normalize broadcasts its (C, 1, 1) mean/std over the batch
        images[start:start + MATERIALISE_CHUNK] = chunk
    labels = torch.as_tensor(base.targets, dtype=torch.int64)[:count].clone()
    return images, labels


def for_training(cfg: DataConfig, datasets: Split) -> Split:
    """(train, test) as the trainer reads them: the test set, and the train set when `[data]` has no
    random augmentation, materialised (`materialise`)."""
    train, test = datasets
    return (train if cfg.augment or cfg.cutout else materialise(train)), materialise(test)


class _TensorBatches:
    """The batches of a `MaterialisedDataset` in a sampler's order (a DataLoader's iteration, gathered)."""

    def __init__(self, dataset: MaterialisedDataset, sampler: EpochSampler, batch_size: int, drop_last: bool) -> None:
        self.dataset, self.sampler, self.batch_size, self.drop_last = dataset, sampler, batch_size, drop_last

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(self.sampler.indices(), dtype=torch.int64)
        for batch in range(len(self)):
            index = order[batch * self.batch_size:(batch + 1) * self.batch_size]
            yield self.dataset.images[index], self.dataset.labels[index]


def _first(dataset: Dataset, limit: int) -> Dataset:
    if limit <= 0 or limit >= len(dataset):  # type: ignore[arg-type]
        return dataset
    return Subset(dataset, range(limit))


# ---------------------------------------------------------------------------------------------
# Deterministic loading


class EpochSampler(Sampler[int]):
    """Indices for one epoch on one rank: a pure function of (seed, epoch, rank), resumable mid-epoch.

    Shuffled order is a permutation from a private generator seeded with `seed * 1_000_003 + epoch`;
    ranks take every world_size-th index (the list wrapped so all ranks get the same count), and
    the first `start_index` indices of this rank's share are skipped (batches already trained on).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        start_index: int = 0,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.start_index = start_index

    def indices(self) -> list[int]:
        n = self.num_samples
        if self.shuffle:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**64)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        if self.world_size > 1 and n > 0:
            total = math.ceil(n / self.world_size) * self.world_size
            order = (order * math.ceil(total / n))[:total]
            order = order[self.rank : total : self.world_size]
        return order[self.start_index :]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        per_rank = math.ceil(self.num_samples / self.world_size) if self.num_samples else 0
        return max(per_rank - self.start_index, 0)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The RNG seed for augmenting sample `index` in `epoch`: a stable hash, same in every process."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: a valid seed on every torch version


class SeededAugmentation(Dataset):
    """`dataset[index]` run with torch's CPU RNG seeded from (seed, epoch, index), then restored.

    Random transforms (crop, flip, erasing) draw from torch's global CPU generator, so without this
    a sample's augmentation depends on which worker loads it and what ran before. Seeding around
    each `__getitem__` makes it a pure function of (seed, epoch, index), whatever num_workers, rank
    or resume point; the caller's RNG state is untouched. Only the CPU generator is reseeded
    (not `torch.manual_seed`, which would also reseed CUDA generators that fork_rng does not restore).
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
            return self.dataset[index]


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    distributed_rank: int = 0,
    world_size: int = 1,
) -> DataLoader | _TensorBatches:
    """A loader for one epoch; its batches are a pure function of (seed, epoch, rank, start_batch).

    Build a new loader each epoch. `start_batch` resumes mid-epoch: the first start_batch batches of
    this rank's share are skipped without loading them. Eval loaders use it too (shuffle=False; a
    deterministic transform makes the per-sample seeding a no-op).
    """
    sampler = EpochSampler(
        len(dataset),  # type: ignore[arg-type]
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        rank=distributed_rank,
        world_size=world_size,
        start_index=start_batch * batch_size,
    )
    if isinstance(dataset, MaterialisedDataset):  # deterministic: no per-sample seeding or workers needed
        return _TensorBatches(dataset, sampler, batch_size, drop_last)
    return DataLoader(
        SeededAugmentation(dataset, seed, epoch),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        # A private generator: the loader's worker base seed would otherwise be drawn from (and
        # advance) the trainer's global RNG. Augmentation does not depend on it (see above).
        generator=torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64),
    )


# ---------------------------------------------------------------------------------------------
# Transforms


@dataclass(frozen=True)
class _Stats:
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _stats(name: str) -> _Stats:
    """Per-channel mean/std of a training set's pixels in [0, 1], from the catalog (the export input
    contract reads the same numbers)."""
    info = dataset_info(name)
    return _Stats(info.mean, info.std)


_MNIST_STATS = _stats("mnist")
_FASHION_MNIST_STATS = _stats("fashion-mnist")
_CIFAR10_STATS = _stats("cifar10")
_CIFAR100_STATS = _stats("cifar100")
_TINY_IMAGENET_STATS = _stats("tinyimagenet")


def _tv_datasets() -> Any:
    """torchvision is imported on first use: it costs seconds, and `ndsnn cost`/`--help` never need it."""
    from torchvision import datasets

    return datasets


def _transforms(
    cfg: DataConfig, stats: _Stats | None, *, size: int, padding: int, flip: bool, pil: bool = True
) -> tuple[Callable[[Any], torch.Tensor], Callable[[Any], torch.Tensor]]:
    """(train, test) transforms: [crop (+flip)] -> tensor -> normalize [-> cutout] for train."""
    from torchvision import transforms as T

    finish: list[Any] = [T.ToTensor()] if pil else []
    if stats is not None:
        finish.append(T.Normalize(stats.mean, stats.std))
    train: list[Any] = []
    if cfg.augment:
        train.append(T.RandomCrop(size, padding=padding))
        if flip:
            train.append(T.RandomHorizontalFlip())
    train += finish
    if cfg.cutout:
        # Cutout (DeVries & Taylor 2017): zero a square of a quarter of the image area (16x16 on
        # 32x32) after Normalize, i.e. set it to the mean pixel. RandomErasing keeps the square
        # inside the image, where Cutout lets it run off the edge.
        train.append(T.RandomErasing(p=1.0, scale=(0.25, 0.25), ratio=(1.0, 1.0), value=0))
    return T.Compose(train), T.Compose(finish)


# ---------------------------------------------------------------------------------------------
# Where data lives


def cache_dir() -> Path:
    """Derived files (decompressed IDX): $NDSNN_CACHE, else ~/.cache/ndsnn."""
    return Path(os.environ.get("NDSNN_CACHE") or Path.home() / ".cache" / "ndsnn")


def default_data_root() -> Path:
    """Where downloads go when a recipe leaves `root` empty."""
    return cache_dir() / "data"


def _missing(cfg: DataConfig, searched: Sequence[Path], what: str, expected: str) -> UserError:
    where = " or ".join(str(p) for p in searched)
    return UserError(
        f"[data] root = {cfg.root!r}: no {what} data found in {where} (expected {expected}); "
        "set download = true to fetch it"
    )


def _download_failed(cfg: DataConfig, what: str, root: Path, err: Exception) -> UserError:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return UserError(f"[data] download = true: could not fetch {what} into {root}: {reason}")


# ---------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX files)

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _find_idx(folder: Path, tv_name: str) -> dict[str, Path] | None:
    """The four IDX files in `folder` (flat, as Debian ships them) or `folder/<tv_name>/raw`, each
    plain or `.gz`; None unless all four are there."""
    found: dict[str, Path] = {}
    for name in _IDX_FILES:
        for place in (folder, folder / tv_name / "raw"):
            hit = next((p for p in (place / name, place / f"{name}.gz") if p.is_file()), None)
            if hit is not None:
                found[name] = hit
                break
        else:
            return None
    return found


def _torchvision_root(files: dict[str, Path], tv_name: str) -> Path:
    """A root under which torchvision finds `<tv_name>/raw/<file>` uncompressed.

    torchvision reads only uncompressed IDX files in that layout. When the files already are, use
    their root as is; otherwise decompress (or copy) them once into the cache, keyed by the source
    files' paths, sizes and mtimes so a changed source is picked up.
    """
    parents = {p.parent for p in files.values()}
    if all(p.suffix != ".gz" for p in files.values()) and len(parents) == 1:
        raw = parents.pop()
        if raw.name == "raw" and raw.parent.name == tv_name:
            return raw.parent.parent
    key = hashlib.sha1()
    for name in _IDX_FILES:
        stat = files[name].stat()
        key.update(f"{files[name].resolve()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    root = cache_dir() / "idx" / f"{tv_name}-{key.hexdigest()[:16]}"
    for name, source in files.items():
        target = root / tv_name / "raw" / name
        if target.is_file():
            continue
        opener = gzip.open if source.suffix == ".gz" else open
        try:
            with opener(source, "rb") as handle:
                data = handle.read(MAX_IDX_BYTES + 1)  # a .gz of a few KB can expand to gigabytes
            if len(data) > MAX_IDX_BYTES:
                raise UserError(f"[data] {source}: more than {MAX_IDX_BYTES:,} bytes uncompressed; not an IDX file "
                                "of this data set")
            atomic.write_bytes(target, data)
        except OSError as err:  # unreadable or corrupt .gz, or a read-only cache
            raise UserError(
                f"[data] could not unpack {source} into {target.parent}: {err} (NDSNN_CACHE sets the cache folder)"
            ) from err
    return root


MAX_IDX_BYTES = 1 << 30  # one IDX file uncompressed (MNIST's training images: 47 MB)
IDX_CLASSES = 10


def _check_idx_pair(raw: Path, split: str) -> None:
    """The IDX headers torchvision trusts: uint8 images [N, 28, 28] and labels [N] in [0, 10), each file exactly
    as long as its header says (torchvision reshapes what it finds, or indexes the loss out of range)."""
    images = _idx_dims(raw / f"{split}-images-idx3-ubyte", 3)
    labels = _idx_dims(raw / f"{split}-labels-idx1-ubyte", 1)
    if images[1:] != [28, 28] or images[0] != labels[0]:
        raise UserError(f"[data] {raw}: {split} images {images} and labels {labels} must be [N, 28, 28] and [N]")
    with open(raw / f"{split}-labels-idx1-ubyte", "rb") as handle:
        handle.seek(8)
        top = max(handle.read(), default=0)
    if top >= IDX_CLASSES:
        raise UserError(f"[data] {raw / f'{split}-labels-idx1-ubyte'}: label {top} is not a class in "
                        f"[0, {IDX_CLASSES})")


def _idx_dims(path: Path, ndim: int) -> list[int]:
    with open(path, "rb") as handle:
        head = handle.read(4 + 4 * ndim)
    if len(head) < 4 + 4 * ndim or head[:4] != bytes([0, 0, 8, ndim]):
        raise UserError(f"[data] {path}: not a uint8 IDX file of {ndim} dimension(s) (magic {head[:4].hex()})")
    dims = [int.from_bytes(head[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if path.stat().st_size != len(head) + math.prod(dims):
        raise UserError(f"[data] {path}: header says {dims} ({math.prod(dims):,} bytes of data), the file holds "
                        f"{path.stat().st_size - len(head):,}")
    return dims


def _idx_datasets(
    cfg: DataConfig,
    cls: type[tv_datasets.MNIST],
    what: str,
    candidates: Sequence[Path],
    stats: _Stats,
    flip: bool,
) -> Split:
    train_tf, test_tf = _transforms(cfg, stats, size=28, padding=2, flip=flip)
    tv_name = cls.__name__
    for folder in candidates:
        files = _find_idx(folder, tv_name)
        if files is not None:
            root = _torchvision_root(files, tv_name)
            break
    else:
        if not cfg.download:
            expected = ", ".join(f"{n}[.gz]" for n in _IDX_FILES)
            raise _missing(cfg, candidates, what, expected)
        root = candidates[-1]
        try:
            cls(str(root), train=True, download=True)
        except (OSError, RuntimeError) as err:
            raise _download_failed(cfg, what, root, err) from err
    for split in ("train", "t10k"):
        _check_idx_pair(root / tv_name / "raw", split)
    return (
        cls(str(root), train=True, transform=train_tf),
        cls(str(root), train=False, transform=test_tf),
    )


def _root_or(cfg: DataConfig, *defaults: Path) -> list[Path]:
    return [Path(cfg.root).expanduser()] if cfg.root else list(defaults)


@register_dataset("fashion-mnist")
def _fashion_mnist(cfg: DataConfig) -> Split:
    candidates = _root_or(cfg, DEBIAN_FASHION_MNIST, default_data_root())
    return _idx_datasets(cfg, _tv_datasets().FashionMNIST, "Fashion-MNIST", candidates, _FASHION_MNIST_STATS, True)


@register_dataset("mnist")
def _mnist(cfg: DataConfig) -> Split:
    candidates = _root_or(cfg, default_data_root())
    # No flip: mirrored digits are different symbols (or none).
    return _idx_datasets(cfg, _tv_datasets().MNIST, "MNIST", candidates, _MNIST_STATS, False)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (pickled batches)


class _ArraysOnly(pickle.Unpickler):
    """CIFAR's batches are pickles of dicts, lists, strings and numpy arrays: only numpy's array constructors
    are resolved, any other global (os.system, builtins.eval, ...) is refused, so a batch cannot run code."""

    ALLOWED = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                         ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")})

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refuses the global {module}.{name}")
        return super().find_class(module, name)


def _load_batch(path: Path, max_bytes: int = 1 << 30) -> dict[str, Any]:
    try:
        if path.stat().st_size > max_bytes:
            raise ValueError(f"{path.stat().st_size:,} bytes")
        with open(path, "rb") as handle:
            entry = _ArraysOnly(handle, encoding="latin1").load()
    except Exception as exc:  # pickle raises UnpicklingError, EOFError, ValueError, TypeError, ... on a bad file
        reason = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
        raise UserError(f"[data] {path}: not a CIFAR batch ({reason})") from None
    if not isinstance(entry, dict):
        raise UserError(f"[data] {path}: not a CIFAR batch (a {type(entry).__name__}, not a dict)")
    return entry


def _batch_rows(path: Path, entry: dict[str, Any], classes: int) -> tuple[np.ndarray, list[int]]:
    """uint8 pixel rows [N, 3072] and their labels in [0, classes), as torchvision's CIFAR reshapes them."""
    rows, labels = entry.get("data"), entry.get("labels", entry.get("fine_labels"))
    if not (isinstance(rows, np.ndarray) and rows.dtype == np.uint8 and rows.ndim == 2 and rows.shape[1] == 3072
            and isinstance(labels, list) and len(labels) == rows.shape[0]
            and all(isinstance(v, int) and 0 <= v < classes for v in labels)):
        raise UserError(f"[data] {path}: a CIFAR batch holds uint8 data [N, 3072] and N labels in [0, {classes})")
    return rows, labels


@functools.cache
def _trust_present_files(cls: type[tv_datasets.CIFAR10]) -> type[tv_datasets.CIFAR10]:
    """`cls` that loads a present folder without md5-checking it, through a pickle loader that builds only
    numpy arrays (`_ArraysOnly`) and checks every batch's shapes and labels.

    torchvision checks every batch's md5 on each load, which rejects any folder but the official
    one (the tests' tiny batches, a re-pickled copy) as "corrupted". Files fetched by
    `download = true` are still checked: torchvision verifies the archive's md5.
    """
    classes = 100 if cls.meta["key"] == "fine_label_names" else 10

    class Trusting(cls):  # type: ignore[misc, valid-type]
        # torchvision's check_integrity(path, md5=None) checks only that the file exists.
        train_list: ClassVar[list[list[str | None]]] = [[name, None] for name, _ in cls.train_list]
        test_list: ClassVar[list[list[str | None]]] = [[name, None] for name, _ in cls.test_list]
        meta: ClassVar[dict[str, str | None]] = {**cls.meta, "md5": None}

        def __init__(self, root: str, train: bool = True, transform: Callable[..., Any] | None = None,
                     target_transform: Callable[..., Any] | None = None, download: bool = False) -> None:
            _tv_datasets().VisionDataset.__init__(self, root, transform=transform, target_transform=target_transform)
            self.train = train
            if download:
                self.download()
            folder = Path(self.root) / self.base_folder
            pairs = [_batch_rows(folder / name, _load_batch(folder / name), classes)
                     for name, _ in (self.train_list if train else self.test_list)]
            self.data = np.vstack([rows for rows, _ in pairs]).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
            self.targets = [label for _, labels in pairs for label in labels]
            self._load_meta()

        def _load_meta(self) -> None:
            path = Path(self.root) / self.base_folder / str(self.meta["filename"])
            names = _load_batch(path).get(str(self.meta["key"]))
            if not isinstance(names, list):
                raise UserError(f"[data] {path}: {self.meta['key']} must be a list of class names")
            self.classes = names
            self.class_to_idx = {name: i for i, name in enumerate(names)}

    Trusting.__name__ = Trusting.__qualname__ = cls.__name__
    return Trusting


def _cifar_datasets(cfg: DataConfig, cls: type[tv_datasets.CIFAR10], what: str, stats: _Stats) -> Split:
    train_tf, test_tf = _transforms(cfg, stats, size=32, padding=4, flip=True)
    root = Path(cfg.root).expanduser() if cfg.root else default_data_root()
    folder = root / cls.base_folder
    names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    if not all((folder / name).is_file() for name in names):
        if not cfg.download:
            expected = f"{cls.base_folder}/ with {', '.join(names)}"
            raise _missing(cfg, [root], what, expected)
        try:
            cls(str(root), train=True, download=True)
        except (OSError, RuntimeError) as err:
            raise _download_failed(cfg, what, root, err) from err
    return (
        cls(str(root), train=True, transform=train_tf),
        cls(str(root), train=False, transform=test_tf),
    )


@register_dataset("cifar10")
def _cifar10(cfg: DataConfig) -> Split:
    return _cifar_datasets(cfg, _trust_present_files(_tv_datasets().CIFAR10), "CIFAR-10", _CIFAR10_STATS)


@register_dataset("cifar100")
def _cifar100(cfg: DataConfig) -> Split:
    return _cifar_datasets(cfg, _trust_present_files(_tv_datasets().CIFAR100), "CIFAR-100", _CIFAR100_STATS)


# ---------------------------------------------------------------------------------------------
# Tiny-ImageNet (JPEG tree)


@functools.cache
def _tiny_imagenet_train_class() -> type[tv_datasets.ImageFolder]:
    class TinyImageNetTrain(_tv_datasets().ImageFolder):
        """`train/<wnid>/images/*.JPEG`; class index = position of the wnid in sorted wnids.txt."""

        def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
            wnids = sorted(_read_wnids(Path(directory).parent))
            return wnids, {wnid: i for i, wnid in enumerate(wnids)}

    return TinyImageNetTrain


class _TinyImageNetVal(Dataset):
    """`val/images/*.JPEG` labelled by `val/val_annotations.txt` (file, wnid, x, y, w, h; tabs)."""

    def __init__(self, folder: Path, transform: Callable[[Any], torch.Tensor]) -> None:
        wnids = sorted(_read_wnids(folder))
        class_of = {wnid: i for i, wnid in enumerate(wnids)}
        self.transform = transform
        self.samples: list[tuple[Path, int]] = []
        lines = (folder / "val" / "val_annotations.txt").read_text().splitlines()
        for line_number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in class_of:
                raise UserError(
                    f"{folder / 'val' / 'val_annotations.txt'}:{line_number}: expected "
                    f"'<file>\\t<wnid from wnids.txt>\\t...', got {line!r}"
                )
            self.samples.append((folder / "val" / "images" / fields[0], class_of[fields[1]]))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        return self.transform(_tv_datasets().folder.default_loader(str(path))), target


def _read_wnids(folder: Path) -> list[str]:
    return [line.strip() for line in (folder / "wnids.txt").read_text().splitlines() if line.strip()]


def _tiny_imagenet_folder(root: Path) -> Path | None:
    for folder in (root / "tiny-imagenet-200", root):
        needed = ("wnids.txt", "train", "val/images", "val/val_annotations.txt")
        if all((folder / name).exists() for name in needed):
            return folder
    return None


@register_dataset("tinyimagenet")
def _tiny_imagenet(cfg: DataConfig) -> Split:
    train_tf, test_tf = _transforms(cfg, _TINY_IMAGENET_STATS, size=64, padding=4, flip=True)
    root = Path(cfg.root).expanduser() if cfg.root else default_data_root()
    folder = _tiny_imagenet_folder(root)
    if folder is None:
        if not cfg.download:
            expected = "tiny-imagenet-200/ with wnids.txt, train/, val/images/, val/val_annotations.txt"
            raise _missing(cfg, [root], "Tiny-ImageNet", expected)
        try:
            _tv_datasets().utils.download_and_extract_archive(TINY_IMAGENET_URL, str(root), md5=TINY_IMAGENET_MD5)
        except (OSError, RuntimeError) as err:
            raise _download_failed(cfg, "Tiny-ImageNet", root, err) from err
        folder = root / "tiny-imagenet-200"
    try:
        train = _tiny_imagenet_train_class()(str(folder / "train"), transform=train_tf)
    except FileNotFoundError as err:  # a wnid without train/<wnid>/images/*.JPEG
        raise UserError(f"[data] root = {cfg.root!r}: {folder / 'train'}: {err}") from err
    return train, _TinyImageNetVal(folder, test_tf)


# ---------------------------------------------------------------------------------------------
# Synthetic


class _TensorImages(Dataset):
    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform: Callable[[Any], Any]) -> None:
        self.images = images
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.targets[index])


@register_dataset("synthetic")
def _synthetic(cfg: DataConfig) -> Split:
    """10 fixed random 28x28 patterns plus unit Gaussian noise: learnable in seconds, no files.

    Everything comes from one generator seeded 0, so every run and process sees the same images.
    """
    generator = torch.Generator().manual_seed(0)
    patterns = torch.randn(10, 1, 28, 28, generator=generator)

    def draw(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        targets = torch.randint(0, 10, (count,), generator=generator)
        noise = torch.randn(count, 1, 28, 28, generator=generator)
        return patterns[targets] + noise, targets

    train_images, train_targets = draw(SYNTHETIC_TRAIN_SIZE)
    test_images, test_targets = draw(SYNTHETIC_TEST_SIZE)
    train_tf, test_tf = _transforms(cfg, None, size=28, padding=2, flip=False, pil=False)
    return _TensorImages(train_images, train_targets, train_tf), _TensorImages(test_images, test_targets, test_tf)
