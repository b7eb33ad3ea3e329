"""Learning-rate schedules as multipliers of the base lr, evaluated per iteration.

Each schedule is a picklable callable ``factor(step)`` bound to the run's length by ``bind``; the
training loop wraps it in ``torch.optim.lr_scheduler.LambdaLR`` and steps it once per iteration, so
per-epoch schedules (the papers') and per-iteration ones (FGSM-PGK's MultiStepLR) share one mechanism
and one checkpointable state.
"""

from __future__ import annotations

import gin
import torch


class Schedule:
    """Base: ``factor(step)`` for a run of ``epochs`` epochs of ``steps_per_epoch`` iterations.

    ``bind(..., ramp_epochs=r)`` multiplies the schedule by a linear ramp from ``1/R`` to 1 over the first
    ``R = r * steps_per_epoch`` iterations (a stabilizer, ``Trainer.lr_ramp_epochs``; 0, the papers' setting,
    leaves every factor exactly as the schedule gives it). The ramp is a plain attribute so that the
    scheduler's state_dict stays loadable with ``weights_only``.
    """

    steps_per_epoch: int = 1
    epochs: int = 1
    ramp_steps: int = 0

    def bind(self, steps_per_epoch: int, epochs: int, ramp_epochs: float = 0.0) -> Schedule:
        if steps_per_epoch < 1 or epochs < 1:
            raise ValueError(
                f"schedule needs steps_per_epoch >= 1 and epochs >= 1, got {steps_per_epoch}, {epochs}"
            )
        if not (isinstance(ramp_epochs, (int, float)) and ramp_epochs >= 0):
            raise ValueError(f"lr ramp epochs must be a number >= 0, got {ramp_epochs!r}")
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.ramp_steps = int(round(ramp_epochs * steps_per_epoch))
        return self

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def __call__(self, step: int) -> float:
        value = self.factor(step)
        if step < self.ramp_steps:
            value *= (step + 1) / self.ramp_steps
        return value

    def factor(self, step: int) -> float:
        """The schedule's own multiplier of the base lr at iteration ``step`` (0-indexed)."""
        raise NotImplementedError


@gin.configurable
class PaperStepSchedule(Schedule):
    """LBGAT/D2R ``adjust_learning_rate``: set per epoch (1-indexed) at its start.

    Epochs ``<= warmup_epochs`` use ``warmup_factor`` (0.02 / 0.1 = 0.2); afterwards the lr is multiplied
    by ``gamma`` once for each milestone fraction m with ``epoch > m * epochs``. For 100 epochs this is
    0.02 (epoch 1), 0.1 (2-75), 0.01 (76-90), 0.001 (91-100). ``milestone_epochs`` gives absolute epochs
    instead (a drop from that epoch on), for TRADES' 75/90/100 of a 76-epoch run. ``factors`` gives the
    multiplier from each milestone on directly instead of powers of ``gamma`` (FAT and GAIRAT: x0.1, x0.01,
    x0.005 from epochs 60, 90, 110).
    """

    def __init__(
        self,
        warmup_epochs: int = 1,
        warmup_factor: float = 0.2,
        milestones: tuple[float, ...] = (0.75, 0.90),
        gamma: float = 0.1,
        milestone_epochs: tuple[int, ...] | None = None,
        factors: tuple[float, ...] | None = None,
    ) -> None:
        self.warmup_epochs, self.warmup_factor = warmup_epochs, warmup_factor
        self.milestones, self.gamma = tuple(milestones), gamma
        self.milestone_epochs = tuple(milestone_epochs) if milestone_epochs is not None else None
        self.factors = tuple(factors) if factors is not None else None
        count = len(self.milestone_epochs if self.milestone_epochs is not None else self.milestones)
        if self.factors is not None and len(self.factors) != count:
            raise ValueError(f"PaperStepSchedule: {len(self.factors)} factors for {count} milestones")

    def factor(self, step: int) -> float:
        epoch = step // self.steps_per_epoch + 1
        if epoch <= self.warmup_epochs:
            return self.warmup_factor
        if self.milestone_epochs is not None:
            drops = sum(epoch >= m for m in self.milestone_epochs)
        else:
            drops = sum(epoch > m * self.epochs for m in self.milestones)
        if self.factors is not None:
            return self.factors[drops - 1] if drops else 1.0
        return self.gamma**drops


@gin.configurable
class MultiStepSchedule(Schedule):
    """FGSM-PGI/PGK: ``MultiStepLR`` stepped per iteration, x``gamma`` at fractions of all iterations."""

    def __init__(self, milestones: tuple[float, ...] = (100 / 110, 105 / 110), gamma: float = 0.1) -> None:
        self.milestones, self.gamma = tuple(milestones), gamma

    def factor(self, step: int) -> float:
        drops = sum(step >= int(m * self.total_steps) for m in self.milestones)
        return self.gamma**drops


@gin.configurable
class PiecewiseSchedule(Schedule):
    """Rice et al.'s ``piecewise`` lr (AT-AWP, ``AT_AWP/train_cifar10.py`` L260-267, L321-322), per iteration.

    Iteration ``i`` (0-based) of 0-based epoch ``e`` uses ``t = e + (i + 1) / n``: factor 1 while
    ``t / epochs < fractions[0]``, ``gamma`` while below ``fractions[1]``, and so on. For 200 epochs this
    is 0.1 until the last iteration of epoch 99 (0-based), then 0.01 until the last of epoch 149, then 0.001.
    """

    def __init__(self, fractions: tuple[float, ...] = (0.5, 0.75), gamma: float = 0.1) -> None:
        self.fractions, self.gamma = tuple(fractions), gamma

    def factor(self, step: int) -> float:
        n = self.steps_per_epoch
        t = step // n + (step % n + 1) / n
        return self.gamma ** sum(t / self.epochs >= f for f in self.fractions)


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    steps_per_epoch: int,
    epochs: int,
    ramp_epochs: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Wrap a schedule (times an optional linear ramp) for an optimizer; ``.step()`` once per iteration."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.bind(steps_per_epoch, epochs, ramp_epochs))
