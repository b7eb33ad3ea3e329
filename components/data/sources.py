"""Where image datasets come from: find them on disk (or download them) and return plain arrays.

Every source ends in the same two arrays, so the rest of the toolkit never cares where data came from:
``x`` uint8 channels-last ``(N, H, W, C)`` and ``y`` int64 ``(N,)``.

Search order for a dataset ``name`` under the data directory ``root``:

1. ``.npz`` shards ``root/<name>/<split>-*.npz`` (keys ``x`` and ``y``), for any name. This is how the
   offline copies in ``shared/data`` hold CIFAR-10, and how users bring data they already have as arrays.
2. The dataset's usual layout: torchvision's folders for CIFAR-10/100, MNIST and Fashion-MNIST (downloaded
   there when ``download`` is on), the ``tiny-imagenet-200`` folder for Tiny ImageNet.

Nothing found raises :class:`DataNotFoundError` saying where it looked and how to point the toolkit at data.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DATASET_INFO",
    "DataNotFoundError",
    "DatasetInfo",
    "check_available",
    "load_arrays",
    "resolve_cache_dir",
    "resolve_data_dir",
]

SPLITS = ("train", "test")

DATA_ENV = "ROBUSTFLOW_DATA"
CACHE_ENV = "ROBUSTFLOW_CACHE"
_DEFAULT_CACHE = Path("~/.cache/robustflow/data")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a built-in dataset before any data is loaded."""

    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    title: str


DATASET_INFO: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(10, (3, 32, 32), "CIFAR-10"),
    "cifar100": DatasetInfo(100, (3, 32, 32), "CIFAR-100"),
    "mnist": DatasetInfo(10, (1, 28, 28), "MNIST"),
    "fashion_mnist": DatasetInfo(10, (1, 28, 28), "Fashion-MNIST"),
    "tinyimagenet": DatasetInfo(200, (3, 64, 64), "Tiny ImageNet"),
}


class DataNotFoundError(FileNotFoundError):
    """A dataset is not where the configuration says; the message lists the paths looked at."""


Arrays = tuple[np.ndarray, np.ndarray]
_Loader = Callable[[], Arrays]


# ----------------------------------------------------------------------------------------------------------
# Directories


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """The data root: the explicit argument, else ``$ROBUSTFLOW_DATA``, else ``./data``."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path("data")


def _data_dir_origin(data_dir: str | os.PathLike[str] | None) -> str:
    if data_dir is not None and str(data_dir) != "":
        return "given as data_dir"
    if os.environ.get(DATA_ENV):
        return f"from ${DATA_ENV}"
    return f"the default ./data; ${DATA_ENV} is not set"


def resolve_cache_dir() -> Path:
    """robustflow's own folder for derived files (unpacked MNIST, downloads, decoded Tiny ImageNet):
    ``$ROBUSTFLOW_CACHE``, else ``$XDG_CACHE_HOME/robustflow/data``, else ``~/.cache/robustflow/data``.
    Nothing is ever written into a data folder: those are read-only to robustflow."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg).expanduser() / "robustflow" / "data" if xdg else _DEFAULT_CACHE.expanduser()


# ----------------------------------------------------------------------------------------------------------
# Public entry points


def load_arrays(
    dataset: str, data_dir: str | os.PathLike[str] | None, split: str, download: bool = False
) -> Arrays:
    """Load one split (``"train"`` or ``"test"``) of ``dataset`` as ``(x, y)``.

    ``x`` is uint8 ``(N, H, W, C)`` (C=1 for MNIST-like data), ``y`` int64 ``(N,)``. ``download`` lets
    torchvision fetch CIFAR/MNIST data that is not on disk; it has no effect on other sources.
    """
    return _plan(dataset, data_dir, split, download)()


def check_available(dataset: str, data_dir: str | os.PathLike[str] | None, download: bool = False) -> None:
    """Raise :class:`DataNotFoundError` now, without decoding anything, if either split of ``dataset``
    cannot be found (or downloaded). Cheap enough to call before any training work starts."""
    for split in SPLITS:
        _plan(dataset, data_dir, split, download)


def _plan(dataset: str, data_dir: str | os.PathLike[str] | None, split: str, download: bool) -> _Loader:
    """Find where ``split`` of ``dataset`` lives and return a function that loads it, or raise."""
    if not isinstance(dataset, str) or not dataset:
        raise ValueError(f"dataset must be a non-empty name, got {dataset!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = resolve_data_dir(data_dir)
    name = dataset.lower()

    shards = _find_shards(root / name, split)
    if shards:
        return lambda: _load_shards(shards)
    shard_pattern = root / name / f"{split}-*.npz"
    looked = [f"{shard_pattern} (.npz shards with arrays x uint8 NHWC and y): none"]

    if name in ("cifar10", "cifar100"):
        return _plan_cifar(name, root, split, download, looked, data_dir)
    if name in ("mnist", "fashion_mnist"):
        return _plan_mnist(name, root, split, download, looked, data_dir)
    if name == "tinyimagenet":
        return _plan_tinyimagenet(root, split, looked, data_dir)

    raise DataNotFoundError(
        _not_found_message(
            f"'{dataset}' ({split} split)",
            looked,
            data_dir,
            where=(
                f"'{dataset}' is not a built-in dataset (built-in: {', '.join(DATASET_INFO)}), so it is read "
                f"from .npz shards: put {root / name}/train-1.npz, ... and {root / name}/test-1.npz, ... "
                "(each with x: uint8 (N, H, W, C) and y: integer labels)"
            ),
        )
    )


def _not_found_message(
    what: str,
    looked: list[str],
    data_dir: str | os.PathLike[str] | None,
    where: str,
    download_note: str | None = None,
) -> str:
    root = resolve_data_dir(data_dir)
    lines = [f"Dataset {what} not found under data dir {root.absolute()} ({_data_dir_origin(data_dir)})."]
    lines.append("Looked at:")
    lines += [f"  - {entry}" for entry in looked]
    lines.append(f"To fix: {where}.")
    lines.append(
        f"Point the toolkit at a folder holding the data with {DATA_ENV}=/path (or the gin macro DATA_DIR, "
        "which sets DataModule.data_dir)."
    )
    if download_note:
        lines.append(download_note)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# .npz shards


def _natural_key(path: Path) -> list[object]:
    # train-2 must come before train-10: the shard order is the sample order, and sample order decides
    # which images land in the validation split.
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", path.name)]


def _find_shards(folder: Path, split: str) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(folder.glob(f"{split}-*.npz"), key=_natural_key)


def _load_shards(paths: list[Path]) -> Arrays:
    xs, ys = [], []
    for path in paths:
        with np.load(path, allow_pickle=False) as shard:
            if "x" not in shard or "y" not in shard:
                raise ValueError(
                    f"{path}: an .npz shard needs arrays 'x' and 'y', found {list(shard.keys())}"
                )
            x, y = shard["x"], shard["y"]
        if x.dtype != np.uint8:
            raise ValueError(f"{path}: x must be uint8 pixels in 0..255, got {x.dtype}")
        if x.ndim == 3:  # (N, H, W) grey images
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"{path}: x must be (N, H, W, C) channels-last with C in (1, 3), got {x.shape}")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{path}: y must be {len(x)} integer labels, got {y.dtype} {y.shape}")
        if len(y) and y.min() < 0:
            raise ValueError(f"{path}: labels must be >= 0, found {int(y.min())}")
        xs.append(x)
        ys.append(y.astype(np.int64))
    if len({x.shape[1:] for x in xs}) > 1:
        raise ValueError(
            f"shards disagree on the image shape: {[(str(p), x.shape) for p, x in zip(paths, xs)]}"
        )
    return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 through torchvision

_CIFAR = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
    "cifar100": ("CIFAR100", "cifar-100-python", "cifar-100-python.tar.gz"),
}


def _download_note(download: bool, tv_class: str) -> str:
    if download:
        return f"Download is on (download=True): torchvision {tv_class} will try to fetch the data."
    return (
        f"Download is off (download=False); with network access, DataModule.download = True lets torchvision "
        f"{tv_class} fetch it."
    )


def _plan_cifar(
    name: str,
    root: Path,
    split: str,
    download: bool,
    looked: list[str],
    data_dir: str | os.PathLike[str] | None,
) -> _Loader:
    tv_class, folder, archive = _CIFAR[name]
    base = root / folder
    have_folder = base.is_dir() and any(base.iterdir())
    if not have_folder and not download:
        looked.append(f"{base} (torchvision {tv_class} layout, unpacked from {archive}): missing")
        raise DataNotFoundError(
            _not_found_message(
                f"{DATASET_INFO[name].title} ({split} split)",
                looked,
                data_dir,
                where=(
                    f"put .npz shards in {root / name}/ or torchvision's {folder}/ folder in {root}/, "
                    f"or enable download"
                ),
                download_note=_download_note(download, tv_class),
            )
        )

    def load() -> Arrays:
        import torchvision

        cls = getattr(torchvision.datasets, tv_class)
        # A download lands in robustflow's cache, never in the data folder (read-only to robustflow).
        tv_root = root if have_folder else resolve_cache_dir() / f"{tv_class}-download"
        try:
            ds = cls(root=str(tv_root), train=split == "train", download=download)
        except (RuntimeError, OSError) as err:  # torchvision's "not found or corrupted", network failures
            looked.append(f"{base} (torchvision {tv_class}): {err}")
            raise DataNotFoundError(
                _not_found_message(
                    f"{DATASET_INFO[name].title} ({split} split)",
                    looked,
                    data_dir,
                    where=f"put a complete {folder}/ folder (or {archive}) in {root}/",
                    download_note=_download_note(download, tv_class),
                )
            ) from err
        return np.ascontiguousarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)

    return load


# ----------------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST through torchvision

_MNIST = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def _mnist_files(tv_class: str) -> list[str]:
    import torchvision

    return [filename for filename, _md5 in getattr(torchvision.datasets, tv_class).resources]


def _unpacked(raw: Path, archives: list[str]) -> bool:
    return all((raw / a.removesuffix(".gz")).is_file() for a in archives)


def _source_key(folder: Path, files: list[str]) -> str:
    # Names a cache entry after the source folder and its files' sizes and times: two data folders never
    # share an entry, and replaced archives are unpacked afresh.
    parts = [str(folder.resolve())]
    for name in files:
        st = (folder / name).stat()
        parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:10]


def _plan_mnist(
    name: str,
    root: Path,
    split: str,
    download: bool,
    looked: list[str],
    data_dir: str | os.PathLike[str] | None,
) -> _Loader:
    tv_class = _MNIST[name]
    archives = _mnist_files(tv_class)
    raw = root / tv_class / "raw"

    if _unpacked(raw, archives):
        return lambda: _load_mnist(tv_class, root, split, download=False)
    have_archives = all((raw / a).is_file() for a in archives)
    # A data folder is read-only to robustflow (a shared copy, or the user's own folder that nobody expects
    # 55 MB to appear in): archives are unpacked, and downloads land, in robustflow's own cache.
    if have_archives:
        cache_root = resolve_cache_dir() / f"{tv_class}-{_source_key(raw, archives)}"

        def load() -> Arrays:
            _gunzip_into(raw, cache_root / tv_class / "raw", archives)
            return _load_mnist(tv_class, cache_root, split, False, looked, data_dir)

        return load
    if download:
        cache_root = resolve_cache_dir() / f"{tv_class}-download"
        return lambda: _load_mnist(tv_class, cache_root, split, True, looked, data_dir)

    looked.append(
        f"{raw}/{{{','.join(archives)}}} (torchvision {tv_class} layout): "
        + ("folder missing" if not raw.is_dir() else "incomplete")
    )
    raise DataNotFoundError(
        _not_found_message(
            f"{DATASET_INFO[name].title} ({split} split)",
            looked,
            data_dir,
            where=f"put the four {tv_class} .gz archives in {raw}/ (torchvision layout), or enable download",
            download_note=_download_note(download, tv_class),
        )
    )


def _gunzip_into(src: Path, dst: Path, archives: list[str]) -> None:
    # torchvision only unpacks inside download(); doing it here lets download=False work from the archives
    # alone, without torchvision ever reaching for the network. Unpacked under a temporary name and renamed,
    # so concurrent ranks or an interrupted unpack never leave a truncated file a later run would trust.
    dst.mkdir(parents=True, exist_ok=True)
    for archive in archives:
        target = dst / archive.removesuffix(".gz")
        if target.is_file():
            continue
        fd, tmp = tempfile.mkstemp(dir=dst, prefix=f".{target.name}.")
        with gzip.open(src / archive, "rb") as fin, os.fdopen(fd, "wb") as fout:
            shutil.copyfileobj(fin, fout, length=1 << 20)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a cache shared by a team must stay readable
        os.replace(tmp, target)


def _load_mnist(
    tv_class: str,
    tv_root: Path,
    split: str,
    download: bool,
    looked: list[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
) -> Arrays:
    import torchvision

    cls = getattr(torchvision.datasets, tv_class)
    try:
        ds = cls(root=str(tv_root), train=split == "train", download=download)
    except (RuntimeError, OSError) as err:
        entries = [*(looked or []), f"{tv_root / tv_class / 'raw'} (torchvision {tv_class}): {err}"]
        raise DataNotFoundError(
            _not_found_message(
                f"{tv_class} ({split} split)",
                entries,
                data_dir,
                where=f"put the four {tv_class} .gz archives in {tv_root / tv_class / 'raw'}/",
                download_note=_download_note(download, tv_class),
            )
        ) from err
    x = ds.data.numpy().astype(np.uint8, copy=False)[..., None]  # (N, 28, 28) -> NHWC with C=1
    return np.ascontiguousarray(x), ds.targets.numpy().astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# Tiny ImageNet from its usual folder layout

_TINY = "tiny-imagenet-200"


def _plan_tinyimagenet(
    root: Path, split: str, looked: list[str], data_dir: str | os.PathLike[str] | None
) -> _Loader:
    base = root / _TINY
    needed = [
        base / "wnids.txt",
        base / "train",
        base / "val" / "images",
        base / "val" / "val_annotations.txt",
    ]
    missing = [p for p in needed if not p.exists()]
    if missing:
        looked.append(f"{base} (Tiny ImageNet folder layout): missing {', '.join(str(p) for p in missing)}")
        raise DataNotFoundError(
            _not_found_message(
                f"Tiny ImageNet ({split} split)",
                looked,
                data_dir,
                where=(
                    f"unzip tiny-imagenet-200.zip into {root}/ so that {base}/wnids.txt, "
                    f"{base}/train/<wnid>/images/*.JPEG and {base}/val/{{images,val_annotations.txt}} exist "
                    "(the val folder serves as the test split)"
                ),
                download_note="Tiny ImageNet is never downloaded automatically.",
            )
        )
    return lambda: _load_tinyimagenet(base, split)


def _load_tinyimagenet(base: Path, split: str) -> Arrays:
    # Decoding 110k JPEGs takes minutes, so it happens once; the cache key includes the source folder so
    # two different copies never share a cache file.
    key = hashlib.sha1(str(base.resolve()).encode()).hexdigest()[:10]
    cache = resolve_cache_dir() / f"tinyimagenet-{key}" / f"{split}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as f:
            return f["x"], f["y"].astype(np.int64)

    from PIL import Image

    # Class ids follow the sorted wnids, the order torchvision's ImageFolder gives the train folders.
    wnids = sorted(w for w in (base / "wnids.txt").read_text().split() if w)
    index = {w: i for i, w in enumerate(wnids)}
    if split == "train":
        items = [
            (path, index[w]) for w in wnids for path in sorted((base / "train" / w / "images").glob("*.JPEG"))
        ]
    else:
        items = []
        for line in (base / "val" / "val_annotations.txt").read_text().splitlines():
            fields = line.split("\t")
            if len(fields) >= 2:
                items.append((base / "val" / "images" / fields[0], index[fields[1]]))
        items.sort(key=lambda item: item[0].name)
    if not items:
        raise DataNotFoundError(f"Tiny ImageNet: no {split} images found under {base}")

    x = np.empty((len(items), 64, 64, 3), dtype=np.uint8)
    for i, (path, _label) in enumerate(items):
        with Image.open(path) as img:
            x[i] = np.asarray(img.convert("RGB"))  # a few images are greyscale
    y = np.array([label for _path, label in items], dtype=np.int64)

    cache.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f".{split}.", suffix=".npz")
    with os.fdopen(fd, "wb") as fout:
        np.savez(fout, x=x, y=y)
    os.chmod(tmp, 0o644)
    os.replace(tmp, cache)
    return x, y
