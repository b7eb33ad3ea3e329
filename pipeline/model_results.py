"""Evaluation results where a researcher looks for them: on the registered model, not only on a side run.

``evaluate`` logs its metrics against the evaluated version's *logged model* (MLflow 3's model-scoped
metrics: the logged model's page lists them), tags the model version with the headline numbers (clean,
PGD, AutoAttack, per-example worst case, eps, flags), and logs accuracy against eps as step-indexed
metrics (step = eps x 255) so the UI draws the curve and compares it across models.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

CURVE_PREFIX = "curve/"
EVAL_TAG_PREFIX = "eval."
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
# MLflow's limit on a model version tag value is 5000 characters; flags beyond it stay in flags.txt.
TAG_LIMIT = 4000


def evaluated_model(model_uri: str, train_run_id: str) -> tuple[str | None, ModelVersion | None]:
    """The logged model id and the registered version behind ``model_uri`` (either may be ``None``).

    ``models:/name@alias`` and ``models:/name/N`` name the version; for ``runs:/id/...`` it is the newest
    version registered from that run, if any.
    """
    client = mlflow.MlflowClient()
    version = None
    try:
        if match := _MODELS_URI.match(model_uri):
            if match["alias"]:
                version = client.get_model_version_by_alias(match["name"], match["alias"])
            else:
                version = client.get_model_version(match["name"], match["version"])
        else:
            found = client.search_model_versions(f"run_id = '{train_run_id}'")
            version = max(found, key=lambda v: int(v.version)) if found else None
    except MlflowException as err:
        version = None
        print(
            f"robustflow evaluate: warning: could not look up the registered version behind {model_uri} "
            f"({err.message}): the results go on the logged model only, no eval.* tags on a version",
            file=sys.stderr,
        )
    if version is not None and str(version.source).startswith("models:/m-"):
        return version.source.removeprefix("models:/"), version
    run = client.get_run(train_run_id)
    logged = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{train_run_id}'",
        output_format="list",
    )
    return (logged[0].model_id if logged else None), version


def curve_points(report: Any) -> dict[str, list[tuple[int, float]]]:  # noqa: ANN401  (an EvalReport)
    """``curve/<series>_acc`` -> ``(round(eps*255), accuracy)`` for each radius that is a multiple of 1/255.

    Other radii (0.031) would share a step with their neighbour (8/255); they stay in the ``_eps`` metrics.
    """
    out: dict[str, list[tuple[int, float]]] = {}
    for series, points in report.accuracy_vs_eps().items():
        steps = [(round(eps * 255), acc) for eps, acc in points if abs(eps * 255 - round(eps * 255)) < 1e-6]
        if steps:
            out[f"{CURVE_PREFIX}{series}_acc"] = steps
    return out


def version_tags(metrics: dict[str, float], report: Any, eps: list[float], run_id: str) -> dict[str, str]:  # noqa: ANN401
    """The headline numbers at the primary eps, the radii, the suite and the flags, as version tags."""
    from components.eval.report import format_eps

    tags = {
        f"{EVAL_TAG_PREFIX}{key.removeprefix('test/')}": f"{value:.4f}"
        for key, value in metrics.items()
        if key.startswith("test/") and "_eps" not in key and key.endswith("_acc") and math.isfinite(value)
    }
    flags = "; ".join(report.flags) if report.flags else "none"
    tags.update(
        {
            f"{EVAL_TAG_PREFIX}eps": ",".join(format_eps(e) for e in eps),
            f"{EVAL_TAG_PREFIX}suite": str(report.suite),
            f"{EVAL_TAG_PREFIX}n_examples": str(report.n_examples),
            f"{EVAL_TAG_PREFIX}flags": flags if len(flags) <= TAG_LIMIT else flags[: TAG_LIMIT - 3] + "...",
            f"{EVAL_TAG_PREFIX}run_id": run_id,
        }
    )
    return tags


def log_results(
    report: Any, metrics: dict[str, float], eps: list[float], model_uri: str, train_run_id: str
) -> None:  # noqa: ANN401
    """Log ``metrics`` and the eps curve to the active run, scoped to the evaluated model; tag its version."""
    model_id, version = evaluated_model(model_uri, train_run_id)
    mlflow.log_metrics(metrics, model_id=model_id)
    for key, points in curve_points(report).items():
        for step, acc in points:
            mlflow.log_metric(key, acc, step=step, model_id=model_id)
    if version is not None:
        client = mlflow.MlflowClient()
        for key, value in version_tags(metrics, report, eps, mlflow.active_run().info.run_id).items():
            client.set_model_version_tag(version.name, version.version, key, value)
