"""Resuming through the train entry point: a different config or a FINISHED run is refused before work."""

import itertools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from support import TINY

from pipeline.resume import ResumeError, resume_checkpoint
from pipeline.tracking import STARTED_TAG
from pipeline.train import EXIT_USAGE, build, main, train_experiment

REPO = Path(__file__).resolve().parents[1]
GIN = "d2r_cag_cifar10,smoke"
OVERRIDES = f"EPOCHS = 2; {TINY}"


def _record(run_id: str) -> tuple:
    """What a refused resume must leave untouched: status, end time, metric histories, model versions."""
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    history = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in run.data.metrics}
    versions = sorted(v.version for v in client.search_model_versions(f"run_id = '{run_id}'"))
    # `mlflow run --run-id` tags the run with its backend before robustflow's code starts; not ours to stop.
    tags = {k: v for k, v in run.data.tags.items() if k != "mlflow.project.backend"}
    return run.info.status, run.info.end_time, history, dict(run.data.params), tags, versions


def _settled(run_id: str, expected: tuple, timeout: float = 30.0) -> tuple:
    """The run's record once it equals ``expected`` or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while (record := _record(run_id)) != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    return record


def _mlflow_run(run_id: str, overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    """`mlflow run --run-id` of the train entry point (the data comes from the shared_data fixture's env)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "train", "--env-manager", "local",
         "--run-id", run_id, "-P", f"gin={GIN}", "-P", f"overrides={overrides}", "-P", "device=cpu"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _killed_run(tmp_path) -> str:
    """A real run stopped in its second epoch (as SIGTERM would), with its epoch-1 checkpoint logged."""
    from components.training import TrainingInterruptedError

    loaded, exp = build(GIN, OVERRIDES, "cpu")
    steps = itertools.count()
    with pytest.raises(TrainingInterruptedError):
        train_experiment(
            loaded, exp, gin_spec=GIN, output_dir=tmp_path / "outputs", stop=lambda: next(steps) >= 6
        )
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "KILLED"
    assert (tmp_path / "outputs" / run.info.run_id / "last.pt").is_file()  # kept while it can be resumed
    return run.info.run_id


def _unreachable(*args, **kwargs):
    raise MlflowException("artifact store unreachable (503)")


def _unreachable_under(prefix: str):
    """``mlflow.artifacts.download_artifacts`` that fails for artifacts under ``prefix`` only."""
    original = mlflow.artifacts.download_artifacts

    def download(*args, **kwargs):
        if str(kwargs.get("artifact_path", "")).startswith(prefix):
            _unreachable()
        return original(*args, **kwargs)

    return download


@pytest.mark.slow
def test_resume_with_a_different_config_is_refused_listing_the_bindings(
    shared_data, mlflow_store, tmp_path, capsys, monkeypatch
):
    run_id = _killed_run(tmp_path)
    before = _record(run_id)
    capsys.readouterr()
    changed = ["--gin", GIN, "--overrides", f"{OVERRIDES}; ALPHA = 10", "--device", "cpu", "--run-id", run_id]
    assert main(changed) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "different config" in err and "ALPHA: 30.0 -> 10" in err, err
    assert "overrides:" in err and "resuming run" not in err
    assert _record(run_id) == before, "a refused resume changed the run"
    # The same refusal through `mlflow run --run-id`; its wrapper's FAILED is undone (the run stays KILLED).
    out = _mlflow_run(run_id, f"{OVERRIDES}; ALPHA = 10", tmp_path)
    assert out.returncode != 0 and "ALPHA: 30.0 -> 10" in out.stderr, out.stderr[-3000:]
    assert _settled(run_id, before) == before, "mlflow run changed the killed run"
    # On another machine (no local copy) an artifact store that fails the download is an error, not "no
    # checkpoint" (which trained from epoch 1 inside the run): exit 2 with the reason, the run untouched.
    shutil.rmtree(tmp_path / "outputs" / run_id)
    same = ["--gin", GIN, "--overrides", OVERRIDES, "--device", "cpu", "--run-id", run_id]
    with monkeypatch.context() as broken:
        broken.setattr(mlflow.artifacts, "download_artifacts", _unreachable_under("checkpoints"))
        assert main(same) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "downloading its checkpoint checkpoints/last.pt failed" in err and "store unreachable" in err, err
    assert "resuming run" not in err and _record(run_id) == before, "a failed download changed the run"
    # Reading the run's config to compare fails the same way: exit 2 with the reason, not a skipped check.
    with monkeypatch.context() as broken:
        broken.setattr(mlflow.artifacts, "download_artifacts", _unreachable)
        assert main(same) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "to compare configs failed" in err and "store unreachable" in err, err
    assert "resuming run" not in err and _record(run_id) == before, "a failed config read changed the run"
    # The same config still resumes from the run's artifacts (the check compares like with like) and
    # finishes the run.
    assert main(same) == 0
    assert "resuming run" in capsys.readouterr().err
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["ALPHA"] == "30.0"
    # FINISHED: the local copies of checkpoints the run's artifacts hold are gone; the artifacts stay.
    assert not (tmp_path / "outputs" / run_id).exists()
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "checkpoints")}
    assert logged == {"checkpoints/last.pt", "checkpoints/best.pt"}


@pytest.mark.slow
def test_resume_of_a_finished_run_is_refused_and_changes_nothing(trained_store, capsys):
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")  # the session's model
    before = _record(run.info.run_id)
    assert len(before[-1]) == 1  # one registered version
    assert not (trained_store.dir / "outputs").exists()  # FINISHED: no local checkpoints left behind
    capsys.readouterr()
    one_epoch = f"EPOCHS = 1; {TINY}"
    assert main(["--gin", GIN, "--overrides", one_epoch, "--device", "cpu", "--run-id", run.info.run_id]) == 2
    err = capsys.readouterr().err
    assert f"run {run.info.run_id} is FINISHED" in err and "nothing to resume" in err, err
    assert _record(run.info.run_id) == before, "a refused resume changed the run"
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == 1
    # The same through `mlflow run --run-id`: its wrapper must not turn the FINISHED run into FAILED either.
    out = _mlflow_run(run.info.run_id, one_epoch, trained_store.dir)
    assert out.returncode != 0 and "is FINISHED" in out.stderr, out.stderr[-3000:]
    # mlflow run overwrites the status as it exits; robustflow's restorer puts it back right after.
    assert _settled(run.info.run_id, before) == before, "mlflow run changed the finished run"


@pytest.mark.parametrize(
    "status, tags, message",
    [
        ("FINISHED", {"robustflow.evaluates": "x"}, "is FINISHED and is not a robustflow training run"),
        ("KILLED", {}, "is not a robustflow training run"),
        (
            "FAILED",
            {STARTED_TAG: "lbgat_cifar10"},
            "trained experiment 'lbgat_cifar10', not 'd2r_cag_cifar10'",
        ),
    ],
    ids=["finished-evaluation-run", "killed-foreign-run", "another-experiments-run"],
)
def test_a_run_that_is_not_this_experiments_training_run_is_refused_untouched(
    status, tags, message, shared_data, mlflow_store, capsys
):
    client = mlflow.MlflowClient()
    run_id = client.create_run("0", tags=tags).info.run_id
    client.log_metric(run_id, "test/clean_acc", 0.5)
    client.set_terminated(run_id, status)
    before = _record(run_id)
    assert main(["--gin", GIN, "--overrides", OVERRIDES, "--device", "cpu", "--run-id", run_id]) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert _record(run_id) == before, "a refused run was written to"


def test_a_run_stopped_before_its_first_checkpoint_restarts_saying_so_and_one_that_logged_epochs_is_refused(
    mlflow_store, tmp_path, capsys
):
    client = mlflow.MlflowClient()
    run_id = client.create_run("0", tags={STARTED_TAG: "d2r_cag_cifar10"}).info.run_id
    client.set_terminated(run_id, "KILLED")
    assert resume_checkpoint(run_id, tmp_path / run_id) is None  # killed in epoch 1: nothing logged yet
    assert (
        f"run {run_id} stopped before its first checkpoint: training it from epoch 1"
        in capsys.readouterr().err
    )
    client.log_metric(run_id, "train/loss", 2.3, step=1)  # an epoch was logged, its checkpoint is gone
    with pytest.raises(ResumeError, match="logged metrics but holds no checkpoints/last.pt"):
        resume_checkpoint(run_id, tmp_path / run_id)
