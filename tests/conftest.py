"""Shared test fixtures: offline data, an isolated MLflow store per test, quiet telemetry."""

import os
from pathlib import Path

import gin
import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ROBUSTFLOW_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data(monkeypatch):
    """The offline CIFAR-10 shards (../shared/data); tests that need real data skip without them."""
    if not (SHARED_DATA / "cifar10" / "train-1.npz").is_file():
        pytest.skip(f"offline CIFAR-10 shards not found under {SHARED_DATA} (set ROBUSTFLOW_TEST_DATA)")
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
def _clear_gin():
    yield
    gin.clear_config()
