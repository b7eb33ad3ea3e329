"""Loss terms rigged to go bad at a chosen step: stand-ins for a real divergence whose step, epoch and term
are known exactly. Registered with gin on import; a process that trains with them (torchrun's workers
included) imports this module first (``tests/rigged_train.py``)."""

import math

import gin
import torch

from components import distributed as dist
from components.losses import Term


def _fires(rank: int | None) -> bool:
    return rank is None or dist.rank() == rank


@gin.configurable
class NaNFromStep(Term):
    """0 times the mean of a view until the ``step``-th call, then NaN: a NaN loss whose gradients stay
    finite (the weights never go bad). ``rank``: only that torchrun rank's term goes NaN."""

    fired = False  # with once=True, only the first instance (in this process) to reach ``step`` goes NaN

    def __init__(
        self, view: str = "guide(x)", step: int = 3, once: bool = False, rank: int | None = None
    ) -> None:
        (self.view,) = self._register(view)
        self.step, self.once, self.rank, self.calls, self.firing = step, once, rank, 0, False

    def __call__(self, views, y):  # noqa: ANN001, ANN204
        self.calls += 1
        zero = views[self.view].float().mean() * 0
        if self.calls < self.step or not _fires(self.rank):
            return zero
        if self.once and NaNFromStep.fired and not self.firing:
            return zero
        self.firing = NaNFromStep.fired = True
        return zero + math.nan


class _NaNGradient(torch.autograd.Function):
    """The identity on the way forward; a NaN gradient on the way back."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return torch.full_like(grad, math.nan)


@gin.configurable
class NaNGradientAtStep(Term):
    """0 (a finite loss) at every call; at the ``step``-th call its gradient into the view is NaN, so the
    optimizer step turns the view's model's weights NaN while every loss statistic stays finite."""

    def __init__(self, view: str = "target(x)", step: int = 4) -> None:
        (self.view,) = self._register(view)
        self.step, self.calls = step, 0

    def __call__(self, views, y):  # noqa: ANN001, ANN204
        self.calls += 1
        logits = views[self.view].float()
        if self.calls == self.step:
            logits = _NaNGradient.apply(logits)
        return logits.mean() * 0


def rigged(step: int, once: bool = False, rank: int | None = None) -> str:
    """Overrides adding a NaN term to D2R's loss at ``step`` (global, 1-indexed)."""
    return (
        "WeightedLoss.terms = {'ce_guide': (1.0, @ce_guide/CrossEntropy()), 'mse': (1.0, @mse/MSE()), "
        "'rigged': (1.0, @NaNFromStep())}; "
        f"NaNFromStep.step = {step}; NaNFromStep.once = {once}; NaNFromStep.rank = {rank}"
    )


def rigged_weights(step: int) -> str:
    """Overrides adding to D2R's loss a term whose gradient turns the target's weights NaN at ``step``."""
    return (
        "WeightedLoss.terms = {'ce_guide': (1.0, @ce_guide/CrossEntropy()), 'mse': (1.0, @mse/MSE()), "
        "'rigged': (1.0, @NaNGradientAtStep())}; "
        f"NaNGradientAtStep.step = {step}"
    )
