"""The ``evaluate`` entry point: attack a registered model and log numbers people can trust.

    python -m pipeline.evaluate --model-uri models:/d2r_cag_cifar10@champion --suite paper
    mlflow run . -e evaluate -P model_uri=models:/d2r_cag_cifar10@champion -P suite=quick --env-manager local

Model URIs: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``runs:/<run_id>/model``. The model
is rebuilt from its training run (gin config + weights-only checkpoint) and evaluated on the test split
of the dataset it was trained on. The evaluation is its own MLflow run in the training run's experiment,
named after what it evaluated (``eval d2r_cag_cifar10/v3 quick``: an alias is resolved to its version when
the evaluation starts, and the version is a parameter and a tag), tagged with the training run's id; it
logs ``eval/n<N>/*`` metrics (see ``pipeline.model_results``), the test split it read as a dataset input,
the checks' flags, a RobustBench-style JSON, a markdown table and, for ``paper`` and ``full``, a plot of
accuracy against eps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from pipeline.config import ConfigError  # noqa: E402
from pipeline.data_inputs import log_data_inputs  # noqa: E402
from pipeline.model_results import evaluated_model, log_results  # noqa: E402
from pipeline.registry import load_model, run_of  # noqa: E402
from pipeline.tracking import configure_tracking, log_params, scrub, scrub_source_tags  # noqa: E402
from pipeline.train import EXIT_USAGE, resolve_device  # noqa: E402

if TYPE_CHECKING:
    from components.eval.suite import Suite

EVALUATES_TAG = "robustflow.evaluates_run"


def parse_eps(text: str) -> list[float]:
    """``'8/255'``, ``'0.031'`` or a comma-separated list of them, each checked to lie in (0, 1]."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(Fraction(part)) if "/" in part else float(part)
        except (ValueError, ZeroDivisionError) as err:
            raise ConfigError(f"bad eps {part!r}: write 8/255 or 0.031") from err
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"eps {part} = {value:g} is out of range (0, 1] (pixel space: 8/255 = 0.0314)")
        out.append(value)
    if not out:
        raise ConfigError("no eps given")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-uri", required=True, help="models:/<name>@champion, models:/<name>/<v>, runs:/<id>/model"
    )
    parser.add_argument("--suite", default="quick", choices=("quick", "paper", "full"))
    parser.add_argument("--eps", default="8/255", help="radii, e.g. '8/255' or '8/255,0.031' (pixel space)")
    parser.add_argument("--n", default="all", help="evaluate the first N test images ('all' for every one)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default=None, help="data root (default: $ROBUSTFLOW_DATA, else ./data)")
    parser.add_argument(
        "--no-curve",
        action="store_true",
        help="skip the PGD-20 accuracy-vs-eps curve of `paper` (quick has none)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output-dir",
        default=os.environ.get("ROBUSTFLOW_OUTPUT", "outputs"),
        help="local copy of the results",
    )
    return parser.parse_args(argv)


def accuracy_vs_eps_figure(report) -> plt.Figure:  # noqa: ANN001  (an EvalReport)
    """Accuracy against eps (in units of 1/255) for clean, each attack and the worst case."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in report.accuracy_vs_eps().items():
        xs, ys = zip(*points)
        # A series measured at one radius is a point, not a line (C&W at 8/255 beside the PGD-20 curve).
        style = {"marker": "o"} if len(points) > 1 else {"marker": "s", "linestyle": "none"}
        ax.plot([x * 255 for x in xs], ys, label=name, **style)
    ax.set_xlabel("eps (x 1/255)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"{report.suite or 'evaluation'} on {report.n_examples} test images")
    fig.tight_layout()
    return fig


def robustbench_entry(report, evaluated, train_run, model_uri: str) -> dict:  # noqa: ANN001
    """RobustBench's ``model_info`` entry with what the registry knows (name, architecture, dataset)."""
    params = train_run.data.params
    arch = params.get("TARGET_BACKBONE") or params.get("target/build_backbone.name", "")
    entry = report.to_robustbench_json(
        name=evaluated.label,
        method=params.get("method_info.name", ""),
        architecture=str(arch).strip("'"),
        dataset=params.get("data.dataset", ""),
        model_uri=evaluated.pinned_uri,
        model_uri_given=model_uri,
    )
    entry["attacks"] = dict(report.attacks)
    entry["n_examples"] = report.n_examples
    return json.loads(scrub(json.dumps(entry)))


@dataclass
class Evaluation:
    """What :func:`evaluate_model` did: the evaluation run, its report, the logged metrics and table."""

    run_id: str
    train_run_id: str
    report: Any  # an EvalReport
    metrics: dict[str, float]
    table: str


def load_for_evaluation(  # noqa: ANN201  (returns (training Run, DataModule, nn.Module, Evaluated))
    model_uri: str,
    n: int | None = None,
    *,
    batch_size: int = 256,
    device: str = "auto",
    data_dir: str | None = None,
):
    """The model behind ``model_uri``, its training run, the test split it is evaluated on, and what is
    evaluated (the registered version an alias points at now, pinned: ``model_results.Evaluated``).

    Every problem (unknown model, a run not made by robustflow, missing data) raises here, before any attack.
    """
    from components.data import DataModule

    if n is not None and n < 1:
        raise ConfigError(f"--n must be >= 1 or 'all', got {n}")
    dev = resolve_device(device)
    train_run_id = run_of(model_uri)
    train_run = mlflow.get_run(train_run_id)
    dataset = train_run.data.params.get("data.dataset")
    if dataset is None:
        raise ConfigError(
            f"run {train_run_id} was not made by robustflow's train entry point (no data.dataset)"
        )
    data = DataModule(
        dataset=dataset,
        data_dir=data_dir,
        val_size=0,
        test_size=n,
        eval_batch_size=batch_size,
        device=str(dev),
    )
    data.check()
    evaluated = evaluated_model(model_uri, train_run_id)  # the version the alias points at now
    model = load_model(evaluated.pinned_uri if evaluated.version else model_uri, dev)
    return train_run, data, model, evaluated


def evaluate_model(
    model_uri: str,
    suite: Suite,
    loaded: tuple[Any, Any, Any, Any],
    *,
    seed: int = 0,
    output_dir: str | Path = "outputs",
    tags: dict[str, str] | None = None,
    eps_text: str | None = None,
) -> Evaluation:
    """Attack the model with ``suite`` and log it as an evaluation run; ``loaded`` is what
    :func:`load_for_evaluation` returned for ``model_uri`` (the training run, the test data, the model, what
    is evaluated). ``metrics`` in the result are the headline ``eval/n<N>/*`` metrics.

    The run is filed in the training run's experiment and tagged with its id (``tags`` adds to those); the
    results are written to ``output_dir`` first, so a tracking-server hiccup never loses a long evaluation.
    """
    from components.eval.report import format_eps

    train_run, data, model, evaluated = loaded
    train_run_id = train_run.info.run_id
    eps_list = list(suite.eps_list)
    eps_text = eps_text or ",".join(format_eps(e) for e in eps_list)
    report = suite.run(model, data.test_loader(), progress=True, seed=seed)

    # Written to disk first: a long evaluation is never lost to a tracking-server hiccup.
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(output_dir) / f"evaluate-{train_run_id}-{suite.name}-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    table = report.to_markdown()
    (out_dir / "results.md").write_text(table)
    (out_dir / "flags.txt").write_text("\n".join(report.flags) + ("\n" if report.flags else "no flags\n"))
    (out_dir / "robustbench.json").write_text(
        json.dumps(robustbench_entry(report, evaluated, train_run, model_uri), indent=2)
    )
    (out_dir / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    if suite.curve_eps:
        figure = accuracy_vs_eps_figure(report)
        figure.savefig(out_dir / "accuracy_vs_eps.png", dpi=120)
        plt.close(figure)

    # Under `mlflow run` this continues the run it created (MLFLOW_RUN_ID), which already holds the entry
    # point's own parameters (model_uri, suite, eps, n): ours are namespaced so they never collide.
    name = f"eval {evaluated.label} {suite.name}"
    with mlflow.start_run(experiment_id=train_run.info.experiment_id, run_name=name) as run:
        client = mlflow.MlflowClient()
        if client.get_run(run.info.run_id).info.run_name != name:  # `mlflow run` named it already
            client.set_tag(run.info.run_id, "mlflow.runName", name)
        pinned = {
            "robustflow.model_uri": evaluated.pinned_uri,
            "robustflow.model_uri_given": model_uri,
            "robustflow.model_version": evaluated.version.version if evaluated.version else "",
        }
        mlflow.set_tags(
            {EVALUATES_TAG: train_run_id, "robustflow.suite": suite.name, **pinned, **(tags or {})}
        )
        scrub_source_tags(run.info.run_id)
        log_params(
            {"eval.model_uri": evaluated.pinned_uri, "eval.model_uri_given": model_uri,
             "eval.model_version": pinned["robustflow.model_version"], "eval.model_id": evaluated.model_id,
             "eval.suite": suite.name, "eval.eps": eps_text, "eval.n_examples": report.n_examples,
             "eval.seed": seed, **{f"eval.attack.{k}": v for k, v in report.attacks.items()}}
        )  # fmt: skip
        test_split = log_data_inputs(data, ("test",))["test"]["mlflow_dataset"]
        # Against the evaluated model too: its page, its registered version and its card show the numbers.
        metrics = log_results(report, eps_list, evaluated, suite.curve_eps, dataset=test_split)
        mlflow.log_artifacts(str(out_dir), "evaluation")
    return Evaluation(run.info.run_id, train_run_id, report, metrics, table)


def main(argv: list[str] | None = None) -> int:
    """Run the entry point; returns the process exit code."""
    from components.data import DataNotFoundError
    from components.eval.suite import CURVE_EPS, get_suite

    args = parse_args(argv)
    configure_tracking()
    try:
        eps_list = parse_eps(args.eps)
        n = None if str(args.n).lower() == "all" else int(args.n)
        suite = get_suite(args.suite, eps=eps_list[0], with_0031=False)
        suite.eps_list = tuple(eps_list)
        # The curve costs a PGD-20 per radius: `paper` gets it (and `full` has its own); `quick` stays quick.
        if args.no_curve:
            suite.curve_eps, suite.curve_attacks = (), ()
        elif args.suite == "paper" and not suite.curve_eps:
            suite.curve_eps, suite.curve_attacks = CURVE_EPS, ("pgd20",)
        loaded = load_for_evaluation(
            args.model_uri, n, batch_size=args.batch_size, device=args.device, data_dir=args.data_dir
        )
    except (ConfigError, DataNotFoundError, ValueError, MlflowException) as err:
        print(f"robustflow evaluate: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    done = evaluate_model(
        args.model_uri, suite, loaded, seed=args.seed, output_dir=args.output_dir, eps_text=args.eps
    )
    print(done.table)
    for flag in done.report.flags:
        print(f"FLAG: {flag}", file=sys.stderr)
    print(
        f"robustflow: evaluated {args.model_uri} on {done.report.n_examples} images "
        f"in {done.report.seconds:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
