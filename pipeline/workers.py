"""Several tune workers from one command, and stores that survive several workers starting at once.

``python -m pipeline.tune ... --workers N`` (``-P workers=N`` under ``mlflow run``) sets the MLflow store,
the Optuna storage, the study and its parent run up once, then starts N worker processes of the same
command on this machine and waits for them; SIGTERM or Ctrl-C is passed on to every worker, which stops its
trial at the next step. Workers on several machines are separate commands against a shared MLflow server
(PostgreSQL-backed) and a shared Optuna storage (see the README's team set-up).

A fresh sqlite MLflow store is created by the first process that opens it, with MLflow's own alembic
migrations; two processes doing that at the same moment collide (``table _alembic_tmp_runs already
exists``), one of them dies, and the half-done migration leaves a table behind that fails every later
attempt too, so retrying is no cure. :func:`prepare_stores` opens both stores before any work, one
process at a time: it holds an exclusive ``flock`` on the sqlite file itself while MLflow (or Optuna)
creates or migrates it (sqlite's own locks are POSIX record locks, independent of ``flock``). Stores
behind a server are set up by the server; their transient errors are retried.
"""

from __future__ import annotations

import contextlib
import fcntl
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pipeline.config import without_flag

T = TypeVar("T")

# Errors of a store that another process is creating at this moment; anything else is a real problem.
_SETUP_RACE = (
    "already exists",
    "database is locked",
    "no such table",
    "duplicate column",
    "Online migration expected",  # alembic: the other process moved the version on under this one
)


def retry_setup(open_store: Callable[[], T], attempts: int = 20, wait_s: float = 0.5) -> T:
    """Call ``open_store`` until it does not fail with a first-time set-up race (others are re-raised)."""
    for attempt in range(attempts):
        try:
            return open_store()
        except Exception as err:  # sqlalchemy's and MLflow's own wrappers: the message is what tells
            if attempt == attempts - 1 or not any(s in str(err) for s in _SETUP_RACE):
                raise
            time.sleep(wait_s * (1 + attempt % 4))
    raise AssertionError("unreachable")


def sqlite_file(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` URI, else ``None``."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :].split("?", 1)[0]) if uri.startswith(prefix) else None


@contextlib.contextmanager
def setup_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on a sqlite store's file (created empty if missing); no-op otherwise."""
    path = sqlite_file(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as f:  # an empty file is a valid, empty sqlite database
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_stores(storage_uri: str | None, storage_opener: Callable[[], Any]) -> None:
    """Create (or open) the MLflow tracking store and the Optuna storage, one process at a time."""
    import mlflow

    with setup_lock(mlflow.get_tracking_uri()):
        retry_setup(lambda: mlflow.MlflowClient().search_experiments(max_results=1))
    with setup_lock(storage_uri or ""):
        retry_setup(storage_opener)


def without_workers_flag(argv: Sequence[str]) -> list[str]:
    """``argv`` less ``--workers N`` / ``--workers=N``: what each worker process runs."""
    return without_flag(argv, "--workers")


def run_workers(n: int, argv: Sequence[str]) -> int:
    """Start ``n`` workers of ``python -m pipeline.tune argv``, pass signals on; the first failing code."""
    cmd = [sys.executable, "-m", "pipeline.tune", *without_workers_flag(argv)]
    procs = [subprocess.Popen(cmd) for _ in range(n)]
    print(
        f"robustflow tune: started {n} workers (pids {', '.join(str(p.pid) for p in procs)})", file=sys.stderr
    )

    def forward(signum: int, frame: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [proc.wait() for proc in procs]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for proc, code in zip(procs, codes):
        print(f"robustflow tune: worker {proc.pid} exited with {code}", file=sys.stderr)
    failed = [c for c in codes if c != 0]
    return failed[0] if failed else 0
