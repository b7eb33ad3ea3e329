"""Pre-flight checks of a dataset's files: readable, labels in range, enough images for the splits asked.

``DataModule.check`` runs these before a run exists, so a truncated shard, a stray label or a training set
smaller than one batch fails in a second with the file named (exit 2), not after models are built and an
MLflow run is opened. Reading what the checks need is cheap: the labels (``y``, a few bytes an image) and
the ``x`` array's header; the pixels are not decoded.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from components.data.sources import DATASET_INFO, SPLITS, _find_shards, resolve_data_dir

# Images per split of the built-in datasets in their usual (torchvision / Tiny ImageNet) layouts.
STANDARD_SIZES: dict[str, dict[str, int]] = {
    "cifar10": {"train": 50_000, "test": 10_000},
    "cifar100": {"train": 50_000, "test": 10_000},
    "mnist": {"train": 60_000, "test": 10_000},
    "fashion_mnist": {"train": 60_000, "test": 10_000},
    "tinyimagenet": {"train": 100_000, "test": 10_000},
}


class DataFileError(ValueError):
    """A data file that cannot be used as it is; the message names the file and what is wrong."""


def _npy_header(archive: zipfile.ZipFile, member: str, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of ``member`` of an .npz without reading its data; checks its size adds up."""
    info = archive.getinfo(member)
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        reader = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, _fortran, dtype = reader(f)
        header_len = f.tell()
    expected = header_len + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    # ``file_size`` is the member's uncompressed size, so this holds for deflated shards (np.savez_compressed,
    # the offline CIFAR-10 copies) as for stored ones.
    if info.file_size != expected:
        raise DataFileError(
            f"{path}: array {member!r} holds {info.file_size} bytes, its header promises {expected} "
            "(a truncated or damaged shard); replace the file"
        )
    return shape, dtype


def inspect_shard(path: Path, num_classes: int | None) -> int:
    """Check one ``.npz`` shard without decoding its pixels; return its number of images."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if not {"x.npy", "y.npy"} <= names:
                raise DataFileError(
                    f"{path}: an .npz shard needs arrays 'x' and 'y', found "
                    f"{sorted(n.removesuffix('.npy') for n in names)}"
                )
            x_shape, x_dtype = _npy_header(archive, "x.npy", path)
            _npy_header(archive, "y.npy", path)
            with archive.open("y.npy") as f:
                y = np.lib.format.read_array(f, allow_pickle=False)
    except DataFileError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as err:
        raise DataFileError(
            f"{path}: cannot be read as an .npz shard ({type(err).__name__}: {err}); "
            "the file is truncated or damaged: replace it"
        ) from err
    if x_dtype != np.uint8:
        raise DataFileError(f"{path}: x must be uint8 pixels in 0..255, got {x_dtype}")
    if y.ndim != 1 or len(y) != x_shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise DataFileError(f"{path}: y must be {x_shape[0]} integer labels, got {y.dtype} {y.shape}")
    if len(y):
        low, high = int(y.min()), int(y.max())
        if low < 0 or (num_classes is not None and high >= num_classes):
            bad = low if low < 0 else high
            allowed = "0.." + (str(num_classes - 1) if num_classes is not None else "")
            raise DataFileError(f"{path}: label {bad} is out of range (labels must be in {allowed})")
    return int(x_shape[0])


def split_sizes_on_disk(dataset: str, data_dir: str | os.PathLike[str] | None) -> dict[str, int | None]:
    """Images per split, checking every shard on the way; ``None`` where the count is not known cheaply."""
    name = dataset.lower()
    info = DATASET_INFO.get(name)
    root = resolve_data_dir(data_dir)
    sizes: dict[str, int | None] = {}
    for split in SPLITS:
        shards = _find_shards(root / name, split)
        if shards:
            sizes[split] = sum(inspect_shard(p, info.num_classes if info else None) for p in shards)
        else:
            sizes[split] = STANDARD_SIZES.get(name, {}).get(split)
    return sizes


def check_split_sizes(
    dataset: str,
    sizes: dict[str, int | None],
    *,
    train_size: int | None,
    val_size: int,
    test_size: int | None,
    batch_size: int | None,
    world_size: int = 1,
) -> None:
    """Raise ``ValueError`` if the asked splits do not fit the data or leave no full training batch.

    ``batch_size=None`` skips the batch check (the data is not trained on)."""
    n, n_test = sizes.get("train"), sizes.get("test")
    if n is not None:
        if val_size >= n:
            raise ValueError(
                f"val_size={val_size} leaves no training images: {dataset} has {n} training images"
            )
        if train_size is not None and train_size + val_size > n:
            raise ValueError(
                f"train_size={train_size} + val_size={val_size} = {train_size + val_size} exceeds the {n} "
                f"training images of {dataset}"
            )
    if n_test is not None and test_size is not None and test_size > n_test:
        raise ValueError(f"test_size={test_size} exceeds the {n_test} test images of {dataset}")
    train = train_size if train_size is not None else (None if n is None else n - val_size)
    if batch_size is not None and train is not None and train // world_size < batch_size:
        per_rank = f" ({train // world_size} per rank over {world_size} ranks)" if world_size > 1 else ""
        raise ValueError(
            f"{train} training images{per_rank} are fewer than one batch "
            f"(DataModule.batch_size={batch_size}): the loader drops the incomplete last batch, so no "
            "training step would run; lower BATCH_SIZE or raise DataModule.train_size"
        )
