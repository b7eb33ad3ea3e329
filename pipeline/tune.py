"""The ``tune`` entry point: Optuna studies over the loss weights, each trial a nested MLflow run.

    python -m pipeline.tune --gin d2r_cag_cifar10,smoke --n-trials 20
    python -m pipeline.tune --gin regmix_cifar10 --objective pareto --storage journal:/shared/regmix.log
    mlflow run . -e tune -P gin=d2r_cag_cifar10 -P n_trials=50 --env-manager local

**What is searched** is declared in gin next to each experiment: a fragment in gin/search/ binds
``SearchSpace.params`` (which macros, their ranges, log scale) and the experiment file includes it. A trial
sets those macros exactly as ``--overrides`` does (its config is ``build(gin, overrides + "; ALPHA = ...")``),
so its nested run can be re-created like any other run. A macro the study's ``--overrides`` set is pinned
there and not searched.

**Objectives.** ``robust`` maximizes a trial's best val/pgd20_acc (the checkpoint the registry receives),
reported after every epoch to a median, Hyperband or threshold pruner. ``pareto`` maximizes val/clean_acc and
val/pgd20_acc of the best epoch together; Optuna cannot prune multi-objective trials, so the rule is explicit:
after epoch k, a trial stops when at least half of the completed trials that reached epoch k dominate its
(clean, robust) point at epoch k (given ``--startup-trials`` of them; for one objective this is median
pruning). Neither prunes at or before ``--warmup-epochs``, nor at the last epoch, when the work is paid for.

**Storage and workers.** A study lives in its own storage: ``optuna.db`` beside the MLflow sqlite store by
default (never inside it: the schemas clash), an RDB URL, or a journal file (``journal:PATH`` or ``*.log``)
that workers on several machines share. Re-running the command resumes the study; ``--n-trials`` is the
study's total of finished (complete or pruned) trials, so workers together stop at that number. A worker
killed mid-trial stops sending heartbeats; after ``--grace-period`` another worker (or the next run) fails
that trial and queues a retry with the same parameters. SIGTERM stops the running trial at its next step
and queues it again at once.

**Outputs**, on the study's parent MLflow run (named after the study): ``tuning/best_params.gin``
(``--gin outputs/<study>/best_params.gin`` trains the best trial's configuration again), the summary, the
trials table, plots, and tags naming the best trial's run and registered model version. Every completed
trial registers its model, so the registry's champion rule leaves ``champion`` on the best one.

This module is imported by the gin files that declare a search space (for ``SearchSpace``), so everything
heavy (Optuna, MLflow, torch) is imported where it is used: parsing a config stays cheap and MLflow-free.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import difflib
import gc
import inspect
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gin

from pipeline.config import GIN_DIR, ConfigError, LoadedConfig, defined_macros

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial, Trial

EXIT_USAGE = 2
EXIT_TRIALS_FAILING = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM

CLEAN_METRIC = "val/clean_acc"
OBJECTIVES = ("robust", "pareto")
PRUNERS = ("median", "hyperband", "none", "threshold:LOWER")
KINDS = ("float", "int", "categorical")
SCALES = ("linear", "log")
MAX_RETRY = 2  # a trial whose worker died is queued again at most this often (it may be what kills it)
MAX_CONSECUTIVE_FAILURES = 3  # a broken config fails every trial: stop instead of burning the budget

# Optuna trial attributes.
RUN_ATTR = "mlflow_run_id"
VERSION_ATTR = "model_version"
CURVE_ATTR = "curve"  # {epoch: [clean, robust]}: what the Pareto rule compares trials on
HEARTBEAT_ATTR = "robustflow:heartbeat"
PER_RUN_ATTRS = (RUN_ATTR, VERSION_ATTR, CURVE_ATTR, "error")
PARENT_ATTR = "mlflow_parent_run_id"
CONFIG_ATTR = "robustflow.config"  # {gin, overrides, objective}: what every worker of the study must run

# MLflow tags.
# parent | trial | worker (the run `mlflow run` made for a worker that joined an existing study)
ROLE_TAG = "robustflow.tune.role"
STUDY_TAG = "optuna.study_name"
STORAGE_TAG = "optuna.storage"
TRIAL_TAG = "optuna.trial_number"
STATE_TAG = "optuna.state"
NOTE_TAG = "robustflow.tune.note"
PARENT_TAG = "robustflow.tune.parent_run_id"


def _register_once(cls: type) -> type:
    # `python -m pipeline.tune` runs this file as __main__ while the gin files import it as pipeline.tune:
    # registering both copies would make `SearchSpace` ambiguous to gin, so only the importable one is.
    return cls if __name__ == "__main__" else gin.configurable(cls)


# ----------------------------------------------------------------------------------------- search space


class SearchSpaceError(ConfigError):
    """A search-space declaration that cannot be searched; found before any trial runs."""


@dataclass(frozen=True)
class Dimension:
    """One searched macro: its kind and range (or choices), and how a trial draws it."""

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Trial) -> Any:
        """Draw (or, for a retried trial, read back) this macro's value for ``trial``."""
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.name} in {list(self.choices)}"
        return f"{self.name}: {self.kind} in [{self.low}, {self.high}]{', log scale' if self.log else ''}"


@_register_once
class SearchSpace:
    """The gin macros an Optuna study searches, declared next to each experiment (gin/search/*.gin).

    ``params`` maps a macro to ``(kind, low, high)`` or ``(kind, low, high, 'log')`` for kind ``'float'``
    or ``'int'``, or to ``('categorical', [choice, ...])``::

        SearchSpace.params = {'ALPHA': ('float', 3.0, 300.0, 'log'), 'BETA': ('float', 0.0, 12.0)}
    """

    def __init__(self, params: Mapping[str, Sequence[Any]] | None = None) -> None:
        self.params = params

    def dimensions(self, defined_macros: set[str]) -> list[Dimension]:
        """The declared dimensions, checked against the macros the applied config defines."""
        if self.params is None:
            raise SearchSpaceError(
                "no search space is declared for this config: include a gin/search/*.gin fragment or bind "
                "SearchSpace.params = {'ALPHA': ('float', 1.0, 100.0, 'log'), ...}"
            )
        if not isinstance(self.params, Mapping) or not self.params:
            raise SearchSpaceError(
                f"SearchSpace.params must be a non-empty dict of macro -> declaration, got {self.params!r}"
            )
        dims = []
        for name, declaration in self.params.items():
            if name not in defined_macros:
                close = difflib.get_close_matches(str(name), sorted(defined_macros), n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise SearchSpaceError(
                    f"SearchSpace.params[{name!r}]: no applied config defines the macro {name!r}, so a trial "
                    f"could not set it.{hint}"
                )
            dims.append(parse_dimension(name, declaration))
        return dims


def parse_dimension(name: str, declaration: Any) -> Dimension:
    """Check one ``SearchSpace.params`` entry and turn it into a :class:`Dimension`."""
    where = f"SearchSpace.params[{name!r}] = {declaration!r}"
    if not isinstance(declaration, (tuple, list)) or not declaration:
        raise SearchSpaceError(
            f"{where}: expected (kind, low, high), (kind, low, high, 'log') or ('categorical', [choices])"
        )
    kind = declaration[0]
    if kind not in KINDS:
        raise SearchSpaceError(f"{where}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "categorical":
        if len(declaration) != 2 or not isinstance(declaration[1], (tuple, list)) or len(declaration[1]) < 2:
            raise SearchSpaceError(f"{where}: expected ('categorical', [at least two choices])")
        return Dimension(name, kind, choices=tuple(declaration[1]))
    if len(declaration) not in (3, 4):
        raise SearchSpaceError(f"{where}: expected ({kind!r}, low, high) or ({kind!r}, low, high, 'log')")
    low, high = declaration[1], declaration[2]
    scale = declaration[3] if len(declaration) == 4 else "linear"
    number = int if kind == "int" else (int, float)
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, number):
            what = "integers" if kind == "int" else "numbers"
            raise SearchSpaceError(f"{where}: the bounds of a {kind} range must be {what}, got {bound!r}")
    if scale not in SCALES:
        raise SearchSpaceError(f"{where}: unknown scale {scale!r}; use 'log' or leave it out (linear)")
    if not low < high:
        raise SearchSpaceError(f"{where}: low ({low}) must be below high ({high})")
    if scale == "log" and low <= 0:
        raise SearchSpaceError(f"{where}: a log scale needs low > 0, got low = {low}")
    if kind == "float":
        low, high = float(low), float(high)
    return Dimension(name, kind, low, high, log=scale == "log")


def load_search_space(pinned: set[str] | frozenset[str] = frozenset()) -> tuple[list[Dimension], list[str]]:
    """The searched dimensions of the loaded gin config, less the macros pinned by the study's overrides."""
    dims = SearchSpace().dimensions(defined_macros())
    searched = [d for d in dims if d.name not in pinned]
    if not searched:
        raise SearchSpaceError(
            f"every searched macro ({', '.join(d.name for d in dims)}) is pinned by --overrides: "
            "nothing to search"
        )
    return searched, sorted(d.name for d in dims if d.name in pinned)


# ---------------------------------------------------------------------------------------------- storage


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


# ---------------------------------------------------------------------------------------------- pruning


@dataclass(frozen=True)
class Pruning:
    """When a trial stops early: the ``--pruner`` rule, its warm-up and how many completed trials it needs."""

    rule: str  # median | hyperband | none | threshold
    warmup_epochs: int
    startup_trials: int
    epochs: int
    lower: float | None = None

    @classmethod
    def parse(
        cls, spec: str, objective: str, epochs: int, warmup_epochs: int, startup_trials: int
    ) -> Pruning:
        rule, _, argument = spec.strip().partition(":")
        lower = None
        if rule == "threshold":
            try:
                lower = float(argument)
            except ValueError:
                raise ConfigError(
                    f"--pruner {spec!r}: expected threshold:LOWER, e.g. threshold:0.2"
                ) from None
        elif rule not in ("median", "hyperband", "none") or argument:
            raise ConfigError(f"unknown --pruner {spec!r}; use one of {', '.join(PRUNERS)}")
        if rule == "hyperband" and objective == "pareto":
            raise ConfigError(
                "--pruner hyperband needs a single objective; with --objective pareto use median (the "
                "Pareto rule: stop a trial dominated by at least half of the completed trials), "
                "threshold:LOWER or none"
            )
        if warmup_epochs < 0 or startup_trials < 0:
            raise ConfigError("--warmup-epochs and --startup-trials must be >= 0")
        return cls(rule, warmup_epochs, startup_trials, epochs, lower)

    def optuna_pruner(self) -> optuna.pruners.BasePruner:
        """The pruner of a single-objective study (Optuna's pruners do not handle several objectives)."""
        import optuna

        # Optuna prunes from step n_warmup_steps on; epochs are steps: the first prunable one is warmup + 1.
        first = self.warmup_epochs + 1
        if self.rule == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=self.startup_trials, n_warmup_steps=first)
        if self.rule == "hyperband":
            return optuna.pruners.HyperbandPruner(
                min_resource=first, max_resource=self.epochs, reduction_factor=3
            )
        if self.rule == "threshold":
            return optuna.pruners.ThresholdPruner(lower=self.lower, n_warmup_steps=first)
        return optuna.pruners.NopPruner()

    def pareto_should_stop(
        self, epoch: int, point: tuple[float, float], peers: list[Sequence[float]]
    ) -> bool:
        """The Pareto rule: ``point`` (clean, robust) at ``epoch`` against completed trials' points there."""
        if epoch <= self.warmup_epochs or epoch >= self.epochs or self.rule == "none":
            return False
        if self.rule == "threshold":
            return point[1] < self.lower
        if len(peers) < max(self.startup_trials, 1):
            return False
        return 2 * sum(dominates(peer, point) for peer in peers) >= len(peers)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether ``a`` is at least as good as ``b`` in every objective and better in one (maximizing)."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------ the worker


@dataclass
class Plan:
    """Everything checked before any work: config, search space, pruning, storage, names."""

    gin_spec: str
    loaded: LoadedConfig
    dims: list[Dimension]
    pinned: list[str]
    objective: str
    pruning: Pruning
    selection: str  # val/pgd20_acc unless Trainer.val_steps says otherwise
    model_name: str
    study_name: str
    storage: StorageSpec
    n_trials: int
    device: str
    output_dir: Path
    seed: int | None
    heartbeat_interval: int
    grace_period: int

    @property
    def metric_names(self) -> list[str]:
        return [CLEAN_METRIC, self.selection] if self.objective == "pareto" else [self.selection]


@dataclass
class _Outcome:
    """How a trial's training ended, before it is told to Optuna."""

    state: str  # COMPLETE | PRUNED | FAIL
    values: list[float] | None = None
    run_id: str | None = None
    note: str = ""
    requeue: bool = False  # the worker was stopped: run this trial again (here on resume, or elsewhere)
    interrupted: bool = False  # Ctrl-C: re-raise once the trial is told


class StopFlag:
    """Set by SIGTERM: the running trial stops at its next step, is queued again, and the worker exits."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def __call__(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> None:
        self._event.wait(seconds)

    def install(self) -> Callable[[], None]:
        """Handle SIGTERM; returns the function that restores the previous handler."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum: int, frame: object) -> None:
            self._event.set()
            print(f"\nrobustflow tune: got signal {signum}; stopping at the next step", file=sys.stderr)

        previous = signal.signal(signal.SIGTERM, handler)
        return lambda: signal.signal(signal.SIGTERM, previous)


class Tuner:
    """One worker of a study: joins (or creates) the study and its parent run, runs trials until the study
    has its target number of finished trials, then writes the best parameters, plots and summary."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.study: optuna.Study
        self.storage: BaseStorage
        self.heartbeat: Heartbeat
        self.parent_id = ""
        self.checkpoints = plan.output_dir / _safe_name(plan.study_name) / "checkpoints"

    # -- setup ------------------------------------------------------------------------------------------

    def open(self) -> None:
        """Open the storage, the study (checking it is the same study), the registry entry, the parent run."""
        import optuna

        p = self.plan
        try:
            self.storage = open_storage(p.storage, p.heartbeat_interval, p.grace_period, self._on_stale)
        except Exception as err:  # a bad URL, a missing driver, an unreachable server: all before any work
            raise ConfigError(
                f"cannot open --storage {p.storage.label}: {type(err).__name__}: {err}"
            ) from err
        self.heartbeat = Heartbeat(self.storage, p.heartbeat_interval, p.grace_period, self._on_stale)
        directions = ["maximize"] * len(p.metric_names)
        existing = self._existing_trials()
        # A seeded sampler restarts its random stream on resume; offset it so a resume draws new points.
        seed = None if p.seed is None else p.seed + existing
        self.study = optuna.create_study(
            study_name=p.study_name,
            storage=self.storage,
            directions=directions,
            sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=True),
            pruner=p.pruning.optuna_pruner() if p.objective == "robust" else optuna.pruners.NopPruner(),
            load_if_exists=True,
        )
        if [d.name.lower() for d in self.study.directions] != directions:
            raise ConfigError(
                f"study {p.study_name!r} has {len(self.study.directions)} objective(s); "
                f"--objective {p.objective} needs another study name (--study)"
            )
        self._check_same_study()
        self.parent_id = self._open_parent_run()

    def _existing_trials(self) -> int:
        import optuna

        try:
            return len(optuna.load_study(study_name=self.plan.study_name, storage=self.storage).trials)
        except KeyError:
            return 0

    def _check_same_study(self) -> None:
        p = self.plan
        wanted = {"gin": p.gin_spec, "overrides": "; ".join(p.loaded.overrides), "objective": p.objective}
        stored = self.study.user_attrs.get(CONFIG_ATTR)
        if stored is None:
            # One attribute, written whole: a worker joining at this moment sees all of it or none.
            self.study.set_user_attr(CONFIG_ATTR, wanted)
            self.study.set_user_attr("search_space", [d.describe() for d in p.dims])
            self.study.set_metric_names(p.metric_names)
            return
        differ = [k for k in wanted if stored.get(k) != wanted[k]]
        if differ:
            was = ", ".join(f"{k}={stored.get(k)!r}" for k in differ)
            now = ", ".join(f"{k}={wanted[k]!r}" for k in differ)
            raise ConfigError(
                f"study {p.study_name!r} in {p.storage.label} was created with {was}; this run asks for "
                f"{now}. Resume it with the same arguments, or start another study with --study NAME"
            )

    def _open_parent_run(self) -> str:
        """The study's parent run: the one recorded in the study, else a new one (all workers agree)."""
        import mlflow
        from mlflow.exceptions import MlflowException

        client = mlflow.MlflowClient()
        # `mlflow run` created a run for this process and exported its id; nested runs would pick it up as
        # theirs, so it is taken out of the environment and used explicitly.
        env_run = os.environ.pop("MLFLOW_RUN_ID", None)
        parent = self.study.user_attrs.get(PARENT_ATTR)
        if parent:
            try:
                if client.get_run(parent).info.lifecycle_stage != "active":
                    parent = None
            except MlflowException:
                parent = None  # recorded by a worker that logs to another tracking server
        if not parent:
            parent = self._new_parent_run(client, env_run)
        elif env_run and env_run != parent:
            _set_tags(client, env_run, self._worker_tags(parent))
        return parent

    def _worker_tags(self, parent: str) -> dict[str, str]:
        return {
            ROLE_TAG: "worker",
            PARENT_TAG: parent,
            STUDY_TAG: self.plan.study_name,
            NOTE_TAG: f"a worker of study {self.plan.study_name!r}; its trials are nested under run {parent}",
        }

    def _new_parent_run(self, client: MlflowClient, env_run: str | None) -> str:
        import mlflow

        p = self.plan
        tags = {
            ROLE_TAG: "parent",
            STUDY_TAG: p.study_name,
            STORAGE_TAG: p.storage.label,
            "mlflow.runName": p.study_name,
            "robustflow.gin": p.gin_spec,
            "robustflow.overrides": "; ".join(p.loaded.overrides),
            "robustflow.model_name": p.model_name,
            "robustflow.tune.objective": p.objective,
            "robustflow.tune.search_space": "; ".join(d.describe() for d in p.dims),
        }
        if env_run:
            _set_tags(client, env_run, tags)
            mine, experiment_id = env_run, client.get_run(env_run).info.experiment_id
        else:
            experiment_id = (
                os.environ.get("MLFLOW_EXPERIMENT_ID") or mlflow.set_experiment(p.model_name).experiment_id
            )
            mine = client.create_run(experiment_id, run_name=p.study_name, tags=tags).info.run_id
        # Workers that start a new study at the same moment each get here; they all settle on the oldest
        # candidate, and the others step aside.
        quote = p.study_name.replace("'", "\\'")
        label = p.storage.label.replace("'", "\\'")
        candidates = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{ROLE_TAG}` = 'parent' and tags.`{STUDY_TAG}` = '{quote}' "
            f"and tags.`{STORAGE_TAG}` = '{label}'",
        )
        runs = [(r.info.start_time, r.info.run_id) for r in candidates] or [(0, mine)]
        winner = min(runs)[1]
        if winner != mine:
            if mine == env_run:
                _set_tags(client, mine, self._worker_tags(winner))
            else:
                client.delete_run(mine)
        self.study.set_user_attr(PARENT_ATTR, winner)
        return winner

    # -- the loop ---------------------------------------------------------------------------------------

    def run(self) -> int:
        """Run trials under the parent run until the study is done (or stopped); returns the exit code."""
        import mlflow

        stop = StopFlag()
        restore = stop.install()
        mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(self.parent_id).info.experiment_id)
        mlflow.start_run(run_id=self.parent_id)
        status = "FINISHED"
        try:
            code = self._loop(stop)
            if stop():
                status, code = "KILLED", EXIT_TERMINATED
            elif code:
                status = "FAILED"
            self.finalize()
            return code
        except KeyboardInterrupt:
            status = "KILLED"
            return EXIT_INTERRUPTED
        except BaseException:
            status = "FAILED"
            raise
        finally:
            mlflow.end_run(status)
            restore()

    def _loop(self, stop: StopFlag) -> int:
        failures = 0
        while not stop():
            trial = self._next_trial(stop)
            if trial is None:
                break
            state = self._run_trial(trial, stop)
            failures = failures + 1 if state == "FAIL" and not stop() else 0
            if failures >= MAX_CONSECUTIVE_FAILURES:
                print(
                    f"robustflow tune: {failures} trials in a row failed; stopping this worker (see the "
                    "errors above and the trials' MLflow runs)",
                    file=sys.stderr,
                )
                return EXIT_TRIALS_FAILING
        return 0

    def _next_trial(self, stop: StopFlag) -> Trial | None:
        """A trial to run, or None once the study has (or is about to have) its number of finished trials.

        Running trials count towards the target: they will finish, or their worker died and after the grace
        period they are failed and queued again, which this loop then picks up (``ask`` pops queued trials
        first). A worker waits for trials running elsewhere rather than exiting before the study is done.
        """
        from optuna.trial import TrialState

        target, announced = self.plan.n_trials, False
        counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        while not stop():
            self.heartbeat.fail_stale(self.study)
            trials = self.study.get_trials(deepcopy=False)
            finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            if finished >= target:
                return None
            if finished + running >= target:
                if not announced:
                    print(
                        f"robustflow tune: {finished}/{target} trials finished, {running} running in other "
                        f"workers; waiting for them (a dead worker's trial is re-queued after "
                        f"{self.plan.grace_period}s without heartbeat)",
                        file=sys.stderr,
                    )
                    announced = True
                stop.wait(min(self.plan.heartbeat_interval, 30))
                continue
            trial = self.study.ask()
            ahead = sum(
                t.number < trial.number and t.state in counted for t in self.study.get_trials(deepcopy=False)
            )
            if ahead >= target:
                # Another worker asked at the same moment and took the last place: hand this trial back
                # unrun (queued), so that the study ends with exactly the target number.
                self.storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)
                continue
            return trial
        return None

    def _run_trial(self, trial: Trial, stop: StopFlag) -> str:
        """Train one trial (heartbeat on), tell Optuna how it ended and mark its MLflow run the same way."""
        import optuna

        with self.heartbeat.keep_alive(trial._trial_id):
            outcome = self._train(trial, stop)
        try:
            if outcome.state == "PRUNED":
                frozen = self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            elif outcome.state == "COMPLETE":
                frozen = self.study.tell(trial, outcome.values)  # a NaN value makes it FAIL
            else:
                frozen = self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            print(
                f"robustflow tune: trial {trial.number} was failed by another worker (no heartbeat for "
                f"{self.plan.grace_period}s); its retry runs there",
                file=sys.stderr,
            )
            return "FAIL"
        state = frozen.state.name
        if outcome.requeue:
            _mark_run(outcome.run_id, state, outcome.note)
            self._requeue(frozen, outcome.note)
        else:
            _mark_run(outcome.run_id, state, outcome.note, status="KILLED" if state == "PRUNED" else None)
        seconds = (frozen.datetime_complete - frozen.datetime_start).total_seconds()
        shown = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in frozen.params.items()
        )
        values = "".join(f"{m}={v:.4f} " for m, v in zip(self.plan.metric_names, frozen.values or []))
        print(
            f"robustflow tune: trial {trial.number} {state} {values}({shown}) in {seconds:.1f}s"
            + (f": {outcome.note}" if outcome.note else ""),
            file=sys.stderr,
        )
        if outcome.interrupted:
            raise KeyboardInterrupt
        return state

    def _train(self, trial: Trial, stop: StopFlag) -> _Outcome:
        import optuna
        import torch

        from components.guard import TrainingDivergedError
        from components.training import TrainingInterruptedError
        from pipeline.train import build, train_experiment

        p = self.plan
        hooks = _TrialHooks(self, trial, stop)
        exp = None
        try:
            values = {d.name: d.suggest(trial) for d in p.dims}
            # The same macros an override sets, through the same code path as `train --overrides`.
            bindings = [*p.loaded.overrides, *(f"{name} = {value!r}" for name, value in values.items())]
            loaded, exp = build(p.gin_spec, "; ".join(bindings), p.device)
            result = train_experiment(
                loaded,
                exp,
                gin_spec=p.gin_spec,
                output_dir=self.checkpoints,
                stop=hooks.should_stop,
                nested=True,
                on_epoch=hooks.on_epoch,
            )
        except optuna.TrialPruned as pruned:
            return _Outcome("PRUNED", run_id=hooks.run_id, note=str(pruned))
        except TrainingInterruptedError:
            return _Outcome("FAIL", run_id=hooks.run_id, note="worker stopped by SIGTERM", requeue=True)
        except KeyboardInterrupt:
            note = "worker interrupted (Ctrl-C)"
            return _Outcome("FAIL", run_id=hooks.run_id, note=note, requeue=True, interrupted=True)
        except TrainingDivergedError as err:
            # Not queued again: the same parameters would diverge the same way. The study goes on.
            error = f"diverged: {err}"[:1000]
            trial.set_user_attr("error", error)
            return _Outcome("FAIL", run_id=hooks.run_id, note=error)
        except Exception as err:
            traceback.print_exc()
            error = f"{type(err).__name__}: {err}"[:1000]
            trial.set_user_attr("error", error)
            # An error before the first step (e.g. out of memory moving the data) leaves the nested run
            # untagged: MLflow has ended it FAILED, which is all that can be said of it.
            return _Outcome("FAIL", run_id=hooks.run_id, note=error)
        finally:
            if hooks.run_id:
                shutil.rmtree(self.checkpoints / hooks.run_id, ignore_errors=True)  # kept as run artifacts
            del exp
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        registered = result["registered"]
        version = registered.version if registered is not None else None
        trial.set_user_attr(RUN_ATTR, result["run_id"])
        if version is not None:
            trial.set_user_attr(VERSION_ATTR, version)
        if p.objective == "pareto":
            best = hooks.history[int(result["test"]["test/best_epoch"])]
            objective_values = [best[CLEAN_METRIC], best[p.selection]]
        else:
            objective_values = [result["best_score"]]
        return _Outcome("COMPLETE", objective_values, run_id=result["run_id"])

    # -- dead and stopped workers -----------------------------------------------------------------------

    def _on_stale(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """A trial whose worker stopped beating was failed: queue it again and close its MLflow run."""
        note = f"no heartbeat for {self.plan.grace_period}s (its worker died)"
        _mark_run(trial.user_attrs.get(RUN_ATTR), "FAIL", note, status="FAILED", only_if_running=True)
        self._requeue(trial, note)

    def _requeue(self, trial: FrozenTrial, why: str) -> None:
        """Queue a failed trial again with the same parameters (Optuna's retry callback), up to MAX_RETRY."""
        import optuna

        retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
        retry = retry or optuna.storages.RetryFailedTrialCallback
        # The callback copies the user attributes; those describing the failed run would mislabel the retry.
        template = copy.deepcopy(trial)
        template.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in PER_RUN_ATTRS}
        # An old heartbeat would make the retry look dead the moment it is popped.
        template.system_attrs = {k: v for k, v in trial.system_attrs.items() if k != HEARTBEAT_ATTR}
        retry(max_retry=MAX_RETRY)(self.study, template)
        tries = len(trial.system_attrs.get("retry_history", [])) + 1
        what = "queued again" if tries <= MAX_RETRY else f"not queued again (failed {tries} times)"
        print(f"robustflow tune: trial {trial.number}: {why}; {what}", file=sys.stderr)

    # -- results ----------------------------------------------------------------------------------------

    def best_trial(self, complete: list[FrozenTrial]) -> FrozenTrial:
        """The best completed trial (pareto: the most robust on the front); ties go to the older model
        version, as the registry's champion rule does."""

        def older(t: FrozenTrial) -> tuple[int, int]:
            return (-int(t.user_attrs.get(VERSION_ATTR, sys.maxsize)), -t.number)

        if self.plan.objective == "pareto":
            return max(self.study.best_trials, key=lambda t: (t.values[1], t.values[0], *older(t)))
        return max(complete, key=lambda t: (t.value, *older(t)))

    def finalize(self) -> dict[str, Any]:
        """Write the best parameters, plots, summary and tags onto the parent run; print the summary."""
        import mlflow
        from mlflow.exceptions import MlflowException
        from optuna.trial import TrialState

        from pipeline.registry import CHAMPION

        p, client = self.plan, mlflow.MlflowClient()
        trials = self.study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
        tags = {
            "robustflow.tune.n_trials": str(p.n_trials),
            **{f"optuna.trials.{k}": str(v) for k, v in counts.items()},
        }
        out_dir = p.output_dir / _safe_name(p.study_name)
        out_dir.mkdir(parents=True, exist_ok=True)
        summary: dict[str, Any] = {"study": p.study_name, "counts": counts, "best": None}
        notes: dict[str, str] = {}
        if complete:
            best = self.best_trial(complete)
            path = out_dir / "best_params.gin"
            path.write_text(self.trial_gin(best, "Best trial", path))
            client.log_artifact(self.parent_id, str(path), "tuning")
            if p.objective == "pareto":
                front_dir = out_dir / "pareto"
                shutil.rmtree(front_dir, ignore_errors=True)
                front_dir.mkdir()
                for t in self.study.best_trials:
                    front_path = front_dir / f"trial_{t.number}.gin"
                    front_path.write_text(self.trial_gin(t, "Pareto-front trial", front_path))
                client.log_artifacts(self.parent_id, str(front_dir), "tuning/pareto")
            try:
                champion = str(client.get_model_version_by_alias(p.model_name, CHAMPION).version)
            except MlflowException:
                champion = ""
            tags.update(
                {
                    "robustflow.tune.best_trial": str(best.number),
                    "robustflow.tune.best_run_id": best.user_attrs.get(RUN_ATTR, ""),
                    "robustflow.tune.best_model_version": best.user_attrs.get(VERSION_ATTR, ""),
                    "robustflow.tune.best_params": "; ".join(f"{k} = {v!r}" for k, v in best.params.items()),
                    "robustflow.tune.champion_version": champion,
                }
            )
            client.log_metric(self.parent_id, f"best/{p.selection}", best.values[-1], step=len(complete))
            if p.objective == "pareto":
                client.log_metric(self.parent_id, f"best/{CLEAN_METRIC}", best.values[0], step=len(complete))
            summary.update(best=best, best_params_gin=path, champion=champion)
        else:
            notes["best_params"] = "no completed trial yet: no best parameters"
        notes.update(self._log_plots(client, len(complete)))
        tags.update({f"{NOTE_TAG}.{k}": v for k, v in notes.items()})
        _set_tags(client, self.parent_id, tags)
        # A note from an earlier run of the study (e.g. "needs >= 2 trials") must not outlive its cause.
        for key in client.get_run(self.parent_id).data.tags:
            if key.startswith(f"{NOTE_TAG}.") and key not in tags:
                client.delete_tag(self.parent_id, key)
        text = self.summary_text(trials, summary, notes)
        client.log_text(self.parent_id, text, "tuning/summary.md")
        with contextlib.suppress(ImportError, ValueError):
            client.log_text(
                self.parent_id, self.study.trials_dataframe().to_csv(index=False), "tuning/trials.csv"
            )
        print(text)
        summary["notes"] = notes
        return summary

    def trial_gin(self, trial: FrozenTrial, what: str, path: Path) -> str:
        """A gin file re-creating ``trial``'s config: the study's files and overrides, the trial's values."""
        p = self.plan
        values = " ".join(f"{m}={v:.4f}" for m, v in zip(p.metric_names, trial.values))
        lines = [
            f"# {what} of Optuna study {p.study_name!r} ({p.storage.label}): trial {trial.number}, {values}.",
            f"# MLflow run {trial.user_attrs.get(RUN_ATTR, '?')}, registered {p.model_name} version "
            f"{trial.user_attrs.get(VERSION_ATTR, '?')}.",
            f"# Train it again: python -m pipeline.train --gin {path}",
            "",
            *(f"include '{_include_name(f)}'" for f in p.loaded.files),
        ]
        if p.loaded.overrides:
            lines += ["", "# The study's --overrides", *p.loaded.overrides]
        lines += ["", "# The trial's values of the searched macros"]
        lines += [f"{name} = {value!r}" for name, value in trial.params.items()]
        return "\n".join(lines) + "\n"

    def _log_plots(self, client: MlflowClient, n_complete: int) -> dict[str, str]:
        """Log Optuna's plots as images on the parent run; returns notes on the plots left out."""
        import matplotlib

        matplotlib.use("Agg")  # workers run headless
        import matplotlib.pyplot as plt
        import numpy as np
        from optuna.visualization import matplotlib as optuna_plots

        p, study = self.plan, self.study
        robust = (lambda t: t.values[1]) if p.objective == "pareto" else None
        plots: dict[str, tuple[int, Callable[[], Any]]] = {
            "optimization_history": (
                1,
                lambda: optuna_plots.plot_optimization_history(study, target=robust, target_name=p.selection),
            ),
            "param_importances": (
                2,
                lambda: optuna_plots.plot_param_importances(study, target=robust, target_name=p.selection),
            ),
        }
        if p.objective == "pareto":
            plots["pareto_front"] = (
                1,
                lambda: optuna_plots.plot_pareto_front(study, target_names=p.metric_names),
            )
        else:
            plots["intermediate_values"] = (1, lambda: optuna_plots.plot_intermediate_values(study))
        notes = {}
        for name, (needed, make) in plots.items():
            if n_complete < needed:
                notes[name] = f"not plotted: needs >= {needed} completed trial(s), the study has {n_complete}"
                continue
            try:
                axes = make()
            except Exception as err:  # e.g. no variance among the values; a plot never fails the study
                notes[name] = f"not plotted: {type(err).__name__}: {err}"
                continue
            figure = (np.ravel(axes)[0] if isinstance(axes, np.ndarray) else axes).figure
            figure.tight_layout()
            client.log_figure(self.parent_id, figure, f"plots/{name}.png")
            plt.close(figure)
        return notes

    def summary_text(self, trials: list[FrozenTrial], summary: dict[str, Any], notes: dict[str, str]) -> str:
        """A markdown summary: the study, a table of trials, the best trial (and front), what was left out."""
        p = self.plan
        counts = summary["counts"]
        front = (
            {t.number for t in self.study.best_trials}
            if p.objective == "pareto" and summary["best"]
            else set()
        )
        names = [d.name for d in p.dims]
        lines = [
            f"# Optuna study `{p.study_name}`",
            "",
            f"- storage: `{p.storage.label}`; gin: `{p.gin_spec}`; "
            f"overrides: `{'; '.join(p.loaded.overrides)}`",
            f"- objective: {p.objective} (maximize {', '.join(p.metric_names)}); pruner: {p.pruning.rule}",
            f"- search space: {'; '.join(d.describe() for d in p.dims)}"
            + (f" (pinned by --overrides: {', '.join(p.pinned)})" if p.pinned else ""),
            f"- trials: {counts['complete'] + counts['pruned']}/{p.n_trials} finished "
            f"({counts['complete']} complete, {counts['pruned']} pruned), {counts['fail']} failed, "
            f"{counts['running']} running, "
            f"{counts['waiting']} queued",
            "",
            "| trial | state | " + " | ".join([*p.metric_names, *names]) + " | time (s) | MLflow run |",
            "|---" * (4 + len(p.metric_names) + len(names)) + "|",
        ]
        for t in trials:
            values = (
                [f"{v:.4f}" for v in t.values] if t.values and len(t.values) == len(p.metric_names) else []
            )
            values += [""] * (len(p.metric_names) - len(values))
            params = [
                f"{t.params[n]:.4g}" if isinstance(t.params.get(n), float) else str(t.params.get(n, ""))
                for n in names
            ]
            seconds = (
                (t.datetime_complete - t.datetime_start).total_seconds()
                if t.datetime_complete and t.datetime_start
                else math.nan
            )
            state = t.state.name + (" (front)" if t.number in front else "")
            row = [str(t.number), state, *values, *params, f"{seconds:.1f}", t.user_attrs.get(RUN_ATTR, "")]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        if best := summary["best"]:
            shown = " ".join(f"{m}={v:.4f}" for m, v in zip(p.metric_names, best.values))
            lines += [
                f"Best trial: {best.number} ({shown}), "
                + ", ".join(f"{k} = {v!r}" for k, v in best.params.items())
                + f"; run {best.user_attrs.get(RUN_ATTR, '?')}, {p.model_name} version "
                f"{best.user_attrs.get(VERSION_ATTR, '?')} (champion: version {summary['champion'] or '?'}).",
                f"Train it again: `python -m pipeline.train --gin {summary['best_params_gin']}`",
            ]
            if front:
                lines.append(f"Pareto front (clean, robust): trials {', '.join(map(str, sorted(front)))}")
        lines += [f"- {name}: {note}" for name, note in notes.items()]
        return "\n".join(lines) + "\n"


class _TrialHooks:
    """What a trial adds to train_experiment: tags on its nested run, epoch reports, pruning, stopping."""

    def __init__(self, tuner: Tuner, trial: Trial, stop: StopFlag) -> None:
        self.tuner, self.trial, self.stop = tuner, trial, stop
        self.run_id: str | None = None
        self.history: dict[int, dict[str, float]] = {}

    def should_stop(self) -> bool:
        """Polled before every training step; the first call also tags the (just started) nested run."""
        if self.run_id is None:
            self._adopt_run()
        return self.stop()

    def _adopt_run(self) -> None:
        import mlflow

        # train_experiment opens the nested run; tagging it at its first step (rather than after an epoch)
        # lets a worker that dies in epoch 1 leave a run that says which trial it was.
        self.run_id = mlflow.active_run().info.run_id
        mlflow.set_tags(
            {
                ROLE_TAG: "trial",
                STUDY_TAG: self.tuner.plan.study_name,
                TRIAL_TAG: str(self.trial.number),
                STATE_TAG: "RUNNING",
                "mlflow.runName": f"{self.tuner.plan.study_name}-trial-{self.trial.number}",
            }
        )
        self.trial.set_user_attr(RUN_ATTR, self.run_id)

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Report the epoch to Optuna and raise ``TrialPruned`` when the pruning rule says stop."""
        import optuna

        p = self.tuner.plan
        robust, clean = metrics[p.selection], metrics[CLEAN_METRIC]
        self.history[epoch] = {CLEAN_METRIC: clean, p.selection: robust}
        if p.objective == "robust":
            self.trial.report(robust, epoch)
            if epoch < p.pruning.epochs and self.trial.should_prune():
                raise optuna.TrialPruned(
                    f"pruned after epoch {epoch} ({p.pruning.rule}): {p.selection}={robust:.4f}"
                )
            return
        self.trial.set_user_attr(
            CURVE_ATTR, {str(e): [h[CLEAN_METRIC], h[p.selection]] for e, h in self.history.items()}
        )
        peers = [
            t.user_attrs[CURVE_ATTR][str(epoch)]
            for t in self.tuner.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if str(epoch) in t.user_attrs.get(CURVE_ATTR, {})
        ]
        if p.pruning.pareto_should_stop(epoch, (clean, robust), peers):
            beaten_by = sum(dominates(q, (clean, robust)) for q in peers)
            raise optuna.TrialPruned(
                f"stopped after epoch {epoch} ({p.pruning.rule}, Pareto rule): "
                f"({CLEAN_METRIC}, {p.selection}) = ({clean:.4f}, {robust:.4f}), dominated by {beaten_by} "
                f"of {len(peers)} completed trials"
            )


def _mark_run(
    run_id: str | None, state: str, note: str = "", status: str | None = None, only_if_running: bool = False
) -> None:
    """Say on a trial's MLflow run how Optuna saw the trial end (and fix the run status to match)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if not run_id:
        return
    client = mlflow.MlflowClient()
    try:
        if status and (not only_if_running or client.get_run(run_id).info.status == "RUNNING"):
            client.set_terminated(run_id, status)
        client.set_tag(run_id, STATE_TAG, state)
        if note:
            client.set_tag(run_id, NOTE_TAG, note[:5000])
    except MlflowException as err:  # e.g. the run lives on another worker's tracking server
        print(f"robustflow tune: could not mark MLflow run {run_id}: {err}", file=sys.stderr)


def _set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _include_name(path: Path) -> str:
    """How a gin file includes ``path``: relative to gin/ (portable across machines) when it lives there."""
    try:
        return path.resolve().relative_to(GIN_DIR).as_posix()
    except ValueError:
        return str(path.resolve())


def default_study_name(loaded: LoadedConfig, objective: str) -> str:
    """``d2r_cag_cifar10-smoke-robust``: the config files and the objective (a study cannot change either)."""
    return "-".join([*(f.stem for f in loaded.files), objective])


# --------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from pipeline.config import available_configs
    from pipeline.outputs import default_output_dir

    parser = argparse.ArgumentParser(prog="python -m pipeline.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--gin",
        required=True,
        help=f"config names in order, comma-separated: {', '.join(available_configs())}",
    )
    parser.add_argument("--n-trials", type=int, default=20, help="the study's total of finished trials")
    parser.add_argument("--study", default="", help="study name (default: <configs>-<objective>)")
    parser.add_argument(
        "--storage",
        default="",
        help="RDB URL, journal:PATH or PATH.log (default: optuna.db beside the MLflow store)",
    )
    parser.add_argument("--objective", default="robust", choices=OBJECTIVES)
    parser.add_argument("--overrides", default="", help="';'-separated gin bindings for every trial")
    parser.add_argument("--pruner", default="median", help=f"one of {', '.join(PRUNERS)}")
    parser.add_argument("--warmup-epochs", type=int, default=1, help="no pruning at or before this epoch")
    parser.add_argument(
        "--startup-trials", type=int, default=5, help="completed trials needed before median/Pareto pruning"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--seed", type=int, default=None, help="sampler seed (default: random)")
    parser.add_argument(
        "--heartbeat-interval", type=int, default=60, help="seconds between a trial's heartbeats"
    )
    parser.add_argument(
        "--grace-period", type=int, default=180, help="seconds without heartbeat before a trial is re-queued"
    )
    parser.add_argument(
        "--output-dir",
        default=default_output_dir(),  # under `mlflow run`: where the user ran it, not the project folder
        help="best_params.gin and checkpoints (default: $ROBUSTFLOW_OUTPUT, else ./outputs)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes on this machine (stores set up once first)"
    )
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace) -> Plan:
    """Check everything before any work: the config builds, the search space, pruner, storage and names."""
    import mlflow

    from pipeline.config import macro
    from pipeline.tracking import configure_tracking
    from pipeline.train import build

    if args.n_trials < 1:
        raise ConfigError(f"--n-trials must be >= 1, got {args.n_trials}")
    if args.heartbeat_interval < 1 or args.grace_period <= args.heartbeat_interval:
        raise ConfigError("--heartbeat-interval must be >= 1 and --grace-period longer than it")
    loaded, exp = build(args.gin, args.overrides, args.device)
    pinned = {b.split("=", 1)[0].strip() for b in loaded.overrides}
    dims, pinned_dims = load_search_space(pinned)
    epochs, selection, device = exp.trainer.epochs, exp.trainer.selection_metric, exp.data.device
    model_name = macro("MODEL_NAME", loaded.experiment)
    del exp
    pruning = Pruning.parse(args.pruner, args.objective, epochs, args.warmup_epochs, args.startup_trials)
    configure_tracking()
    return Plan(
        gin_spec=args.gin,
        loaded=loaded,
        dims=dims,
        pinned=pinned_dims,
        objective=args.objective,
        pruning=pruning,
        selection=selection,
        model_name=model_name,
        study_name=args.study.strip() or default_study_name(loaded, args.objective),
        storage=parse_storage(args.storage, mlflow.get_tracking_uri()),
        n_trials=args.n_trials,
        device=str(device),
        output_dir=Path(args.output_dir),
        seed=args.seed,
        heartbeat_interval=args.heartbeat_interval,
        grace_period=args.grace_period,
    )


def _quiet_optuna() -> None:
    import optuna

    # The heartbeat, plotting and constant-liar APIs are marked experimental; the run's own lines say more.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # Study.optimize runs heartbeats itself; this ask/tell loop runs them (Heartbeat.keep_alive) instead.
    warnings.filterwarnings(
        "ignore", message="Heartbeat of storage is supposed to be used with Study.optimize"
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run the entry point; returns the process exit code."""
    from components.data import DataNotFoundError
    from pipeline.workers import prepare_stores, run_workers

    args = parse_args(argv)
    _quiet_optuna()
    try:
        if args.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {args.workers}")
        plan = prepare(args)
        db = plan.storage.target if plan.storage.kind != "journal" else None
        prepare_stores(db, lambda: open_storage(plan.storage, 1, 2, lambda *_: None))
        print(
            f"robustflow tune: study {plan.study_name!r} in {plan.storage.label}: {plan.objective} over "
            + "; ".join(d.describe() for d in plan.dims)
            + (f" (pinned by --overrides: {', '.join(plan.pinned)})" if plan.pinned else ""),
            file=sys.stderr,
        )
        tuner = Tuner(plan)
        tuner.open()
    except (ConfigError, DataNotFoundError, ValueError, TypeError) as err:
        print(f"robustflow tune: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.workers > 1:  # the study and its parent run exist now: every worker joins them
        return run_workers(args.workers, sys.argv[1:] if argv is None else argv)
    return tuner.run()


if __name__ == "__main__":
    # Run the importable module's main: it is the copy whose SearchSpace gin knows.
    from pipeline.tune import main as _main

    sys.exit(_main())
