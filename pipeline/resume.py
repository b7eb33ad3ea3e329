"""Resuming a run safely: the run's own config, never a finished or foreign run, never a silent restart.

A resumed run must train on the config its record says it trained on: its parameters, its
``robustflow.overrides`` tag and ``config/operative_config.txt`` are what a reader (and the registry's model
card) trusts. So before any work the resumed config is compared with what the run logged, and any difference
is refused with the differing bindings listed. A FINISHED run (any, not only robustflow's) has nothing to
resume: opening it again would log its test metrics a second time, register a duplicate model version and
stretch its duration. A run that robustflow did not start for this experiment (an evaluation run, another
experiment's run) is refused too: training into it would mix two records. And the checkpoint is fetched before
the run is opened: a download error is an error, not "no checkpoint" (which would train from epoch 1 inside a
run that already logged epochs). All of this runs before ``mlflow.start_run`` touches the run (which would
mark it RUNNING).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from pipeline.config import ConfigError
from pipeline.tracking import CHECKPOINT_ARTIFACT_DIR, CONFIG_ARTIFACT, MAX_PARAM_LENGTH, STARTED_TAG

# Where the run trains is not part of what it trains: a run killed on one machine may resume on another
# (its checkpoint is downloaded from the run's artifacts), so the device binding is not compared.
IGNORED_BINDINGS = frozenset({"DataModule.device"})
# Parameters that ``mlflow run`` logs for the entry point itself (not gin bindings) and the data summary,
# which describes the data on disk rather than the config.
_NON_GIN_PARAMS = frozenset({"gin", "overrides", "device", "nproc"})
# Every training run carries a fingerprint of its config, so that a run can be found again by what it
# trained (the table command reuses a finished row this way instead of training it again).
CONFIG_HASH_TAG = "robustflow.config_hash"


class ResumeError(ConfigError):
    """A resume that would make the run's record untrue; the message says why and what to do instead."""


def resume_target(run_id: str | None) -> str | None:
    """The run this process would continue: ``--run-id``, else the run ``mlflow run`` created for it."""
    return run_id or os.environ.get("MLFLOW_RUN_ID") or None


def resume_command(args: argparse.Namespace, run_id: str) -> str:
    """The command that continues ``run_id`` with the same config, in the form this process was started."""
    from pipeline.run_status import wrapper_pid

    if wrapper_pid(run_id) is not None:
        project = Path(__file__).resolve().parents[1]
        params = {"gin": args.gin, "overrides": args.overrides, "device": args.device}
        if args.nproc != 1:
            params["nproc"] = args.nproc
        ps = " ".join(f"-P {shlex.quote(f'{k}={v}')}" for k, v in params.items() if v != "")
        return f"mlflow run {shlex.quote(str(project))} -e train --env-manager local --run-id {run_id} {ps}"
    parts = ["python", "-m", "pipeline.train", "--gin", args.gin]
    if args.overrides:
        parts += ["--overrides", args.overrides]
    parts += ["--device", args.device, "--run-id", run_id]
    if args.nproc != 1:
        parts += ["--nproc", str(args.nproc)]
    return shlex.join(parts)


def check_resume(
    run_id: str | None,
    flat_params: Mapping[str, str],
    overrides: list[str],
    config_text: str,
    experiment: str | None = None,
) -> bool:
    """Raise :class:`ResumeError` if continuing ``run_id`` with this config would be untrustworthy.

    Returns whether this is a resume (the run already trained); a run ``mlflow run -e train`` has just
    created, or no run at all, is a fresh start and passes. ``flat_params`` are the gin bindings as
    ``flat_parameters`` gives them, ``overrides`` the override bindings, ``config_text``
    ``tracking.full_config_text()``,
    ``experiment`` the experiment's name (the run must have been started for it).
    """
    if run_id is None:
        return False
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ResumeError(f"cannot resume run {run_id}: {err.message}") from err
    trained = run.data.tags.get(STARTED_TAG)
    if run.info.status == "FINISHED":
        if trained:
            raise ResumeError(
                f"run {run_id} is FINISHED: it trained to the end and registered its model, so there is "
                "nothing to resume. Start a new run (drop --run-id), or evaluate the run's model with "
                f"'python -m pipeline.evaluate --model-uri runs:/{run_id}/model'."
            )
        raise ResumeError(
            f"run {run_id} is FINISHED and is not a robustflow training run: training into it would mix a "
            "new training run into its record. Drop --run-id to start a new run."
        )
    if not trained:
        if _fresh_train_run(run):
            return False
        raise ResumeError(
            f"run {run_id} is not a robustflow training run (no {STARTED_TAG} tag; status "
            f"{run.info.status}): training into it would mix a new training run into its record. "
            "Drop --run-id to start a new run."
        )
    if experiment is not None and trained != experiment:
        raise ResumeError(
            f"run {run_id} trained experiment {trained!r}, not {experiment!r}: resume it with its own config "
            f"(gin={run.data.tags.get('robustflow.gin', '?')!r}), or start a new run."
        )
    differences = config_differences(run, flat_params, overrides, config_text, client)
    if differences:
        listed = "\n".join(f"  - {line}" for line in differences)
        raise ResumeError(
            f"run {run_id} was trained with a different config; resuming it with this one would leave its "
            f"parameters, overrides tag and {CONFIG_ARTIFACT} untrue. Differences (run's value -> now):\n"
            f"{listed}\n"
            f"Resume with the run's own config (gin={run.data.tags.get('robustflow.gin', '?')!r}, "
            f"overrides={run.data.tags.get('robustflow.overrides', '')!r}), or start a new run."
        )
    return True


def _fresh_train_run(run: mlflow.entities.Run) -> bool:
    """Whether ``run`` is the run ``mlflow run -e train`` created for this process: running, nothing logged
    but the entry point's parameters."""
    tags = run.data.tags
    return (
        run.info.status == "RUNNING"
        and tags.get("mlflow.project.entryPoint") == "train"
        and run.info.run_id == os.environ.get("MLFLOW_RUN_ID")
        and not run.data.metrics
    )


def resume_checkpoint(run_id: str, local_dir: Path) -> Path | None:
    """The checkpoint a resumed ``run_id`` continues from: the local copy, else the run's artifacts.

    ``None`` only when the run logged no checkpoint and no epoch (it stopped in its first epoch): it then
    trains from epoch 1, and says so. Raises :class:`ResumeError` when the checkpoint cannot be fetched (an
    unreachable artifact store is not "no checkpoint"), or when the run logged epochs but no checkpoint.
    """
    local = local_dir / "last.pt"
    if local.is_file() and (local_dir / "best.pt").is_file():
        return local
    client = mlflow.MlflowClient()
    try:
        logged = {a.path for a in client.list_artifacts(run_id, CHECKPOINT_ARTIFACT_DIR)}
        epochs = client.get_run(run_id).data.metrics
    except (MlflowException, OSError) as err:
        raise ResumeError(
            f"cannot resume run {run_id}: listing its checkpoints failed ({type(err).__name__}: {err}). "
            "Nothing was written to the run; retry once the tracking server and artifact store are reachable."
        ) from err
    names = [f"{CHECKPOINT_ARTIFACT_DIR}/last.pt", f"{CHECKPOINT_ARTIFACT_DIR}/best.pt"]
    if names[0] not in logged:
        if epochs:
            raise ResumeError(
                f"run {run_id} logged metrics but holds no {names[0]}: it cannot continue without "
                "logging its epochs a second time. Start a new run (drop --run-id)."
            )
        print(
            f"robustflow: run {run_id} stopped before its first checkpoint: training it from epoch 1",
            file=sys.stderr,
        )
        return None
    local_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        try:
            downloaded = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=name, dst_path=str(local_dir / "download")
            )
        except (MlflowException, OSError) as err:
            raise ResumeError(
                f"cannot resume run {run_id}: downloading its checkpoint {name} failed "
                f"({type(err).__name__}: {err}). Nothing was written to the run; retry once the artifact "
                "store is reachable."
            ) from err
        shutil.move(downloaded, local_dir / Path(name).name)
    return local


def config_fingerprint(flat_params: Mapping[str, str]) -> str:
    """A short hash of every gin binding but the device (``flat_parameters()``): equal iff the configs are.

    Files, profiles and overrides that bind the same values give the same fingerprint: it is what the run
    trains that counts, not how the command was spelled.
    """
    import hashlib
    import json

    kept = {k: str(v) for k, v in flat_params.items() if k not in IGNORED_BINDINGS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:20]


def config_differences(
    run: mlflow.entities.Run,
    flat_params: Mapping[str, str],
    overrides: list[str],
    config_text: str,
    client: mlflow.MlflowClient | None = None,
) -> list[str]:
    """Human-readable differences between ``run``'s logged config and the given one (empty: same config)."""
    logged = {
        k: v
        for k, v in run.data.params.items()
        if k not in _NON_GIN_PARAMS and not k.startswith("data.") and k not in IGNORED_BINDINGS
    }
    now = {k: _as_logged(v) for k, v in flat_params.items() if k not in IGNORED_BINDINGS}
    out = []
    for key in sorted(set(logged) | set(now)):
        was, is_ = logged.get(key, "<unset>"), now.get(key, "<unset>")
        if was != is_:
            out.append(f"{key}: {was} -> {is_}")
    logged_overrides = run.data.tags.get("robustflow.overrides", "")
    if logged_overrides != "; ".join(overrides):
        out.append(f"overrides: {logged_overrides!r} -> {'; '.join(overrides)!r}")
    if not out:
        # Parameters are truncated for MLflow; the logged config file holds every value whole.
        out += _config_file_differences(run.info.run_id, config_text, client or mlflow.MlflowClient())
    return out


def _as_logged(value: object) -> str:
    # What ``tracking.log_params`` stores for a value (MLflow rejects longer ones).
    text = str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


def _config_lines(text: str) -> list[str]:
    keep = []
    for line in text.splitlines():
        name = line.split("=", 1)[0].strip()
        if line.strip() and name not in IGNORED_BINDINGS:
            keep.append(line.rstrip())
    return keep


def _config_file_differences(run_id: str, config_text: str, client: mlflow.MlflowClient) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if CONFIG_ARTIFACT not in {a.path for a in client.list_artifacts(run_id, "config")}:
                return []  # an older run without the file: the parameters were all there is to compare
            path = client.download_artifacts(run_id, CONFIG_ARTIFACT, tmp)
        except (MlflowException, OSError) as err:
            raise ResumeError(
                f"cannot resume run {run_id}: reading its {CONFIG_ARTIFACT} to compare configs failed "
                f"({type(err).__name__}: {err}); retry once the artifact store is reachable."
            ) from err
        logged = _config_lines(Path(path).read_text())
    now = _config_lines(config_text)
    gone = [line for line in logged if line not in now]
    new = [line for line in now if line not in logged]
    return [f"{CONFIG_ARTIFACT}: was {line!r}" for line in gone] + [
        f"{CONFIG_ARTIFACT}: now {line!r}" for line in new
    ]


__all__ = [
    "CONFIG_HASH_TAG",
    "ResumeError",
    "check_resume",
    "config_differences",
    "config_fingerprint",
    "resume_checkpoint",
    "resume_command",
    "resume_target",
]
