"""``python -m pipeline.bench``: how fast each method trains and evaluates, what it costs in FLOPs, and how
much faster D2R-CAG runs here than the authors' loop on the same machine (docs/benchmarks.md).

The modules, in the order a run goes through them:

* ``cli``: the options and ``main`` (print, write, log);
* ``methods``: each method built from its gin config with the command's bindings, and the images;
* ``accounting``: FLOPs per training image, from the graph's forward and backward passes;
* ``training``: the Trainer's own step, timed;
* ``evaluation``: PGD-20 and AutoAttack throughput;
* ``comparisons``: the authors' D2R loop, and the fast path against plain fp32;
* ``run``: one row per method, repeats, the whole bench.json document;
* ``report``: bench.md, bench.json and the MLflow run.
"""

from pipeline.bench.accounting import describe_counts, flops_per_image, graph_pass_counts
from pipeline.bench.cli import main, parse_args
from pipeline.bench.methods import build_method, method_overrides, method_spec
from pipeline.bench.report import COLUMNS, render_markdown
from pipeline.bench.run import DEFAULT_METHODS, run_bench
from pipeline.bench.training import bench_training, train_steps

__all__ = [
    "COLUMNS",
    "DEFAULT_METHODS",
    "bench_training",
    "build_method",
    "describe_counts",
    "flops_per_image",
    "graph_pass_counts",
    "main",
    "method_overrides",
    "method_spec",
    "parse_args",
    "render_markdown",
    "run_bench",
    "train_steps",
]
