"""Datasets as device-resident uint8 tensors, their splits, and the loaders that batch them."""

from components.data.datamodule import DataModule, to_device_nchw
from components.data.device_loader import Batch, DeviceLoader
from components.data.sources import (
    DATASET_INFO,
    DataNotFoundError,
    DatasetInfo,
    check_available,
    load_arrays,
    resolve_cache_dir,
    resolve_data_dir,
)

__all__ = [
    "DATASET_INFO",
    "Batch",
    "DataModule",
    "DataNotFoundError",
    "DatasetInfo",
    "DeviceLoader",
    "check_available",
    "load_arrays",
    "resolve_cache_dir",
    "resolve_data_dir",
    "to_device_nchw",
]
