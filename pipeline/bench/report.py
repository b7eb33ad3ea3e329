"""The bench's report: bench.md (the setup, the main table, the FLOP accounting, the AutoAttack and fast-path
tables), bench.json, and the run of the MLflow 'bench' experiment that holds them with their metrics."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.bench.accounting import describe_counts
from pipeline.bench_health import SCHEDULE

#: Columns of the main table in bench.md (and keys of each ``methods`` row in bench.json, in this order).
COLUMNS = (
    ("method", "method"),
    ("target", "target"),
    ("guide", "guide"),
    ("batch", "batch"),
    ("lr_span", "lr"),
    ("train_images_per_s", "train img/s"),
    ("step_ms", "ms/step"),
    ("median_step_ms", "median ms/step"),
    ("gflop_per_image", "GFLOP/img"),
    ("achieved_tflops", "TFLOP/s"),
    ("peak_fraction", "% of peak"),
    ("peak_mem_mib", "peak mem MiB"),
    ("pgd20_images_per_s", "PGD-20 eval img/s"),
    ("aa_images_per_s", "AA img/s"),
    ("speedup_vs_reference", "speed-up vs reference"),
    ("loss_status", "losses"),
)


def _fmt(value: Any, key: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if key == "peak_fraction":
        return f"{100 * value:.1f}%"
    if key == "speedup_vs_reference":
        return f"{value:.2f}x"
    if key in ("batch",):
        return str(value)
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.4g}"
    return str(value)


def _number(value: float | None, spec: str, missing: str = "non-finite") -> str:
    """A comparison cell: the number, or ``missing`` where there is none (a NaN/inf value, no diff)."""
    return missing if value is None else format(value, spec)


def render_markdown(report: Mapping[str, Any]) -> str:
    """bench.md: the setup, the main table, the FLOP accounting and the fast-path comparison."""
    meta = report["meta"]
    lines = [
        f"# robustflow benchmark ({meta['date']})",
        "",
        f"- machine: {meta['machine']}",
        f"- torch {meta['torch']}, threads {meta['threads']}, data: {meta['data']}",
        f"- fast path: amp={meta['amp']}, channels_last={meta['channels_last']}, compile={meta['compile']}"
        f", cudnn.benchmark={meta['args'].get('cudnn_benchmark', 'off')}",
        f"- lr: {meta.get('lr', SCHEDULE)} (schedule: each config's own, stepped per iteration from step 1; "
        "a number: that fixed lr). Losses that went NaN/inf are marked NON-FINITE, never averaged",
        f"- peak TFLOP/s for the fraction: {meta['peak_tflops'] if meta['peak_tflops'] else 'not given'}",
        f"- profiles: {', '.join(meta['args'].get('profile') or []) or 'none'}",
        f"- command: `{meta['command']}`",
        f"- timed: {meta['steps']} steps after {meta['warmup']} warm-up steps"
        + (
            f", {meta['repeats']} interleaved repeats (median shown; speed-up = median of per-repeat ratios)"
            if meta["repeats"] > 1
            else ""
        )
        + f"; PGD-20 eval on {meta['eval_images']} images"
        + (f"; AutoAttack standard on {meta['aa_images']} images" if meta["autoattack"] else ""),
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    rows = list(report["methods"]) + ([report["reference"]] if report.get("reference") else [])
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(key), key) for key, _ in COLUMNS) + " |")
    if meta["compile"]:
        counts = ", ".join(
            f"{r['method']} {r.get('compiled_graphs_warmup', 0)} / {r.get('compiled_graphs_timed', 0)}"
            for r in report["methods"]
        )
        lines += ["", f"torch.compile graphs compiled in warm-up / timed steps (timed: 0 expected): {counts}"]
    lines += [
        "",
        "Peak memory: `torch.cuda.max_memory_allocated` on CUDA; on CPU the process's peak resident set size "
        "(`resource.getrusage`, a high-water mark over the whole run, so it only grows down the table).",
        "",
        "## FLOP accounting (per training image, in forward-pass equivalents F of each backbone)",
        "",
        "FLOPs/image = Σ_m F_m × (fwd + bwd_in + 2·bwd); bwd_in = input-gradient-only backward "
        "(attack steps), bwd = backward with weight gradients (loss views).",
        "",
        "| method | forward GFLOP per image | passes per image | GFLOP/img |",
        "|---|---|---|---|",
    ]
    for row in rows:
        fwd = row.get("forward_gflop") or report.get("reference_forward_gflop") or {}
        fwd_s = ", ".join(f"{m} {g:.4g}" for m, g in fwd.items()) or "as above"
        lines.append(
            f"| {row['method']} | {fwd_s} | {describe_counts(row['passes_per_image'])} | "
            f"{_fmt(row['gflop_per_image'], 'gflop_per_image')} |"
        )
    if report["methods"] and any(r.get("aa_images_per_s") for r in report["methods"]):
        lines += [
            "",
            "## AutoAttack (standard, L-inf 8/255, fp32)",
            "",
            "| method | images | clean acc | robust acc | img/s | s per 10k (scaled) | implementation |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in report["methods"]:
            if row.get("aa_images_per_s"):
                lines.append(
                    f"| {row['method']} | {row['aa_images']} | {row['aa_clean_acc']:.3f} | "
                    f"{row['aa_robust_acc']:.3f} | {_fmt(row['aa_images_per_s'], '')} | "
                    f"{_fmt(row['aa_s_per_10k'], '')} | {row['aa_impl']} |"
                )
        lines.append(
            "\nAutoAttack only attacks images still classified correctly, so its cost grows with the model's "
            "robustness: on untrained weights most images drop out at the clean check."
        )
    for cmp in report.get("compare_fast_path") or []:
        fast, plain = cmp["fast"], cmp["plain"]
        lines += [
            "",
            f"## Fast path vs plain: {cmp['method']} ({cmp['steps']} steps, same seed and batches)",
            "",
            f"fast path: amp={'bf16' if fast['amp'] else 'off'}, channels_last={fast['channels_last']}; "
            f"plain: amp={'bf16' if plain['amp'] else 'off'}, channels_last={plain['channels_last']}; "
            f"lr {fast['lr_span']} ({fast['lr_schedule']})",
            "",
            f"**{cmp['verdict']}**",
            "",
            "| quantity | fast path | plain | abs diff |",
            "|---|---|---|---|",
        ]
        for r in cmp["rows"]:
            cells = [
                _number(r["fast"], ".6g"),
                _number(r["plain"], ".6g"),
                _number(r["abs_diff"], ".3g", "–"),
            ]
            lines.append(f"| {r['quantity']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mlflow_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    keys = (
        "train_images_per_s",
        "step_ms",
        "median_step_ms",
        "gflop_per_image",
        "achieved_tflops",
        "peak_fraction",
        "peak_mem_mib",
        "pgd20_images_per_s",
        "aa_images_per_s",
        "aa_s_per_10k",
        "speedup_vs_reference",
    )
    metrics = {}
    for row in report["methods"]:
        metrics.update({f"{row['method']}/{k}": float(row[k]) for k in keys if row.get(k) is not None})
    if report.get("reference"):
        row = report["reference"]
        metrics.update({f"reference_d2r/{k}": float(row[k]) for k in keys if row.get(k) is not None})
    return metrics


def log_to_mlflow(report: Mapping[str, Any], folder: Path) -> str:
    """Log bench.md, bench.json, the options and the metrics to a run of the 'bench' experiment."""
    import mlflow

    from pipeline.tracking import configure_tracking, log_params, start_run

    configure_tracking()
    with start_run("bench") as run:
        log_params({k: v for k, v in report["meta"]["args"].items()})
        mlflow.set_tags({"robustflow.bench.machine": report["meta"]["machine"]})
        mlflow.log_metrics(_mlflow_metrics(report))
        mlflow.log_artifact(str(folder / "bench.md"))
        mlflow.log_artifact(str(folder / "bench.json"))
        return run.info.run_id


def write_report(report: Mapping[str, Any], folder: Path) -> None:
    """Write bench.md and bench.json into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.md").write_text(render_markdown(report))
    (folder / "bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
