"""The one data object a training or evaluation run configures: which dataset, which splits, which loaders.

Splits follow the rule that keeps reported numbers honest: the validation split that picks checkpoints
(and the registry's champion) is carved out of the *training* set; the test set is only ever reported.
"""

from __future__ import annotations

import os
from typing import Any

import gin
import numpy as np
import torch

from components.data.device_loader import DeviceLoader
from components.data.sources import DATASET_INFO, check_available, load_arrays, resolve_data_dir

__all__ = ["DataModule", "to_device_nchw"]


def to_device_nchw(x: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC images and their labels as an NCHW image tensor and an int64 label tensor on ``device``."""
    # NHWC -> NCHW once, here, so that no batch ever pays for the transpose.
    images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    return images.to(device), torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)


@gin.configurable
class DataModule:
    """Train / validation / test splits of one dataset, held on ``device``, served by :class:`DeviceLoader`.

    Building it is cheap (gin builds it while parsing); :meth:`check` finds the data without loading it,
    :meth:`setup` loads it (the loader methods call it on first use).

    Args:
        dataset: ``cifar10``, ``cifar100``, ``mnist``, ``fashion_mnist``, ``tinyimagenet``, or the name of a
            folder of ``.npz`` shards under ``data_dir``.
        data_dir: data root; ``None`` means ``$ROBUSTFLOW_DATA``, else ``./data``.
        download: let torchvision download CIFAR/MNIST data that is not on disk.
        train_size: use only this many training images (after the validation split is set aside);
            ``None`` uses all of them. For smoke runs.
        val_size: images of the training set held out for validation (model selection).
        test_size: use only the first ``test_size`` test images; ``None`` uses all.
        batch_size: training batch size per rank.
        eval_batch_size: batch size of the validation and test loaders.
        augment: random crop (``pad`` pixels of zero padding) and horizontal flip on training batches.
        pad: padding of the random crop.
        split_seed: fixes which training images are held out; keep it fixed across runs that are compared.
        seed: shuffling and augmentation seed (same on every DDP rank).
        device: where the images live and batches are produced.
        val_drop_last: drop the ragged last validation batch, so that every validation batch has
            ``eval_batch_size`` images (static shapes: no extra ``torch.compile`` graph or CUDA graph for
            the odd size). Validation then uses ``val_size // eval_batch_size * eval_batch_size`` images,
            the same ones every epoch; off by default (every held-out image counts). The test loader never
            drops images.
    """

    def __init__(
        self,
        dataset: str = gin.REQUIRED,
        data_dir: str | None = None,
        download: bool = False,
        train_size: int | None = None,
        val_size: int = 1000,
        test_size: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        augment: bool = True,
        pad: int = 4,
        split_seed: int = 0,
        seed: int = 0,
        device: str | torch.device = "cpu",
        val_drop_last: bool = False,
    ) -> None:
        if not isinstance(dataset, str) or not dataset:
            raise ValueError(f"DataModule.dataset must be a dataset name, got {dataset!r}")
        for name, value in (("train_size", train_size), ("test_size", test_size)):
            if value is not None and value < 1:
                raise ValueError(f"DataModule.{name} must be >= 1 or None, got {value}")
        if val_size < 0:
            raise ValueError(f"DataModule.val_size must be >= 0, got {val_size}")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {eval_batch_size}")
        if val_drop_last and 0 < val_size < eval_batch_size:
            raise ValueError(
                f"DataModule.val_drop_last with val_size={val_size} < eval_batch_size={eval_batch_size} "
                "leaves no validation batch; lower eval_batch_size or raise val_size"
            )
        self.dataset = dataset.lower()
        self.data_dir = None if data_dir is None else os.fspath(data_dir)
        self.download = download
        self.train_size = train_size
        self.val_size = val_size
        self.test_size = test_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.augment = augment
        self.pad = pad
        self.split_seed = split_seed
        self.seed = seed
        self.device = torch.device(device)
        self.val_drop_last = bool(val_drop_last)

        self._ready = False
        self._num_classes: int | None = None
        self._image_shape: tuple[int, int, int] | None = None
        self.train_indices: np.ndarray | None = None  # positions in the source training set
        self.val_indices: np.ndarray | None = None
        self._train: tuple[torch.Tensor, torch.Tensor] | None = None
        self._val: tuple[torch.Tensor, torch.Tensor] | None = None
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------------------------------------------

    def check(self, for_training: bool = True) -> None:
        """Fail fast, before a run builds models or starts tracking: raise :class:`DataNotFoundError` if the
        data cannot be found (or downloaded), ``ValueError`` naming the file if a shard is unreadable or has
        labels out of range, or if the asked splits do not fit the data or leave no full training batch.
        Reads labels and array headers only, no pixels. ``for_training=False`` skips the one-batch check
        (evaluation reads only the test split)."""
        from components.data.preflight import check_split_sizes, split_sizes_on_disk

        check_available(self.dataset, self.data_dir, self.download)
        check_split_sizes(
            self.dataset,
            split_sizes_on_disk(self.dataset, self.data_dir),
            train_size=self.train_size,
            val_size=self.val_size,
            test_size=self.test_size,
            batch_size=self.batch_size if for_training else None,
            world_size=int(os.environ.get("WORLD_SIZE", 1)),  # torchrun's; each rank needs a full batch
        )

    def setup(self) -> None:
        """Load both splits once, carve the validation split, and move everything to ``device``."""
        if self._ready:
            return
        self.check(for_training=False)  # a training entry point checked the batch before any work
        x_train, y_train = load_arrays(self.dataset, self.data_dir, "train", self.download)
        x_test, y_test = load_arrays(self.dataset, self.data_dir, "test", self.download)
        self._set_metadata(x_train, y_train, x_test, y_test)

        n = len(x_train)
        if self.val_size >= n:
            raise ValueError(
                f"val_size={self.val_size} leaves no training images: {self.dataset} has {n} training images"
            )
        available = n - self.val_size
        if self.train_size is not None and self.train_size > available:
            raise ValueError(
                f"train_size={self.train_size} + val_size={self.val_size} = "
                f"{self.train_size + self.val_size} exceeds the {n} training images of {self.dataset}"
            )
        if self.test_size is not None and self.test_size > len(x_test):
            raise ValueError(
                f"test_size={self.test_size} exceeds the {len(x_test)} test images of {self.dataset}"
            )

        # The legacy RandomState stream is frozen by numpy, so the same split_seed holds out the same images
        # on every machine and numpy version: validation numbers of different runs stay comparable.
        perm = np.random.RandomState(self.split_seed).permutation(n)
        rest = perm[:available]
        self.val_indices = np.sort(perm[available:])
        self.train_indices = np.sort(rest if self.train_size is None else rest[: self.train_size])

        self._train = to_device_nchw(x_train[self.train_indices], y_train[self.train_indices], self.device)
        if self.val_size > 0:
            self._val = to_device_nchw(x_train[self.val_indices], y_train[self.val_indices], self.device)
        n_test = len(x_test) if self.test_size is None else self.test_size
        self._test = to_device_nchw(x_test[:n_test], y_test[:n_test], self.device)
        self._ready = True

    def _set_metadata(
        self, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
    ) -> None:
        shape = (x_train.shape[3], x_train.shape[1], x_train.shape[2])
        if x_test.shape[1:] != x_train.shape[1:]:
            raise ValueError(
                f"{self.dataset}: train images are {x_train.shape[1:]}, test images {x_test.shape[1:]}"
            )
        max_label = int(max(y_train.max(initial=0), y_test.max(initial=0)))
        info = DATASET_INFO.get(self.dataset)
        if info is not None:
            if shape != info.image_shape:
                raise ValueError(
                    f"{self.dataset}: expected images of shape {info.image_shape}, found {shape}"
                )
            if max_label >= info.num_classes:
                raise ValueError(
                    f"{self.dataset}: label {max_label} out of range for {info.num_classes} classes"
                )
            self._num_classes = info.num_classes
        else:
            self._num_classes = max_label + 1
        self._image_shape = shape

    # ------------------------------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """Classes of the dataset (known without loading for built-in datasets)."""
        if self.dataset in DATASET_INFO:
            return DATASET_INFO[self.dataset].num_classes
        self.setup()
        assert self._num_classes is not None
        return self._num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images (known without loading for built-in datasets)."""
        if self.dataset in DATASET_INFO:
            return DATASET_INFO[self.dataset].image_shape
        self.setup()
        assert self._image_shape is not None
        return self._image_shape

    @property
    def has_validation(self) -> bool:
        """Whether a validation split exists (``val_size > 0``)."""
        return self.val_size > 0

    def split_sizes(self) -> dict[str, int]:
        """Images per split after subsetting; worth logging next to every result."""
        self.setup()
        assert self._train is not None and self._test is not None
        return {
            "train": len(self._train[1]),
            "val": 0 if self._val is None else len(self._val[1]),
            "test": len(self._test[1]),
        }

    def summary(self) -> dict[str, Any]:
        """Flat description of the data a run used, for run parameters and model cards."""
        return {
            "dataset": self.dataset,
            "data_dir": str(resolve_data_dir(self.data_dir).absolute()),
            "num_classes": self.num_classes,
            "image_shape": "x".join(map(str, self.image_shape)),
            **{f"{k}_size": v for k, v in self.split_sizes().items()},
            "split_seed": self.split_seed,
            "augment": self.augment,
        }

    # ------------------------------------------------------------------------------------------------------

    def train_loader(self, rank: int = 0, world_size: int = 1) -> DeviceLoader:
        """Shuffled, augmented training batches; under DDP each rank passes its rank and the world size.

        The last incomplete batch is dropped: a handful of images would give batch-norm noisy statistics, and
        under DDP ranks must agree on the number of steps.
        """
        self.setup()
        assert self._train is not None
        images, labels = self._train
        return DeviceLoader(
            images,
            labels,
            self.batch_size,
            shuffle=True,
            drop_last=True,
            augment=self.augment,
            pad=self.pad,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
        )

    def val_loader(self) -> DeviceLoader:
        """Validation batches (held out from training data) in a fixed order, unaugmented."""
        self.setup()
        if self._val is None:
            raise ValueError("no validation split: DataModule.val_size is 0")
        return DeviceLoader(*self._val, self.eval_batch_size, drop_last=self.val_drop_last)

    def test_loader(self) -> DeviceLoader:
        """Test batches in a fixed order, unaugmented. Report them; never select on them."""
        self.setup()
        assert self._test is not None
        return DeviceLoader(*self._test, self.eval_batch_size)
