"""Opening a study: its storage, the Optuna study (checked to be the same study on resume), its parent run.

Every worker of a study runs this; they agree on one study and one parent MLflow run without talking to each
other, through what the study's storage and the MLflow store already hold.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.config import ConfigError
from pipeline.tuning.plan import (
    CONFIG_ATTR,
    NOTE_TAG,
    PARENT_ATTR,
    PARENT_TAG,
    ROLE_TAG,
    STORAGE_TAG,
    STUDY_TAG,
    Plan,
    set_tags,
)
from pipeline.tuning.space import describe, describe_space
from pipeline.tuning.storage import open_storage

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient
    from optuna.storages import BaseStorage


def open_study(plan: Plan, on_stale: Callable[..., None]) -> tuple[BaseStorage, optuna.Study]:
    """Open the storage and create or load the study, checking it is the study this plan asks for."""
    import optuna

    p = plan
    try:
        storage = open_storage(p.storage, p.heartbeat_interval, p.grace_period, on_stale)
    except Exception as err:  # a bad URL, a missing driver, an unreachable server: all before any work
        raise ConfigError(f"cannot open --storage {p.storage.label}: {type(err).__name__}: {err}") from err
    directions = ["maximize"] * len(p.metric_names)
    try:
        existing = len(optuna.load_study(study_name=p.study_name, storage=storage).trials)
    except KeyError:
        existing = 0
    # A seeded sampler restarts its random stream on resume; offset it so a resume draws new points.
    seed = None if p.seed is None else p.seed + existing
    study = optuna.create_study(
        study_name=p.study_name,
        storage=storage,
        directions=directions,
        sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=True),
        pruner=p.pruning.optuna_pruner() if p.objective == "robust" else optuna.pruners.NopPruner(),
        load_if_exists=True,
    )
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(
            f"study {p.study_name!r} has {len(study.directions)} objective(s); "
            f"--objective {p.objective} needs another study name (--study)"
        )
    _check_same_study(plan, study)
    return storage, study


def _check_same_study(plan: Plan, study: optuna.Study) -> None:
    p = plan
    wanted = {"gin": p.gin_spec, "overrides": "; ".join(p.loaded.overrides), "objective": p.objective}
    stored = study.user_attrs.get(CONFIG_ATTR)
    if stored is None:
        # One attribute, written whole: a worker joining at this moment sees all of it or none.
        study.set_user_attr(CONFIG_ATTR, wanted)
        study.set_user_attr("search_space", [describe(name, d) for name, d in p.space.items()])
        study.set_metric_names(p.metric_names)
        return
    differ = [k for k in wanted if stored.get(k) != wanted[k]]
    if differ:
        was = ", ".join(f"{k}={stored.get(k)!r}" for k in differ)
        now = ", ".join(f"{k}={wanted[k]!r}" for k in differ)
        raise ConfigError(
            f"study {p.study_name!r} in {p.storage.label} was created with {was}; this run asks for "
            f"{now}. Resume it with the same arguments, or start another study with --study NAME"
        )


def open_parent_run(plan: Plan, study: optuna.Study) -> str:
    """The study's parent run: the one recorded in the study, else a new one (all workers agree)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    # `mlflow run` created a run for this process and exported its id; nested runs would pick it up as
    # theirs, so it is taken out of the environment and used explicitly.
    env_run = os.environ.pop("MLFLOW_RUN_ID", None)
    parent = study.user_attrs.get(PARENT_ATTR)
    if parent:
        try:
            if client.get_run(parent).info.lifecycle_stage != "active":
                parent = None
        except MlflowException:
            parent = None  # recorded by a worker that logs to another tracking server
    if not parent:
        parent = _new_parent_run(plan, study, client, env_run)
    elif env_run and env_run != parent:
        set_tags(client, env_run, _worker_tags(plan, parent))
    return parent


def _worker_tags(plan: Plan, parent: str) -> dict[str, str]:
    return {
        ROLE_TAG: "worker",
        PARENT_TAG: parent,
        STUDY_TAG: plan.study_name,
        NOTE_TAG: f"a worker of study {plan.study_name!r}; its trials are nested under run {parent}",
    }


def _new_parent_run(plan: Plan, study: optuna.Study, client: MlflowClient, env_run: str | None) -> str:
    import mlflow

    p = plan
    tags: dict[str, Any] = {
        ROLE_TAG: "parent",
        STUDY_TAG: p.study_name,
        STORAGE_TAG: p.storage.label,
        "mlflow.runName": p.study_name,
        "robustflow.gin": p.gin_spec,
        "robustflow.overrides": "; ".join(p.loaded.overrides),
        "robustflow.model_name": p.model_name,
        "robustflow.tune.objective": p.objective,
        "robustflow.tune.search_space": describe_space(p.space),
    }
    if env_run:
        set_tags(client, env_run, tags)
        mine, experiment_id = env_run, client.get_run(env_run).info.experiment_id
    else:
        experiment_id = (
            os.environ.get("MLFLOW_EXPERIMENT_ID") or mlflow.set_experiment(p.model_name).experiment_id
        )
        mine = client.create_run(experiment_id, run_name=p.study_name, tags=tags).info.run_id
    # Workers that start a new study at the same moment each get here; they all settle on the oldest
    # candidate, and the others step aside.
    quote = p.study_name.replace("'", "\\'")
    label = p.storage.label.replace("'", "\\'")
    candidates = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{ROLE_TAG}` = 'parent' and tags.`{STUDY_TAG}` = '{quote}' "
        f"and tags.`{STORAGE_TAG}` = '{label}'",
    )
    runs = [(r.info.start_time, r.info.run_id) for r in candidates] or [(0, mine)]
    winner = min(runs)[1]
    if winner != mine:
        if mine == env_run:
            set_tags(client, mine, _worker_tags(plan, winner))
        else:
            client.delete_run(mine)
    study.set_user_attr(PARENT_ATTR, winner)
    return winner
