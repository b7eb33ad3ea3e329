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

This module is the command line; the parts live in ``pipeline/tuning/``: ``space`` (``SearchSpace``, which
the config loader registers with gin), ``storage``, ``pruning``, ``study``, ``worker`` and ``report``.
Everything heavy (Optuna, MLflow, torch) is imported where it is used.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.tuning.plan import (  # noqa: F401  (RUN_ATTR, VERSION_ATTR: the names other code reads trials by)
    EXIT_USAGE,
    OBJECTIVES,
    RUN_ATTR,
    VERSION_ATTR,
    Plan,
    default_study_name,
)
from pipeline.tuning.pruning import PRUNERS, Pruning
from pipeline.tuning.space import describe_space, load_search_space
from pipeline.tuning.storage import open_storage, parse_storage
from pipeline.tuning.worker import Tuner


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``sys.argv`` when ``argv`` is None), as MLproject's ``tune`` passes it on."""
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
    space, pinned_macros = load_search_space(pinned)
    epochs, selection, device = exp.trainer.epochs, exp.trainer.selection_metric, exp.data.device
    model_name = macro("MODEL_NAME", loaded.experiment)
    del exp
    pruning = Pruning.parse(args.pruner, args.objective, epochs, args.warmup_epochs, args.startup_trials)
    configure_tracking()
    return Plan(
        gin_spec=args.gin,
        loaded=loaded,
        space=space,
        pinned=pinned_macros,
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
    from pipeline.run_status import stop_with_wrapper
    from pipeline.workers import prepare_stores, run_workers

    args = parse_args(argv)
    _quiet_optuna()
    # Under `mlflow run`: SIGTERM when the wrapper dies (no orphan worker), and the wrapper's run found now,
    # before the study takes MLFLOW_RUN_ID out of the environment (its status is kept at the end).
    stop_with_wrapper()
    try:
        if args.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {args.workers}")
        plan = prepare(args)
        db = plan.storage.target if plan.storage.kind != "journal" else None
        prepare_stores(db, lambda: open_storage(plan.storage, 1, 2, lambda *_: None))
        print(
            f"robustflow tune: study {plan.study_name!r} in {plan.storage.label}: {plan.objective} over "
            + describe_space(plan.space)
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
    sys.exit(main())
