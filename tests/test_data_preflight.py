"""Bad data files fail the train entry point's pre-flight: file named, exit 2, no MLflow run created."""

import zipfile
from pathlib import Path

import numpy as np
import pytest

from components.data import DataModule
from pipeline.train import EXIT_USAGE, main

SIZES = "DataModule.train_size = 128; DataModule.val_size = 32; DataModule.test_size = 32; BATCH_SIZE = 64"


def _shard(path: Path, n: int, label: int | None = None) -> Path:
    rng = np.random.default_rng(len(path.name) + n)
    y = rng.integers(0, 10, n)
    if label is not None:
        y[n // 2] = label
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=y)
    return path


@pytest.fixture
def data_root(tmp_path):
    """A small CIFAR-10-shaped dataset of .npz shards: two training shards, one test shard."""
    root = tmp_path / "data"
    _shard(root / "cifar10" / "train-1.npz", 100)
    _shard(root / "cifar10" / "train-2.npz", 100)
    _shard(root / "cifar10" / "test-1.npz", 50)
    return root


def _train(root: Path, extra: str = "") -> list[str]:
    return ["--gin", "d2r_cag_cifar10,smoke", "--device", "cpu", "--overrides", f"{SIZES}{extra}"]


def test_good_shards_pass_the_preflight(data_root, monkeypatch, tmp_path):
    monkeypatch.setenv("ROBUSTFLOW_DATA", str(data_root))
    DataModule("cifar10", train_size=128, val_size=32, test_size=32, batch_size=64).check()
    # Deflated shards (np.savez_compressed, as the offline copies) pass too.
    for shard in (data_root / "cifar10").glob("*.npz"):
        with np.load(shard) as arrays:
            np.savez_compressed(shard, **arrays)
    DataModule("cifar10", train_size=128, val_size=32, test_size=32, batch_size=64).check()


def _refused(root: Path, monkeypatch, capsys, extra: str = "") -> str:
    monkeypatch.setenv("ROBUSTFLOW_DATA", str(root))
    assert main(_train(root, extra)) == EXIT_USAGE
    assert not Path("mlflow.db").exists(), "a run was created before the data was checked"
    return capsys.readouterr().err


def test_truncated_shard_is_named(data_root, mlflow_store, monkeypatch, capsys):
    shard = data_root / "cifar10" / "train-2.npz"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    err = _refused(data_root, monkeypatch, capsys)
    assert str(shard) in err and "truncated or damaged" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"]
)
def test_shard_whose_array_is_cut_short_is_named(data_root, mlflow_store, monkeypatch, capsys, compression):
    # A zip whose directory is intact but whose x array is shorter than its header says; stored (np.savez) or
    # deflated (np.savez_compressed, as the offline CIFAR-10 shards are).
    shard = data_root / "cifar10" / "train-1.npz"
    x = np.zeros((100, 32, 32, 3), np.uint8)
    with zipfile.ZipFile(shard, "w", compression=compression) as z:
        header = np.lib.format.header_data_from_array_1_0(x)
        with z.open("x.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, header)
            f.write(x.tobytes()[:1000])
        with z.open("y.npy", "w") as f:
            np.lib.format.write_array(f, np.zeros(100, np.int64))
    err = _refused(data_root, monkeypatch, capsys)
    assert str(shard) in err and "truncated or damaged" in err, err


def test_label_out_of_range_names_the_shard(data_root, mlflow_store, monkeypatch, capsys):
    shard = _shard(data_root / "cifar10" / "train-2.npz", 100, label=99)
    err = _refused(data_root, monkeypatch, capsys)
    assert str(shard) in err and "label 99 is out of range" in err, err


def test_fewer_training_images_than_one_batch(data_root, mlflow_store, monkeypatch, capsys):
    err = _refused(data_root, monkeypatch, capsys, "; DataModule.train_size = 32")
    assert "32 training images are fewer than one batch" in err, err


def test_splits_larger_than_the_data(data_root, mlflow_store, monkeypatch, capsys):
    err = _refused(data_root, monkeypatch, capsys, "; DataModule.train_size = 190")
    assert "exceeds the 200 training images" in err, err
