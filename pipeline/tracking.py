"""MLflow plumbing for the entry points: the store, runs, parameters, config logging and checkpoint artifacts.

Everything robustflow writes where people read it (parameters, tags, run and version descriptions, the model
card) goes through :func:`scrub` first, which replaces the machine's own paths (the repository, the data
root, the home and temporary directories, the working directory) by placeholders: a page another person
reads never shows where a file sat on the machine that trained it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import mlflow

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
CHECKPOINT_ARTIFACT_DIR = "checkpoints"
# MLflow rejects longer parameter values; gin values beyond this are kept whole in the config artifact.
MAX_PARAM_LENGTH = 6000
# A parameter longer than this is shortened, visibly, so the UI's run comparison stays readable; the config
# artifact keeps every value whole.
PARAM_SHOW_LENGTH = 250
CONFIG_ARTIFACT = "config/operative_config.txt"
REPO = Path(__file__).resolve().parents[1]


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


def _machine_paths() -> list[tuple[str, str]]:
    """(path, placeholder) for each directory of this machine that may turn up in a logged string."""
    from components.data import resolve_data_dir

    places = [
        (resolve_data_dir(None), "$ROBUSTFLOW_DATA" if os.environ.get("ROBUSTFLOW_DATA") else "./data"),
        (REPO, "<repo>"),
        (Path.cwd(), "<cwd>"),
        (Path(tempfile.gettempdir()), "<tmp>"),
        (Path.home(), "~"),
    ]
    pairs: dict[str, str] = {}
    for path, placeholder in places:
        for form in {str(path.absolute()), str(path.resolve())}:
            if len(form) > 1:  # never '/'
                pairs.setdefault(form, placeholder)
    # The longest first: the data root inside the repository is named as data, not as '<repo>/...'.
    return sorted(pairs.items(), key=lambda kv: -len(kv[0]))


def scrub(text: str) -> str:
    """``text`` with this machine's paths replaced (``/home/me/rf/../shared/data/x`` -> ``$ROBUSTFLOW_DATA/x``
    when ``ROBUSTFLOW_DATA`` names that folder).

    Only whole path prefixes are replaced (``/tmp`` in ``/tmpfoo`` stays); ``file://`` URIs too.
    """
    text = str(text)
    for path, placeholder in _machine_paths():
        text = re.sub(rf"(file://)?{re.escape(path)}(?![\w.-])", lambda _, p=placeholder: p, text)
    return text


def shorten(value: object, limit: int = PARAM_SHOW_LENGTH) -> str:
    """``value`` as a parameter string: scrubbed, and cut visibly after ``limit`` characters."""
    text = scrub(str(value))
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [{len(text)} chars; whole in {CONFIG_ARTIFACT}]"


def run_params() -> dict[str, str]:
    """Every gin binding that decides the run, as logged parameters: what the files bind (macros included)
    and every parameter of every configurable the run called, defaults included (gin's operative config),
    with ``%MACROS`` resolved to their values, paths scrubbed and long values shortened.

    Called after the experiment is built and again after training (configurables called during training,
    e.g. the optimizer and the validation attack, join the operative config then).
    """
    import gin

    from pipeline.config import flat_parameters, render_value

    params = dict(flat_parameters())
    for (scope, selector), bound in sorted(gin.config._OPERATIVE_CONFIG.items()):
        if selector == "gin.macro":
            continue  # flat_parameters has every macro
        prefix = f"{scope}/" if scope else ""
        short = selector.rsplit(".", 1)[-1]
        for param, value in bound.items():
            key = f"{prefix}{short}.{param}"
            if key not in params:
                params[key] = value if isinstance(value, str) else render_value(value, _macro_or_ref)
    return {k: shorten(v) for k, v in sorted(params.items())}


def _macro_or_ref(ref: object) -> str:
    import gin

    if ref.selector == "gin.macro":  # type: ignore[attr-defined]
        return repr(gin.query_parameter(f"%{ref.scoped_selector.split('/')[0]}"))  # type: ignore[attr-defined]
    return repr(ref)


def full_config_text() -> str:
    """The run's one config file: gin's operative config, then every binding the run did not call.

    The second part keeps what re-creating the run needs beyond the operative config (``MODEL_NAME``, the
    method's ``method_info``, a search space), so ``-P gin=<this file>`` trains the same experiment again.
    """
    import gin

    operative = gin.config._OPERATIVE_CONFIG
    unused: dict = {}
    for key, bound in gin.config._CONFIG.items():
        rest = {p: v for p, v in bound.items() if p not in operative.get(key, {})}
        if rest:
            unused[key] = rest
    text = gin.operative_config_str().rstrip() + "\n"
    if unused:
        text += (
            "\n# ==============================================================================\n"
            "# Bound by the config files but not called by this run (kept so this file re-creates it):\n"
            + gin.config._config_str(unused)
        )
    return text


def log_params(params: Mapping[str, object]) -> None:
    """Log parameters in batches: scrubbed of machine paths, long values shortened visibly."""
    items = [(k, shorten(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i : i + 100]))


def log_new_params(params: Mapping[str, str]) -> None:
    """Log the parameters the active run does not have yet (MLflow refuses to change a logged value)."""
    run = mlflow.active_run()
    logged = mlflow.get_run(run.info.run_id).data.params if run is not None else {}
    log_params({k: v for k, v in params.items() if k not in logged})


def scrub_source_tags(run_id: str) -> None:
    """MLflow's own source tags name the script or project by its local path: keep only the part after it."""
    client = mlflow.MlflowClient()
    tags = client.get_run(run_id).data.tags
    for key in ("mlflow.source.name", "mlflow.source.git.repoURL", "mlflow.gitRepoURL"):
        if key in tags and scrub(tags[key]) != tags[key]:
            client.set_tag(run_id, key, scrub(tags[key]))


def log_checkpoints(paths: Mapping[str, Path]) -> None:
    """Copy the epoch's checkpoints into the run's artifacts (where resume and the registry find them)."""
    for path in paths.values():
        if Path(path).is_file():
            mlflow.log_artifact(str(path), artifact_path=CHECKPOINT_ARTIFACT_DIR)
