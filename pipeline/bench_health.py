"""What the bench's training steps ran at and whether they stayed finite.

Two ways the first bench misled: it ran every method at its base lr (0.1) from the first step, where the
configs' own schedules start at a warm-up lr (0.02 for LBGAT/D2R), so two-model methods went to NaN within 20
steps; and it averaged NaN losses into a number-looking table cell and compared two NaN runs as if they were
results. This module holds the fixes, kept out of ``pipeline/bench/`` so that the bench and the learning
check share them:

* :func:`lr_scheduler_for`: the config's own schedule stepped per iteration exactly as ``Trainer.fit`` steps
  it (bound to the length of a real epoch of the config's data, so the first steps get the warm-up lr), or a
  stated fixed lr.
* :func:`loss_status`: per-step finiteness of the loss rows, the first bad step and term, as data and as
  the text the tables print instead of ``nan``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from components.schedules import make_lr_scheduler

#: Training images of the built-in datasets' full training sets, for the length of a real epoch.
TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "tinyimagenet": 100_000, "mnist": 60_000}

#: The ``--lr`` value meaning "each config's own schedule".
SCHEDULE = "schedule"


def parse_lr(value: str) -> str | float:
    """``'schedule'`` or a positive float: the bench's ``--lr`` (argparse ``type``)."""
    if value == SCHEDULE:
        return SCHEDULE
    try:
        lr = float(value)
    except ValueError:
        lr = math.nan
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr must be 'schedule' or a positive number, got {value!r}")
    return lr


def epoch_steps(data: Any, min_steps: int = 1) -> int:
    """Iterations of one real epoch of ``data`` (a ``DataModule``), from its sizes, without loading it.

    ``train_size`` when the config sets one, else the dataset's full training set less ``val_size``; the
    loader drops the ragged last batch, hence the floor. At least ``min_steps`` (the bench's own steps), so
    that the bench never runs past the epoch it was bound to.
    """
    images = data.train_size
    if images is None:
        images = TRAIN_IMAGES.get(data.dataset, 50_000) - data.val_size
    return max(images // data.batch_size, min_steps, 1)


def lr_scheduler_for(
    exp: Any, optimizer: torch.optim.Optimizer, lr: str | float, total_steps: int
) -> tuple[torch.optim.lr_scheduler.LRScheduler | None, str]:
    """The scheduler the bench steps after every optimizer step (None for a fixed lr), and what it is.

    ``lr == 'schedule'``: ``exp.trainer.schedule`` bound as ``Trainer.fit`` binds it (a real epoch of the
    config's data, ``Trainer.epochs`` epochs, and the trainer's linear lr ramp where it has one). A float:
    every parameter group at that lr for every step, the schedule ignored.
    """
    if lr != SCHEDULE:
        for group in optimizer.param_groups:
            group["lr"] = float(lr)
        return None, f"fixed {float(lr):g}"
    trainer = exp.trainer
    spe = epoch_steps(exp.data, total_steps)
    ramp = trainer.lr_ramp_epochs
    scheduler = make_lr_scheduler(optimizer, trainer.schedule, spe, trainer.epochs, ramp)
    what = f"{type(trainer.schedule).__name__} ({trainer.epochs} epochs of {spe} steps)"
    return scheduler, what + (f", lr ramp {ramp:g} epochs" if ramp else "")


def lr_span(lrs: Sequence[float]) -> str:
    """``'0.02'`` when every step ran at one lr, else ``'0.002 → 0.02'`` (first → last)."""
    if not lrs:
        return "–"
    first, last = lrs[0], lrs[-1]
    return f"{first:.4g}" if math.isclose(first, last) else f"{first:.4g} → {last:.4g}"


def loss_status(rows: Tensor | Sequence[Sequence[float]], names: Sequence[str]) -> dict[str, Any]:
    """Finiteness of per-step loss rows ``[loss, *terms, ...]`` (columns beyond ``names`` are ignored).

    Returns ``finite`` (every step, every named column), ``nonfinite_steps`` (how many steps had a bad
    value), ``first_nonfinite_step`` (1-indexed, None when finite) and ``first_nonfinite_term`` (the first
    named column bad at that step), and ``text``, what a table prints.
    """
    values = torch.as_tensor(rows, dtype=torch.float64).reshape(len(rows), -1)[:, : len(names)]
    bad = ~torch.isfinite(values)
    bad_steps = bad.any(1).nonzero().flatten().tolist()
    status: dict[str, Any] = {
        "finite": not bad_steps,
        "nonfinite_steps": len(bad_steps),
        "steps": len(values),
        "first_nonfinite_step": None,
        "first_nonfinite_term": None,
    }
    if bad_steps:
        first = bad_steps[0]
        status["first_nonfinite_step"] = first + 1
        # Name a loss term rather than the total where one went bad at that step (the total follows it).
        columns = bad[first].nonzero().flatten().tolist()
        terms = [c for c in columns if c > 0]
        status["first_nonfinite_term"] = names[(terms or columns)[0]]
        status["text"] = (
            f"NON-FINITE from step {first + 1} ({status['first_nonfinite_term']}; "
            f"{len(bad_steps)}/{len(values)} steps)"
        )
    else:
        status["text"] = "finite"
    return status


def finite_mean(rows: Tensor, names: Sequence[str]) -> dict[str, float | None]:
    """Mean of each named column over the rows, or None for a column with any non-finite value: a NaN run
    has no average loss, and printing one would make it look like a result."""
    values = torch.as_tensor(rows, dtype=torch.float64).reshape(len(rows), -1)
    out: dict[str, float | None] = {}
    for i, name in enumerate(names):
        column = values[:, i]
        out[name] = float(column.mean()) if bool(torch.isfinite(column).all()) else None
    return out
