"""What a training run's page in the MLflow UI shows: its name, its experiment, grouped metrics, the config.

A researcher opening a run should see at once which method and config it is (the run name is the gin
spec plus shortened overrides), find it in the experiment named after its model (``MODEL_NAME``), read
the method and the operative config (as the run description and as the run's one config artifact,
``config/operative_config.txt``, which the UI previews) and see metrics grouped in sections (``train/``,
``val/``, ``test/``, ``perf/``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import gin
import mlflow

from pipeline.tracking import CONFIG_ARTIFACT, scrub

RUN_NAME_LIMIT = 90
# Per-epoch numbers that describe speed and schedule rather than the model: one `perf/` section in the UI.
PERF_METRICS = {
    "lr": "perf/lr",
    "epoch_time_s": "perf/epoch_time_s",
    "train/images_per_s": "perf/images_per_s",
}
DESCRIPTION_LIMIT = 8000


def run_name(gin_spec: str, overrides: list[str]) -> str:
    """``'d2r_cag_cifar10,smoke [ALPHA=10, train_size=256]'``: the spec, then overrides as ``param=value``.

    Configurable prefixes are dropped (``DataModule.train_size`` shows as ``train_size``) and the name is
    cut at ``RUN_NAME_LIMIT`` characters; the full overrides stay in the ``robustflow.overrides`` tag.
    """
    name = gin_spec.strip()
    if overrides:
        short = []
        for binding in overrides:
            key, value = (part.strip() for part in binding.split("=", 1))
            short.append(f"{key.rsplit('.', 1)[-1].rsplit('/', 1)[-1]}={value}")
        name += f" [{', '.join(short)}]"
    return name if len(name) <= RUN_NAME_LIMIT else name[: RUN_NAME_LIMIT - 2].rstrip(", ") + "…]"


def _generated(name: str | None) -> bool:
    """Whether ``name`` is one MLflow made up (``skillful-fly-574``) rather than one a person chose."""
    from mlflow.utils.name_utils import _GENERATOR_NOUNS, _GENERATOR_PREDICATES

    parts = (name or "").split("-")
    return not name or (
        len(parts) == 3
        and parts[0] in _GENERATOR_PREDICATES
        and parts[1] in _GENERATOR_NOUNS
        and parts[2].isdigit()
    )


def name_and_file(run_id: str, name: str, model_name: str) -> None:
    """Name the run (unless a person named it, e.g. ``mlflow run --run-name``) and check where it is filed.

    ``mlflow run`` creates the run before our code starts, in the experiment given by
    ``--experiment-name`` (else "Default"); MLflow cannot move a run, so a run filed elsewhere than the
    ``MODEL_NAME`` experiment gets a log line saying how to file the next one with its model.
    """
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    if _generated(run.info.run_name):
        client.set_tag(run_id, "mlflow.runName", name)
    experiment = client.get_experiment(run.info.experiment_id).name
    if experiment != model_name:
        print(
            f"robustflow: run {run_id} is filed under experiment {experiment!r}, not {model_name!r} "
            f"(its registered model's name); with `mlflow run` pass --experiment-name {model_name}",
            file=sys.stderr,
        )


def grouped(metrics: Mapping[str, float]) -> dict[str, float]:
    """Metrics renamed for the UI's sections: speed and schedule numbers go under ``perf/``."""
    return {
        PERF_METRICS.get(k, k if "/" in k else f"perf/{k}"): v for k, v in metrics.items() if k != "epoch"
    }


def log_operative_config(config: str) -> None:
    """The run's config as its one artifact (``config/operative_config.txt``, previewable) and, after a
    line naming the method, as the run's description (markdown, machine paths scrubbed)."""
    from components.method import declared_method

    mlflow.log_text(config, CONFIG_ARTIFACT)
    method = declared_method()
    head = f"**{method.name}** ({method.paper}): {method.summary}\n\n" if method else ""
    note = scrub(head + "Operative gin config (what the run actually used):\n\n" + gin.markdown(config))
    if len(note) > DESCRIPTION_LIMIT:  # MLflow's limit on a tag value; the artifact keeps it whole
        tail = f"\n\n... cut here; the whole config is the artifact `{CONFIG_ARTIFACT}`."
        note = note[: DESCRIPTION_LIMIT - len(tail)] + tail
    mlflow.set_tag("mlflow.note.content", note)
