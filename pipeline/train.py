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
from pipeline.data_inputs import describe, log_data_inputs
from pipeline.model_card import model_card
from pipeline.outputs import default_output_dir, remove_logged_checkpoints
from pipeline.plots import training_curves
from pipeline.registry import log_model, register
from pipeline.resume import (
    CONFIG_HASH_TAG,
    ResumeError,
    check_resume,
    config_fingerprint,
    resume_checkpoint,
    resume_command,
    resume_target,
)
from pipeline.run_page import grouped, log_operative_config, name_and_file, run_name
from pipeline.run_status import keep_current_status, stop_with_wrapper
from pipeline.tracking import (
    CONFIG_ARTIFACT,
    FAILURE_TAG,
    STARTED_TAG,
    configure_tracking,
    full_config_text,
    log_checkpoints,
    log_new_params,
    log_params,
    run_params,
    scrub,
    scrub_source_tags,
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
    target = resume_target(args.run_id)
    try:  # before start_run, which would mark a finished run RUNNING again
        resuming = check_resume(
            target, run_params(), loaded.overrides, full_config_text(), experiment=loaded.experiment
        )
        resume_from = resume_checkpoint(target, Path(args.output_dir) / target) if resuming else None
    except ResumeError as err:
        print(f"robustflow train: error: {err}", file=sys.stderr)
        keep_current_status(target)  # `mlflow run` would mark it FAILED
        if world > 1:
            dist.broadcast_object(None)  # the other ranks wait for the run to train in: there is none
        return EXIT_USAGE
    try:
        train_experiment(
            loaded,
            exp,
            gin_spec=args.gin,
            run_id=args.run_id,
            output_dir=args.output_dir,
            stop=stop,
            resume_from=resume_from,
        )
    except TrainingInterruptedError:
        stopped = mlflow.last_active_run()
        if stopped is not None:
            print(f"robustflow: to resume: {resume_command(args, stopped.info.run_id)}", file=sys.stderr)
            keep_current_status(stopped.info.run_id)  # KILLED, which `mlflow run` would overwrite
        dist.barrier()  # the other ranks wait: torchrun stops the job as soon as one rank exits
        return EXIT_TERMINATED
    except TrainingDivergedError:
        dist.barrier()  # the run is FAILED and tagged now; the other ranks may exit
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

    sent = dist.broadcast_object(None)
    if sent is None:  # rank 0 refused the run before it started (its error says why)
        return EXIT_USAGE
    run_id, resume_from = sent
    try:
        exp.trainer.fit(
            exp.graph, exp.data, exp.data.device, Path(output_dir) / run_id, resume_from, should_stop=stop
        )
    except TrainingInterruptedError:
        dist.barrier()  # until rank 0 has marked the run KILLED (torchrun ends the job when one rank exits)
        return EXIT_TERMINATED
    except TrainingDivergedError as err:
        # Rank 0's error may only say "on another rank": this rank's own says where and which term.
        print(f"robustflow train: error on rank {dist.rank()}: {err}", file=sys.stderr)
        dist.barrier()  # until rank 0 has marked the run FAILED
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
    resume_from: Path | None = None,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train a built experiment inside an MLflow run (new, resumed, or nested) and register its best model.

    ``resume_from``: the checkpoint a resumed ``run_id`` continues from (``resume.resume_checkpoint``, fetched
    and checked before the run is opened); ``None`` trains from epoch 1.

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
    name = scrub(run_name(gin_spec, loaded.overrides))
    run_ctx = mlflow.start_run(nested=True) if nested else start_run(model_name, run_id, run_name=name)
    with run_ctx as run:
        run_id = run.info.run_id
        ckpt_dir = Path(output_dir) / run_id
        datasets = None  # the splits' facts (size, digest) for the card; logged as inputs on a fresh start
        if dist.is_distributed():
            dist.broadcast_object((run_id, resume_from))  # the other ranks wait for this in _follow
        if resume_from is not None:
            print(f"robustflow: resuming run {run_id} from {resume_from}", file=sys.stderr)
        else:
            mlflow.set_tags(
                {
                    STARTED_TAG: loaded.experiment,
                    "robustflow.gin": scrub(gin_spec),
                    "robustflow.overrides": scrub("; ".join(loaded.overrides)),
                    "robustflow.model_name": model_name,
                    CONFIG_HASH_TAG: config_fingerprint(flat_parameters()),  # what the run trains
                    **(tags or {}),
                }
            )
            scrub_source_tags(run_id)
            log_params(run_params())
            log_params({f"data.{k}": v for k, v in exp.data.summary().items()})
            # The one config file (the operative config plus what it did not call), previewable in the UI.
            mlflow.log_text(full_config_text(), CONFIG_ARTIFACT)
            datasets = log_data_inputs(exp.data, ("train", "validation", "test"))
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
        # Configurables first called while training (the optimizer, the validation attack) join now.
        log_new_params(run_params())
        log_operative_config(full_config_text())
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
            config_text = full_config_text()
            datasets = datasets or describe(exp.data, ("train", "validation", "test"))

            def card(version: str | None) -> str:
                return model_card(
                    run_id, model_name, best_score, exp, config_text, datasets=datasets, version=version
                )

            mlflow.log_text(card(None), "model_card.md")
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
