"""Data: sources, splits and the on-device loader behave as DESIGN.md's "Data" section says."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from support import unavailable

from components.data import (
    DATASET_INFO,
    DataModule,
    DataNotFoundError,
    DeviceLoader,
    load_arrays,
    resolve_cache_dir,
    resolve_data_dir,
)


def _shared_data() -> Path:
    env = os.environ.get("ROBUSTFLOW_TEST_DATA") or os.environ.get("ROBUSTFLOW_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


SHARED = _shared_data()


@pytest.fixture(scope="module")
def cifar10_shards():
    """The offline CIFAR-10 shards; a listed skip without them (a failure under CI=true)."""
    if not (SHARED / "cifar10" / "train-1.npz").is_file():
        unavailable(
            f"offline CIFAR-10 shards not found at {SHARED / 'cifar10'} (set ROBUSTFLOW_DATA to shared/data)"
        )


@pytest.fixture
def mnist_archives():
    """The offline MNIST archives; a listed skip without them (a failure under CI=true)."""
    if not (SHARED / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").is_file():
        unavailable(
            f"offline MNIST archives not found in {SHARED / 'MNIST'} (set ROBUSTFLOW_DATA to shared/data)"
        )


needs_cifar10 = pytest.mark.usefixtures("cifar10_shards")
needs_mnist = pytest.mark.usefixtures("mnist_archives")


def _images(
    n: int = 64, c: int = 3, h: int = 8, w: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    # Random noise in 1..255: no two crops of it coincide, so an augmented image identifies its crop.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, c, h, w), generator=g, dtype=torch.uint8), torch.arange(n) % 10


def _collect(loader, n_batches: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    out = []
    for i, batch in enumerate(loader):
        if n_batches is not None and i == n_batches:
            break
        out.append(batch)
    return out


# ----------------------------------------------------------------------------------------------------------
# Sources


def test_data_dir_resolution_order(monkeypatch, tmp_path):
    monkeypatch.delenv("ROBUSTFLOW_DATA", raising=False)
    assert resolve_data_dir(None) == Path("data")
    monkeypatch.setenv("ROBUSTFLOW_DATA", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir("/elsewhere") == Path("/elsewhere")


@pytest.fixture(scope="module")
def cifar10_train(cifar10_shards):
    return load_arrays("cifar10", str(SHARED), "train")


@needs_cifar10
def test_cifar10_shards_load_all_training_images_in_order(cifar10_train):
    x, y = cifar10_train
    assert x.dtype == np.uint8 and x.shape == (50000, 32, 32, 3)
    assert y.dtype == np.int64 and y.shape == (50000,)
    assert np.bincount(y, minlength=10).tolist() == [5000] * 10
    # train-1 .. train-5 concatenated in order: the first 10000 are exactly shard train-1.
    with np.load(SHARED / "cifar10" / "train-1.npz") as first:
        assert np.array_equal(x[:10000], first["x"]) and np.array_equal(y[:10000], first["y"])


@needs_cifar10
def test_cifar10_test_shard_has_the_first_1000_test_images():
    x, y = load_arrays("cifar10", str(SHARED), "test")
    assert x.dtype == np.uint8 and x.shape == (1000, 32, 32, 3)
    assert y.dtype == np.int64 and set(np.unique(y)) <= set(range(10))


def test_npz_shards_of_any_name_concatenate_in_natural_order(tmp_path):
    folder = tmp_path / "mydata"
    folder.mkdir()
    for k in (1, 2, 10):  # a plain sort would put train-10 before train-2
        np.savez(folder / f"train-{k}.npz", x=np.full((2, 4, 4, 3), k, np.uint8), y=np.full(2, k, np.uint8))
    np.savez(folder / "test-1.npz", x=np.zeros((3, 4, 4, 3), np.uint8), y=np.zeros(3, np.int32))
    x, y = load_arrays("mydata", str(tmp_path), "train")
    assert y.tolist() == [1, 1, 2, 2, 10, 10] and y.dtype == np.int64
    assert x[:, 0, 0, 0].tolist() == [1, 1, 2, 2, 10, 10]

    dm = DataModule(dataset="mydata", data_dir=str(tmp_path), val_size=2, batch_size=2)
    assert dm.num_classes == 11 and dm.image_shape == (3, 4, 4)  # read from the data: not a built-in
    assert dm.split_sizes() == {"train": 4, "val": 2, "test": 3}


def test_grey_npz_shards_gain_a_channel_axis(tmp_path):
    (tmp_path / "grey").mkdir()
    np.savez(tmp_path / "grey" / "test-1.npz", x=np.zeros((3, 5, 5), np.uint8), y=np.zeros(3, np.int32))
    x, y = load_arrays("grey", str(tmp_path), "test")
    assert x.shape == (3, 5, 5, 1) and y.dtype == np.int64


def _tree(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


@needs_mnist
@pytest.mark.parametrize("read_only", [True, False])
def test_mnist_unpacks_into_the_cache_never_into_the_data_folder(monkeypatch, tmp_path, read_only):
    # The test makes the folder it relies on: its own copy of the archives, read-only or writable.
    data = tmp_path / "data"
    shutil.copytree(SHARED / "MNIST" / "raw", data / "MNIST" / "raw")
    for path in [data, *data.rglob("*")]:
        path.chmod((0o555 if path.is_dir() else 0o444) if read_only else (0o755 if path.is_dir() else 0o644))
    monkeypatch.setenv("ROBUSTFLOW_CACHE", str(tmp_path / "cache"))
    before = _tree(data)
    try:
        x, y = load_arrays("mnist", str(data), "test")
        assert x.dtype == np.uint8 and x.shape == (10000, 28, 28, 1)
        assert y.dtype == np.int64 and np.bincount(y).sum() == 10000 and y.max() == 9
        assert _tree(data) == before, "the loader wrote into the data folder"
        assert list((tmp_path / "cache").glob("MNIST-*/MNIST/raw/t10k-images-idx3-ubyte"))
        # The second load reuses the unpacked cache.
        x2, _ = load_arrays("mnist", str(data), "test")
        assert np.array_equal(x, x2)
    finally:
        for path in [data, *data.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)  # let pytest clean tmp_path up


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("ROBUSTFLOW_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert resolve_cache_dir() == tmp_path / "robustflow" / "data"
    monkeypatch.setenv("ROBUSTFLOW_CACHE", str(tmp_path / "mine"))
    assert resolve_cache_dir() == tmp_path / "mine"


def test_missing_data_names_paths_and_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("ROBUSTFLOW_DATA", raising=False)
    with pytest.raises(DataNotFoundError) as err:
        load_arrays("cifar10", str(tmp_path), "train")
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert str(tmp_path / "cifar10" / "train-*.npz") in msg
    assert str(tmp_path / "cifar-10-batches-py") in msg
    assert "ROBUSTFLOW_DATA" in msg and "DATA_DIR" in msg and "Download is off" in msg

    monkeypatch.setenv("ROBUSTFLOW_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataNotFoundError, match="MNIST/raw"):
        load_arrays("mnist", str(tmp_path), "test")


def test_unknown_name_without_shards_raises(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_arrays("svhn", str(tmp_path), "train")
    assert str(tmp_path / "svhn" / "train-*.npz") in str(err.value)
    assert "not a built-in dataset" in str(err.value)


def test_datamodule_is_cheap_to_build_and_check_fails_fast(tmp_path):
    dm = DataModule(dataset="cifar10", data_dir=str(tmp_path))  # builds without touching the disk
    assert dm.num_classes == 10 and dm.image_shape == (3, 32, 32) == DATASET_INFO["cifar10"].image_shape
    with pytest.raises(DataNotFoundError, match="ROBUSTFLOW_DATA"):
        dm.check()


# ----------------------------------------------------------------------------------------------------------
# Splits


@pytest.fixture(scope="module")
def cifar10_dm(cifar10_shards):
    dm = DataModule(dataset="cifar10", data_dir=str(SHARED), val_size=1000, batch_size=256)
    dm.setup()
    return dm


@needs_cifar10
def test_validation_split_is_deterministic_and_disjoint_from_train(cifar10_dm, cifar10_train):
    dm = cifar10_dm
    assert dm.split_sizes() == {"train": 49000, "val": 1000, "test": 1000}
    assert len(np.intersect1d(dm.train_indices, dm.val_indices)) == 0
    assert len(np.union1d(dm.train_indices, dm.val_indices)) == 50000

    again = DataModule(dataset="cifar10", data_dir=str(SHARED), val_size=1000, train_size=5000)
    again.setup()
    assert np.array_equal(again.val_indices, dm.val_indices)
    assert set(again.train_indices) <= set(dm.train_indices) and len(again.train_indices) == 5000

    # Validation images are the training images at val_indices, in the loader's order.
    x_val = torch.cat([x for x, _, _ in dm.val_loader()])
    x_src, _ = cifar10_train
    expected = torch.from_numpy(x_src[dm.val_indices]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(x_val, expected)

    other = DataModule(dataset="cifar10", data_dir=str(SHARED), val_size=1000, split_seed=1, train_size=10)
    other.setup()
    assert not np.array_equal(other.val_indices, dm.val_indices)


@needs_cifar10
def test_loaders_of_the_datamodule(cifar10_dm):
    train = cifar10_dm.train_loader()
    assert len(train) == 49000 // 256  # drop_last for training
    x, y, idx = next(iter(train))
    assert x.dtype == torch.float32 and x.shape == (256, 3, 32, 32) and x.min() >= 0 and x.max() <= 1
    assert y.dtype == torch.int64 and idx.dtype == torch.int64
    test = cifar10_dm.test_loader()
    assert len(test) == 4 and sum(len(b[1]) for b in test) == 1000  # no drop_last


@needs_cifar10
def test_sizes_are_validated(tmp_path):
    dm = DataModule(dataset="cifar10", data_dir=str(SHARED), val_size=1000, train_size=49001)
    with pytest.raises(ValueError, match=r"49001.*1000.*50000"):
        dm.setup()
    with pytest.raises(ValueError, match="1001"):
        DataModule(dataset="cifar10", data_dir=str(SHARED), train_size=10, test_size=1001).setup()


# ----------------------------------------------------------------------------------------------------------
# DeviceLoader


def test_unaugmented_batches_are_the_images_scaled_to_unit_range():
    images, labels = _images(n=10)
    loader = DeviceLoader(images, labels, batch_size=4)
    batches = _collect(loader)
    assert [len(b[1]) for b in batches] == [4, 4, 2] and len(loader) == 3
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32 and torch.equal(x, images.float() / 255)
    assert torch.equal(torch.cat([b[2] for b in batches]), torch.arange(10))


def _crop(padded: torch.Tensor, dy: int, dx: int, h: int, w: int, flip: bool) -> torch.Tensor:
    crop = padded[:, dy : dy + h, dx : dx + w]
    return crop.flip(-1) if flip else crop


def test_augmentation_is_a_per_sample_crop_of_the_zero_padded_image_maybe_flipped():
    images, labels = _images(n=48)
    pad = 4
    loader = DeviceLoader(images, labels, batch_size=48, augment=True, pad=pad, seed=3)
    x, _, idx = next(iter(loader))
    aug = (x * 255).round().to(torch.uint8)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    H, W = images.shape[2:]
    found = []
    for i in range(len(idx)):
        src = padded[idx[i]]
        matches = [
            (dy, dx, flip)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for flip in (False, True)
            if torch.equal(aug[i], _crop(src, dy, dx, H, W, flip))
        ]
        assert matches, f"augmented sample {i} is no crop/flip of its source image"
        found.append(matches[0])
    assert len({(dy, dx) for dy, dx, _ in found}) > 5  # offsets vary across samples
    assert {flip for _, _, flip in found} == {False, True}  # some flipped, some not


def test_shuffling_changes_every_epoch_and_covers_the_data():
    images, labels = _images(n=50)
    loader = DeviceLoader(images, labels, batch_size=8, shuffle=True, seed=1)
    orders = [torch.cat([b[2] for b in loader]) for _ in range(2)]
    assert loader.epoch == 2
    for order in orders:
        assert sorted(order.tolist()) == list(range(50))
    assert not torch.equal(orders[0], orders[1])


@pytest.mark.parametrize("stop_after", [3, 0])  # mid-epoch, and at an epoch boundary
def test_resumed_loader_serves_the_same_batches_as_an_uninterrupted_one(stop_after):
    images, labels = _images(n=70)
    kwargs = dict(batch_size=16, shuffle=True, augment=True, drop_last=True, seed=7)
    reference = DeviceLoader(images, labels, **kwargs)
    expected = _collect(reference) + _collect(reference)  # epochs 0 and 1

    interrupted = DeviceLoader(images, labels, **kwargs)
    served = _collect(interrupted)  # epoch 0
    it = iter(interrupted)
    served += [next(it) for _ in range(stop_after)]
    buf = io.BytesIO()
    torch.save(interrupted.state_dict(), buf)  # as a checkpoint would
    buf.seek(0)

    resumed = DeviceLoader(images, labels, **kwargs)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    served += _collect(resumed)
    assert len(served) == len(expected) == 8
    for got, want in zip(served, expected):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_ddp_ranks_take_disjoint_shards_whose_union_is_the_epoch():
    images, labels = _images(n=100)
    ranks = [
        DeviceLoader(images, labels, batch_size=16, shuffle=True, augment=True, seed=5, rank=r, world_size=2)
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 4
    shards = [torch.cat([b[2] for b in loader]) for loader in ranks]
    assert set(shards[0].tolist()).isdisjoint(shards[1].tolist())
    assert sorted(shards[0].tolist() + shards[1].tolist()) == list(range(100))

    # An uneven split pads by wrapping around so both ranks run the same number of steps.
    images, labels = _images(n=101)
    ranks = [
        DeviceLoader(images, labels, batch_size=16, shuffle=True, rank=r, world_size=2) for r in range(2)
    ]
    shards = [torch.cat([b[2] for b in loader]) for loader in ranks]
    assert len(ranks[0]) == len(ranks[1]) and len(shards[0]) == len(shards[1]) == 51
    assert set(shards[0].tolist()) | set(shards[1].tolist()) == set(range(101))


def test_loader_rejects_bad_input():
    images, labels = _images(n=10)
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(images.float(), labels, batch_size=4)
    with pytest.raises(ValueError, match="no batches"):
        DeviceLoader(images, labels, batch_size=16, drop_last=True)
    with pytest.raises(ValueError, match="rank"):
        DeviceLoader(images, labels, batch_size=4, rank=2, world_size=2)
