"""MLflow plumbing for the entry points: the store, runs, config logging and checkpoint artifacts."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import mlflow

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
CHECKPOINT_ARTIFACT_DIR = "checkpoints"
# MLflow rejects longer parameter values; gin values beyond this are kept whole in the config artifact.
MAX_PARAM_LENGTH = 6000


def configure_tracking() -> str:
    """Use ``MLFLOW_TRACKING_URI`` when set, else MLflow's embedded default, sqlite in the working dir.

    MLflow's artifact progress bars are turned off when stderr is not a terminal (a log file would
    collect every redraw), as robustflow's own bars are.
    """
    if not sys.stderr.isatty():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(DEFAULT_TRACKING_URI)
    return mlflow.get_tracking_uri()


def start_run(
    experiment_name: str, run_id: str | None = None, run_name: str | None = None
) -> mlflow.ActiveRun:
    """Continue ``run_id`` (or the run ``mlflow run`` created, via MLFLOW_RUN_ID), else start a new one.

    System metrics (CPU, memory, disk, network; GPU where the NVIDIA library is installed) are sampled
    for the run's lifetime when psutil is importable.
    """
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID")
    system = importlib.util.find_spec("psutil") is not None
    if run_id:
        return mlflow.start_run(run_id=run_id, log_system_metrics=system)
    if not os.environ.get("MLFLOW_EXPERIMENT_ID"):
        mlflow.set_experiment(experiment_name)
    return mlflow.start_run(run_name=run_name, log_system_metrics=system)


STARTED_TAG = "robustflow.experiment"
# Why a run ended FAILED, in words a person can act on (e.g. the divergence guard's message).
FAILURE_TAG = "robustflow.failure"


def log_params(params: Mapping[str, object]) -> None:
    """Log parameters in batches, truncating values MLflow would reject."""
    items = [
        (k, str(v) if len(str(v)) <= MAX_PARAM_LENGTH else str(v)[: MAX_PARAM_LENGTH - 3] + "...")
        for k, v in params.items()
    ]
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i : i + 100]))


def log_checkpoints(paths: Mapping[str, Path]) -> None:
    """Copy the epoch's checkpoints into the run's artifacts (where resume and the registry find them)."""
    for path in paths.values():
        if Path(path).is_file():
            mlflow.log_artifact(str(path), artifact_path=CHECKPOINT_ARTIFACT_DIR)
