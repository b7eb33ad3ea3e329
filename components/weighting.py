"""Per-example weighting of a loss by what the attack reports: GAIRAT's geometry-aware weights.

GAIRAT (Zhang, Zhu, Niu, Han, Sugiyama, Kankanhalli, "Geometry-aware Instance-reweighted Adversarial
Training", ICLR 2021; code zjfheart/Geometry-aware-Instance-reweighted-Adversarial-Training) weights each
example's adversarial CE by how close it lies to the decision boundary, measured by ``kappa``, the number
of GA-PGD iterates classified correctly (``EarlyStopPGD`` with ``tau=None`` reports it). Examples the
attack flips early (small kappa) get large weights.
"""

from __future__ import annotations

import math

import gin
import torch.nn.functional as F
from torch import Tensor

from components.losses import Term, _full

WEIGHT_FUNCTIONS = ("tanh", "sigmoid", "discrete")
LAMBDA_SCHEDULES = ("fixed", "linear")


def gair_weights(kappa: Tensor, steps: int, lam: float, function: str = "tanh") -> Tensor:
    """``GAIR.py`` L5-17: the weight of each example, normalised to mean 1 over the batch (``w * B / sum w``).

    With ``h = int(steps / 2)``: Tanh ``(tanh(lam + (h - kappa) * 5 / h) + 1) / 2``, Sigmoid
    ``sigmoid(lam + (h - kappa) * 5 / h)``, Discrete ``((steps + 1) - kappa) / (steps + 1)``. The operations
    run in the code's order, so the rounding is the code's too. ``lam = inf`` gives every example weight 1.
    """
    if function not in WEIGHT_FUNCTIONS:
        raise ValueError(f"unknown GAIR weight function {function!r}; use one of {WEIGHT_FUNCTIONS}")
    half = int(steps / 2)
    if function == "discrete":
        weight = ((steps + 1) - kappa) / (steps + 1)
    else:
        if half < 1:
            raise ValueError(f"GAIR {function} weights need steps >= 2 (int(steps / 2) >= 1), got {steps}")
        z = lam + (half - kappa) * 5 / half
        weight = (z.tanh() + 1) / 2 if function == "tanh" else z.sigmoid()
    return weight * len(weight) / weight.sum()


@gin.configurable
class GAIRWeightedCE(Term):
    """GAIRAT's loss (``GAIRAT.py`` L139-148): ``mean_i CE_i(view) * w_i(kappa)``, plain mean CE in burn-in.

    * ``begin_epoch``: the first (1-based) epoch with weights; the code's ``(epoch + 1) >= begin_epoch``
      with its 0-based ``epoch`` (L141), so begin_epoch 60 weights from the 60th epoch on.
    * lambda (``adjust_Lambda``, L162-194, called with the 1-based epoch): ``'fixed'`` is ``lam_max``
      before ``lam_epoch`` and ``lam`` from it on; ``'linear'`` goes from ``lam_max`` towards ``lam`` as
      ``lam_max - (epoch / epochs) * (lam_max - lam)`` from ``lam_epoch`` (needs a finite ``lam_max``).
      The code's ``'piecewise'`` computes what ``'fixed'`` computes (its later branches are unreachable).
      The code puts ``lam_epoch`` at 60 for runs of >= 110 epochs and 30 otherwise.
    * ``kappa`` is a report of the generator, a count: it carries no gradient.
    """

    def __init__(
        self,
        view: str = gin.REQUIRED,
        steps: int = gin.REQUIRED,
        kappa: str = "kappa",
        function: str = "tanh",
        lam: float = -1.0,
        lam_max: float = math.inf,
        lam_schedule: str = "fixed",
        lam_epoch: int = 60,
        begin_epoch: int = 60,
    ) -> None:
        (self.view,) = self._register(view)
        self.reports = (kappa,)
        if function not in WEIGHT_FUNCTIONS:
            raise ValueError(f"GAIRWeightedCE: unknown function {function!r}; use one of {WEIGHT_FUNCTIONS}")
        if lam_schedule not in LAMBDA_SCHEDULES:
            raise ValueError(
                f"GAIRWeightedCE: lam_schedule must be one of {LAMBDA_SCHEDULES}, got {lam_schedule!r}"
            )
        if lam_schedule == "linear" and not math.isfinite(lam_max):
            raise ValueError(
                "GAIRWeightedCE: the 'linear' lambda schedule needs a finite lam_max (inf gives nan)"
            )
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"GAIRWeightedCE: steps must be the attack's integer step count, got {steps!r}")
        self.kappa, self.steps, self.function = kappa, steps, function
        self.lam, self.lam_max, self.lam_schedule = float(lam), float(lam_max), lam_schedule
        self.lam_epoch, self.begin_epoch = lam_epoch, begin_epoch
        self.set_epoch(1, 1)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Burn-in and lambda for this 1-based epoch."""
        self.weighted = epoch >= self.begin_epoch
        if epoch < self.lam_epoch:
            self.current_lam = self.lam_max
        elif self.lam_schedule == "fixed":
            self.current_lam = self.lam
        else:
            self.current_lam = self.lam_max - (epoch / epochs) * (self.lam_max - self.lam)

    def __call__(self, views: dict[str, Tensor], y: Tensor) -> Tensor:
        logits = _full(views[self.view])
        if not self.weighted:
            return F.cross_entropy(logits, y)
        kappa = views[self.kappa].detach().to(device=logits.device, dtype=logits.dtype)
        weights = gair_weights(kappa, self.steps, self.current_lam, self.function)
        return (F.cross_entropy(logits, y, reduction="none") * weights).mean()
