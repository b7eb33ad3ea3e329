"""Stops under `mlflow run`: a signal to the wrapper or to training ends the run KILLED with its checkpoint.

Each case starts a real `mlflow run ... --env-manager local` on the tiny smoke config, waits for epoch 1,
and stops it the way a user or a scheduler would: SIGTERM to the `mlflow run` PID, Ctrl-C (SIGINT to the
whole process group), or SIGTERM to the training process. Training must stop at its next step, leave no
process behind, print the resume command, keep the epoch-1 checkpoint, and the run must end KILLED (not
FAILED, which `mlflow run` itself writes).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import support

pytestmark = pytest.mark.slow  # three `mlflow run` trainings
REPO = Path(__file__).resolve().parents[1]
TINY = f"EPOCHS = 3; {support.TINY}"


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _mlflow_run_until_epoch_1(entry: str, params: list[str], tmp_path: Path):
    """Start `mlflow run -e entry` in its own session on a fresh store; return it, its env and the stderr
    lines up to the first "epoch 1/3"."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local",
           "--experiment-name", "d2r_cag_cifar10", "-P", "gin=d2r_cag_cifar10,smoke", "-P", "device=cpu",
           *params]  # fmt: skip
    # Its own session: the signals below reach this command's processes only, as a terminal's would.
    wrapper = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    lines = []
    for line in wrapper.stderr:
        lines.append(line)
        if line.startswith("epoch 1/3"):
            break
    return wrapper, env, lines


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("how", ["sigterm-wrapper", "ctrl-c", "sigterm-training"])
def test_stop_under_mlflow_run_ends_killed_with_no_orphan(how, shared_data, tmp_path):
    wrapper, env, lines = _mlflow_run_until_epoch_1("train", ["-P", f"overrides={TINY}"], tmp_path)
    (training,) = _children(wrapper.pid)  # the MLproject command execs python: no shell in between
    if how == "sigterm-wrapper":
        wrapper.send_signal(signal.SIGTERM)
    elif how == "ctrl-c":
        os.killpg(wrapper.pid, signal.SIGINT)
    else:
        os.kill(training, signal.SIGTERM)
    rest = wrapper.stderr.read()  # EOF only once training (which shares the pipe) has exited too
    wrapper.wait(timeout=120)
    out = "".join(lines) + rest
    deadline = time.monotonic() + 60
    while _alive(training) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(training), "training went on without its wrapper:\n" + out[-3000:]
    assert "epoch 3/3" not in out and "robustflow: registered" not in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "to resume: mlflow run" in out and "--run-id" in out, out[-3000:]

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    deadline = time.monotonic() + 30  # mlflow run writes FAILED as it exits; robustflow puts KILLED back
    while (status := mlflow.get_run(run.info.run_id).info.status) != "KILLED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert status == "KILLED", out[-3000:]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "checkpoints")}
    assert "checkpoints/last.pt" in artifacts
    assert not mlflow.MlflowClient().search_model_versions(f"run_id = '{run.info.run_id}'")
    # Local checkpoints are kept (the run can be resumed) where the command was run, not in the project.
    assert (tmp_path / "outputs" / run.info.run_id / "last.pt").is_file()
    assert not (REPO / "outputs" / run.info.run_id).exists()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_tune_under_mlflow_run_stops_with_its_wrapper_and_its_run_stays_killed(shared_data, tmp_path):
    """`mlflow run -e tune` SIGTERMed: the tune process stops with it (parent-death signal), the running
    trial is queued again, and the study's parent run (the wrapper's run) ends KILLED, not FAILED."""
    import optuna
    from optuna.trial import TrialState

    params = ["-P", "n_trials=1", "-P", f"overrides={TINY}; ATTACK_STEPS = 1", "-P", "pruner=none"]
    wrapper, env, lines = _mlflow_run_until_epoch_1("tune", params, tmp_path)
    tuner = [p for p in _children(wrapper.pid) if _alive(p)]
    wrapper.send_signal(signal.SIGTERM)
    rest = wrapper.stderr.read()
    wrapper.wait(timeout=120)
    out = "".join(lines) + rest
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in tuner) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert tuner and not any(_alive(p) for p in tuner), "tune went on without its wrapper:\n" + out[-3000:]
    assert "worker stopped by SIGTERM" in out and "queued again" in out, out[-3000:]
    study = optuna.load_study(
        study_name="d2r_cag_cifar10-smoke-robust", storage=f"sqlite:///{tmp_path / 'optuna.db'}"
    )
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    (parent,) = [
        r
        for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
        if r.data.tags.get("robustflow.tune.role") == "parent"
    ]
    deadline = time.monotonic() + 30  # mlflow run writes FAILED as it exits; robustflow puts KILLED back
    while (
        status := mlflow.get_run(parent.info.run_id).info.status
    ) != "KILLED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert status == "KILLED", out[-3000:]
