"""The ``train`` entry point: gin config -> training graph -> MLflow run with metrics and checkpoints.

    python -m pipeline.train --gin d2r_cag_cifar10,smoke --overrides "ALPHA = 10; EPOCHS = 2"
    mlflow run . -e train -P gin=d2r_cag_cifar10,smoke --env-manager local
    mlflow run . -e train -P gin=... --run-id <run_id> --env-manager local    # resume a killed run
    mlflow run . -e train -P gin=d2r_cag_cifar10 -P nproc=4 --env-manager local  # 4 GPUs, via torchrun

Everything is built and checked (config, models, attack radii, data on disk) before a run is opened,
so bad input fails in seconds with a message. Each epoch writes a checkpoint; SIGTERM or Ctrl-C (to this
process or to its `mlflow run`) stops at the next step, leaves the last epoch's checkpoint, prints the resume
command and marks the run KILLED; re-running on the same run id with the same config resumes (a different
config, or a FINISHED run, is refused: pipeline/resume.py).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gin
import matplotlib.pyplot as plt
import mlflow
import torch

from components import distributed as dist
from pipeline.config import (
    ConfigError,
    LoadedConfig,
    available_configs,
    flat_parameters,
    load_config,
    macro,
    resolve_device,
    without_flag,
)
from pipeline.model_card import model_card
from pipeline.outputs import default_output_dir, remove_logged_checkpoints
from pipeline.plots import training_curves
from pipeline.registry import log_model, register
from pipeline.resume import (
    CONFIG_HASH_TAG,
    ResumeError,
    check_resume,
    config_fingerprint,
    resume_command,
    resume_target,
)
from pipeline.run_page import grouped, log_operative_config, name_and_file, run_name
from pipeline.run_status import keep_current_status, stop_with_wrapper
from pipeline.tracking import (
    FAILURE_TAG,
    STARTED_TAG,
    configure_tracking,
    fetch_resume_checkpoint,
    log_checkpoints,
    log_params,
    run_was_started,
    start_run,
)

if TYPE_CHECKING:
    from components.experiment import Experiment

EXIT_USAGE = 2
EXIT_DIVERGED = 3  # training stopped by the divergence guard: the run is FAILED and nothing is registered
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a terminated job


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--gin",
        required=True,
        help=f"config names in order, comma-separated: {', '.join(available_configs())}",
    )
    parser.add_argument(
        "--overrides", default="", help="';'-separated gin bindings, e.g. 'ALPHA = 10; EPOCHS = 2'"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--nproc", type=int, default=1, help="processes (GPUs) for data-parallel training; >1 starts torchrun"
    )
    parser.add_argument("--run-id", default=None, help="continue this MLflow run from its last checkpoint")
    parser.add_argument(
        "--output-dir",
        default=default_output_dir(),
        help="local checkpoints (default: $ROBUSTFLOW_OUTPUT, else ./outputs where the command was run)",
    )
    return parser.parse_args(argv)


def build(gin_spec: str, overrides: str, device: str = "auto"):  # noqa: ANN201  (returns (LoadedConfig, Experiment))
    """Load the config and build the experiment; every problem surfaces here, before any work."""
    from components.experiment import experiment

    loaded = load_config(gin_spec, overrides)
    dev = resolve_device(device)
    with gin.unlock_config():
        gin.bind_parameter("DataModule.device", str(dev))
    exp = experiment()
    exp.data.check()
    return loaded, exp


class _StopFlag:
    """Set by SIGTERM/SIGINT; the training loop polls it between steps."""

    def __init__(self) -> None:
        self.stop = False

    def __call__(self) -> bool:
        return self.stop

    def install(self) -> None:
        def handler(signum: int, frame: object) -> None:
            self.stop = True
            print(f"\nrobustflow: got signal {signum}; stopping at the next step", file=sys.stderr)

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)  # Ctrl-C: the same clean stop, no traceback


def main(argv: list[str] | None = None) -> int:
    """Run the entry point; returns the process exit code."""
    from components.data import DataNotFoundError
    from components.guard import TrainingDivergedError
    from components.training import TrainingInterruptedError

    args = parse_args(argv)
    rank, world, _ = dist.env_world()
    if args.nproc > 1 and world == 1:
        return _launch(args.nproc, sys.argv[1:] if argv is None else argv)
    try:
        device = dist.init_from_env(args.device) if world > 1 else args.device
        loaded, exp = build(args.gin, args.overrides, device)
    except (ConfigError, DataNotFoundError, ValueError, TypeError) as err:
        print(f"robustflow train: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    stop = _StopFlag()
    stop.install()
    stop_with_wrapper()
    if rank != 0:
        return _follow(exp, args.output_dir, stop)
    configure_tracking()
    try:  # before start_run, which would mark a finished run RUNNING again
        check_resume(resume_target(args.run_id), flat_parameters(), loaded.overrides, gin.config_str())
    except ResumeError as err:
        print(f"robustflow train: error: {err}", file=sys.stderr)
        keep_current_status(resume_target(args.run_id))  # `mlflow run` would mark it FAILED
        return EXIT_USAGE
    try:
        train_experiment(
            loaded, exp, gin_spec=args.gin, run_id=args.run_id, output_dir=args.output_dir, stop=stop
        )
    except TrainingInterruptedError:
        stopped = mlflow.last_active_run()
        if stopped is not None:
            print(f"robustflow: to resume: {resume_command(args, stopped.info.run_id)}", file=sys.stderr)
            keep_current_status(stopped.info.run_id)  # KILLED, which `mlflow run` would overwrite
        return EXIT_TERMINATED
    except TrainingDivergedError:
        return EXIT_DIVERGED
    return 0


def _launch(nproc: int, argv: list[str]) -> int:
    """Re-run this entry point under torchrun with ``nproc`` processes on this machine."""
    import subprocess

    # Drop --nproc: the workers run as ranks of one job, and torchrun would take it for its own flag.
    rest = without_flag(argv, "--nproc")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.call([*cmd, "-m", "pipeline.train", *rest])


def _follow(exp: Experiment, output_dir: str, stop: Callable[[], bool]) -> int:
    """A rank > 0 under torchrun: train in step with rank 0, which alone talks to MLflow."""
    from components.guard import TrainingDivergedError
    from components.training import TrainingInterruptedError

    run_id, resume_from = dist.broadcast_object(None)
    try:
        exp.trainer.fit(
            exp.graph, exp.data, exp.data.device, Path(output_dir) / run_id, resume_from, should_stop=stop
        )
    except TrainingInterruptedError:
        return EXIT_TERMINATED
    except TrainingDivergedError:
        return EXIT_DIVERGED
    return 0


def train_experiment(
    loaded: LoadedConfig,
    exp: Experiment,
    *,
    gin_spec: str,
    run_id: str | None = None,
    output_dir: str | Path = "outputs",
    stop: Callable[[], bool] | None = None,
    nested: bool = False,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    register_model: bool = True,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train a built experiment inside an MLflow run (new, resumed, or nested) and register its best model.

    ``on_epoch`` sees each epoch's metrics after they are logged (Optuna reports and prunes there: it may
    raise to stop the run, which then ends FAILED unless the caller's exception says otherwise).
    A run that diverges (``TrainingDivergedError``) ends FAILED with the guard's message as the
    ``robustflow.failure`` tag, registers nothing, and the error propagates.
    ``tags`` are set on a new run beside robustflow's own (the table command links its rows this way).
    Returns the run id, the best validation score, the test metrics and the registered version.
    """
    from components.guard import TrainingDivergedError
    from components.training import TrainingInterruptedError

    model_name = macro("MODEL_NAME", loaded.experiment)
    config_text = gin.config_str()
    name = run_name(gin_spec, loaded.overrides)
    run_ctx = mlflow.start_run(nested=True) if nested else start_run(model_name, run_id, run_name=name)
    with run_ctx as run:
        run_id = run.info.run_id
        ckpt_dir = Path(output_dir) / run_id
        resume_from = fetch_resume_checkpoint(run_id, ckpt_dir) if run_was_started(run_id) else None
        if dist.is_distributed():
            dist.broadcast_object((run_id, resume_from))  # the other ranks wait for this in _follow
        if resume_from is not None:
            print(f"robustflow: resuming run {run_id} from {resume_from}", file=sys.stderr)
        else:
            params = flat_parameters()
            mlflow.set_tags(
                {
                    STARTED_TAG: loaded.experiment,
                    "robustflow.gin": gin_spec,
                    "robustflow.overrides": "; ".join(loaded.overrides),
                    "robustflow.model_name": model_name,
                    CONFIG_HASH_TAG: config_fingerprint(params),
                    **(tags or {}),
                }
            )
            log_params(params)
            log_params({f"data.{k}": v for k, v in exp.data.summary().items()})
            mlflow.log_text(config_text, "config/config.gin")
            if not nested:  # a tune trial is named by the tuner
                name_and_file(run_id, name, model_name)

        def on_epoch_end(epoch: int, metrics: dict[str, float], paths: dict[str, Path]) -> None:
            mlflow.log_metrics(grouped(metrics), step=epoch)
            log_checkpoints(paths)
            shown = " ".join(
                f"{k}={metrics[k]:.4f}" for k in ("train/loss", "train/adv_acc", "val/clean_acc")
            )
            sel = exp.trainer.selection_metric
            print(f"epoch {epoch}/{exp.trainer.epochs} {shown} {sel}={metrics[sel]:.4f}", file=sys.stderr)
            if on_epoch is not None:
                on_epoch(epoch, metrics)

        try:
            result = exp.trainer.fit(
                exp.graph, exp.data, exp.data.device, ckpt_dir, resume_from, on_epoch_end, should_stop=stop
            )
        except TrainingInterruptedError as err:
            print(f"robustflow: {err}. Resume with --run-id {run_id}", file=sys.stderr)
            mlflow.end_run(status="KILLED")
            raise
        except TrainingDivergedError as err:
            print(
                f"robustflow: error: {err}. The run is marked FAILED and nothing is registered; "
                f"last.pt holds the last good epoch. Stabilizers: append the 'stable' profile "
                f"(e.g. --gin {gin_spec},stable), see docs/stability.md",
                file=sys.stderr,
            )
            mlflow.set_tags({FAILURE_TAG: str(err)[:5000], "robustflow.diverged": "true"})
            mlflow.end_run(status="FAILED")
            raise
        mlflow.log_text(gin.operative_config_str(), "config/operative.gin")
        log_operative_config(gin.operative_config_str())
        selection = exp.trainer.selection_metric
        best_score = float(result.best[selection])
        test = test_metrics(exp, result.best_checkpoint)
        best_epoch = int(test["test/best_epoch"])  # kept in the returned dict: the tuner reads it
        mlflow.set_tag("robustflow.best_epoch", best_epoch)  # a label, not a curve
        logged = {k: v for k, v in test.items() if k != "test/best_epoch"}
        mlflow.log_metrics({**logged, f"val/best_{selection.split('/', 1)[1]}": best_score})
        if result.history:
            figure = training_curves(result.history, selection, f"{model_name}: {name}", best_epoch)
            mlflow.log_figure(figure, "plots/training_curves.png")
            plt.close(figure)
        print("test: " + " ".join(f"{k}={v:.4f}" for k, v in logged.items()), file=sys.stderr)
        if register_model:
            # test_metrics left the best checkpoint's weights in the target: that is what gets registered.
            uri = log_model(exp.graph.target, exp.data.image_shape, name=model_name)
            card = model_card(
                run_id, model_name, best_score, exp.data.summary(), config_text,
                device=exp.data.device, val_steps=exp.trainer.val_steps,
            )  # fmt: skip
            mlflow.log_text(card, "model_card.md")
        print(f"robustflow: run {run_id} finished (experiment {model_name})", file=sys.stderr)
    registered = None
    if register_model:  # after the run ended: the registry only takes FINISHED runs
        registered = register(run_id, model_name, uri, best_score, card)
        if registered is not None:
            state = "now champion" if registered.champion else "champion unchanged"
            print(
                f"robustflow: registered {model_name} version {registered.version} ({state})", file=sys.stderr
            )
    if not nested:  # logged to the run; a FINISHED run is never resumed (the tuner removes its trials')
        remove_logged_checkpoints(run_id, ckpt_dir)
    return {"run_id": run_id, "best_score": best_score, "test": test, "registered": registered}


def test_metrics(exp, best_checkpoint: Path) -> dict[str, float]:  # noqa: ANN001  (an Experiment)
    """Clean and PGD-20 test accuracy of the last model and of the best checkpoint (by validation)."""
    from components.checkpoint import load_checkpoint
    from components.eval.attacks import robust_accuracy

    target, device = exp.graph.target, exp.data.device
    k = exp.trainer.val_steps
    with exp.trainer.autocast(torch.device(device)):
        last = robust_accuracy(target, exp.data.test_loader(), attack_steps=k)
        best_state = load_checkpoint(best_checkpoint, map_location=device)
        target.load_state_dict(best_state["model"])
        best = robust_accuracy(target, exp.data.test_loader(), attack_steps=k)
    out = {f"test/{name}": value for name, value in best.items()}
    out.update({f"test/last_{name}": value for name, value in last.items()})
    out["test/best_epoch"] = float(best_state["epoch"])
    return out


if __name__ == "__main__":
    sys.exit(main())
