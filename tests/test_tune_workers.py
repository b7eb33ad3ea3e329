"""Several tune workers from one command (--workers N): the stores set up once, the workers run at the same
time, and SIGTERM to the command stops every worker's trial and queues it again. (Two separate commands
racing on a fresh store: tests/test_tune.py.)"""

import signal
import subprocess
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState
from test_stop_under_mlflow_run import _alive
from test_tune import TINY, tune_command, worker_env

from pipeline.workers import retry_setup, without_workers_flag

ARGS = [
    "--n-trials",
    "2",
    "--study",
    "pair",
    "--pruner",
    "none",
    "--heartbeat-interval",
    "2",
    "--grace-period",
    "60",
]


def _study(tmp_path) -> optuna.Study:
    return optuna.load_study(study_name="pair", storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def _complete_trials(tmp_path) -> list[int]:
    return sorted(t.number for t in _study(tmp_path).trials if t.state == TrialState.COMPLETE)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_sigterm_to_the_command_requeues_every_running_trial_and_leaves_no_worker(
    shared_data, mlflow_store, tmp_path
):
    # 4 trials of 20 epochs: when each worker has finished epoch 1 of its first trial, both are mid-trial with
    # steps left. A trial must outlast the second worker's start-up (imports, stores): with 4 epochs of this
    # tiny run the first worker once finished its whole trial before the second printed its epoch 1.
    cmd = tune_command(*ARGS[:1], "4", *ARGS[2:], "--workers", "2")
    cmd[cmd.index("--overrides") + 1] = TINY.replace("EPOCHS = 2", "EPOCHS = 20")
    parent = subprocess.Popen(cmd, cwd=tmp_path, env=worker_env(), stderr=subprocess.PIPE, text=True)
    lines, epochs = [], 0
    for line in parent.stderr:
        lines.append(line)
        if line.startswith("robustflow tune: started 2 workers"):
            workers = [int(p) for p in line.split("pids ", 1)[1].rstrip(")\n").split(", ")]
        epochs += line.startswith("epoch 1/20")
        if epochs == 2:  # both workers are in their first trial (each has finished its epoch 1)
            break
    parent.send_signal(signal.SIGTERM)
    rest = parent.stderr.read()
    said = "".join(lines) + rest
    assert parent.wait(timeout=300) == 143, said[-4000:]
    for pid in workers:
        assert not _alive(pid), f"worker {pid} outlived the command:\n" + said[-3000:]
    assert said.count("worker stopped by SIGTERM; queued again") == 2, said[-4000:]
    trials = _study(tmp_path).trials
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    # Each stopped trial is queued again (Optuna's retry: same parameters, "failed_trial" names it).
    queued = [t for t in trials if t.state == TrialState.WAITING and "failed_trial" in t.system_attrs]
    assert len(stopped) == 2, [(t.number, t.state) for t in trials]
    assert sorted(t.system_attrs["failed_trial"] for t in queued) == sorted(t.number for t in stopped)
    by_number = {t.number: t for t in trials}
    for t in queued:  # the retry's parameters: params (Optuna 5.1) or fixed_params (older releases)
        retry_params = t.params or t.system_attrs.get("fixed_params")
        assert retry_params == by_number[t.system_attrs["failed_trial"]].params


@pytest.mark.slow
def test_one_command_starts_n_workers_after_setting_the_stores_up(shared_data, mlflow_store, tmp_path):
    out = subprocess.run(
        tune_command(*ARGS, "--workers", "2"), cwd=tmp_path, env=worker_env(), capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    assert "started 2 workers" in out.stderr
    assert out.stderr.count("exited with 0") == 2, out.stderr[-4000:]
    assert _complete_trials(tmp_path) == [0, 1]
    # The workers ran at the same time: each trial started before the other one ended.
    first, second = _study(tmp_path).trials[:2]
    assert first.datetime_start < second.datetime_complete and second.datetime_start < first.datetime_complete
    parents = [
        r
        for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
        if r.data.tags.get("robustflow.tune.role") == "parent"
    ]
    assert len(parents) == 1  # set up once, joined by both workers


def test_setup_race_is_retried_and_other_errors_are_not():
    calls = []

    def racing():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) table _alembic_tmp_runs already exists")
        return "store"

    assert retry_setup(racing, wait_s=0.01) == "store" and len(calls) == 3
    with pytest.raises(ValueError, match="bad url"):
        retry_setup(lambda: (_ for _ in ()).throw(ValueError("bad url")), wait_s=0.01)
    assert without_workers_flag(["--gin", "x", "--workers", "3", "--workers=2", "--seed", "1"]) == [
        "--gin",
        "x",
        "--seed",
        "1",
    ]
