"""Shared test fixtures: offline data, an isolated MLflow store per test, quiet telemetry."""

import os
from pathlib import Path

import gin
import pytest
from support import unavailable

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ROBUSTFLOW_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data(monkeypatch):
    """The offline CIFAR-10 shards (../shared/data); missing: a listed skip (a failure on CI)."""
    if not (SHARED_DATA / "cifar10" / "train-1.npz").is_file():
        unavailable(f"offline CIFAR-10 shards not found under {SHARED_DATA} (set ROBUSTFLOW_TEST_DATA)")
    monkeypatch.setenv("ROBUSTFLOW_DATA", str(SHARED_DATA))
    return SHARED_DATA


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh sqlite MLflow store and working directory for one test."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    # mlflow.set_experiment exports the id for child processes; do not let it leak into later tests.
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.fixture(autouse=True)
def _isolate():
    """Each test starts with no gin config and without MLflow state a previous test left behind.

    mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID for child processes; a stale id from another
    test's store would point the next test at an experiment its store does not have.
    """
    saved = {k: os.environ.get(k) for k in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI")}
    yield
    gin.clear_config()
    import mlflow

    while mlflow.active_run():
        mlflow.end_run()
    # set_experiment also caches the id in the fluent API; the next test's store would not have it.
    mlflow.tracking.fluent._active_experiment_id = None
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests (threads only contend on a shared CPU)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
