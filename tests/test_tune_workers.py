"""Several tune workers: one command with --workers N, and two commands started at once on a fresh store.

Neither test creates the MLflow store first: a fresh sqlite store is what the first workers race to set up.
"""

import subprocess

import mlflow
import optuna
import pytest
from optuna.trial import TrialState
from test_tune import tune_command, worker_env

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


def _complete_trials(tmp_path) -> list[int]:
    study = optuna.load_study(study_name="pair", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    return sorted(t.number for t in study.trials if t.state == TrialState.COMPLETE)


def test_one_command_starts_n_workers_after_setting_the_stores_up(shared_data, mlflow_store, tmp_path):
    out = subprocess.run(
        tune_command(*ARGS, "--workers", "2"), cwd=tmp_path, env=worker_env(), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    assert "started 2 workers" in out.stderr
    assert out.stderr.count("exited with 0") == 2, out.stderr[-4000:]
    assert _complete_trials(tmp_path) == [0, 1]
    parents = [
        r
        for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
        if r.data.tags.get("robustflow.tune.role") == "parent"
    ]
    assert len(parents) == 1  # set up once, joined by both workers


def test_two_commands_started_together_on_a_fresh_store_both_work(shared_data, mlflow_store, tmp_path):
    procs = [
        subprocess.Popen(
            tune_command(*ARGS), cwd=tmp_path, env=worker_env(), stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    for proc, err in zip(procs, errs):
        assert proc.returncode == 0, err[:3000] + "\n...\n" + err[-1500:]
    assert _complete_trials(tmp_path) == [0, 1], "\n".join(e[-2000:] for e in errs)


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
