"""What a tune worker checked before any work (:class:`Plan`) and the names it records under.

The names are the contract between workers (Optuna trial and study attributes) and with whoever reads the
MLflow store (tags); the small MLflow helpers here write them.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import LoadedConfig
from pipeline.tuning.pruning import Pruning
from pipeline.tuning.storage import StorageSpec

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from optuna.distributions import BaseDistribution

EXIT_USAGE = 2
EXIT_TRIALS_FAILING = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM

CLEAN_METRIC = "val/clean_acc"
OBJECTIVES = ("robust", "pareto")

# Optuna trial attributes.
RUN_ATTR = "mlflow_run_id"
VERSION_ATTR = "model_version"
CURVE_ATTR = "curve"  # {epoch: [clean, robust]}: what the Pareto rule compares trials on
DIVERGED_ATTR = "diverged"  # the guard's message: the trial finished by diverging (told to Optuna as PRUNED)
PER_RUN_ATTRS = (RUN_ATTR, VERSION_ATTR, CURVE_ATTR, DIVERGED_ATTR, "error")
PARENT_ATTR = "mlflow_parent_run_id"
CONFIG_ATTR = "robustflow.config"  # {gin, overrides, objective}: what every worker of the study must run

# MLflow tags.
# parent | trial | worker (the run `mlflow run` made for a worker that joined an existing study)
ROLE_TAG = "robustflow.tune.role"
STUDY_TAG = "optuna.study_name"
STORAGE_TAG = "optuna.storage"
TRIAL_TAG = "optuna.trial_number"
STATE_TAG = "optuna.state"
NOTE_TAG = "robustflow.tune.note"
PARENT_TAG = "robustflow.tune.parent_run_id"


@dataclass
class Plan:
    """Everything checked before any work: config, search space, pruning, storage, names."""

    gin_spec: str
    loaded: LoadedConfig
    space: dict[str, BaseDistribution]  # the searched macros (less those --overrides pins)
    pinned: list[str]
    objective: str
    pruning: Pruning
    selection: str  # val/pgd20_acc unless Trainer.val_steps says otherwise
    model_name: str
    study_name: str
    storage: StorageSpec
    n_trials: int
    device: str
    output_dir: Path
    seed: int | None
    heartbeat_interval: int
    grace_period: int

    @property
    def metric_names(self) -> list[str]:
        return [CLEAN_METRIC, self.selection] if self.objective == "pareto" else [self.selection]

    @property
    def study_dir(self) -> Path:
        """Where the study's local files go: best_params.gin, the Pareto front, trials' checkpoints."""
        return self.output_dir / re.sub(r"[^A-Za-z0-9._-]+", "_", self.study_name)


def default_study_name(loaded: LoadedConfig, objective: str) -> str:
    """``d2r_cag_cifar10-smoke-robust``: the config files and the objective (a study cannot change either)."""
    return "-".join([*(f.stem for f in loaded.files), objective])


def mark_run(
    run_id: str | None, state: str, note: str = "", status: str | None = None, only_if_running: bool = False
) -> None:
    """Say on a trial's MLflow run how Optuna saw the trial end (and fix the run status to match)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not run_id:
        return
    client = mlflow.MlflowClient()
    try:
        if status and (not only_if_running or client.get_run(run_id).info.status == "RUNNING"):
            client.set_terminated(run_id, status)
        client.set_tag(run_id, STATE_TAG, state)
        if note:
            client.set_tag(run_id, NOTE_TAG, note[:5000])
    except MlflowException as err:  # e.g. the run lives on another worker's tracking server
        print(f"robustflow tune: could not mark MLflow run {run_id}: {err}", file=sys.stderr)


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])
