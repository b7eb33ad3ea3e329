"""Where a study lives (an RDB URL or a journal file) and the liveness of its running trials.

``--storage`` is read into a :class:`StorageSpec` (``optuna.db`` beside the MLflow store by default, never
inside it), opened with Optuna's heartbeats where the storage has them, and :class:`Heartbeat` fails the
trials of dead workers so that they are queued again.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import ConfigError

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial

HEARTBEAT_ATTR = "robustflow:heartbeat"  # a trial's system attribute: the time of its last journal heartbeat


@dataclass(frozen=True)
class StorageSpec:
    """Where a study lives: an RDB URL or a journal file, and the label that names it (no password)."""

    kind: str  # "rdb" | "journal"
    target: str
    label: str


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///") and ":memory:" not in uri:
        return Path(uri[len("sqlite:///") :]).expanduser().resolve()
    return None


def _tracking_dir(tracking_uri: str) -> Path:
    """The folder that holds a local MLflow store (the working directory for a tracking server)."""
    if db := _sqlite_path(tracking_uri):
        return db.parent
    if tracking_uri.startswith("file:"):
        return Path(tracking_uri.removeprefix("file://").removeprefix("file:")).resolve().parent
    if "://" not in tracking_uri:
        return Path(tracking_uri).resolve().parent
    return Path.cwd()


def parse_storage(spec: str | None, tracking_uri: str) -> StorageSpec:
    """Read ``--storage``: empty (optuna.db beside the MLflow store), an RDB URL, ``journal:PATH``, *.log."""
    spec = (spec or "").strip()
    if not spec:
        spec = f"sqlite:///{_tracking_dir(tracking_uri) / 'optuna.db'}"
    if spec.startswith("journal:") or spec.endswith((".log", ".journal")):
        path = Path(spec.removeprefix("journal:")).expanduser().resolve()
        return StorageSpec("journal", str(path), f"journal:{path}")
    if "://" not in spec and spec.endswith((".db", ".sqlite", ".sqlite3")):
        spec = f"sqlite:///{Path(spec).expanduser().resolve()}"
    if "://" not in spec:
        raise ConfigError(
            f"unsupported --storage {spec!r}: use an RDB URL (sqlite:///optuna.db, postgresql://...), "
            "a journal file (journal:PATH or PATH.log), or nothing for optuna.db beside the MLflow store"
        )
    if db := _sqlite_path(spec):
        if db == _sqlite_path(tracking_uri):
            raise ConfigError(
                f"--storage {spec!r} is the MLflow store's own sqlite file: Optuna's tables clash with "
                f"MLflow's; use another file, e.g. sqlite:///{db.parent / 'optuna.db'}"
            )
        spec = f"sqlite:///{db}"
    return StorageSpec("rdb", spec, re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", spec))


def _stale_callback_argument() -> str:
    import optuna

    # Optuna 4.9 renamed failed_trial_callback; keep working on the older releases pyproject allows.
    parameters = inspect.signature(optuna.storages.RDBStorage).parameters
    return (
        "heartbeat_stale_trial_callback"
        if "heartbeat_stale_trial_callback" in parameters
        else "failed_trial_callback"
    )


def open_storage(
    spec: StorageSpec, heartbeat_interval: int, grace_period: int, on_stale: Callable[..., None]
) -> BaseStorage:
    """Open (or create) the storage; RDB storages get Optuna's heartbeats, calling ``on_stale``."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if spec.kind == "journal":
        Path(spec.target).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(spec.target))
    engine_kwargs = {}
    if db := _sqlite_path(spec.target):
        db.parent.mkdir(parents=True, exist_ok=True)
        # Several local workers share one sqlite file: wait for the write lock instead of failing at once.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    return optuna.storages.RDBStorage(
        spec.target,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=heartbeat_interval,
        grace_period=grace_period,
        **{_stale_callback_argument(): on_stale},
    )


class Heartbeat:
    """Liveness of running trials, so that a dead worker's trial is failed and retried, not stuck.

    RDB storages have Optuna's own heartbeats. Optuna's JournalStorage has none, so for journal files the
    worker writes a timestamp into the trial's system attributes, and stale trials are failed the same way.
    """

    # Kept by hand on purpose: Optuna (5.0 included) implements heartbeats only for RDBStorage, and a journal
    # file is what workers on several machines without a database share. Drop the journal half when
    # JournalStorage gains record_heartbeat.

    def __init__(
        self, storage: BaseStorage, interval: int, grace: int, on_stale: Callable[[Any, FrozenTrial], None]
    ) -> None:
        import optuna

        self.storage, self.interval, self.grace, self.on_stale = storage, interval, grace, on_stale
        self.native = isinstance(storage, optuna.storages.RDBStorage)

    def beat(self, trial_id: int) -> None:
        if self.native:
            self.storage.record_heartbeat(trial_id)
        else:
            self.storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    @contextlib.contextmanager
    def keep_alive(self, trial_id: int) -> Iterator[None]:
        """Beat for ``trial_id`` from a background thread while the block runs."""
        import optuna

        done = threading.Event()

        def loop() -> None:
            while not done.is_set():
                try:
                    self.beat(trial_id)
                except optuna.exceptions.UpdateFinishedTrialError:
                    return  # another worker declared the trial stale; nothing left to keep alive
                except Exception as err:  # a storage hiccup must not kill the trial: the next beat may pass
                    print(f"robustflow tune: heartbeat failed: {err}", file=sys.stderr)
                done.wait(self.interval)

        thread = threading.Thread(target=loop, name=f"heartbeat-{trial_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def fail_stale(self, study: optuna.Study) -> None:
        """Fail the running trials whose worker stopped beating more than ``grace`` seconds ago."""
        import optuna
        from optuna.trial import TrialState

        if self.native:
            optuna.storages.fail_stale_trials(study)  # calls on_stale through the storage
            return
        now = time.time()
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            last = trial.system_attrs.get(HEARTBEAT_ATTR)
            if last is None:
                last = trial.datetime_start.timestamp() if trial.datetime_start else now
            if now - float(last) <= self.grace:
                continue
            try:
                failed = self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker got there first and ran the callback
            if failed:
                self.on_stale(study, self.storage.get_trial(trial._trial_id))
