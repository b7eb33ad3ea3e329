"""Stability study: does each method's training step hold on real backbones at the lrs its schedule uses?

    python -m benchmarks.stability                                   # CPU table (docs/stability.md)
    python -m benchmarks.stability --profile stable                  # the same with gin/stable.gin appended
    python -m benchmarks.stability --targets wrn34_10 --batch-size 128 --phases 0.02:391,0.1:300 \\
        --methods d2r_cag_cifar10 --device cuda    # the authors' D2R-CAG: 1 epoch at 0.02, 300 steps at 0.1

For each method x target x lr it builds the experiment from the method's own gin config (backbones, batch
size and attack steps overridden; ``--profile`` files appended after it, as ``-P gin=method,stable`` does),
sets every parameter group to a fixed lr (the schedule is off: 0.02 is the LBGAT/D2R warm-up epoch's lr, 0.1
their main phase's and TRADES' lr from the first step) and runs ``Trainer.train_step``, the step training
runs (clipping included when the profile turns it on), on the same real CIFAR-10 batches from the same
initial weights (``--phases lr:steps,...`` instead runs the phases one after another on the same models,
as one trajectory per method). A run *diverges* at the first step whose loss exceeds ``--factor`` (10)
times the first step's loss or is non-finite. For D2R-CAG, ``--reference`` also runs the authors' loop
(``benchmarks/reference_d2r.py``) from the same weights on the same batches.

Runs without MLflow or Optuna (gin, torch, numpy). Writes ``stability.md`` and ``stability.json`` to
``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gin
import numpy as np
import torch
from torch import Tensor

from benchmarks.reference_d2r import D2R_WEIGHTS, d2r_step
from components.training import step_losses
from pipeline.config import load_config

DEFAULT_METHODS = (
    "d2r_cag_cifar10",
    "d2r_cifar10",
    "lbgat_cifar10",
    "trades_cifar10",
    "pgd_at_cifar10",
    "regmix_cifar10",
    "pgd2_mse_cifar10",
    "mart_cifar10",
    "fat_cifar10",
    "fat_trades_cifar10",
    "gairat_cifar10",
    "sat_cifar10",
    "pgd_at_awp_cifar10",
    "trades_awp_cifar10",
    "rat_trades_cifar10",
    "las_at_cifar10",
)
DATA = Path(os.environ.get("ROBUSTFLOW_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


@dataclass
class Trajectory:
    """The losses of one study run, and where (if anywhere) it diverged."""

    method: str
    target: str
    lr: float
    profile: str
    loop: str  # 'robustflow' or 'authors'
    losses: list[float] = field(default_factory=list)
    terms: dict[str, list[float]] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def diverged_at(self, factor: float) -> int | None:
        """1-indexed step at which the loss first exceeds ``factor`` x the first loss or is non-finite."""
        start = self.losses[0] if self.losses else math.nan
        for i, loss in enumerate(self.losses, 1):
            if not math.isfinite(loss) or (math.isfinite(start) and loss > factor * abs(start)):
                return i
        return None

    def worst_term(self) -> str:
        """The term with the largest weighted share of the loss where it peaked (or first went non-finite)."""
        if not self.terms:
            return ""
        bad = [i for i, v in enumerate(self.losses) if not math.isfinite(v)]
        finite = [v if math.isfinite(v) else -math.inf for v in self.losses]
        step = bad[0] if bad else max(range(len(finite)), key=finite.__getitem__)

        def share(name: str) -> float:
            value = self.terms[name][step] if step < len(self.terms[name]) else math.nan
            return math.inf if not math.isfinite(value) else self.weights.get(name, 1.0) * value

        name = max(self.terms, key=share)
        value = share(name)
        return f"{name} ({value:.3g} of {self.losses[step]:.3g} at step {step + 1})"


def load_batches(data_dir: Path, batch_size: int, steps: int, device: torch.device) -> list[tuple]:
    """``steps`` real CIFAR-10 training batches, in shard order (train-1.npz, train-2.npz, ... as far as
    needed, starting over when the shards run out), as [0, 1] NCHW floats on ``device``."""
    shards = sorted((data_dir / "cifar10").glob("train-*.npz"))
    if not shards:
        raise SystemExit(
            f"stability: no CIFAR-10 shards (train-*.npz) under {data_dir / 'cifar10'} (pass --data)"
        )
    n, xs, ys = batch_size * steps, [], []
    for shard in shards:
        with np.load(shard) as archive:
            xs.append(archive["x"][:n])
            ys.append(archive["y"][:n].astype(np.int64))
        if sum(len(y) for y in ys) >= n:
            break
    x = torch.from_numpy(np.concatenate(xs)).permute(0, 3, 1, 2).float().div(255).to(device)
    y = torch.from_numpy(np.concatenate(ys)).to(device)
    full = len(y) // batch_size
    return [
        (x[j * batch_size : (j + 1) * batch_size], y[j * batch_size : (j + 1) * batch_size])
        for j in (i % full for i in range(steps))
    ]


def build(method: str, profile: list[str], overrides: list[str]):  # noqa: ANN201  (an Experiment)
    """Build the experiment of ``method`` with the profile files appended and the size overrides."""
    from components.experiment import experiment

    load_config(",".join([method, *profile]), overrides, skip_undefined_macros=True)
    return experiment()


def run_robustflow(exp, batches: list[tuple], lrs: list[float], device: torch.device) -> Trajectory:  # noqa: ANN001
    """Robustflow's training step (``Trainer.train_step``, fast path included) at the lr given per step."""
    graph, trainer = exp.graph, exp.trainer
    trainer.prepare(graph, device)
    optimizer = trainer.optimizer_fn(graph.models)
    graph.train()
    traj = Trajectory("", "", lrs[-1], "", "robustflow")
    names = list(graph.loss.terms)
    traj.terms = {n: [] for n in names}
    traj.weights = {n: w for n, (w, _) in graph.loss.terms.items()}
    t0 = time.perf_counter()
    for (x, y), lr in zip(batches, lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        out = trainer.train_step(graph, optimizer, x, y, device)
        loss, *parts = step_losses(out, names).tolist()  # one read per step
        traj.losses.append(loss)
        for n, v in zip(names, parts):
            traj.terms[n].append(v)
        if not math.isfinite(traj.losses[-1]):
            break  # everything after a NaN is NaN
    traj.seconds = time.perf_counter() - t0
    return traj


def run_authors(models: dict, batches: list[tuple], lrs: list[float], attack_steps: int) -> Trajectory:
    """The authors' D2R-CAG loop: one SGD over both models (momentum 0.9, wd 2e-4), fp32, lr per step."""
    target, guide = models["target"], models["guide"]
    params = [*target.parameters(), *guide.parameters()]
    optimizer = torch.optim.SGD(params, lr=lrs[0], momentum=0.9, weight_decay=2e-4)
    traj = Trajectory("", "", lrs[-1], "", "authors")
    names = ("ce_guide", "mse", "kl_gap", "kl_adv")
    traj.terms = {n: [] for n in names}
    traj.weights = dict(D2R_WEIGHTS)
    t0 = time.perf_counter()
    for (x, y), lr in zip(batches, lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        out = d2r_step(target, guide, optimizer, x, y, perturb_steps=attack_steps)
        loss, *parts = torch.stack([out[n].detach().float() for n in ("loss", *names)]).tolist()
        traj.losses.append(loss)
        for n, v in zip(names, parts):
            traj.terms[n].append(v)
        if not math.isfinite(traj.losses[-1]):
            break
    traj.seconds = time.perf_counter() - t0
    return traj


def feature_norms(backbones: list[str], batch: tuple, device: torch.device) -> dict[str, float]:
    """Mean squared norm of each backbone's penultimate features (the classifier's input) at init, train mode.

    The logit-space MSE is a quadratic in the classifier's weights with curvature ``2 E||h||^2 / K`` per
    model ('mean' over B*K): plain gradient descent on it overshoots and grows once ``lr x curvature > 2``.
    """
    from components.backbones.registry import build_backbone

    norms = {}
    for name in backbones:
        torch.manual_seed(0)
        model = build_backbone(name, num_classes=10).to(device).train()
        linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        seen: list[Tensor] = []
        handle = linear.register_forward_hook(lambda mod, args, out, seen=seen: seen.append(args[0].detach()))
        with torch.no_grad():
            model(batch[0])
        handle.remove()
        norms[name] = float(seen[-1].flatten(1).pow(2).sum(1).mean())
    return norms


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.stability", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument(
        "--targets", default="resnet18,preact_resnet18", help="target backbones, comma-separated"
    )
    parser.add_argument("--guide", default="resnet18_lbgat")
    parser.add_argument("--lrs", default="0.02,0.1")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument(
        "--phases",
        default="",
        help="'lr:steps,...' run in sequence on the same models (replaces --lrs/--steps)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--attack-steps", type=int, default=None, help="override ATTACK_STEPS (default: config's)"
    )
    parser.add_argument("--profile", default="", help="gin files appended to each experiment, e.g. 'stable'")
    parser.add_argument(
        "--overrides",
        default="",
        help="more gin bindings for every run, ';'-separated (e.g. a method's own sizes: "
        "'STRATEGY_ITERATIONS = (3, 4, 5)')",
    )
    parser.add_argument("--factor", type=float, default=10.0, help="diverged: loss > factor x first loss")
    parser.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the authors' loop for D2R-CAG",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--data", default=str(DATA), help="folder holding cifar10/train-1.npz")
    parser.add_argument("--out", default="stability_out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--epoch",
        type=int,
        default=1,
        help="the epoch (1-based) set_epoch announces before the steps, for epoch-scheduled parts "
        "(FAT's tau, GAIRAT's burn-in, SAT's curriculum)",
    )
    parser.add_argument(
        "--render", default="", help="re-render stability.md from a stability.json, run nothing"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return render(Path(args.render), Path(args.out))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    profile = [p.strip() for p in args.profile.split(",") if p.strip()]
    if args.phases:  # one trajectory per method through every phase
        per_step = [
            float(lr) for part in args.phases.split(",") for lr, k in [part.split(":")] for _ in range(int(k))
        ]
        plans = [per_step]
    else:
        plans = [[float(v)] * args.steps for v in args.lrs.split(",") if v.strip()]
    lrs = sorted({lr for plan in plans for lr in plan})
    batches = load_batches(Path(args.data), args.batch_size, max(len(p) for p in plans), device)
    results: list[Trajectory] = []
    for method in methods:
        for target in targets:
            overrides = [
                f"TARGET_BACKBONE = '{target}'",
                f"GUIDE_BACKBONE = '{args.guide}'",
                f"BATCH_SIZE = {args.batch_size}",
                f"SEED = {args.seed}",
            ]
            if args.attack_steps is not None:
                overrides.append(f"ATTACK_STEPS = {args.attack_steps}")
            overrides += [o.strip() for o in args.overrides.split(";") if o.strip()]
            for plan in plans:
                exp = build(method, profile, overrides)
                exp.graph.set_epoch(args.epoch, exp.trainer.epochs)
                reference = args.reference and method == "d2r_cag_cifar10"
                # The authors' loop starts from the same initial weights: copied only when it runs.
                initial = {n: copy.deepcopy(m) for n, m in exp.graph.models.items()} if reference else {}
                steps = exp.graph.generator.steps
                torch.manual_seed(args.seed)
                runs = [run_robustflow(exp, batches, plan, device)]
                if reference:
                    torch.manual_seed(args.seed)
                    runs.append(
                        run_authors({n: m.to(device) for n, m in initial.items()}, batches, plan, steps)
                    )
                for traj in runs:
                    traj.method, traj.target, traj.profile = method, target, "+".join(profile) or "faithful"
                    results.append(traj)
                    at = traj.diverged_at(args.factor)
                    print(
                        f"{method:18s} {target:16s} lr={traj.lr:<5g} {traj.loop:10s} "
                        f"{'DIVERGED at step ' + str(at) if at else 'holds':22s} "
                        f"losses {' '.join(f'{v:.4g}' for v in traj.losses[:12])}"
                        f"{' ...' if len(traj.losses) > 12 else ''}  [{traj.seconds:.0f}s]",
                        flush=True,
                    )
                del exp, initial
                gin.clear_config()
    norms = feature_norms(sorted({*targets, args.guide, "small_cnn"}), batches[0], device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stability.md").write_text(table(results, args) + "\n" + norm_table(norms, lrs))
    (out / "stability.json").write_text(
        json.dumps(
            {"args": vars(args), "runs": [asdict(r) for r in results], "feature_norms": norms}, indent=1
        )
    )
    print(f"stability: wrote {out / 'stability.md'}", file=sys.stderr)
    return 0


def render(path: Path, out: Path) -> int:
    """Write stability.md again from a stability.json (e.g. after the table's columns changed)."""
    saved = json.loads(path.read_text())
    runs = [Trajectory(**r) for r in saved["runs"]]
    for run in runs:
        if not run.weights:  # older files: the weights are the configs' own
            run.weights = dict(D2R_WEIGHTS) if run.loop == "authors" else _weights(run.method)
    args = argparse.Namespace(**{"phases": "", **saved["args"]})
    lrs = sorted({r.lr for r in runs})
    out.mkdir(parents=True, exist_ok=True)
    (out / "stability.md").write_text(table(runs, args) + "\n" + norm_table(saved["feature_norms"], lrs))
    return 0


def _weights(method: str) -> dict[str, float]:
    from components.experiment import experiment

    load_config(f"{method},smoke")
    return {n: w for n, (w, _) in experiment().graph.loss.terms.items()}


def table(results: list[Trajectory], args: argparse.Namespace) -> str:
    """The markdown table of the study, with the command's settings and the machine."""
    lines = [
        f"Settings: batch {args.batch_size}, {args.phases or str(args.steps) + ' steps'}, attack steps "
        f"{args.attack_steps or 'as configured'}, guide {args.guide}, profile '{args.profile or 'none'}', "
        f"epoch {getattr(args, 'epoch', 1)}, "
        f"{('overrides ' + repr(args.overrides) + ', ') if getattr(args, 'overrides', '') else ''}"
        f"device {args.device}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads. Diverged = loss > {args.factor:g}x step 1 or non-finite.",
        "",
        "| method | target | lr | loop | step 1 loss | max loss | last loss | diverged at "
        "| largest weighted term |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        at = r.diverged_at(args.factor)
        finite = [v for v in r.losses if math.isfinite(v)]
        lines.append(
            f"| {r.method} | {r.target} | {r.lr:g} | {r.loop} | {r.losses[0]:.4g} | "
            f"{max(finite) if finite else math.nan:.4g} | {r.losses[-1]:.4g} | "
            f"{'step ' + str(at) if at else '-'} | {r.worst_term()} |"
        )
    return "\n".join(lines) + "\n"


def norm_table(norms: dict[str, float], lrs: list[float], classes: int = 10) -> str:
    """Penultimate feature norms at init and the step size they imply for a logit-space MSE."""
    head = " | ".join(f"lr {lr:g} x 2E‖h‖²/K" for lr in lrs)
    lines = [f"| backbone | E‖h‖² at init | {head} |", "|---|---|" + "---|" * len(lrs)]
    for name, sq in norms.items():
        cells = " | ".join(f"{lr * 2 * sq / classes:.3g}" for lr in lrs)
        lines.append(f"| {name} | {sq:.4g} | {cells} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
