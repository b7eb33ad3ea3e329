"""The ``bench`` entry point: how fast each method trains and evaluates, what it costs in FLOPs, and how
much faster D2R-CAG runs here than the authors' loop on the same machine.

    python -m pipeline.bench --threads 1         # tiny CPU defaults: small_cnn, batch 32, 3 steps
    python -m pipeline.bench --learn --threads 1 # the learning check instead (pipeline/learn.py)
    python -m pipeline.bench --target wrn34_10 --guide resnet18_lbgat --batch-size 128 --steps 20 \\
        --warmup 5 --eval-images 1024 --eval-batch-size 256 --autoattack --aa-images 256 \\
        --compare-fast-path --out bench_gpu --mlflow                                    # H100 / H200

See docs/benchmarks.md for what each number means and the numbers measured so far. This module holds the
options and ``main``; ``pipeline.bench.run`` measures, ``pipeline.bench.report`` writes and logs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

from pipeline.bench.report import log_to_mlflow, render_markdown, write_report
from pipeline.bench.run import DEFAULT_METHODS, GPU_PEAK_TFLOPS, run_bench
from pipeline.bench_health import SCHEDULE, parse_lr
from pipeline.config import ConfigError


def _add_switch(
    parser: argparse.ArgumentParser, name: str, default: str, choices: tuple[str, ...], doc: str
) -> None:
    """``--name`` (= on), ``--name on|off[|auto]`` and ``--no-name``: usable bare and from MLproject."""
    dest = name.replace("-", "_")
    parser.add_argument(
        f"--{name}", dest=dest, nargs="?", const="on", default=default, choices=choices, help=doc
    )
    parser.add_argument(f"--no-{name}", dest=dest, action="store_const", const="off", help=f"= --{name} off")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's options; the defaults are a CPU run of about a minute."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated gin configs")
    parser.add_argument("--target", default="small_cnn", help="TARGET_BACKBONE of every method")
    parser.add_argument("--guide", default="small_cnn", help="GUIDE_BACKBONE (two-model methods only)")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before (cover compile, cudnn)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="time every method this often, interleaved; report medians"
    )
    parser.add_argument(
        "--lr",
        default=SCHEDULE,
        help="'schedule' (default): each config's own schedule from its first step, stepped per iteration as "
        "Trainer.fit does (the warm-up lr of LBGAT/D2R); or a number: that fixed lr for every step",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    _add_switch(parser, "amp", "auto", ("auto", "on", "off"), "bf16 autocast (Trainer.amp); auto = on CUDA")
    _add_switch(
        parser, "channels-last", "auto", ("auto", "on", "off"), "NHWC (Trainer.channels_last); auto = CUDA"
    )
    _add_switch(parser, "compile", "off", ("on", "off"), "torch.compile the models (Trainer.compile)")
    _add_switch(
        parser,
        "cudnn-benchmark",
        "off",
        ("on", "off"),
        "cuDNN autotuning (experiment.cudnn_benchmark; CUDA only; the warm-up steps cover the tuning)",
    )
    _add_switch(parser, "reference", "on", ("on", "off"), "also time the authors' D2R loop")
    _add_switch(parser, "autoattack", "off", ("on", "off"), "also time AutoAttack 'standard' (slow on CPU)")
    _add_switch(
        parser,
        "compare-fast-path",
        "off",
        ("on", "off"),
        "train the same steps with the fast path on and off",
    )
    parser.add_argument(
        "--profile",
        action="append",
        default=[],
        help="a gin file (name in gin/ or path) applied after each method's config (e.g. stable); repeatable",
    )
    parser.add_argument("--overrides", default="", help="extra ';'-separated gin bindings for every method")
    parser.add_argument("--eval-batch-size", type=int, default=64, help="PGD-20 / AutoAttack batch size")
    parser.add_argument("--eval-images", type=int, default=64, help="images attacked by PGD-20")
    parser.add_argument("--aa-images", type=int, default=16, help="images attacked by AutoAttack")
    parser.add_argument(
        "--eval-checkpoint",
        default=None,
        help="robustflow best.pt/last.pt loaded into each matching target before evaluation (AutoAttack's "
        "cost depends on how many images stay robust; random weights make it look far cheaper)",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help=f"default: {GPU_PEAK_TFLOPS} on CUDA")
    parser.add_argument(
        "--data",
        default="auto",
        choices=("auto", "cifar10", "synthetic"),
        help="images to train on: CIFAR-10 from $ROBUSTFLOW_DATA (auto: when found), or random uint8",
    )
    parser.add_argument("--data-dir", default=None, help="data root (default: $ROBUSTFLOW_DATA, ./data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--learn",
        action="store_true",
        help="run the learning check instead (python -m pipeline.learn; its options follow, see its --help)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 on a shared CPU)"
    )
    parser.add_argument("--out", default=None, help="folder for bench.md and bench.json")
    parser.add_argument(
        "--mlflow", action="store_true", help="log bench.md, bench.json and metrics to MLflow"
    )
    args = parser.parse_args(argv)
    try:
        args.lr = parse_lr(args.lr)
    except ValueError as err:
        parser.error(str(err))
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods:
        parser.error("--methods is empty")
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.repeats < 1:
        parser.error("need --steps >= 1, --warmup >= 0, --batch-size >= 1, --repeats >= 1")
    if args.eval_images < 1 or args.eval_batch_size < 1 or args.aa_images < 1:
        parser.error("need --eval-images, --eval-batch-size and --aa-images >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the markdown; write/log it as asked. Returns the exit code."""
    from components.data import DataNotFoundError

    given = list(sys.argv[1:] if argv is None else argv)
    if "--learn" in given:  # the learning check (pipeline/learn.py) takes the rest of the options
        from pipeline.learn import main as learn_main

        given.remove("--learn")
        return learn_main(given)
    args = parse_args(argv)
    args.argv = argv
    if args.mlflow and importlib.util.find_spec("mlflow") is None:
        print("robustflow bench: error: --mlflow given but MLflow is not installed here", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = run_bench(args)
    except (ConfigError, DataNotFoundError) as err:
        print(f"robustflow bench: error: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (a test) keeps its own setting
    print(render_markdown(report))
    with contextlib.ExitStack() as stack:
        folder = Path(args.out) if args.out else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        write_report(report, folder)
        if args.out:
            print(
                f"robustflow bench: wrote {folder / 'bench.md'} and {folder / 'bench.json'}", file=sys.stderr
            )
        if args.mlflow:
            run_id = log_to_mlflow(report, folder)
            print(f"robustflow bench: logged to MLflow run {run_id} (experiment 'bench')", file=sys.stderr)
    return 0
