"""The data a run used, as MLflow dataset inputs: name, digest of the images and labels, split size.

Each split a run reads (``train``, ``validation``, ``test``) is logged with ``mlflow.log_input`` as its own
dataset, named ``<dataset> <split> (<n> images)``, with a digest of the exact images and labels of that
split (so two runs on the same held-out validation images show the same digest, and a run on a subset or
different shards shows another), the input's context set to the split, and a profile holding the split
size, the split seed and the source files' names. The source is named relative to ``$ROBUSTFLOW_DATA``,
never by the machine's path. The run page lists them under "Datasets"; the experiment's runs table can
filter by them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import mlflow
from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source import DatasetSource

from pipeline.tracking import scrub

DIGEST_LENGTH = 12


class RobustflowDataSource(DatasetSource):
    """Where a split came from: the dataset's name and its folder relative to the data root."""

    def __init__(self, dataset: str, location: str) -> None:
        self.dataset = dataset
        self.location = location

    @staticmethod
    def _get_source_type() -> str:
        return "robustflow"

    def load(self) -> Any:  # noqa: ANN401
        raise NotImplementedError("load a robustflow split with components.data.DataModule")

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:  # noqa: ANN401
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> RobustflowDataSource:  # noqa: ANN401
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "location": self.location}

    @classmethod
    def from_dict(cls, source_dict: dict[str, Any]) -> RobustflowDataSource:
        return cls(source_dict["dataset"], source_dict["location"])


class SplitDataset(Dataset):
    """One split of a dataset as MLflow sees it: a name, a digest and a profile (no data is uploaded)."""

    def __init__(self, source: RobustflowDataSource, name: str, digest: str, profile: dict[str, Any]) -> None:
        self._profile = profile
        super().__init__(source=source, name=name, digest=digest)

    def _compute_digest(self) -> str:
        return self._digest

    def to_dict(self) -> dict[str, str]:
        out = super().to_dict()
        out["profile"] = json.dumps(self._profile)
        return out

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    @property
    def schema(self) -> None:
        return None


def _loader(data: Any, split: str) -> Any:  # noqa: ANN401  (a DataModule; returns a DeviceLoader)
    return {"train": data.train_loader, "validation": data.val_loader, "test": data.test_loader}[split]()


def digest(images: Any, labels: Any) -> str:  # noqa: ANN401  (tensors)
    """sha256 of the uint8 images and int64 labels of a split, in order (first ``DIGEST_LENGTH`` hex)."""
    h = hashlib.sha256()
    h.update(images.detach().cpu().contiguous().numpy().tobytes())
    h.update(labels.detach().cpu().long().contiguous().numpy().tobytes())
    return h.hexdigest()[:DIGEST_LENGTH]


def describe(data: Any, splits: Iterable[str]) -> dict[str, dict[str, Any]]:  # noqa: ANN401  (a DataModule)
    """Per split: the dataset name, number of examples, digest and source files, for inputs and the card."""
    from components.data.sources import _find_shards, resolve_data_dir

    root = resolve_data_dir(data.data_dir)
    out = {}
    for split in splits:
        if split == "validation" and not data.has_validation:
            continue
        loader = _loader(data, split)
        files = _find_shards(root / data.dataset, "test" if split == "test" else "train")
        out[split] = {
            "dataset": data.dataset,
            "num_examples": int(loader.labels.shape[0]),
            "digest": digest(loader.images, loader.labels),
            "split_seed": data.split_seed,
            "files": ", ".join(f.name for f in files) or "(not .npz shards)",
            "location": scrub(str((root / data.dataset).absolute())),
        }
    return out


def split_dataset(split: str, info: dict[str, Any]) -> SplitDataset:
    """The MLflow dataset of one split, from its facts (``describe``)."""
    source = RobustflowDataSource(info["dataset"], info["location"])
    profile = {k: info[k] for k in ("num_examples", "split_seed", "files")}
    name = f"{info['dataset']} {split} ({info['num_examples']} images)"
    return SplitDataset(source, name, info["digest"], profile)


def log_data_inputs(data: Any, splits: Iterable[str]) -> dict[str, dict[str, Any]]:  # noqa: ANN401
    """Log each split as an MLflow dataset input of the active run (context = split); returns the facts,
    each with the logged dataset under ``"mlflow_dataset"`` (for metrics that name the data they measured)."""
    facts = describe(data, splits)
    for split, info in facts.items():
        dataset = split_dataset(split, info)
        mlflow.log_input(dataset, context=split)
        info["mlflow_dataset"] = dataset
    return facts
