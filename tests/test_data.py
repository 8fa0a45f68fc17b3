"""Data sets load from files in their real on-disk formats; loaders are pure functions of (seed, epoch)."""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from ndsnn_cli import data as catalog
from ndsnn_cli.data import loading as data
from ndsnn_cli.errors import UserError


@dataclass(frozen=True)
class DataCfg:
    """The attributes of recipe.DataConfig that data.py reads."""

    dataset: str = "synthetic"
    root: str = ""
    download: bool = False
    augment: bool = False
    cutout: bool = False
    train_limit: int = 0
    test_limit: int = 0


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("NDSNN_CACHE", str(cache))
    return cache


def normalized(value: int, mean: float, std: float) -> float:
    return (value / 255 - mean) / std


# ----------------------------------------------------------------------------- file writers


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> None:
    """IDX (SN3) file: magic 0x0000080<ndim> (unsigned byte data), big-endian dims, raw bytes."""
    payload = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if gz else payload)


def idx_images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 28, 28), dtype=np.uint8)


def write_idx_set(folder: Path, *, gz: bool, train: int = 6, test: int = 4) -> dict[str, np.ndarray]:
    arrays = {
        "train-images-idx3-ubyte": idx_images(train, 1),
        "train-labels-idx1-ubyte": np.arange(train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": idx_images(test, 2),
        "t10k-labels-idx1-ubyte": (np.arange(test, dtype=np.uint8) * 3) % 10,
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, gz=gz)
    return arrays


def write_pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def cifar_rows(count: int, seed: int) -> np.ndarray:
    """Rows of 3072 bytes: 1024 red, 1024 green, 1024 blue, each 32x32 row-major."""
    return np.random.default_rng(seed).integers(0, 256, (count, 3072), dtype=np.uint8)


def write_cifar10(root: Path) -> tuple[np.ndarray, list[int]]:
    folder = root / "cifar-10-batches-py"
    train_rows, train_labels = [], []
    for i in range(1, 6):
        rows, labels = cifar_rows(2, i), [(2 * i) % 10, (2 * i + 1) % 10]
        write_pickle(folder / f"data_batch_{i}", {"batch_label": f"batch {i}", "data": rows, "labels": labels})
        train_rows.append(rows)
        train_labels += labels
    write_pickle(folder / "test_batch", {"data": cifar_rows(3, 9), "labels": [7, 8, 9]})
    write_pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    return np.concatenate(train_rows), train_labels


def write_cifar100(root: Path) -> np.ndarray:
    folder = root / "cifar-100-python"
    rows = cifar_rows(4, 11)
    write_pickle(folder / "train", {"data": rows, "fine_labels": [0, 42, 99, 5], "coarse_labels": [0, 1, 2, 3]})
    write_pickle(folder / "test", {"data": cifar_rows(2, 12), "fine_labels": [98, 1], "coarse_labels": [0, 0]})
    write_pickle(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": []})
    return rows


TINY_WNIDS = ["n03000000", "n01000000", "n02000000"]  # file order; class index follows sorted order
TINY_COLOURS = {"n01000000": (200, 30, 40), "n02000000": (20, 180, 60), "n03000000": (10, 20, 240)}


def write_tiny_imagenet(root: Path) -> Path:
    folder = root / "tiny-imagenet-200"
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    for wnid in TINY_WNIDS:
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
        for i in range(2):
            Image.new("RGB", (64, 64), TINY_COLOURS[wnid]).save(images / f"{wnid}_{i}.JPEG", quality=95)
    annotations = []
    for i, wnid in enumerate(["n02000000", "n03000000", "n01000000", "n02000000"]):
        Image.new("RGB", (64, 64), TINY_COLOURS[wnid]).save(folder / "val" / "images" / f"val_{i}.JPEG", quality=95)
        annotations.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    return folder


# ----------------------------------------------------------------------------- loading real formats


def test_fashion_mnist_loads_debian_style_flat_gz_folder_with_exact_pixels(tmp_path: Path) -> None:
    arrays = write_idx_set(tmp_path / "fm", gz=True)
    train, test = data.build_datasets(DataCfg("fashion-mnist", root=str(tmp_path / "fm")))
    assert (len(train), len(test)) == (6, 4)
    image, label = train[2]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert label == 2
    pixel = int(arrays["train-images-idx3-ubyte"][2, 3, 5])
    assert image[0, 3, 5].item() == pytest.approx(normalized(pixel, 0.2860, 0.3530), abs=1e-5)
    assert [test[i][1] for i in range(4)] == [0, 3, 6, 9]


def test_idx_files_are_decompressed_once_into_the_cache(tmp_path: Path, _private_cache: Path) -> None:
    write_idx_set(tmp_path / "fm", gz=True)
    data.build_datasets(DataCfg("fashion-mnist", root=str(tmp_path / "fm")))
    cached = sorted(_private_cache.glob("idx/*/FashionMNIST/raw/*"))
    assert [p.name for p in cached] == sorted(data._IDX_FILES)
    stamps = [p.stat().st_mtime_ns for p in cached]
    data.build_datasets(DataCfg("fashion-mnist", root=str(tmp_path / "fm")))
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    assert not list(_private_cache.rglob("*.tmp"))


@pytest.mark.parametrize("layout", ["flat", "flat-gz", "torchvision", "torchvision-gz"])
def test_mnist_loads_flat_and_torchvision_layouts(tmp_path: Path, _private_cache: Path, layout: str) -> None:
    folder = tmp_path / "mnist" / ("MNIST/raw" if layout.startswith("torchvision") else "")
    arrays = write_idx_set(folder, gz=layout.endswith("gz"), train=5, test=3)
    train, test = data.build_datasets(DataCfg("mnist", root=str(tmp_path / "mnist")))
    assert (len(train), len(test)) == (5, 3)
    pixel = int(arrays["t10k-images-idx3-ubyte"][1, 27, 0])
    image, label = test[1]
    assert label == 3
    assert image[0, 27, 0].item() == pytest.approx(normalized(pixel, 0.1307, 0.3081), abs=1e-5)
    # torchvision's own uncompressed layout is read in place, nothing copied.
    assert _private_cache.exists() == (layout != "torchvision")


def test_cifar10_pickled_batches_load_with_labels_and_channel_pixels(tmp_path: Path) -> None:
    rows, labels = write_cifar10(tmp_path)
    train, test = data.build_datasets(DataCfg("cifar10", root=str(tmp_path)))
    assert (len(train), len(test)) == (10, 3)
    assert [train[i][1] for i in range(10)] == labels
    image, _ = train[7]
    assert image.shape == (3, 32, 32)
    green_y2_x3 = int(rows[7, 1024 + 2 * 32 + 3])
    assert image[1, 2, 3].item() == pytest.approx(normalized(green_y2_x3, 0.4822, 0.2435), abs=1e-5)
    assert [test[i][1] for i in range(3)] == [7, 8, 9]


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    rows = write_cifar100(tmp_path)
    train, test = data.build_datasets(DataCfg("cifar100", root=str(tmp_path)))
    assert [train[i][1] for i in range(4)] == [0, 42, 99, 5]
    assert [test[i][1] for i in range(2)] == [98, 1]
    blue_y31_x31 = int(rows[2, 2048 + 31 * 32 + 31])
    assert train[2][0][2, 31, 31].item() == pytest.approx(normalized(blue_y31_x31, 0.4409, 0.2762), abs=1e-5)


def test_cifar_augment_and_cutout_change_train_images_only(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    plain_train, plain_test = data.build_datasets(DataCfg("cifar10", root=str(tmp_path)))
    train, test = data.build_datasets(DataCfg("cifar10", root=str(tmp_path), augment=True, cutout=True))
    assert torch.equal(test[0][0], plain_test[0][0])
    torch.manual_seed(0)
    image = train[0][0]
    # Cutout: exactly one 16x16 square set to 0 (the mean after Normalize), whole inside the image.
    erased = (image == 0).all(dim=0)
    rows, cols = erased.nonzero().unbind(1)
    assert erased.sum() == 256 and rows.max() - rows.min() == 15 and cols.max() - cols.min() == 15
    assert not torch.equal(image, plain_train[0][0])


@pytest.mark.parametrize("root_is_folder", [False, True])
def test_tinyimagenet_tree_loads_sorted_wnid_classes_and_val_annotations(tmp_path: Path, root_is_folder: bool) -> None:
    folder = write_tiny_imagenet(tmp_path)
    root = folder if root_is_folder else tmp_path
    train, test = data.build_datasets(DataCfg("tinyimagenet", root=str(root)))
    assert (len(train), len(test)) == (6, 4)
    assert sorted(train[i][1] for i in range(6)) == [0, 0, 1, 1, 2, 2]
    assert [test[i][1] for i in range(4)] == [1, 2, 0, 1]  # n02 -> 1, n03 -> 2, n01 -> 0
    image, label = test[2]
    assert image.shape == (3, 64, 64) and label == 0
    red = normalized(TINY_COLOURS["n01000000"][0], 0.4802, 0.2770)
    assert image[0, 10, 10].item() == pytest.approx(red, abs=3 / 255 / 0.2770)  # JPEG: a few levels off


def test_synthetic_is_deterministic_and_learnable_by_nearest_class_mean() -> None:
    train, test = data.build_datasets(DataCfg("synthetic"))
    again, _ = data.build_datasets(DataCfg("synthetic"))
    assert (len(train), len(test)) == (2048, 512)
    assert torch.equal(train.images, again.images) and torch.equal(train.targets, again.targets)
    assert train[0][0].shape == (1, 28, 28)
    means = torch.stack([train.images[train.targets == c].mean(0).flatten() for c in range(10)])
    predicted = torch.cdist(test.images.flatten(1), means).argmin(1)
    assert (predicted == test.targets).float().mean().item() > 0.95


def test_limits_keep_the_first_images() -> None:
    full_train, full_test = data.build_datasets(DataCfg("synthetic"))
    train, test = data.build_datasets(DataCfg("synthetic", train_limit=100, test_limit=7))
    assert (len(train), len(test)) == (100, 7)
    assert torch.equal(train[99][0], full_train[99][0]) and test[6][1] == full_test[6][1]
    assert len(data.build_datasets(DataCfg("synthetic", train_limit=10**6))[0]) == 2048


def test_registry_info_matches_what_the_builders_produce() -> None:
    info = data.dataset_info("synthetic")
    train, _ = data.build_datasets(DataCfg("synthetic"))
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 28)
    assert tuple(train[0][0].shape) == (info.in_channels, info.image_size, info.image_size)
    assert set(catalog.DATASETS) == {"fashion-mnist", "mnist", "cifar10", "cifar100", "tinyimagenet", "synthetic"}
    assert set(data._BUILDERS) == set(catalog.DATASETS)  # every catalog entry can be built, and only those
    assert (data.dataset_info("cifar100").num_classes, data.dataset_info("tinyimagenet").image_size) == (100, 64)


@pytest.mark.skipif(not data.DEBIAN_FASHION_MNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_debian_fashion_mnist_loads_by_default() -> None:
    train, test = data.build_datasets(DataCfg("fashion-mnist"))
    assert (len(train), len(test)) == (60000, 10000)
    assert train.targets.unique().tolist() == list(range(10))
    image, label = test[0]
    assert image.shape == (1, 28, 28) and label == 9  # the first t10k image is an ankle boot


# ----------------------------------------------------------------------------- errors


def test_unknown_dataset_lists_the_known_ones() -> None:
    with pytest.raises(UserError, match=r"\[data\] dataset: unknown dataset 'cifar11' \(known: cifar10, cifar100, "):
        data.build_datasets(DataCfg("cifar11"))


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist", "cifar10", "cifar100", "tinyimagenet"])
def test_missing_files_give_one_line_user_error_naming_key_and_path(tmp_path: Path, name: str) -> None:
    root = tmp_path / "nothing-here"
    with pytest.raises(UserError) as caught:
        data.build_datasets(DataCfg(name, root=str(root)))
    message = str(caught.value)
    assert message.startswith(f"[data] root = '{root}': no ") and "set download = true" in message
    assert "\n" not in message


def test_missing_debian_and_cache_names_both_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    with pytest.raises(UserError, match=r"no Fashion-MNIST data found in .*no-debian or .*cache"):
        data.build_datasets(DataCfg("fashion-mnist"))


def test_corrupt_gz_file_is_a_user_error_naming_it(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "fm", gz=True)
    (tmp_path / "fm" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match=r"could not unpack .*t10k-labels-idx1-ubyte.gz"):
        data.build_datasets(DataCfg("fashion-mnist", root=str(tmp_path / "fm")))


def test_failed_download_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("Network is unreachable")

    monkeypatch.setattr(data._tv_datasets().utils, "download_and_extract_archive", offline)
    with pytest.raises(UserError, match=r"download = true: could not fetch Tiny-ImageNet .*Network is unreachable"):
        data.build_datasets(DataCfg("tinyimagenet", root=str(tmp_path), download=True))


# ----------------------------------------------------------------------------- determinism


def batches(loader: torch.utils.data.DataLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x, y) for x, y in loader]


def indexed_synthetic() -> torch.utils.data.Dataset:
    """Augmented synthetic images whose label is replaced by the sample index, to read the order."""
    train, _ = data.build_datasets(DataCfg("synthetic", augment=True, cutout=True))
    return data._TensorImages(train.images[:96], torch.arange(96), train.transform)


def test_sampler_order_is_the_documented_permutation() -> None:
    sampler = data.EpochSampler(10, shuffle=True, seed=3, epoch=2)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 1_000_003 + 2)).tolist()
    assert sampler.indices() == expected
    assert data.EpochSampler(10, shuffle=False, seed=3, epoch=2).indices() == list(range(10))


def test_same_seed_and_epoch_give_same_order_and_augmentation_for_any_num_workers() -> None:
    dataset = indexed_synthetic()
    rng_before = torch.get_rng_state()
    serial = batches(data.make_loader(dataset, 16, shuffle=True, seed=7, epoch=1))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the trainer's RNG is left alone
    torch.manual_seed(123)  # whatever ran before must not matter
    parallel = batches(data.make_loader(dataset, 16, shuffle=True, seed=7, epoch=1, num_workers=2))
    assert len(serial) == len(parallel) == 6
    for (x0, y0), (x1, y1) in zip(serial, parallel, strict=True):
        assert torch.equal(y0, y1) and torch.equal(x0, x1)
    order = torch.cat([y for _, y in serial])
    assert sorted(order.tolist()) == list(range(96)) and order.tolist() != list(range(96))


def test_a_new_epoch_reshuffles_and_redraws_augmentation() -> None:
    dataset = indexed_synthetic()
    first = data.make_loader(dataset, 96, shuffle=True, seed=7, epoch=1)
    second = data.make_loader(dataset, 96, shuffle=True, seed=7, epoch=2)
    (x1, y1), (x2, y2) = next(iter(first)), next(iter(second))
    assert y1.tolist() != y2.tolist()
    assert not torch.equal(x1[y1.argsort()], x2[y2.argsort()])


def test_start_batch_skips_exactly_the_batches_already_seen() -> None:
    dataset = indexed_synthetic()
    full = batches(data.make_loader(dataset, 10, shuffle=True, seed=5, epoch=3))
    resumed = data.make_loader(dataset, 10, shuffle=True, seed=5, epoch=3, start_batch=4)
    assert len(resumed) == len(full) - 4 == 6
    for (x0, y0), (x1, y1) in zip(full[4:], batches(resumed), strict=True):
        assert torch.equal(y0, y1) and torch.equal(x0, x1)


def test_two_ranks_partition_the_epoch_with_equal_lengths() -> None:
    dataset = data._TensorImages(torch.zeros(95, 1, 2, 2), torch.arange(95), lambda x: x)  # odd: one pad
    loaders = [
        data.make_loader(dataset, 8, shuffle=True, seed=1, epoch=0, distributed_rank=rank, world_size=2)
        for rank in (0, 1)
    ]
    shares = [torch.cat([y for _, y in loader]).tolist() for loader in loaders]
    assert len(shares[0]) == len(shares[1]) == 48
    assert set(shares[0]) | set(shares[1]) == set(range(95))
    assert len(set(shares[0]) & set(shares[1])) == 1  # the wrapped index
    whole = data.EpochSampler(95, shuffle=True, seed=1, epoch=0).indices()
    assert shares[0] + shares[1] == whole[0::2] + [*whole[1::2], whole[0]]


def test_augmentation_of_a_sample_depends_only_on_seed_epoch_and_index() -> None:
    dataset = indexed_synthetic()
    wrapped = data.SeededAugmentation(dataset, seed=7, epoch=1)
    first = wrapped[5][0]
    torch.rand(1000)
    assert torch.equal(wrapped[5][0], first)
    assert not torch.equal(data.SeededAugmentation(dataset, seed=8, epoch=1)[5][0], first)


def test_input_contract_states_the_training_normalisation_of_each_dataset() -> None:
    from ndsnn_cli.data import input_contract

    contract = input_contract("fashion-mnist")
    assert contract == {"layout": "NCHW", "range": [0.0, 1.0], "shape": [1, 28, 28], "mean": [0.2860], "std": [0.3530]}
    assert input_contract("cifar10")["mean"] == [0.4914, 0.4822, 0.4465]
    assert input_contract("synthetic")["mean"] == [0.0] and input_contract("synthetic")["std"] == [1.0]


# ----------------------------------------------------------------------------- materialised data sets


def test_a_materialised_set_gives_the_per_sample_pipelines_batches_bit_for_bit(tmp_path: Path) -> None:
    """Shuffled, resumed mid-epoch, last batch short or dropped, one rank of two: the same images and labels
    in the same order as the DataLoader over the decoded files (Fashion-MNIST idx files, normalised)."""
    write_idx_set(tmp_path / "fm", gz=True)
    train, _ = data.build_datasets(DataCfg("fashion-mnist", root=str(tmp_path / "fm")))
    held = data.materialise(train)
    assert isinstance(held, data.MaterialisedDataset) and held.images.shape == (6, 1, 28, 28)
    for kwargs in ({}, {"start_batch": 1}, {"drop_last": True}, {"distributed_rank": 1, "world_size": 2}):
        loader = data.make_loader(held, 4, shuffle=True, seed=3, epoch=2, **kwargs)
        reference = batches(data.make_loader(train, 4, shuffle=True, seed=3, epoch=2, **kwargs))
        mine = batches(loader)
        assert len(loader) == len(mine) == len(reference), kwargs
        for (x0, y0), (x1, y1) in zip(reference, mine, strict=True):
            assert torch.equal(x0, x1) and torch.equal(y0, y1) and y1.dtype == y0.dtype, kwargs


@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10", "cifar100"])
def test_a_set_decoded_at_once_equals_the_per_sample_pipeline_bit_for_bit(tmp_path: Path, dataset: str) -> None:
    """The vectorised decode (whole uint8 arrays -> float, / 255, Normalize) against torchvision's
    per-image PIL -> ToTensor -> Normalize, on files in the real formats, whole and cut to a first-n Subset."""
    if dataset == "fashion-mnist":
        write_idx_set(tmp_path, gz=True)
    else:
        (write_cifar10 if dataset == "cifar10" else write_cifar100)(tmp_path)
    for cfg in (DataCfg(dataset, root=str(tmp_path)), DataCfg(dataset, root=str(tmp_path), train_limit=3)):
        train, test = data.build_datasets(cfg)
        for part in (train, test):
            whole = data._decoded_at_once(part)
            assert whole is not None, (dataset, part)
            images, labels = whole
            assert images.shape[0] == len(part) and images.dtype == torch.float32 and images.is_contiguous()
            for index in range(len(part)):
                image, label = part[index]
                assert torch.equal(images[index], image) and int(labels[index]) == label, (dataset, index)


def test_sets_the_vectorised_decode_cannot_reproduce_run_per_sample(tmp_path: Path) -> None:
    write_idx_set(tmp_path, gz=True)
    cfg = DataCfg("fashion-mnist", root=str(tmp_path))
    train, _ = data.build_datasets(cfg)
    assert data._decoded_at_once(Subset(train, [2, 0])) is None  # not a first-n cut
    augmented, _ = data.build_datasets(DataCfg("fashion-mnist", root=str(tmp_path), augment=True))
    assert data._decoded_at_once(augmented) is None  # random crops
    train.target_transform = lambda label: label + 1
    assert data._decoded_at_once(train) is None
    reordered = data.materialise(Subset(data.build_datasets(cfg)[0], [2, 0]))
    assert isinstance(reordered, data.MaterialisedDataset) and reordered.images.shape == (2, 1, 28, 28)


def test_only_deterministic_sets_that_fit_are_materialised(tmp_path: Path) -> None:
    write_idx_set(tmp_path / "fm", gz=True)
    plain = DataCfg("fashion-mnist", root=str(tmp_path / "fm"))
    train, test = data.for_training(plain, data.build_datasets(plain))
    assert isinstance(train, data.MaterialisedDataset) and isinstance(test, data.MaterialisedDataset)
    augmented = DataCfg("fashion-mnist", root=str(tmp_path / "fm"), augment=True)
    train, test = data.for_training(augmented, data.build_datasets(augmented))
    assert not isinstance(train, data.MaterialisedDataset)  # new crops every epoch
    assert isinstance(test, data.MaterialisedDataset)
    too_big = data.materialise(data.build_datasets(plain)[0], max_bytes=6 * 28 * 28 * 4 - 1)
    assert not isinstance(too_big, data.MaterialisedDataset)
