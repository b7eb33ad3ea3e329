"""What a study leaves on its parent MLflow run when a worker finishes: the best parameters as a gin file (and
the Pareto front's), tags naming the best trial, Optuna's plots, the summary and the trials table."""

from __future__ import annotations

import math
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import GIN_DIR
from pipeline.tuning.plan import CLEAN_METRIC, DIVERGED_ATTR, NOTE_TAG, RUN_ATTR, VERSION_ATTR, Plan, set_tags
from pipeline.tuning.space import describe_space

if TYPE_CHECKING:
    import optuna
    from mlflow import MlflowClient
    from optuna.trial import FrozenTrial


class StudyReport:
    """The study's results, written onto its parent run (by every worker as it ends: the last one wins)."""

    def __init__(self, plan: Plan, study: optuna.Study, parent_id: str) -> None:
        self.plan, self.study, self.parent_id = plan, study, parent_id

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
        # Diverged trials are told to Optuna as pruned; they are counted (and shown) as what they are.
        counts["diverged"] = sum(_diverged(t) for t in trials)
        counts["pruned"] -= counts["diverged"]
        tags = {
            "robustflow.tune.n_trials": str(p.n_trials),
            **{f"optuna.trials.{k}": str(v) for k, v in counts.items()},
        }
        out_dir = p.study_dir
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
        notes.update(self.log_plots(client, len(complete)))
        try:  # Optuna's table needs pandas
            table = self.study.trials_dataframe().to_csv(index=False)
        except (ImportError, ValueError) as err:
            table = None
            notes["trials_csv"] = f"tuning/trials.csv not written: {type(err).__name__}: {err}"
        tags.update({f"{NOTE_TAG}.{k}": v for k, v in notes.items()})
        set_tags(client, self.parent_id, tags)
        # A note from an earlier run of the study (e.g. "needs >= 2 trials") must not outlive its cause.
        for key in client.get_run(self.parent_id).data.tags:
            if key.startswith(f"{NOTE_TAG}.") and key not in tags:
                client.delete_tag(self.parent_id, key)
        text = self.summary_text(trials, summary, notes)
        client.log_text(self.parent_id, text, "tuning/summary.md")
        # Optuna's own table, rewritten whole each time: not mlflow.log_table, which appends to an artifact of
        # the same name (every worker and every resume finalizes, so each trial would be listed again).
        if table is not None:
            client.log_text(self.parent_id, table, "tuning/trials.csv")
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

    def log_plots(self, client: MlflowClient, n_complete: int) -> dict[str, str]:
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
        names = list(p.space)
        lines = [
            f"# Optuna study `{p.study_name}`",
            "",
            f"- storage: `{p.storage.label}`; gin: `{p.gin_spec}`; "
            f"overrides: `{'; '.join(p.loaded.overrides)}`",
            f"- objective: {p.objective} (maximize {', '.join(p.metric_names)}); pruner: {p.pruning.rule}",
            f"- search space: {describe_space(p.space)}"
            + (f" (pinned by --overrides: {', '.join(p.pinned)})" if p.pinned else ""),
            f"- trials: {counts['complete'] + counts['pruned'] + counts['diverged']}/{p.n_trials} finished "
            f"({counts['complete']} complete, {counts['pruned']} pruned, {counts['diverged']} diverged), "
            f"{counts['fail']} failed, "
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
            state = ("DIVERGED" if _diverged(t) else t.state.name) + (" (front)" if t.number in front else "")
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
        finished = counts["complete"] + counts["pruned"] + counts["diverged"]
        if counts["diverged"] and 2 * counts["diverged"] > finished:
            lines.append(
                f"Most trials diverged ({counts['diverged']} of {finished}): the recipe is unstable over "
                "this search space. The `stable` profile (gradient clipping, an lr ramp; docs/stability.md) "
                f"exists for this: `--gin {p.gin_spec},stable`."
            )
        lines += [f"- {name}: {note}" for name, note in notes.items()]
        return "\n".join(lines) + "\n"


def _diverged(trial: FrozenTrial) -> bool:
    from optuna.trial import TrialState

    return trial.state == TrialState.PRUNED and DIVERGED_ATTR in trial.user_attrs


def _include_name(path: Path) -> str:
    """How a gin file includes ``path``: relative to gin/ (portable across machines) when it lives there."""
    try:
        return path.resolve().relative_to(GIN_DIR).as_posix()
    except ValueError:
        return str(path.resolve())
