"""Training speed: the step ``Trainer.fit`` runs, timed.

Per method (built from its gin config, with the backbones and batch size overridden) the bench runs
``Trainer.train_step`` itself (``TrainingGraph.step`` under the trainer's bf16 autocast, backward, its
gradient clipping, optimizer step; channels_last on CUDA only, fused SGD on CUDA, optional
``torch.compile``) and the scheduler step, with per-step statistics kept on the device and read once,
over ``--steps`` steps after ``--warmup`` steps, with the device synchronized around the timed region.
What is here is only what measuring needs: the per-step timer, the synchronization, the statistics.
Speed is measured here, never asserted in a test.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmarks.reference_d2r import peak_memory_mib, sync_device
from components.training import resolve_auto, step_losses
from pipeline.bench_health import SCHEDULE, finite_mean, loss_status, lr_scheduler_for, lr_span


def free_memory(device: torch.device) -> None:
    """Drop what the last measurement left (and reset CUDA's peak), so the next one starts clean."""
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
        """Record the time now (a CUDA event queued behind the work so far, on a GPU)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def durations_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (waits for the device once)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [1000 * (b - a) for a, b in zip(self.marks, self.marks[1:])]


def train_steps(
    trainer: Any,
    graph: Any,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[Tensor, Tensor, Tensor]],
    timer: StepTimer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    lrs: list[float] | None = None,
) -> list[Tensor]:
    """``Trainer``'s inner loop: ``trainer.train_step`` (the step ``Trainer.fit`` runs: autocast, backward,
    the trainer's gradient clipping, optimizer step), the scheduler step, stats on device.

    Returns one row per step, ``[loss, *parts (in term order), clean acc, adv acc]``, still on the device
    (the caller reads them once, as the Trainer does once per epoch). ``lrs`` collects the lr of the first
    parameter group each step ran at (a host-side float: no sync).
    """
    rows = []
    if timer is not None:
        timer.mark()
    term_names = list(graph.loss.terms)
    for x, y, _ in batches:
        if lrs is not None:
            lrs.append(float(optimizer.param_groups[0]["lr"]))
        out = trainer.train_step(graph, optimizer, x, y, x.device)
        if scheduler is not None:
            scheduler.step()
        accuracy = [(out[k].argmax(1) == y).float().mean() for k in ("clean_logits", "adv_logits")]
        rows.append(torch.cat([step_losses(out, term_names), torch.stack(accuracy)]))
        if timer is not None:
            timer.mark()
    return rows


def train_loader(images: Tensor, labels: Tensor, batch_size: int, data: Any, seed: int) -> Any:
    """Shuffled, augmented batches of the bench's images, as the config's ``DataModule`` would serve them."""
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
    graph, trainer = exp.graph, exp.trainer
    optimizer, amp = prepare_fast_path(exp, device)
    scheduler, schedule = lr_scheduler_for(exp, optimizer, lr, warmup + steps)
    lrs: list[float] = []
    batch_size = exp.data.batch_size
    batches = iter(train_loader(images, labels, batch_size, exp.data, seed))
    graph.train()
    free_memory(device)
    graphs_before = _compiled_graphs()
    t0 = time.perf_counter()
    warmed = None
    if warmup:
        warm = (next(batches) for _ in range(warmup))
        # Reading the rows waits for the warm-up steps (a read, as the Trainer's epoch end).
        warmed = torch.stack(train_steps(trainer, graph, optimizer, warm, None, scheduler, lrs)).cpu()
    sync_device(device)
    t1 = time.perf_counter()
    graphs_warm = _compiled_graphs()
    timer = StepTimer(device)
    rows = train_steps(
        trainer, graph, optimizer, (next(batches) for _ in range(steps)), timer, scheduler, lrs
    )
    timed = torch.stack(rows).cpu()  # the one host read, as the Trainer's per-epoch sync
    sync_device(device)
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
        "channels_last": resolve_auto(trainer.channels_last, device),
        "compile": bool(trainer.compile),
        # torch.compile: graphs dynamo compiled during the warm-up steps (both BN modes, grad modes) and
        # during the timed steps, which should be none: a recompile there is a per-step cost.
        "compiled_graphs_warmup": graphs_warm - graphs_before,
        "compiled_graphs_timed": _compiled_graphs() - graphs_warm,
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "lr_schedule": schedule,
        "lr_each": lrs,
        "lr_span": lr_span(lrs),
        **_loss_report(warmed, timed, ["loss", *graph.loss.terms]),
    }


def _compiled_graphs() -> int:
    """Graphs ``torch._dynamo`` has compiled in this process so far (0 when nothing was compiled)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _loss_report(warmed: Tensor | None, timed: Tensor, names: list[str]) -> dict[str, Any]:
    """``losses`` (means over the timed steps; None for a term that went non-finite) and the status of
    every step run, warm-up included (step 1 = the first warm-up step)."""
    every = torch.cat([warmed, timed]) if warmed is not None else timed
    status = loss_status(every, names)
    return {
        "losses": finite_mean(timed, names),
        "loss_status": status["text"],
        "loss_finite": status["finite"],
        "first_nonfinite_step": status["first_nonfinite_step"],
        "first_nonfinite_term": status["first_nonfinite_term"],
    }
