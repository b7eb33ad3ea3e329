"""The model registry: one registered model per experiment, the alias ``champion`` on the most robust.

Every training run registers its best checkpoint (by the validation split, never the test set) as a new
version of the model named after the experiment (gin macro ``MODEL_NAME``). ``champion`` moves to the new
version only if its ``val/pgd20_acc`` is strictly higher than the current champion's; ties keep the older
version. The rule is applied by re-reading every version's score after registering, so two workers
registering at once still leave the alias on the best version.

Only trustworthy runs are registered (``pipeline.trust``): a run that did not end FINISHED, logged a
non-finite training loss, or whose best checkpoint holds non-finite weights is refused with a log line
and a ``robustflow.registration`` tag on the run. ``champion`` only ever points at a version that passed
those checks (tag ``robustflow.checks = passed``); a version created any other way is never champion.

Two ways back to a model:

* ``load_model(uri)`` (robustflow's loader): rebuilds the real ``nn.Module`` class from the run's gin
  config and loads the weights with ``torch.load(weights_only=True)``; nothing is unpickled.
* ``mlflow.pytorch.load_model(uri)``: the model is logged in MLflow's default ``pt2`` (torch.export)
  format, which loads without unpickling; what comes back is a differentiable ``GraphModule`` exported
  in eval mode, on which torch does not support calling ``.eval()``. Its ``.training`` attribute reads
  ``True`` all the same: torch's loader builds a fresh ``GraphModule`` (an ``nn.Module`` defaults to
  training) and nothing stored in the archive can change that; the graph computes eval mode (BatchNorm
  running statistics, no dropout) whatever the attribute says.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from torch import nn

CHAMPION = "champion"
SCORE_TAG = "val_pgd20_acc"
CHECKS_TAG = "robustflow.checks"
REFUSED_TAG = "robustflow.registration"
MODEL_ARTIFACT = "model"
# The step the logged model is filed at in its run. MLflow links every run metric logged at the model's
# step to the model (system metrics, the run's own test split at step 0); no metric is ever logged at a
# negative step, so the model's metrics are only what ``evaluate`` logs against it.
MODEL_STEP = -1
T = TypeVar("T")


@dataclass
class Registered:
    """The version a run registered and whether it took the champion alias."""

    name: str
    version: str
    score: float
    champion: bool


def log_model(model: nn.Module, input_shape: tuple[int, ...], name: str = MODEL_ARTIFACT) -> str:
    """Log ``model`` (eval mode, CPU) to the active run as MLflow's pt2 pytorch model; returns its URI.

    ``name`` is the logged model's name in the UI (train passes the experiment's ``MODEL_NAME``).
    """
    model = model.eval()
    device = next(model.parameters()).device
    cpu_model = model.to("cpu")
    example = np.random.default_rng(0).random((2, *input_shape), dtype=np.float32)
    try:
        # Explicit requirements: MLflow's inference of them costs 10+ s per run and adds nothing here.
        info = mlflow.pytorch.log_model(
            cpu_model,
            name=name,
            input_example=example,
            serialization_format="pt2",
            step=MODEL_STEP,
            pip_requirements=[f"torch>={torch.__version__.split('+')[0]}", "numpy"],
        )
    finally:
        model.to(device)
    # The logged model copies the run's source tags (the script's local path, e.g. a venv inside the clone).
    from pipeline.tracking import scrub

    tags = mlflow.get_logged_model(info.model_id).tags
    fixed = {k: scrub(v) for k, v in tags.items() if k.startswith("mlflow.source.") and scrub(v) != v}
    if fixed:
        mlflow.set_logged_model_tags(info.model_id, fixed)
    return info.model_uri


def _eligible_score(tags: dict[str, str]) -> float:
    """A version's score if it may hold ``champion`` (passed the checks, finite score), else -inf."""
    score = float(tags.get(SCORE_TAG, "-inf"))
    return score if tags.get(CHECKS_TAG) == "passed" and math.isfinite(score) else -math.inf


def _score(client: mlflow.MlflowClient, name: str, version: str) -> float:
    return _eligible_score(client.get_model_version(name, version).tags)


def settle_champion(name: str, attempts: int = 5) -> str | None:
    """Point ``champion`` at the best-scoring version (ties: the oldest); returns that version.

    Two workers may settle at the same moment (the first alias insert of one loses a unique-constraint
    race): on failure, re-read every version and settle again.
    """
    for attempt in range(attempts):
        try:
            return _settle_once(name)
        except MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.1 * (attempt + 1))
    return None


def _settle_once(name: str) -> str | None:
    client = mlflow.MlflowClient()
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        return None
    best = max(versions, key=lambda v: (_eligible_score(v.tags), -int(v.version)))
    if _eligible_score(best.tags) == -math.inf:
        return None  # no version may hold the alias
    try:
        current = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        current = None
    if current is None or _score(client, name, current) < _eligible_score(best.tags):
        client.set_registered_model_alias(name, CHAMPION, best.version)
        return str(best.version)
    return current


REGISTERED_DESCRIPTION = (
    "robustflow experiment `{name}`: one version per trustworthy training run; the alias `champion` is on "
    "the version with the best validation PGD-20 accuracy. Load it as a real `nn.Module` with "
    "`pipeline.registry.load_model('models:/{name}@champion')` (`mlflow.pytorch.load_model` gives a "
    "torch.export GraphModule, already in eval mode, whose `.eval()`/`.train()` raise NotImplementedError)."
)


def _with_retries(call: Callable[[], T], attempts: int = 5) -> T:
    """``call()``, retried on MlflowException: concurrent first registrations can collide in the store."""
    for attempt in range(attempts):
        try:
            return call()
        except MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def register(
    run_id: str, name: str, model_uri: str, score: float, card: str | Callable[[str], str]
) -> Registered | None:
    """Register ``model_uri`` as a new version of ``name`` and apply the champion rule.

    ``card`` is the version's description, or a function of the new version's number that returns it
    (the card names the version in its commands); it is also logged to the run as ``model_card.md``.

    Call it after the run ended: a run that is not FINISHED, or fails any other check of
    ``pipeline.trust.untrustworthy``, is refused (``None``, a log line and a tag on the run say why).
    """
    from pipeline.trust import untrustworthy

    client = mlflow.MlflowClient()
    reasons = untrustworthy(run_id, score)
    if reasons:
        why = "; ".join(reasons)
        print(f"robustflow: NOT registering run {run_id} as a version of {name}: {why}", file=sys.stderr)
        with contextlib.suppress(MlflowException):  # a deleted run cannot be tagged; the log line stands
            client.set_tag(run_id, REFUSED_TAG, f"refused: {why}")
        return None
    # mlflow.register_model links the version to the logged model (its page lists the version) and
    # creates the registered model on first use, tolerating another worker creating it at the same moment.
    tags = {SCORE_TAG: repr(score), CHECKS_TAG: "passed"}
    version = _with_retries(lambda: mlflow.register_model(model_uri, name, tags=tags))
    text = card(str(version.version)) if callable(card) else card
    client.update_model_version(name, version.version, description=text)
    with contextlib.suppress(MlflowException, OSError):
        client.log_text(run_id, text, "model_card.md")
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=REGISTERED_DESCRIPTION.format(name=name))
    champion = settle_champion(name)
    number = str(version.version)
    return Registered(name=name, version=number, score=score, champion=champion == number)


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
_RUNS_URI = re.compile(r"^runs:/(?P<run>[0-9a-f]+)(?:/.*)?$")


def run_of(model_uri: str) -> str:
    """The training run behind ``models:/name@alias``, ``models:/name/version`` or ``runs:/id/...``."""
    client = mlflow.MlflowClient()
    if match := _MODELS_URI.match(model_uri):
        if match["alias"]:
            return client.get_model_version_by_alias(match["name"], match["alias"]).run_id
        return client.get_model_version(match["name"], match["version"]).run_id
    if match := _RUNS_URI.match(model_uri):
        return match["run"]
    raise ValueError(
        f"unsupported model URI {model_uri!r}: use models:/<name>@<alias>, models:/<name>/<version> "
        "or runs:/<run_id>/model"
    )


def _eval_model_name() -> str:
    import gin

    try:
        return gin.query_parameter("TrainingGraph.eval_model")
    except ValueError:
        return "target"


@contextlib.contextmanager
def _quiet_downloads() -> Iterator[None]:
    """MLflow's download progress bars only on a terminal: in a log file each redraw would be a line."""
    if sys.stderr.isatty() or "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" in os.environ:
        yield
        return
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)


def _download_config(run_id: str, dst: str) -> Path:
    """The run's config file: ``config/operative_config.txt``; runs logged before it was the one config
    artifact have ``config/config.gin`` (their ``operative_config.txt`` lacks ``MODEL_NAME``)."""
    from pipeline.tracking import CONFIG_ARTIFACT

    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "config")}
    path = "config/config.gin" if "config/config.gin" in logged else CONFIG_ARTIFACT
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=dst))


def load_model(model_uri: str, device: str | torch.device = "cpu") -> nn.Module:
    """The real ``nn.Module`` behind a registry URI, rebuilt from its run's gin config, in eval mode.

    The weights come from the run's ``checkpoints/best.pt`` through ``torch.load(weights_only=True)``,
    with ``strict=True`` so a key mismatch can never silently leave random weights (METHODS.md 1.5).
    """
    import gin

    from components.checkpoint import load_checkpoint, strip_module_prefix
    from pipeline.config import load_config

    run_id = run_of(model_uri)
    with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
        config = _download_config(run_id, tmp)
        best = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="checkpoints/best.pt", dst_path=tmp
        )
        load_config(str(config))
        # Build only the evaluated model (no data, no guide): the scoped backbone reference in the graph.
        reference = gin.query_parameter("TrainingGraph.models")[_eval_model_name()]
        model = reference.scoped_configurable_fn()
        state = load_checkpoint(best, map_location="cpu")
        model.load_state_dict(strip_module_prefix(state["model"]), strict=True)
    gin.clear_config()
    return model.to(device).eval()
