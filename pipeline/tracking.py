"""MLflow plumbing for the entry points: the store, runs, config logging and checkpoint artifacts."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

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


def run_was_started(run_id: str) -> bool:
    """Whether an earlier process already trained in this run (its tags are set), i.e. this is a resume.

    Parameters alone do not tell: ``mlflow run`` logs the entry point's own parameters before we start.
    """
    return STARTED_TAG in mlflow.get_run(run_id).data.tags


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


def fetch_resume_checkpoint(run_id: str, local_dir: Path) -> Path | None:
    """The run's last checkpoint: the local copy if this machine has it, else the run's artifact."""
    local = local_dir / "last.pt"
    if local.is_file():
        return local
    try:
        downloaded = mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path=f"{CHECKPOINT_ARTIFACT_DIR}/last.pt",
            dst_path=str(local_dir / "download"),
        )
    except (MlflowException, OSError):
        return None
    local_dir.mkdir(parents=True, exist_ok=True)
    shutil.move(downloaded, local)
    best = None
    with contextlib.suppress(MlflowException, OSError):
        best = mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path=f"{CHECKPOINT_ARTIFACT_DIR}/best.pt",
            dst_path=str(local_dir / "download"),
        )
    if best:
        shutil.move(best, local_dir / "best.pt")
    return local
