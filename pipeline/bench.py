"""The ``bench`` entry point: how fast each method trains and evaluates, what it costs in FLOPs, and how
much faster D2R-CAG runs here than the authors' loop on the same machine.

    python -m pipeline.bench --threads 1         # tiny CPU defaults: small_cnn, batch 32, 3 steps
    python -m pipeline.bench --learn --threads 1 # the learning check instead (pipeline/learn.py)
    python -m pipeline.bench --target wrn34_10 --guide resnet18_lbgat --batch-size 128 --steps 20 \\
        --warmup 5 --eval-images 1024 --eval-batch-size 256 --autoattack --aa-images 256 \\
        --compare-fast-path --out bench_gpu --mlflow                                    # H100 / H200

See docs/benchmarks.md for what each number means and the numbers measured so far.

Per method (built from its gin config, with the backbones and batch size overridden) it times
``TrainingGraph.step`` + backward + optimizer step exactly as ``Trainer`` runs them (bf16 autocast and
channels_last on CUDA only, fused SGD on CUDA, optional ``torch.compile``, per-step statistics summed on
the device and read once), over ``--steps`` steps after ``--warmup`` steps, with the device synchronized
around the timed region; then PGD-20 evaluation (``components.eval.attacks.robust_accuracy``) and,
optionally, AutoAttack 'standard'. Speed is measured here, never asserted in a test.

FLOPs per training image, counted in forward-pass equivalents of each backbone (``F_m`` =
``count_forward_flops(m, (C, H, W))``, 2 x MACs of convs and linears):

    FLOPs/image = sum_m F_m * (fwd_m + 1 * bwd_input_m + 2 * bwd_full_m)

* ``fwd``: forwards. The attack runs the attacked model once per step (``PGDGenerator.steps``; with
  ``init_view`` the first of them is also the loss view at x_init); a soft-label objective
  (TRADES/LBGAT/CAG) adds one no-grad forward of its soft-label model per batch; each loss view not
  produced by the attack is one forward; the step's accuracy metrics add a no-grad forward of the
  evaluated model on x or x_adv when no loss view already reads it.
* ``bwd_input``: one per attack step: the gradient w.r.t. the input only (parameters frozen), which
  costs about one forward (activation gradients, no weight gradients).
* ``bwd_full``: one per loss view: input and weight gradients, about two forwards.
* The optimizer, BN, activations and the loss terms are left out (O(parameters) or memory-bound).

So D2R-CAG with S attack steps costs ``(2S + 6) F_t + 4 F_g`` (target: S + 2 forwards, S input-only
backwards, 2 full backwards; guide: the soft label and the ``guide(x)`` view, 1 full backward), and the
authors' loop, which recomputes the guide at every attack step, ``(2S + 6) F_t + (S + 3) F_g``.

Achieved TFLOP/s = FLOPs/image x images/s. The fraction of peak divides it by ``--peak-tflops``: by
default 790 on CUDA, the measured bf16 dense matrix rate of H100/H200 named in the "Speed and scale"
issue; on CPU no fraction unless given.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.reference_d2r import peak_memory_mib, reference_flop_counts, run_reference
from components.training import resolve_auto
from pipeline.bench_health import SCHEDULE, finite_mean, loss_status, lr_scheduler_for, lr_span, parse_lr
from pipeline.config import ConfigError, load_config, macro, resolve_device

DEFAULT_METHODS = ("d2r_cag_cifar10", "lbgat_cifar10", "trades_cifar10", "pgd_at_cifar10", "regmix_cifar10")
# The method the authors' loop (benchmarks/reference_d2r.py) reproduces.
REFERENCE_METHOD = "d2r_cag_cifar10"
# Measured bf16 dense matrix rate of H100/H200 as stated in the "Speed and scale" issue (not the 989 TFLOP/s
# datasheet figure): the fraction of peak is against what the hardware actually sustains.
GPU_PEAK_TFLOPS = 790.0
EVAL_PGD_STEPS = 20
AA_EPS = 8 / 255

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


# ----------------------------------------------------------------------------------------------------------
# Command line


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


_GIN_SWITCH = {"auto": "'auto'", "on": "True", "off": "False"}


# ----------------------------------------------------------------------------------------------------------
# Data


def load_images(
    source: str, n_train: int, n_eval: int, data_dir: str | None, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """uint8 NHWC train and eval images with labels, and what they are ('cifar10' or 'synthetic').

    Training throughput does not depend on the pixels; evaluation does a little (PGD's early stop only
    masks updates, AutoAttack skips images it has already broken), and the fast-path comparison reads
    best on real images, so CIFAR-10 is used when it is found.
    """
    if source in ("auto", "cifar10"):
        from components.data import DataNotFoundError, load_arrays

        try:
            x_train, y_train = load_arrays("cifar10", data_dir, "train")
            x_test, y_test = load_arrays("cifar10", data_dir, "test")
        except DataNotFoundError:
            if source == "cifar10":
                raise
        else:
            rng = np.random.RandomState(seed)
            pick = rng.choice(len(x_train), size=n_train, replace=n_train > len(x_train))
            eval_pick = np.arange(n_eval) % len(x_test)
            return x_train[pick], y_train[pick], x_test[eval_pick], y_test[eval_pick], "cifar10"
    rng = np.random.RandomState(seed)
    x = rng.randint(0, 256, size=(n_train + n_eval, 32, 32, 3), dtype=np.uint8)
    y = rng.randint(0, 10, size=n_train + n_eval).astype(np.int64)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:], "synthetic"


def _to_device_nchw(x: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor]:
    images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous().to(device)
    return images, torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)


# ----------------------------------------------------------------------------------------------------------
# Building a method


def method_overrides(
    name: str, args: argparse.Namespace, fast_path: bool | None = None
) -> tuple[list[str], list[str]]:
    """Gin bindings for ``name``: backbones, batch size, fast-path switches, then ``--overrides``.

    Macro bindings are kept only where the config defines the macro (single-model methods have no
    GUIDE_BACKBONE): the second list holds the ones left out. ``fast_path`` False forces fp32/contiguous,
    True/None uses the command line's --amp and --channels-last.
    """
    load_config(method_spec(name, args))  # to learn which macros these configs define
    missing = object()
    wanted = [
        f"TARGET_BACKBONE = '{args.target}'",
        f"GUIDE_BACKBONE = '{args.guide}'",
        f"BATCH_SIZE = {args.batch_size}",
    ]
    wanted += [b.strip() for b in args.overrides.replace("\n", ";").split(";") if b.strip()]
    kept, skipped = [], []
    for binding in wanted:
        lhs = binding.split("=", 1)[0].strip()
        is_macro = "." not in lhs and "/" not in lhs
        (skipped if is_macro and macro(lhs, missing) is missing else kept).append(binding)
    amp, channels_last = ("off", "off") if fast_path is False else (args.amp, args.channels_last)
    kept += [
        f"Trainer.amp = {_GIN_SWITCH[amp]}",
        f"Trainer.channels_last = {_GIN_SWITCH[channels_last]}",
        f"Trainer.compile = {_GIN_SWITCH[args.compile]}",
        f"experiment.cudnn_benchmark = {_GIN_SWITCH[args.cudnn_benchmark]}",
        "Trainer.progress = False",
    ]
    return kept, skipped


def method_spec(name: str, args: argparse.Namespace) -> str:
    """The gin spec of one method: its config, then every ``--profile`` file (e.g. ``stable``)."""
    return ",".join([name, *getattr(args, "profile", [])])


def build_method(name: str, overrides: list[str]) -> Any:
    """Load ``name`` with ``overrides`` and build its experiment (graph, data, trainer), seeded."""
    from components.experiment import experiment

    load_config(name, overrides)
    return experiment()


def graph_pass_counts(graph: Any) -> dict[str, dict[str, int]]:
    """Forwards and backwards per training image, per model, of one ``TrainingGraph.step`` + backward.

    Derived from the graph's parts (see the module docstring): the attack's steps, objective and
    ``init_view``, the loss's views, and the metrics' extra forwards.
    """
    from components.views import parse_view

    counts = {name: {"fwd": 0, "bwd_input": 0, "bwd_full": 0} for name in graph.models}
    generator = graph.generator
    objective = generator.objective
    attacked = objective.model
    # Soft-label objectives run their soft-label model once per batch (prepare), not once per step.
    soft = getattr(objective, "soft_label_model", None)
    if soft is not None:
        counts[soft]["fwd"] += 1
    counts[attacked]["fwd"] += generator.steps
    counts[attacked]["bwd_input"] += generator.steps
    from_attack = {f"{attacked}(x_init)"} if generator.init_view else set()
    for view in graph.loss.views:
        model = parse_view(view).model
        if view not in from_attack:
            counts[model]["fwd"] += 1
        counts[model]["bwd_full"] += 1
    for inp in ("x", "x_adv"):
        if f"{graph.eval_model}({inp})" not in graph.loss.views:
            counts[graph.eval_model]["fwd"] += 1
    return counts


def flops_per_image(counts: Mapping[str, Mapping[str, int]], forward_flops: Mapping[str, int]) -> float:
    """``sum_m F_m * (fwd + bwd_input + 2 * bwd_full)``: forward-pass equivalents times each model's F."""
    return float(
        sum(forward_flops[m] * (c["fwd"] + c["bwd_input"] + 2 * c["bwd_full"]) for m, c in counts.items())
    )


def describe_counts(counts: Mapping[str, Mapping[str, int]]) -> str:
    """``'target 12 fwd + 10 bwd_in + 2 bwd = 26 F; guide ...'`` for the FLOP accounting table."""
    parts = []
    for m, c in counts.items():
        equiv = c["fwd"] + c["bwd_input"] + 2 * c["bwd_full"]
        parts.append(f"{m}: {c['fwd']} fwd + {c['bwd_input']} bwd_in + {c['bwd_full']} bwd = {equiv} F")
        if equiv == 0:
            parts[-1] = f"{m}: unused"
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager:
    return (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()
    )


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def prepare_fast_path(exp: Any, device: torch.device) -> tuple[torch.optim.Optimizer, bool]:
    """Put the graph on ``device`` as ``Trainer.fit`` does (channels_last, compile) and make its optimizer."""
    exp.trainer.prepare(exp.graph, device)
    return exp.trainer.optimizer_fn(exp.graph.models), exp.trainer.uses_amp(device)


class StepTimer:
    """Per-step times without host syncs: CUDA events on a GPU, ``perf_counter`` on CPU (synchronous there).

    ``mark()`` before the first step and after each one; ``durations_ms()`` reads them all at the end. The
    median of these resists a shared machine's bursts better than the total does.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def durations_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [1000 * (b - a) for a, b in zip(self.marks, self.marks[1:])]


def train_steps(
    graph: Any,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[Tensor, Tensor, Tensor]],
    amp: bool,
    timer: StepTimer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    lrs: list[float] | None = None,
    trainer: Any = None,
) -> list[Tensor]:
    """``Trainer``'s inner loop: ``trainer.train_step`` (the step ``Trainer.fit`` runs: autocast, backward,
    the trainer's gradient clipping, optimizer step), the scheduler step, stats on device. Without a
    trainer: ``graph.step`` under autocast (``amp``), backward, optimizer step.

    Returns one row per step, ``[loss, *parts (in term order), clean acc, adv acc]``, still on the device
    (the caller reads them once, as the Trainer does once per epoch). ``lrs`` collects the lr of the first
    parameter group each step ran at (a host-side float: no sync).
    """
    rows = []
    if timer is not None:
        timer.mark()
    term_names = list(graph.loss.terms)
    for x, y, _ in batches:
        device = x.device
        if lrs is not None:
            lrs.append(float(optimizer.param_groups[0]["lr"]))
        if trainer is not None:
            out = trainer.train_step(graph, optimizer, x, y, device)
        else:
            with _autocast(amp, device):
                out = graph.step(x, y)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        rows.append(
            torch.stack(
                [
                    out["loss"].detach().float(),
                    *(out["parts"][n].detach().float() for n in term_names),
                    (out["clean_logits"].argmax(1) == y).float().mean(),
                    (out["adv_logits"].argmax(1) == y).float().mean(),
                ]
            )
        )
        if timer is not None:
            timer.mark()
    return rows


def _loader(images: Tensor, labels: Tensor, batch_size: int, data: Any, seed: int) -> Any:
    from components.data import DeviceLoader

    return DeviceLoader(
        images,
        labels,
        batch_size,
        shuffle=True,
        drop_last=True,
        augment=data.augment,
        pad=data.pad,
        seed=seed,
    )


def bench_training(
    exp: Any,
    images: Tensor,
    labels: Tensor,
    steps: int,
    warmup: int,
    device: torch.device,
    seed: int,
    lr: str | float = SCHEDULE,
) -> dict[str, Any]:
    """Train ``warmup`` then ``steps`` batches through the real step; time the ``steps`` (device-synced).

    The lr follows the config's schedule from its first step (``lr='schedule'``) or is fixed at ``lr``;
    losses are reported as non-finite (with the first bad step and term) rather than averaged into NaN.
    """
    graph = exp.graph
    optimizer, amp = prepare_fast_path(exp, device)
    scheduler, schedule = lr_scheduler_for(exp, optimizer, lr, warmup + steps)
    lrs: list[float] = []
    batch_size = exp.data.batch_size
    batches = iter(_loader(images, labels, batch_size, exp.data, seed))
    graph.train()
    _free(device)
    graphs_before = _compiled_graphs()
    t0 = time.perf_counter()
    warm_rows = []
    if warmup:
        warm_rows = train_steps(
            graph, optimizer, (next(batches) for _ in range(warmup)), amp, None, scheduler, lrs, exp.trainer
        )
        torch.stack(warm_rows).tolist()  # wait for the warm-up steps (a read, as the Trainer's epoch end)
    _sync(device)
    t1 = time.perf_counter()
    graphs_warm = _compiled_graphs()
    timer = StepTimer(device)
    rows = train_steps(
        graph, optimizer, (next(batches) for _ in range(steps)), amp, timer, scheduler, lrs, exp.trainer
    )
    timed = torch.stack(rows).cpu()  # the one host read, as the Trainer's per-epoch sync
    _sync(device)
    elapsed = time.perf_counter() - t1
    step_ms = timer.durations_ms()
    return {
        "train_images_per_s": steps * batch_size / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "median_step_ms": float(np.median(step_ms)),
        "step_ms_each": step_ms,
        "warmup_s": t1 - t0,
        "peak_mem_mib": peak_memory_mib(device),
        "amp": amp,
        "channels_last": resolve_auto(exp.trainer.channels_last, device),
        "compile": bool(exp.trainer.compile),
        # torch.compile: graphs dynamo compiled during the warm-up steps (both BN modes, grad modes) and
        # during the timed steps, which should be none: a recompile there is a per-step cost.
        "compiled_graphs_warmup": graphs_warm - graphs_before,
        "compiled_graphs_timed": _compiled_graphs() - graphs_warm,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "lr_schedule": schedule,
        "lr_each": lrs,
        "lr_span": lr_span(lrs),
        **_loss_report(warm_rows, timed, ["loss", *graph.loss.terms]),
    }


def _compiled_graphs() -> int:
    """Graphs ``torch._dynamo`` has compiled in this process so far (0 when nothing was compiled)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _loss_report(warm_rows: list[Tensor], timed: Tensor, names: list[str]) -> dict[str, Any]:
    """``losses`` (means over the timed steps; None for a term that went non-finite) and the status of
    every step run, warm-up included (step 1 = the first warm-up step)."""
    every = torch.cat([torch.stack(warm_rows).cpu(), timed]) if warm_rows else timed
    status = loss_status(every, names)
    return {
        "losses": finite_mean(timed, names),
        "loss_status": status["text"],
        "loss_finite": status["finite"],
        "first_nonfinite_step": status["first_nonfinite_step"],
        "first_nonfinite_term": status["first_nonfinite_term"],
    }


def load_eval_checkpoint(model: nn.Module, path: str | Path) -> bool:
    """Load a robustflow checkpoint's target weights into ``model``; False if the architecture differs."""
    from components.checkpoint import load_checkpoint, strip_module_prefix

    state = load_checkpoint(path)
    weights = state["model"] if "model" in state else state["models"]["target"]
    try:
        model.load_state_dict(strip_module_prefix(weights), strict=True)
    except RuntimeError:
        return False
    return True


def bench_pgd_eval(
    model: nn.Module, images: Tensor, labels: Tensor, batch_size: int, amp: bool, warmup: bool
) -> dict[str, Any]:
    """PGD-20 evaluation throughput of ``robust_accuracy`` (clean forward, 20 steps, adversarial forward)."""
    from components.data import DeviceLoader
    from components.eval.attacks import robust_accuracy

    device = images.device
    loader = DeviceLoader(images, labels, batch_size)
    with _autocast(amp, device):
        if warmup:
            first = DeviceLoader(images[:batch_size], labels[:batch_size], batch_size)
            robust_accuracy(model, first, attack_steps=EVAL_PGD_STEPS)
        _sync(device)
        t0 = time.perf_counter()
        acc = robust_accuracy(model, loader, attack_steps=EVAL_PGD_STEPS)
        _sync(device)
    elapsed = time.perf_counter() - t0
    return {"pgd20_images_per_s": len(labels) / elapsed, "pgd20_eval": acc}


def _autoattack_runner() -> tuple[str, Callable[..., tuple[Tensor, list[str]]]]:
    """AutoAttack through robustflow's wrapper (``components.eval.autoattack.AutoAttack``) when it exists,
    else through ``pyautoattack`` directly. The runner returns x_adv and the attack's warnings."""
    if importlib.util.find_spec("components.eval.autoattack") is not None:
        from components.eval.autoattack import AutoAttack as RobustflowAutoAttack

        def run_wrapper(
            model: nn.Module, x: Tensor, y: Tensor, *, eps: float, version: str, batch_size: int
        ) -> tuple[Tensor, list[str]]:
            attack = RobustflowAutoAttack(eps=eps, version=version, batch_size=batch_size, seed=0)
            return attack(model, x, y), list(attack.flags)

        return "components.eval.autoattack.AutoAttack", run_wrapper

    def run_direct(
        model: nn.Module, x: Tensor, y: Tensor, *, eps: float, version: str, batch_size: int
    ) -> tuple[Tensor, list[str]]:
        from pyautoattack import AutoAttack

        attack = AutoAttack(model, norm="Linf", eps=eps, version=version, device=x.device, seed=0)
        x_adv, _ = attack.run_standard_evaluation(x, y, batch_size=batch_size)
        return x_adv, []

    return "pyautoattack.AutoAttack", run_direct


def bench_autoattack(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int) -> dict[str, Any]:
    """AutoAttack 'standard' (L-inf, 8/255, fp32) on a few images: images/s and the time scaled to 10k.

    Its cost scales with the images that stay robust (each attack runs only on those): read the clean
    and robust accuracy next to the speed, and use ``--eval-checkpoint`` for a trained model's cost.
    """
    impl, run = _autoattack_runner()
    device = images.device
    x = images.float() / 255
    was_training = model.training
    model.eval()
    try:
        _sync(device)
        t0 = time.perf_counter()
        x_adv, flags = run(model, x, labels, eps=AA_EPS, version="standard", batch_size=batch_size)
        _sync(device)
        elapsed = time.perf_counter() - t0
        with torch.no_grad():
            clean = (model(x).argmax(1) == labels).float().mean().item()
            robust = (model(x_adv).argmax(1) == labels).float().mean().item()
    finally:
        model.train(was_training)
    return {
        "aa_images_per_s": len(labels) / elapsed,
        "aa_images": len(labels),
        "aa_s_per_10k": elapsed / len(labels) * 10_000,
        "aa_clean_acc": clean,
        "aa_robust_acc": robust,
        "aa_impl": impl,
        "aa_flags": flags,
    }


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

    overrides, skipped = method_overrides(name, args)
    exp = build_method(method_spec(name, args), overrides)
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
    row["achieved_tflops"] = flops * row["train_images_per_s"] / 1e12
    row["peak_fraction"] = row["achieved_tflops"] / peak_tflops if peak_tflops else None
    row["pgd20_gflop_per_image"] = forward_flops[graph.eval_model] * (2 + 2 * EVAL_PGD_STEPS) / 1e9
    row["pgd20_images_per_s"] = row["aa_images_per_s"] = None
    target = graph.target
    if evaluate:
        if args.eval_checkpoint:
            row["eval_checkpoint_loaded"] = load_eval_checkpoint(target, args.eval_checkpoint)
        row.update(
            bench_pgd_eval(target, *data["eval"], args.eval_batch_size, row["amp"], warmup=args.warmup > 0)
        )
        if args.autoattack == "on":
            row.update(bench_autoattack(target, *data["aa"], args.eval_batch_size))
    del exp, graph, target
    _free(device)
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

    overrides, _ = method_overrides(REFERENCE_METHOD, args, fast_path=False)
    exp = build_method(method_spec(REFERENCE_METHOD, args), overrides)
    target, guide = exp.graph.models["target"].to(device), exp.graph.models["guide"].to(device)
    generator = exp.graph.generator
    shape = exp.data.image_shape
    counts = reference_flop_counts(generator.steps)
    forward_flops = {"target": count_forward_flops(target, shape), "guide": count_forward_flops(guide, shape)}
    flops = flops_per_image(counts, forward_flops)
    _free(device)
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
    row["achieved_tflops"] = flops * row["train_images_per_s"] / 1e12
    row["peak_fraction"] = row["achieved_tflops"] / peak_tflops if peak_tflops else None
    del exp, target, guide
    _free(device)
    return row


# ----------------------------------------------------------------------------------------------------------
# Fast path vs plain


def compare_fast_path(
    name: str, args: argparse.Namespace, data: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    """Train ``name`` for ``--steps`` steps twice, fast path as configured and plain fp32/contiguous.

    Same seed (same initial weights, attack noise), same batches and augmentations: the differences are
    what bf16 autocast (and NHWC kernels) change. Reports each loss term at step 1, averaged over the steps
    and at the last step, training accuracy, and clean/PGD-20 accuracy of the trained target on the eval
    images.
    """
    from components.data import DeviceLoader
    from components.eval.attacks import robust_accuracy

    runs = {}
    for label, fast in (("fast", None), ("plain", False)):
        overrides, _ = method_overrides(name, args, fast_path=fast)
        exp = build_method(method_spec(name, args), overrides)
        optimizer, amp = prepare_fast_path(exp, device)
        scheduler, schedule = lr_scheduler_for(exp, optimizer, args.lr, args.steps)
        lrs: list[float] = []
        exp.graph.train()
        torch.manual_seed(args.seed)  # the attack's random init draws from the global generator
        loader = _loader(*data["train"], exp.data.batch_size, exp.data, args.seed)
        batches = iter(loader)
        steps = (next(batches) for _ in range(args.steps))
        done = train_steps(exp.graph, optimizer, steps, amp, None, scheduler, lrs, exp.trainer)
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
        with _autocast(amp, device):
            acc = robust_accuracy(
                exp.graph.target,
                DeviceLoader(*data["eval"], args.eval_batch_size),
                attack_steps=EVAL_PGD_STEPS,
            )
        values.update({f"eval/{k}": v for k, v in acc.items()})
        runs[label] = {
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
        _free(device)
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


# ----------------------------------------------------------------------------------------------------------
# Report


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


def _machine(device: torch.device) -> str:
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
        "train": _to_device_nchw(x_train, y_train, device),
        "train_nhwc": (x_train, y_train),
        "eval": _to_device_nchw(x_eval[: args.eval_images], y_eval[: args.eval_images], device),
        "aa": _to_device_nchw(x_eval[: args.aa_images], y_eval[: args.aa_images], device),
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
        "machine": _machine(device),
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


if __name__ == "__main__":
    sys.exit(main())
