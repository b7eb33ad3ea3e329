"""The two comparisons the bench makes besides its main table.

* :func:`bench_reference`: the authors' D2R-CAG loop (``benchmarks/reference_d2r.py``) on the same images,
  backbones, batch size and attack as the D2R row: the speed-up robustflow's step gives.
* :func:`compare_fast_path`: the same seeded steps trained with the fast path (bf16 autocast, NHWC) and
  plain (fp32, contiguous): what the fast path changes in the numbers.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
import torch

from benchmarks.reference_d2r import reference_flop_counts, run_reference
from components.training import resolve_auto
from pipeline.bench.accounting import achieved, flops_per_image
from pipeline.bench.evaluation import EVAL_PGD_STEPS
from pipeline.bench.methods import build_for_bench
from pipeline.bench.training import free_memory, prepare_fast_path, train_loader, train_steps
from pipeline.bench_health import loss_status, lr_scheduler_for, lr_span
from pipeline.config import macro

# The method the authors' loop (benchmarks/reference_d2r.py) reproduces.
REFERENCE_METHOD = "d2r_cag_cifar10"


def bench_reference(
    args: argparse.Namespace,
    data: dict[str, Any],
    device: torch.device,
    peak_tflops: float | None,
    lr: float = 0.1,
) -> dict[str, Any]:
    """The authors' D2R loop on the same images, backbones, batch size and attack as the D2R row, at a
    fixed ``lr`` (the lr the D2R row's first step ran at)."""
    from components.backbones import count_forward_flops

    exp, _, _ = build_for_bench(REFERENCE_METHOD, args, fast_path=False)
    target, guide = exp.graph.models["target"].to(device), exp.graph.models["guide"].to(device)
    generator = exp.graph.generator
    shape = exp.data.image_shape
    counts = reference_flop_counts(generator.steps)
    forward_flops = {"target": count_forward_flops(target, shape), "guide": count_forward_flops(guide, shape)}
    flops = flops_per_image(counts, forward_flops)
    free_memory(device)
    result = run_reference(
        target,
        guide,
        data["train_nhwc"][0],
        data["train_nhwc"][1],
        steps=args.steps,
        batch_size=exp.data.batch_size,
        device=device,
        attack_steps=generator.steps,
        warmup=args.warmup,
        epsilon=generator.eps,
        step_size=generator.step_size,
        seed=args.seed,
        lr=lr,
    )
    status = loss_status([[v] for v in result["losses"]], ["loss"])
    row = {
        "method": f"{REFERENCE_METHOD} (reference loop)",
        "target": macro("TARGET_BACKBONE"),
        "guide": macro("GUIDE_BACKBONE"),
        "batch": exp.data.batch_size,
        "attack_steps": generator.steps,
        "passes_per_image": counts,
        "gflop_per_image": flops / 1e9,
        "train_images_per_s": result["images_per_s"],
        "step_ms": 1000 * result["step_s"],
        "median_step_ms": float(np.median(result["step_ms_each"])),
        "step_ms_each": result["step_ms_each"],
        "warmup_s": result["warmup_s"],
        "peak_mem_mib": result["peak_mem_mib"],
        "amp": False,
        "channels_last": False,
        "compile": False,
        "losses": {
            "loss": float(np.mean(result["losses"][args.warmup :])) if status["finite"] else None,
            **{k: (v if math.isfinite(v) else None) for k, v in result["parts"].items()},
        },
        "loss_status": status["text"],
        "loss_finite": status["finite"],
        "first_nonfinite_step": status["first_nonfinite_step"],
        "first_nonfinite_term": status["first_nonfinite_term"],
        "lr_schedule": f"fixed {lr:g} (the D2R row's first lr)",
        "lr_span": f"{lr:.4g}",
        "pgd20_images_per_s": None,
        "aa_images_per_s": None,
        "speedup_vs_reference": None,
    }
    row.update(achieved(flops, row["train_images_per_s"], peak_tflops))
    del exp, target, guide
    free_memory(device)
    return row


def _train_and_score(
    name: str, args: argparse.Namespace, data: dict[str, Any], device: torch.device, fast: bool | None
) -> dict[str, Any]:
    """One side of :func:`compare_fast_path`: ``--steps`` seeded steps, then PGD-20 on the eval images."""
    from components.data import DeviceLoader
    from components.eval.attacks import robust_accuracy

    exp, _, _ = build_for_bench(name, args, fast_path=fast)
    optimizer, amp = prepare_fast_path(exp, device)
    scheduler, schedule = lr_scheduler_for(exp, optimizer, args.lr, args.steps)
    lrs: list[float] = []
    exp.graph.train()
    torch.manual_seed(args.seed)  # the attack's random init draws from the global generator
    loader = train_loader(*data["train"], exp.data.batch_size, exp.data, args.seed)
    batches = iter(loader)
    steps = (next(batches) for _ in range(args.steps))
    done = train_steps(exp.trainer, exp.graph, optimizer, steps, None, scheduler, lrs)
    rows = torch.stack(done).tolist()
    terms = ["loss", *exp.graph.loss.terms]
    status = loss_status(rows, terms)
    values: dict[str, float] = {}
    for i, term in enumerate(terms):
        key = "train/loss" if term == "loss" else f"train/loss/{term}"
        # Step 1 starts from identical weights: its difference is bf16 alone; later steps compound it.
        values[f"{key} (step 1)"] = rows[0][i]
        values[f"{key} (mean over steps)"] = float(np.mean([r[i] for r in rows]))
        values[f"{key} (last step)"] = rows[-1][i]
    values["train/clean_acc"] = float(np.mean([r[-2] for r in rows]))
    values["train/adv_acc"] = float(np.mean([r[-1] for r in rows]))
    torch.manual_seed(args.seed)  # PGD-20's uniform start
    with exp.trainer.autocast(device):
        acc = robust_accuracy(
            exp.graph.target,
            DeviceLoader(*data["eval"], args.eval_batch_size),
            attack_steps=EVAL_PGD_STEPS,
        )
    values.update({f"eval/{k}": v for k, v in acc.items()})
    run = {
        "amp": amp,
        "channels_last": resolve_auto(exp.trainer.channels_last, device),
        "lr_schedule": schedule,
        "lr_span": lr_span(lrs),
        "loss_status": status["text"],
        "loss_finite": status["finite"],
        "first_nonfinite_step": status["first_nonfinite_step"],
        "values": values,
    }
    del exp, optimizer
    free_memory(device)
    return run


def compare_fast_path(
    name: str, args: argparse.Namespace, data: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    """Train ``name`` for ``--steps`` steps twice, fast path as configured and plain fp32/contiguous.

    Same seed (same initial weights, attack noise), same batches and augmentations: the differences are
    what bf16 autocast (and NHWC kernels) change. Reports each loss term at step 1, averaged over the steps
    and at the last step, training accuracy, and clean/PGD-20 accuracy of the trained target on the eval
    images.
    """
    runs = {
        label: _train_and_score(name, args, data, device, fast)
        for label, fast in (("fast", None), ("plain", False))
    }
    fast, plain = runs["fast"], runs["plain"]
    # Two NaN runs agree on nothing worth knowing: say which side went non-finite instead of comparing.
    comparable = fast["loss_finite"] and plain["loss_finite"]
    bad = [
        f"{label}: {runs[label]['loss_status']}"
        for label in ("fast", "plain")
        if not runs[label]["loss_finite"]
    ]
    rows_out = []
    for k in fast["values"]:
        a, b = fast["values"][k], plain["values"][k]
        both = math.isfinite(a) and math.isfinite(b)
        rows_out.append(
            {
                "quantity": k,
                "fast": a if math.isfinite(a) else None,
                "plain": b if math.isfinite(b) else None,
                "abs_diff": abs(a - b) if both and comparable else None,
            }
        )
    return {
        "method": name,
        "steps": args.steps,
        "comparable": comparable,
        "verdict": f"losses finite on both sides over {args.steps} steps: differences below"
        if comparable
        else "NOT COMPARABLE (" + "; ".join(bad) + "): no differences reported",
        "fast": {k: v for k, v in fast.items() if k != "values"},
        "plain": {k: v for k, v in plain.items() if k != "values"},
        "rows": rows_out,
    }
