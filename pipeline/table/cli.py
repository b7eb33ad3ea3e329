"""The ``table`` entry point: train and evaluate every row of a paper's table, and render it beside the paper.

    python -m pipeline.table --table d2r_table1_cifar10 --gin smoke --device cpu
    mlflow run . -e table -P table=d2r_table1_cifar10 -P gin=smoke --env-manager local

``--gin`` takes profiles (``smoke``, ``stable``, ...) appended to every row's spec, ``--overrides``
bindings applied to every row. Every row is checked (config, data) before the first one trains. Running the
same command again reuses the rows that finished (see ``pipeline.table.run``), so an interrupted table
continues where it stopped and a finished one re-renders in minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import mlflow

from pipeline.config import ConfigError
from pipeline.outputs import default_output_dir
from pipeline.run_status import keep_current_status, stop_with_wrapper
from pipeline.table.plan import EvalPlan, PlannedRow, eval_plan, plan_rows, split_profiles
from pipeline.table.render import FAILED, RowResult, render_markdown
from pipeline.table.run import EVAL_PLAN_TAG, TABLE_TAG, run_row
from pipeline.table.spec import Table, available_tables, load_table
from pipeline.tracking import configure_tracking
from pipeline.train import _StopFlag

EXIT_USAGE = 2
EXIT_TERMINATED = 143
ROLE_TAG = "robustflow.role"
SMOKE_WARNING = (
    "smoke: numbers are not comparable to the paper. Every row was trained under the smoke profile "
    "(small backbones, a few thousand images, a few epochs) and {evaluation}."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.table", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--table", required=True, help=f"a table in gin/tables/: {', '.join(available_tables())}"
    )
    parser.add_argument("--gin", default="", help="profiles appended to every row's spec, e.g. smoke,stable")
    parser.add_argument("--overrides", default="", help="';'-separated gin bindings applied to every row")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--n",
        default="auto",
        help="test images per evaluation: all, a number, or auto (all; 128 under smoke)",
    )
    parser.add_argument(
        "--retry-failed", action="store_true", help="train again the rows whose earlier run diverged"
    )
    parser.add_argument("--output-dir", default=default_output_dir(), help="local checkpoints and results")
    return parser.parse_args(argv)


def _images(text: str) -> int | None | str:
    if str(text).lower() in ("auto", "all"):
        return str(text).lower() if str(text).lower() == "auto" else None
    try:
        return int(text)
    except ValueError as err:
        raise ConfigError(f"--n must be a number, 'all' or 'auto', got {text!r}") from err


def prepare(args: argparse.Namespace) -> tuple[Table, list[PlannedRow], EvalPlan, list[str]]:
    """Everything checked before any work: the table, every row's config and data, the evaluation."""
    table = load_table(args.table)
    profiles = split_profiles(args.gin)
    plan = eval_plan(table, profiles, _images(args.n))
    planned = plan_rows(table, profiles, args.overrides)
    return table, planned, plan, profiles


def slug(label: str) -> str:
    """A row label as an MLflow key part: ``'RAT(TRADES)'`` -> ``'RAT_TRADES'``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "row"


def open_parent(table: Table, profiles: list[str], args: argparse.Namespace, plan: EvalPlan) -> str:
    """The table's run: the one ``mlflow run`` created (MLFLOW_RUN_ID), else a new one in an experiment
    named after the table. Rows never continue it (``pipeline.table.run.outside_parent``)."""
    from pipeline.run_page import _generated

    client = mlflow.MlflowClient()
    name = ",".join([table.name, *profiles]) + (f" [{args.overrides}]" if args.overrides else "")
    tags = {
        ROLE_TAG: "table",
        TABLE_TAG: table.name,
        EVAL_PLAN_TAG: plan.key,
        "robustflow.gin": ",".join(profiles),
        "robustflow.overrides": args.overrides,
    }
    env_run = os.environ.get("MLFLOW_RUN_ID")
    if env_run:
        if _generated(client.get_run(env_run).info.run_name):
            tags["mlflow.runName"] = name[:90]
        for key, value in tags.items():
            client.set_tag(env_run, key, value)
        parent = env_run
    else:
        experiment = client.get_experiment_by_name(table.name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(table.name)
        parent = client.create_run(experiment_id, run_name=name[:90], tags=tags).info.run_id
    # Namespaced: under `mlflow run` the run already holds the entry point's own (table, gin, overrides ...).
    params = {
        "table.name": table.name,
        "table.profiles": ",".join(profiles),
        "table.overrides": args.overrides,
    }
    params |= {
        "table.suite": plan.suite,
        "table.eval_n": str(plan.n or "all"),
        "table.eval_autoattack": plan.autoattack or "suite",
    }
    for key, value in params.items():
        client.log_param(parent, key, value)
    return parent


def finish_parent(parent: str, table: Table, results: list[RowResult], markdown: str, out_dir: Path) -> None:
    """The rendered table as the run's description and artifacts, each row's runs and numbers on it."""
    client = mlflow.MlflowClient()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(markdown)
    rows = [
        {
            "label": r.label, "spec": r.spec, "status": r.status, "reason": r.reason, "paper": list(r.paper),
            "ours": {m: r.ours.get(m) for _, m in table.columns}, "source": r.source, "note": r.note,
            "train_run_id": r.train_run_id, "eval_run_id": r.eval_run_id, "flags": r.flags,
        }
        for r in results
    ]  # fmt: skip
    (out_dir / "table.json").write_text(json.dumps({"table": table.name, "rows": rows}, indent=2))
    client.log_artifact(parent, str(out_dir / "table.md"))
    client.log_artifact(parent, str(out_dir / "table.json"))
    client.set_tag(parent, "mlflow.note.content", markdown[:8000])
    for r in results:
        runs = f"{r.status} train={r.train_run_id or '-'} eval={r.eval_run_id or '-'}"
        client.set_tag(parent, f"robustflow.row.{slug(r.label)}", runs)
        if r.status != FAILED:
            for _, metric in table.columns:
                if metric in r.ours:
                    client.log_metric(parent, f"{slug(r.label)}/{metric}", r.ours[metric])
    client.set_tag(parent, "robustflow.failed_rows", str(sum(r.status == FAILED for r in results)))


class _TableStop(_StopFlag):
    """SIGTERM/Ctrl-C: training stops at the next step (its run KILLED, resumed by the next table run);
    anywhere else (an evaluation, a download) the table stops at once with KeyboardInterrupt."""

    def __init__(self) -> None:
        super().__init__()
        self.training = False

    def install(self) -> None:
        super().install()
        flag_only = signal.getsignal(signal.SIGTERM)

        def handler(signum: int, frame: object) -> None:
            flag_only(signum, frame)
            if not self.training:
                raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def main(argv: list[str] | None = None) -> int:
    """Run the entry point; returns the exit code (0 also when rows FAILED: the table is complete)."""
    from components.data import DataNotFoundError
    from components.training import TrainingInterruptedError

    args = parse_args(argv)
    configure_tracking()
    try:
        table, planned, plan, profiles = prepare(args)
    except (ConfigError, DataNotFoundError, ValueError) as err:
        print(f"robustflow table: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    stop = _TableStop()
    stop.install()
    stop_with_wrapper()  # a table never goes on alone once its `mlflow run` is stopped
    by_wrapper = bool(os.environ.get("MLFLOW_RUN_ID"))
    parent = open_parent(table, profiles, args, plan)
    print(f"robustflow table: {table.name}: {len(planned)} rows, parent run {parent}", file=sys.stderr)
    results = []
    started = time.monotonic()
    try:
        for p in planned:
            row_start, row_cpu = time.monotonic(), time.process_time()
            results.append(
                run_row(
                    p, plan, parent_id=parent, table_name=table.name, device=args.device,
                    output_dir=args.output_dir, retry_failed=args.retry_failed, stop=stop,
                )
            )  # fmt: skip
            r = results[-1]
            took, cpu = time.monotonic() - row_start, time.process_time() - row_cpu
            print(
                f"robustflow table: row {r.label}: {r.status} in {took:.0f} s ({cpu:.0f} CPU-s)",
                file=sys.stderr,
            )
    except (TrainingInterruptedError, KeyboardInterrupt):
        mlflow.MlflowClient().set_terminated(parent, "KILLED")
        keep_current_status(parent)  # `mlflow run` would mark it FAILED
        print("robustflow table: interrupted; run the same command again to continue", file=sys.stderr)
        return EXIT_TERMINATED
    notes = (
        [SMOKE_WARNING.format(evaluation=plan.describe())] if plan.smoke else [plan.describe().capitalize()]
    )
    if profiles or args.overrides:
        changed = [f"`,{','.join(profiles)}` appended to its spec"] if profiles else []
        changed += [f"overrides `{args.overrides}`"] if args.overrides else []
        notes.append(f"Every row trained with {' and '.join(changed)}.")
    markdown = render_markdown(table, results, notes=notes, run_id=parent)
    out_dir = Path(args.output_dir) / f"table-{table.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    finish_parent(parent, table, results, markdown, out_dir)
    if not by_wrapper:  # `mlflow run` ends its run itself when this process exits
        mlflow.MlflowClient().set_terminated(parent, "FINISHED")
    print(markdown)
    print(
        f"robustflow table: done in {time.monotonic() - started:.0f} s (parent run {parent})", file=sys.stderr
    )
    return 0
