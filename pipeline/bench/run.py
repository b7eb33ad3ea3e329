"""One bench run: every method's row (FLOPs, training speed, evaluation speed), repeated and interleaved,
the reference loop next to D2R-CAG, the fast-path comparisons, and the run's setup: the bench.json
document."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from typing import Any

import numpy as np
import torch

from components.data import to_device_nchw
from pipeline.bench.accounting import achieved, flops_per_image, graph_pass_counts
from pipeline.bench.comparisons import REFERENCE_METHOD, bench_reference, compare_fast_path
from pipeline.bench.evaluation import EVAL_PGD_STEPS, bench_autoattack, bench_pgd_eval, load_eval_checkpoint
from pipeline.bench.methods import build_for_bench, load_images, method_spec
from pipeline.bench.training import bench_training, free_memory
from pipeline.config import macro, resolve_device

DEFAULT_METHODS = ("d2r_cag_cifar10", "lbgat_cifar10", "trades_cifar10", "pgd_at_cifar10", "regmix_cifar10")
# Measured bf16 dense matrix rate of H100/H200 as stated in the "Speed and scale" issue (not the 989 TFLOP/s
# datasheet figure): the fraction of peak is against what the hardware actually sustains.
GPU_PEAK_TFLOPS = 790.0


def bench_method(
    name: str,
    args: argparse.Namespace,
    data: dict[str, Any],
    device: torch.device,
    peak_tflops: float | None,
    evaluate: bool = True,
) -> dict[str, Any]:
    """One row of the table: build ``name``, count its FLOPs, time training, then (``evaluate``) PGD-20
    and AutoAttack."""
    from components.backbones import count_forward_flops

    exp, overrides, skipped = build_for_bench(name, args)
    graph = exp.graph
    graph.to(device)
    shape = exp.data.image_shape
    forward_flops = {m: count_forward_flops(model, shape) for m, model in graph.models.items()}
    counts = graph_pass_counts(graph)
    flops = flops_per_image(counts, forward_flops)
    row: dict[str, Any] = {
        "method": name,
        "target": macro("TARGET_BACKBONE"),
        "guide": macro("GUIDE_BACKBONE") if "guide" in graph.models else None,
        "batch": exp.data.batch_size,
        "attack_steps": graph.generator.steps,
        "overrides": overrides,
        "skipped_overrides": skipped,
        "forward_gflop": {m: f / 1e9 for m, f in forward_flops.items()},
        "passes_per_image": counts,
        "gflop_per_image": flops / 1e9,
        "speedup_vs_reference": None,
    }
    row.update(
        bench_training(
            exp, data["train"][0], data["train"][1], args.steps, args.warmup, device, args.seed, args.lr
        )
    )
    row.update(achieved(flops, row["train_images_per_s"], peak_tflops))
    row["pgd20_gflop_per_image"] = forward_flops[graph.eval_model] * (2 + 2 * EVAL_PGD_STEPS) / 1e9
    row["pgd20_images_per_s"] = row["aa_images_per_s"] = None
    target = graph.target
    if evaluate:
        if args.eval_checkpoint:
            row["eval_checkpoint_loaded"] = load_eval_checkpoint(target, args.eval_checkpoint)
        row.update(
            bench_pgd_eval(target, *data["eval"], args.eval_batch_size, exp.trainer, warmup=args.warmup > 0)
        )
        if args.autoattack == "on":
            row.update(bench_autoattack(target, *data["aa"], args.eval_batch_size))
    del exp, graph, target
    free_memory(device)
    return row


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median training throughput, keeping the first repeat's evaluation numbers.

    Every repeat's images/s is kept in ``train_images_per_s_each``.
    """
    ordered = sorted(rows, key=lambda r: r["train_images_per_s"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    for key, value in rows[0].items():
        if key.startswith(("pgd20", "aa_", "eval_")):
            row[key] = value
    row["train_images_per_s_each"] = [r["train_images_per_s"] for r in rows]
    return row


def describe_machine(device: torch.device) -> str:
    """The GPU and CUDA version, or the CPU and its core count: the 'machine' line of a report."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU"


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the command measures, as the bench.json document."""
    from pipeline.config import resolve_gin_files

    for name in args.methods:
        resolve_gin_files(method_spec(name, args))  # an unknown method/profile fails here, before work
    argv = getattr(args, "argv", None)
    device = resolve_device(args.device)
    peak = (
        args.peak_tflops
        if args.peak_tflops is not None
        else (GPU_PEAK_TFLOPS if device.type == "cuda" else None)
    )
    n_train = args.batch_size * (args.warmup + args.steps)
    n_eval = max(args.eval_images, args.aa_images)
    x_train, y_train, x_eval, y_eval, source = load_images(
        args.data, n_train, n_eval, args.data_dir, args.seed
    )
    data = {
        "train": to_device_nchw(x_train, y_train, device),
        "train_nhwc": (x_train, y_train),
        "eval": to_device_nchw(x_eval[: args.eval_images], y_eval[: args.eval_images], device),
        "aa": to_device_nchw(x_eval[: args.aa_images], y_eval[: args.aa_images], device),
    }
    # Repeats interleave the methods (and the reference right after D2R-CAG), so a burst of load on a
    # shared machine hits one repeat of everything rather than all repeats of one method.
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.methods}
    references: list[dict[str, Any]] = []
    speedups: list[float] = []
    for repeat in range(args.repeats):
        for name in args.methods:
            row = bench_method(name, args, data, device, peak, evaluate=repeat == 0)
            runs[name].append(row)
            if name == REFERENCE_METHOD and args.reference == "on":
                references.append(bench_reference(args, data, device, peak, lr=row["lr_each"][0]))
                speedups.append(row["train_images_per_s"] / references[-1]["train_images_per_s"])
    methods = [median_row(rows) for rows in runs.values()]
    reference = median_row(references) if references else None
    if reference is not None:
        d2r = next(r for r in methods if r["method"] == REFERENCE_METHOD)
        # The median of ratios taken within a repeat: both sides of each ratio saw the same load.
        d2r["speedup_vs_reference"] = float(np.median(speedups))
        d2r["speedup_vs_reference_each"] = speedups
        reference["forward_gflop"] = d2r["forward_gflop"]
    compare = (
        [compare_fast_path(name, args, data, device) for name in args.methods]
        if args.compare_fast_path == "on"
        else None
    )
    first = methods[0] if methods else {}
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": describe_machine(device),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "data": source,
        "amp": first.get("amp"),
        "channels_last": first.get("channels_last"),
        "compile": first.get("compile"),
        "peak_tflops": peak,
        "lr": args.lr,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "eval_images": args.eval_images,
        "aa_images": args.aa_images,
        "autoattack": args.autoattack == "on",
        "command": "python -m pipeline.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: v for k, v in vars(args).items() if k != "argv"},
    }
    return {"meta": meta, "methods": methods, "reference": reference, "compare_fast_path": compare}
