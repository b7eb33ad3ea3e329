"""The divergence guard: a training run whose loss goes non-finite (or past a bound) stops with a clear error.

A diverged run must never look like a finished one (a NaN run that ends normally gets its "best" checkpoint
picked and registered). The guard keeps, on the device, the global step at which each loss statistic first
went bad and its value there, and reads that record every ``check_every`` steps and at the end of every epoch,
before anything is validated or checkpointed: no host sync per step, detection within ``check_every`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn


class TrainingDivergedError(RuntimeError):
    """Training produced a non-finite (or out-of-bound) loss or non-finite weights; the run cannot be trusted.

    ``epoch`` and ``step`` (global, 1-indexed) say where; ``term`` names the first loss term that went bad
    (``'loss'`` for the weighted total, ``'parameters of <model>'`` for weights); ``value`` is what it was.
    """

    def __init__(self, message: str, *, epoch: int, step: int, term: str, value: float) -> None:
        super().__init__(message)
        self.epoch, self.step, self.term, self.value = epoch, step, term, value


class DivergenceGuard:
    """Watches the per-step loss statistics ``[total, term_1, ..., term_n]`` of one epoch loop.

    ``update`` is a few device kernels (no sync); ``check`` reads the record (one sync) and raises
    ``TrainingDivergedError`` naming the epoch, the step and the first term that went bad. ``max_loss``
    bounds the weighted total (None: only non-finite values count).
    """

    def __init__(
        self,
        term_names: Sequence[str],
        device: torch.device,
        steps_per_epoch: int,
        check_every: int = 10,
        max_loss: float | None = None,
    ) -> None:
        if not (isinstance(check_every, int) and check_every >= 1):
            raise ValueError(f"divergence check_every must be an integer >= 1, got {check_every!r}")
        if max_loss is not None and not (isinstance(max_loss, (int, float)) and max_loss > 0):
            raise ValueError(f"max_loss must be a positive number or None, got {max_loss!r}")
        self.names = ["loss", *term_names]
        self.check_every, self.max_loss = check_every, max_loss
        self.steps_per_epoch = steps_per_epoch
        bound = math.inf if max_loss is None else float(max_loss)
        self._bound = torch.tensor([bound] + [math.inf] * len(term_names), device=device)
        self._first = torch.zeros(len(self.names), dtype=torch.long, device=device)  # 0: never went bad
        self._value = torch.zeros(len(self.names), dtype=torch.float32, device=device)

    def update(self, stats: Tensor, step: int) -> None:
        """Record which statistics are bad at global ``step`` (1-indexed); call every step."""
        stats = stats.detach().float()
        bad = ~torch.isfinite(stats) | (stats > self._bound)
        new = bad & (self._first == 0)
        self._first = torch.where(new, step, self._first)
        self._value = torch.where(new, stats, self._value)

    def due(self, step: int) -> bool:
        """Whether ``step`` is one at which the record is read."""
        return step % self.check_every == 0

    def check(self, epoch: int) -> None:
        """Read the record (one host sync); raise if anything went bad since training began."""
        first = self._first.tolist()
        if not any(first):
            return
        step = min(s for s in first if s)
        # The total is bad whenever a term is: name the first term (in the loss's order) that went bad at
        # that step, and the total only when no term did (the max_loss bound, or an overflow in the sum).
        at_step = [i for i, s in enumerate(first) if s == step]
        index = next((i for i in at_step if i > 0), at_step[0])
        term, value = self.names[index], float(self._value[index].item())
        reason = "is non-finite" if not math.isfinite(value) else f"exceeds max_loss={self.max_loss:g}"
        raise TrainingDivergedError(
            _where(epoch, step, self.steps_per_epoch) + f": loss term {term!r} {reason} ({value:g})",
            epoch=epoch,
            step=step,
            term=term,
            value=value,
        )

    def check_parameters(self, models: Iterable[tuple[str, nn.Module]], epoch: int, step: int) -> None:
        """Raise if a model holds a non-finite weight (one host sync; run before a checkpoint is written)."""
        named = list(models)
        flags = torch.stack(
            [torch.stack([p.detach().isfinite().all() for p in m.parameters()]).all() for _, m in named]
        ).tolist()
        for (name, _), finite in zip(named, flags):
            if not finite:
                raise TrainingDivergedError(
                    _where(epoch, step, self.steps_per_epoch) + f": the {name} model has non-finite weights",
                    epoch=epoch,
                    step=step,
                    term=f"parameters of {name}",
                    value=math.nan,
                )


def _where(epoch: int, step: int, steps_per_epoch: int) -> str:
    in_epoch = (step - 1) % steps_per_epoch + 1
    return (
        f"training diverged in epoch {epoch} at step {step} "
        f"(step {in_epoch} of {steps_per_epoch} in the epoch)"
    )
