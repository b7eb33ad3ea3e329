"""Running a table's rows: each an ordinary training run in its own experiment, evaluated by the evaluate
entry point's functions, reused when the store already holds it, FAILED (with the reason) when it fails.

How the runs hang together in MLflow. The table's own run (the *parent*) lives in an experiment named after
the table; each row's training run lives in the row's experiment (``MODEL_NAME``), with its usual name and
registered model, and its evaluation run beside it. They are linked by tags, not by MLflow's nesting:
``mlflow.parentRunId`` is shown by the UI only within one experiment, and a row reused by a later table
run would need two parents. So each run the table creates carries ``robustflow.table_run`` (the parent that
made it) and ``robustflow.table``; the parent records every row's runs (tags ``robustflow.row.<label>``,
``table.json``, the ``Run`` column) whether it made them or reused them.

Reuse: a training run is found by its config fingerprint (``robustflow.config_hash``, set on every training
run: a row trained by ``pipeline.train`` with the same config counts too) and its evaluation by the training
run's id and the evaluation plan (``robustflow.eval_plan``). A run that diverged is reused as FAILED (the
same config diverges again); ``--retry-failed`` trains it anew. A run that was interrupted (KILLED) is
resumed from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
from mlflow.entities import Run

from pipeline.evaluate import EVALUATES_TAG, evaluate_model, load_for_evaluation
from pipeline.resume import CONFIG_HASH_TAG, check_resume, resume_checkpoint
from pipeline.table.plan import EvalPlan, PlannedRow
from pipeline.table.render import FAILED, REUSED, TRAINED, RowResult
from pipeline.tracking import FAILURE_TAG, STARTED_TAG

TABLE_RUN_TAG = "robustflow.table_run"
TABLE_TAG = "robustflow.table"
EVAL_PLAN_TAG = "robustflow.eval_plan"
EVAL_FLAGS_TAG = "robustflow.eval_flags"
DIVERGED_TAG = "robustflow.diverged"
FLAGS_LIMIT = 4000


@contextlib.contextmanager
def outside_parent() -> Iterator[None]:
    """Let a row's runs go to their own experiment: ``mlflow run`` exported the parent's run and experiment
    ids, and ``mlflow.set_experiment`` (called by each row's training) exports its own; none may leak from
    one row into the next."""
    saved = {k: os.environ.pop(k, None) for k in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value
        mlflow.tracking.fluent._active_experiment_id = None


def _search(model_name: str, filter_string: str) -> list[Run]:
    experiment = mlflow.MlflowClient().get_experiment_by_name(model_name)
    if experiment is None:
        return []
    return mlflow.MlflowClient().search_runs(
        [experiment.experiment_id], filter_string=filter_string, order_by=["attributes.start_time DESC"]
    )


def prior_training(p: PlannedRow) -> Run | None:
    """The newest usable training run of this config: FINISHED, else diverged, else KILLED (resumable).

    Tune trials (nested runs) are left out: they are not registered and were picked by a study.
    """
    runs = [
        r
        for r in _search(p.model_name, f"tags.`{CONFIG_HASH_TAG}` = '{p.fingerprint}'")
        if "mlflow.parentRunId" not in r.data.tags and STARTED_TAG in r.data.tags
    ]
    for wanted in (
        lambda r: r.info.status == "FINISHED",
        lambda r: r.info.status == "FAILED" and r.data.tags.get(DIVERGED_TAG) == "true",
        lambda r: r.info.status == "KILLED",
    ):
        found = [r for r in runs if wanted(r)]
        if found:
            return found[0]
    return None


def prior_evaluation(p: PlannedRow, train_run_id: str, plan: EvalPlan) -> Run | None:
    """The newest FINISHED evaluation of ``train_run_id`` with this evaluation plan."""
    runs = _search(
        p.model_name,
        f"tags.`{EVALUATES_TAG}` = '{train_run_id}' and tags.`{EVAL_PLAN_TAG}` = '{plan.key}' "
        "and attributes.status = 'FINISHED'",
    )
    return runs[0] if runs else None


def run_row(
    p: PlannedRow,
    plan: EvalPlan,
    *,
    parent_id: str,
    table_name: str,
    device: str,
    output_dir: str | Path,
    retry_failed: bool = False,
    stop: Callable[[], bool] | None = None,
) -> RowResult:
    """Train (or reuse) and evaluate (or reuse) one row; any failure becomes a FAILED result with its reason.

    An interrupt (``TrainingInterruptedError``) is no failure of the row: it propagates and stops the table.
    """
    row = p.row
    result = RowResult(row.label, p.spec, row.paper, row.source, row.note)
    tags = {TABLE_RUN_TAG: parent_id, TABLE_TAG: table_name}
    prior = prior_training(p)
    if prior is not None and prior.info.status == "FINISHED":
        result.status, result.train_run_id = REUSED, prior.info.run_id
    elif prior is not None and prior.info.status == "FAILED" and not retry_failed:
        result.status, result.train_run_id = FAILED, prior.info.run_id
        result.reason = (
            f"{prior.data.tags.get(FAILURE_TAG, 'diverged')} (an earlier run; --retry-failed trains again)"
        )
        return result
    else:
        resume = prior.info.run_id if prior is not None and prior.info.status == "KILLED" else None
        _train(p, result, tags, device=device, output_dir=output_dir, resume=resume, stop=stop)
        if result.status == FAILED:
            return result
    _evaluate(p, result, plan, tags, device=device, output_dir=output_dir)
    return result


def _train(
    p: PlannedRow,
    result: RowResult,
    tags: dict[str, str],
    *,
    device: str,
    output_dir: str | Path,
    resume: str | None,
    stop: Callable[[], bool] | None,
) -> None:
    from components.guard import TrainingDivergedError
    from components.training import TrainingInterruptedError
    from pipeline.tracking import full_config_text, run_params
    from pipeline.train import build, train_experiment

    print(f"robustflow table: row {p.row.label}: training {p.spec}", file=sys.stderr)
    exp = None
    try:
        with outside_parent():
            loaded, exp = build(p.spec, p.overrides, device)
            resume_from = None
            if resume is not None:
                check_resume(
                    resume, run_params(), loaded.overrides, full_config_text(), experiment=loaded.experiment
                )
                resume_from = resume_checkpoint(resume, Path(output_dir) / resume)
                print(f"robustflow table: row {p.row.label}: resuming run {resume}", file=sys.stderr)
            with _training(stop):
                out = train_experiment(
                    loaded, exp, gin_spec=p.spec, run_id=resume, output_dir=output_dir, stop=stop, tags=tags,
                    resume_from=resume_from,
                )  # fmt: skip
        result.status, result.train_run_id = TRAINED, out["run_id"]
    except TrainingInterruptedError:
        raise
    except TrainingDivergedError as err:
        result.status, result.reason = FAILED, str(err)
        last = mlflow.last_active_run()
        result.train_run_id = last.info.run_id if last is not None else None
    except Exception as err:  # noqa: BLE001  (a row's failure of any kind must not stop the table)
        result.status, result.reason = FAILED, f"training: {type(err).__name__}: {err}"
        while mlflow.active_run():
            mlflow.end_run(status="FAILED")
    finally:
        del exp
        _release_memory()


@contextlib.contextmanager
def _training(stop: object) -> Iterator[None]:
    """While training, a signal only sets the flag: training stops at the next step and leaves its run
    KILLED with a checkpoint (the command's ``_TableStop`` reads ``training``)."""
    if hasattr(stop, "training"):
        stop.training = True
    try:
        yield
    finally:
        if hasattr(stop, "training"):
            stop.training = False


def _evaluate(
    p: PlannedRow,
    result: RowResult,
    plan: EvalPlan,
    tags: dict[str, str],
    *,
    device: str,
    output_dir: str | Path,
) -> None:
    prior = prior_evaluation(p, result.train_run_id, plan)
    if prior is not None:
        result.eval_run_id, result.reused_eval = prior.info.run_id, True
        result.ours = headline(prior.data.metrics)
        flags = prior.data.tags.get(EVAL_FLAGS_TAG, "")
        result.flags = [f for f in flags.split("\n") if f]
        return
    print(f"robustflow table: row {p.row.label}: evaluating ({plan.name})", file=sys.stderr)
    uri = f"runs:/{result.train_run_id}/model"
    try:
        with outside_parent():
            loaded = load_for_evaluation(uri, plan.n, device=device)
            done = evaluate_model(
                uri, plan.build(), loaded, output_dir=output_dir, tags={**tags, EVAL_PLAN_TAG: plan.key}
            )
            flags_text = "\n".join(done.report.flags)[:FLAGS_LIMIT]
            mlflow.MlflowClient().set_tag(done.run_id, EVAL_FLAGS_TAG, flags_text)
        result.eval_run_id = done.run_id
        result.ours = headline(done.metrics)
        result.flags = list(done.report.flags)
    except Exception as err:  # noqa: BLE001  (as in _train: the table goes on)
        result.status, result.reason = FAILED, f"evaluation: {type(err).__name__}: {err}"
        while mlflow.active_run():
            mlflow.end_run(status="FAILED")
    finally:
        _release_memory()


def headline(metrics: dict[str, float]) -> dict[str, float]:
    """An evaluation's ``eval/n<N>/<name>`` metrics by ``<name>`` (``pgd50_acc``, ``aa_acc``, ...)."""
    return {k.split("/", 2)[2]: v for k, v in metrics.items() if k.startswith("eval/n") and k.count("/") >= 2}


def _release_memory() -> None:
    """Rows run one after another in one process: give back the last row's GPU memory before the next."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
