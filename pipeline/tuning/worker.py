"""One worker of a study: the loop that asks Optuna for a trial, trains it as a nested MLflow run, and tells
Optuna how it ended, until the study has its number of finished trials."""

from __future__ import annotations

import copy
import gc
import os
import shutil
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.tuning.plan import (
    CLEAN_METRIC,
    CURVE_ATTR,
    DIVERGED_ATTR,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_TRIALS_FAILING,
    PER_RUN_ATTRS,
    ROLE_TAG,
    RUN_ATTR,
    STATE_TAG,
    STUDY_TAG,
    TRIAL_TAG,
    VERSION_ATTR,
    Plan,
    mark_run,
)
from pipeline.tuning.pruning import dominates
from pipeline.tuning.report import StudyReport
from pipeline.tuning.space import suggest
from pipeline.tuning.storage import HEARTBEAT_ATTR, Heartbeat
from pipeline.tuning.study import open_parent_run, open_study

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial, Trial

MAX_RETRY = 2  # a trial whose worker died is queued again at most this often (it may be what kills it)
# A broken config fails every trial: stop instead of burning the budget. Diverged trials are not failures
# (a diverging recipe is an answer the study goes on from), so they never count here.
MAX_CONSECUTIVE_FAILURES = 3


@dataclass
class _Outcome:
    """How a trial's training ended, before it is told to Optuna."""

    state: str  # COMPLETE | PRUNED | DIVERGED | FAIL
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
        self.env_run: str | None = None  # the run `mlflow run` made for this process, if any
        self.checkpoints = plan.study_dir / "checkpoints"

    # -- setup ------------------------------------------------------------------------------------------

    def open(self) -> None:
        """Open the storage, the study (checking it is the same study) and its parent run."""
        p = self.plan
        self.storage, self.study = open_study(p, self._on_stale)
        self.heartbeat = Heartbeat(self.storage, p.heartbeat_interval, p.grace_period, self._on_stale)
        self.env_run = os.environ.get("MLFLOW_RUN_ID")  # open_parent_run takes it out of the environment
        self.parent_id = open_parent_run(p, self.study)

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
            self._keep_status(status)

    def _keep_status(self, status: str) -> None:
        """Under ``mlflow run``: end the wrapper's run as this worker ended (KILLED on SIGTERM) and keep that
        status, which the wrapper would overwrite with FAILED or FINISHED as it exits."""
        import mlflow

        from pipeline.run_status import keep_current_status

        if self.env_run and self.env_run != self.parent_id:  # a worker that joined another parent run
            mlflow.MlflowClient().set_terminated(self.env_run, status)
        keep_current_status(self.env_run)

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
            if outcome.state in ("PRUNED", "DIVERGED"):
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
        state = "DIVERGED" if outcome.state == "DIVERGED" else frozen.state.name
        if outcome.requeue:
            mark_run(outcome.run_id, state, outcome.note)
            self._requeue(frozen, outcome.note)
        else:
            mark_run(outcome.run_id, state, outcome.note, status="KILLED" if state == "PRUNED" else None)
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
            values = {name: suggest(trial, name, d) for name, d in p.space.items()}
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
            # A finished trial: its parameters have an answer (they diverge). Told to Optuna as pruned (a
            # trial stopped early for being bad), marked DIVERGED with the reason; not queued again.
            error = f"diverged: {err}"[:1000]
            trial.set_user_attr(DIVERGED_ATTR, error)
            return _Outcome("DIVERGED", run_id=hooks.run_id, note=error)
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
        mark_run(trial.user_attrs.get(RUN_ATTR), "FAIL", note, status="FAILED", only_if_running=True)
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

    def finalize(self) -> dict[str, Any]:
        """Write the best parameters, plots, summary and tags onto the parent run; print the summary."""
        return StudyReport(self.plan, self.study, self.parent_id).finalize()


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
