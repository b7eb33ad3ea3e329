"""Shared test fixtures: offline data, an isolated MLflow store per test, a model trained once per session,
quiet telemetry."""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import gin
import pytest
from support import SMOKE, cpu_args, unavailable

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# Under pytest-xdist (the README's command runs one worker per core) each worker gets its share of the cores,
# and so do the processes its tests start: torch's default of one thread per core in every worker (and in
# every subprocess) oversubscribes the CPU, and spinning OpenMP threads then cost more than they give.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = str(_threads)
    import torch

    torch.set_num_threads(_threads)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ROBUSTFLOW_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data(monkeypatch):
    """The offline CIFAR-10 shards (../shared/data); missing: a listed skip (a failure on CI)."""
    if not (SHARED_DATA / "cifar10" / "train-1.npz").is_file():
        unavailable(f"offline CIFAR-10 shards not found under {SHARED_DATA} (set ROBUSTFLOW_TEST_DATA)")
    monkeypatch.setenv("ROBUSTFLOW_DATA", str(SHARED_DATA))
    return SHARED_DATA


def _use_store(folder: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Make ``folder/mlflow.db`` this test's MLflow store and ``folder`` its working directory."""
    import mlflow

    monkeypatch.chdir(folder)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    return uri


def _leave_store() -> None:
    import mlflow

    while mlflow.active_run():
        mlflow.end_run()
    # mlflow.set_experiment exports the id for child processes; do not let it leak into later tests.
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh sqlite MLflow store and working directory for one test."""
    yield _use_store(tmp_path, monkeypatch)
    _leave_store()


@pytest.fixture(autouse=True)
def _isolate():
    """Each test starts with no gin config and without MLflow state a previous test left behind.

    mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID for child processes; a stale id from another
    test's store would point the next test at an experiment its store does not have.
    """
    saved = {k: os.environ.get(k) for k in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI")}
    yield
    gin.clear_config()
    import mlflow

    while mlflow.active_run():
        mlflow.end_run()
    # set_experiment also caches the id in the fluent API; the next test's store would not have it.
    mlflow.tracking.fluent._active_experiment_id = None
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests (threads only contend on a shared CPU)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The model every test that needs "a trained, registered model" shares: the smoke profile on 128 training
# images (2 steps an epoch), 2 epochs, trained once per session through the train entry point, with system
# metrics sampled fast enough to be logged by so short a run.
TRAINED_OVERRIDES = (
    "EPOCHS = 2; DataModule.train_size = 128; DataModule.val_size = 64; DataModule.test_size = 64; "
    "BATCH_SIZE = 64; Trainer.progress = False"
)


@dataclass
class TrainedStore:
    """A copy of the session's trained store: ``uri`` (sqlite), ``dir`` (also the working directory),
    ``run_id`` of the FINISHED training run (version 1 of ``d2r_cag_cifar10``, champion), its ``log``."""

    uri: str
    dir: Path
    run_id: str
    log: str


@pytest.fixture(scope="session")
def _trained_snapshot(tmp_path_factory):
    if not (SHARED_DATA / "cifar10" / "train-1.npz").is_file():
        unavailable(f"offline CIFAR-10 shards not found under {SHARED_DATA} (set ROBUSTFLOW_TEST_DATA)")
    # Trained once per test session, not once per pytest-xdist worker: the workers share the parent of
    # their base temp folders, and the first to get the lock trains (pytest-xdist's documented pattern).
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    root = shared / "trained"
    from filelock import FileLock

    with FileLock(str(shared / "trained.lock")):
        done = root / "run.json"
        if not done.is_file():
            _train_snapshot(root)
        record = json.loads(done.read_text())
    return root / "store", root / "pristine", record["run_id"], record["log"]


def _train_snapshot(root: Path) -> None:
    """Train the shared model into ``root/store``, copy it to ``root/pristine``, write ``root/run.json``."""
    shutil.rmtree(root, ignore_errors=True)  # a half-written one, from a worker that crashed
    work = root / "store"
    work.mkdir(parents=True)
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
        ROBUSTFLOW_DATA=str(SHARED_DATA),
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.5",
        MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(key, None)
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.train", *cpu_args(TRAINED_OVERRIDES, SMOKE)],
        cwd=work, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    run_id = re.search(r"robustflow: run (\w+) finished", out.stderr)[1]
    shutil.copytree(work, root / "pristine")
    (root / "run.json").write_text(json.dumps({"run_id": run_id, "log": out.stderr}))


@pytest.fixture
def trained_store(_trained_snapshot, shared_data, tmp_path, monkeypatch):
    """The session's trained model in a fresh copy of its MLflow store, as working directory and tracking URI.

    Training it costs more than most tests; copying it costs milliseconds. The copy is this test's own (in
    its tmp_path), so a test may change it (evaluate it, resume it, train beside it) without affecting the
    next one.
    """
    work, pristine, run_id, log = _trained_snapshot
    store = tmp_path / "store"
    shutil.copytree(pristine, store)
    _move_store(store / "mlflow.db", str(work), str(store))
    yield TrainedStore(uri=_use_store(store, monkeypatch), dir=store, run_id=run_id, log=log)
    _leave_store()


def _move_store(db: Path, old: str, new: str) -> None:
    """Point a copied sqlite MLflow store's records at the copy: it stores artifact locations as absolute
    paths (``file:///.../mlruns/...``). Every text column of every table, so no MLflow schema is assumed."""
    import sqlite3

    with sqlite3.connect(db) as con:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for _, column, kind, *_ in con.execute(f'PRAGMA table_info("{table}")').fetchall():
                if any(t in kind.upper() for t in ("CHAR", "TEXT", "CLOB")):
                    col = f'"{column}"'
                    sql = f'UPDATE "{table}" SET {col} = replace({col}, ?, ?) WHERE {col} LIKE ?'
                    con.execute(sql, (old, new, f"%{old}%"))
