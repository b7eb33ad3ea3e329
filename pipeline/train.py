"""The ``train`` entry point: gin config -> training graph -> MLflow run with metrics and checkpoints.

    python -m pipeline.train --gin d2r_cag_cifar10,smoke --overrides "ALPHA = 10; EPOCHS = 2"
    mlflow run . -e train -P gin=d2r_cag_cifar10,smoke --env-manager local
    mlflow run . -e train -P gin=... --run-id <run_id> --env-manager local    # resume a killed run

Everything is built and checked (config, models, attack radii, data on disk) before a run is opened,
so bad input fails in seconds with a message. Each epoch writes a checkpoint; SIGTERM stops at the next
step, leaves the last epoch's checkpoint and marks the run KILLED; re-running on the same run id resumes.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import gin
import matplotlib.pyplot as plt
import mlflow
import torch

from pipeline.config import ConfigError, available_configs, flat_parameters, load_config, macro
from pipeline.plots import training_curves
from pipeline.tracking import (
    STARTED_TAG,
    configure_tracking,
    fetch_resume_checkpoint,
    log_checkpoints,
    log_params,
    run_was_started,
    start_run,
)

EXIT_USAGE = 2
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a terminated job


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; an explicit 'cuda' without a GPU is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but torch sees no GPU; use --device cpu or auto")
    return device


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
    parser.add_argument("--run-id", default=None, help="continue this MLflow run from its last checkpoint")
    parser.add_argument(
        "--output-dir", default=os.environ.get("ROBUSTFLOW_OUTPUT", "outputs"), help="local checkpoints"
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


def main(argv: list[str] | None = None) -> int:
    """Run the entry point; returns the process exit code."""
    from components.data import DataNotFoundError
    from components.training import TrainingInterruptedError

    args = parse_args(argv)
    try:
        loaded, exp = build(args.gin, args.overrides, args.device)
    except (ConfigError, DataNotFoundError, ValueError, TypeError) as err:
        print(f"robustflow train: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    model_name = macro("MODEL_NAME", loaded.experiment)
    operative = gin.config_str()
    configure_tracking()
    stop = _StopFlag()
    stop.install()
    with start_run(model_name, args.run_id) as run:
        run_id = run.info.run_id
        ckpt_dir = Path(args.output_dir) / run_id
        resume_from = fetch_resume_checkpoint(run_id, ckpt_dir) if run_was_started(run_id) else None
        if resume_from is not None:
            print(f"robustflow: resuming run {run_id} from {resume_from}", file=sys.stderr)
        else:
            mlflow.set_tags(
                {
                    STARTED_TAG: loaded.experiment,
                    "robustflow.gin": args.gin,
                    "robustflow.overrides": "; ".join(loaded.overrides),
                    "robustflow.model_name": model_name,
                }
            )
            log_params(flat_parameters())
            log_params({f"data.{k}": v for k, v in exp.data.summary().items()})
            mlflow.log_text(operative, "config/config.gin")

        def on_epoch_end(epoch: int, metrics: dict[str, float], paths: dict[str, Path]) -> None:
            mlflow.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
            log_checkpoints(paths)
            shown = " ".join(
                f"{k}={metrics[k]:.4f}" for k in ("train/loss", "train/adv_acc", "val/clean_acc")
            )
            sel = exp.trainer.selection_metric
            print(f"epoch {epoch}/{exp.trainer.epochs} {shown} {sel}={metrics[sel]:.4f}", file=sys.stderr)

        try:
            result = exp.trainer.fit(
                exp.graph, exp.data, exp.data.device, ckpt_dir, resume_from, on_epoch_end, should_stop=stop
            )
        except TrainingInterruptedError as err:
            print(f"robustflow: {err}. Resume with --run-id {run_id}", file=sys.stderr)
            mlflow.end_run(status="KILLED")
            return EXIT_TERMINATED
        mlflow.log_text(gin.operative_config_str(), "config/operative.gin")
        test = test_metrics(exp, result.best_checkpoint)
        mlflow.log_metrics(test)
        if result.history:
            figure = training_curves(result.history, exp.trainer.selection_metric)
            mlflow.log_figure(figure, "plots/training_curves.png")
            plt.close(figure)
        print("test: " + " ".join(f"{k}={v:.4f}" for k, v in test.items()), file=sys.stderr)
        print(f"robustflow: run {run_id} finished (experiment {model_name})", file=sys.stderr)
    return 0


def test_metrics(exp, best_checkpoint: Path) -> dict[str, float]:  # noqa: ANN001  (an Experiment)
    """Clean and PGD-20 test accuracy of the last model and of the best checkpoint (by validation)."""
    from components.checkpoint import load_checkpoint
    from components.evaluation import robust_accuracy

    target, device = exp.graph.target, exp.data.device
    k = exp.trainer.val_steps
    with exp.trainer._autocast(torch.device(device)):
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
