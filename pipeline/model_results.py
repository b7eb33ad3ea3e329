"""Evaluation results where a researcher looks for them: on the registered model, not only on a side run.

``evaluate`` resolves what it evaluated (an alias names a version only at one moment: the version is
pinned), logs its numbers under names that say what they are and on how many images
(``eval/n1000/pgd20_acc``: one name per quantity and sample size, never shared with the training run's own
``test/`` split), rounded to the precision the sample size supports (k/n needs no more than
ceil(log10 n) decimals). Against the evaluated version's *logged model* (MLflow 3's model-scoped metrics)
it logs only those robustness results; it tags the version with the headline numbers and writes them into
the version's model card. Accuracy against eps is logged on the evaluation run only (step = eps x 255),
and only for a series measured at every radius of the curve.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

EVAL_TAG_PREFIX = "eval."
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
# MLflow's limit on a model version tag value is 5000 characters; flags beyond it stay in flags.txt.
TAG_LIMIT = 4000


@dataclass
class Evaluated:
    """What an evaluation evaluated, pinned: the logged model, the registered version (if any), the run."""

    model_id: str | None
    version: ModelVersion | None
    train_run_id: str

    @property
    def pinned_uri(self) -> str:
        """``models:/name/3`` (the version an alias pointed at), else ``runs:/<id>/model``."""
        if self.version is not None:
            return f"models:/{self.version.name}/{self.version.version}"
        return f"runs:/{self.train_run_id}/model"

    @property
    def label(self) -> str:
        """``d2r_cag_cifar10/v3`` for run names and tables, else the run id's first characters."""
        if self.version is not None:
            return f"{self.version.name}/v{self.version.version}"
        return f"run {self.train_run_id[:8]}"


def evaluated_model(model_uri: str, train_run_id: str) -> Evaluated:
    """The logged model and the registered version behind ``model_uri``, resolved now.

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
        return Evaluated(version.source.removeprefix("models:/"), version, train_run_id)
    run = client.get_run(train_run_id)
    logged = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{train_run_id}'",
        output_format="list",
    )
    return Evaluated(logged[0].model_id if logged else None, version, train_run_id)


def decimals(n: int) -> int:
    """Decimals an accuracy over ``n`` examples supports: its resolution is 1/n (1000 -> 3, 256 -> 3)."""
    return max(0, math.ceil(math.log10(n))) if n > 1 else 0


def rounded(value: float, n: int) -> float:
    """``value`` rounded to what ``n`` examples resolve (float32 noise such as 0.23199999 gone)."""
    return round(float(value), decimals(n))


def eval_prefix(n: int) -> str:
    """``eval/n1000/``: the section and the sample size of every evaluation metric."""
    return f"eval/n{n}/"


def eval_metrics(report: Any, primary_eps: float) -> dict[str, float]:  # noqa: ANN401  (an EvalReport)
    """The robustness results under their names: clean once, each attack and the worst case per radius
    (other radii suffixed ``_eps0.031``), rounded to the sample size."""
    from components.eval.report import metric_suffix

    n = report.n_examples
    prefix = eval_prefix(n)
    out = {f"{prefix}clean_acc": rounded(report.results[0].clean_acc, n)}
    for r in report.results:
        if not (r.acc or r.eps == primary_eps):
            continue
        s = metric_suffix(r.eps, primary_eps)
        for name, acc in r.acc.items():
            out[f"{prefix}{name}_acc{s}"] = rounded(acc, n)
        out[f"{prefix}worst_acc{s}"] = rounded(r.worst_acc, n)
    return out


def stage_metrics(report: Any, primary_eps: float) -> dict[str, float]:  # noqa: ANN401
    """AutoAttack's cumulative per-stage accuracies (``eval/n1000/aa_apgd-ce_acc``), for the run page."""
    from components.eval.report import metric_suffix

    n = report.n_examples
    return {
        f"{eval_prefix(n)}{name}_{stage}_acc{metric_suffix(r.eps, primary_eps)}": rounded(acc, n)
        for r in report.results
        for name, stages in r.stages.items()
        for stage, acc in stages.items()
    }


def curve_points(report: Any, radii: tuple[float, ...]) -> dict[str, list[tuple[int, float]]]:  # noqa: ANN401
    """``eval/n<N>/<attack>_acc_vs_eps`` -> ``(eps x 255, accuracy)``: only attacks run at every radius of
    ``radii`` (so the points of one chart are one attack), only radii that are multiples of 1/255.

    The worst case is left out unless every radius ran the same attacks: a worst case over PGD-20 alone at
    4/255 and over PGD-20 and C&W at 8/255 is not one curve. Clean accuracy does not depend on eps.
    """
    on_grid = [e for e in radii if abs(e * 255 - round(e * 255)) < 1e-6]
    if len(on_grid) < 2:
        return {}
    results = [r for r in report.results if any(math.isclose(r.eps, e, abs_tol=1e-9) for e in on_grid)]
    if len(results) < len(on_grid):
        return {}
    common = set.intersection(*(set(r.acc) for r in results))
    n = report.n_examples
    out = {
        f"{eval_prefix(n)}{name}_acc_vs_eps": [(round(r.eps * 255), rounded(r.acc[name], n)) for r in results]
        for name in sorted(common)
    }
    if all(set(r.acc) == common for r in results):
        out[f"{eval_prefix(n)}worst_acc_vs_eps"] = [
            (round(r.eps * 255), rounded(r.worst_acc, n)) for r in results
        ]
    return out


def version_tags(metrics: dict[str, float], report: Any, eps: list[float], run_id: str) -> dict[str, str]:  # noqa: ANN401
    """The headline numbers at the primary eps, the radii, the suite, the sample size and the flags."""
    from components.eval.report import format_eps

    prefix = eval_prefix(report.n_examples)
    tags = {
        f"{EVAL_TAG_PREFIX}{key.removeprefix(prefix)}": f"{value:g}"
        for key, value in metrics.items()
        if "_eps" not in key and math.isfinite(value)
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


def card_row(report: Any, metrics: dict[str, float], eps: float, run_link: str) -> tuple[str, str, str]:  # noqa: ANN401
    """(key, row, header) of the model card's evaluation table for this evaluation."""
    from components.eval.report import format_eps

    prefix = eval_prefix(report.n_examples)
    attacks = [k.removeprefix(prefix).removesuffix("_acc") for k in metrics if "_eps" not in k]
    cells = ", ".join(f"{a} **{100 * metrics[prefix + a + '_acc']:.1f}**" for a in attacks)
    flags = "none" if not report.flags else f"{len(report.flags)}: " + "; ".join(report.flags)[:300]
    key = f"`{report.suite}`, {report.n_examples} images"
    row = f"| {key} | {format_eps(eps)} | {cells} | {flags} | {run_link} |"
    header = "| evaluation | eps | accuracy (%) | flags | run |\n|---|---|---|---|---|"
    return key, row, header


def headline(report: Any, metrics: dict[str, float]) -> str:  # noqa: ANN401
    """``quick on 1000 images: clean 23.2%, pgd20 6.1%, worst 5.9%`` for the card's first line."""
    prefix = eval_prefix(report.n_examples)
    shown = [k for k in ("clean", "pgd20", "pgd50", "aa", "worst") if f"{prefix}{k}_acc" in metrics]
    numbers = ", ".join(f"{k} {100 * metrics[f'{prefix}{k}_acc']:.1f}%" for k in shown)
    flags = f", {len(report.flags)} flag(s)" if report.flags else ""
    return f"{report.suite} on {report.n_examples} images: {numbers}{flags}"


def log_results(
    report: Any,  # noqa: ANN401
    eps: list[float],
    evaluated: Evaluated,
    curve_radii: tuple[float, ...],
    dataset: Any = None,  # noqa: ANN401  (an mlflow Dataset)
) -> dict[str, float]:
    """Log the results to the active run; the robustness results also against the evaluated model (and,
    given the evaluated split's ``dataset``, linked to it: the logged model's "Datasets used"); tag the
    version and update its card. Returns the headline metrics."""
    from pipeline.model_card import with_evaluation

    metrics = eval_metrics(report, eps[0])
    mlflow.log_metrics(metrics, model_id=evaluated.model_id, dataset=dataset)
    mlflow.log_metrics({**stage_metrics(report, eps[0]), "eval/flags": float(len(report.flags))})
    for key, points in curve_points(report, curve_radii).items():
        for step, acc in points:
            mlflow.log_metric(key, acc, step=step)
    version = evaluated.version
    if version is not None:
        client = mlflow.MlflowClient()
        run = mlflow.active_run()
        for key, value in version_tags(metrics, report, eps, run.info.run_id).items():
            client.set_model_version_tag(version.name, version.version, key, value)
        target = f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        link = f"[{run.info.run_name or run.info.run_id}]({target})"
        key, row, header = card_row(report, metrics, eps[0], link)
        train = client.get_run(evaluated.train_run_id)
        card = client.get_model_version(version.name, version.version).description or ""
        updated = with_evaluation(
            card, key, row, header, headline(report, metrics), train.info.experiment_id, train.info.run_id
        )
        client.update_model_version(version.name, version.version, description=updated)
    return metrics
