"""PGD that checks every iterate against a stopping criterion and reports per-example geometry.

One generator serves three methods:

* **FAT** (Zhang et al., ICML 2020; zjfheart/Friendly-Adversarial-Training ``earlystop.py`` L5-113): an
  example whose iterate is misclassified gets ``tau`` more steps (its control counter), then stops at the
  iterate it has, the one from *before* this iteration's step; ``tau`` follows an epoch schedule.
* **GAIRAT** (Zhang et al., ICLR 2021; zjfheart/Geometry-aware-Instance-reweighted-Adversarial-Training
  ``attack_generator.py`` L20-53, ``GA_PGD``): no stopping (``tau=None``); the generator reports ``kappa``,
  the number of checked iterates (the start and steps 1..K-1, i.e. every iterate that was forwarded before
  a step) the model classifies correctly (L29-36). It is a count, not a first-flip time: an iterate that
  is correct again after a wrong one counts again.
* **SAT** (Sitawarin et al., AISec 2021): the same loop with a probability criterion whose threshold
  follows the curriculum (``ProbabilityGap``; an *inferred* reading of the paper, see gin/methods/sat.gin).

Per example and iteration k = 0..K-1 (``earlystop.py`` L43-102): forward the iterate; if the criterion
holds and the counter is 0, the example is done and keeps this iterate; if it holds and the counter is
positive, the counter drops by one and the example steps; otherwise it steps. Each step is the signed
gradient step, plus ``omega * N(0, I)`` (FAT's escape noise, drawn for the examples still iterating, in
batch order, as the code draws it), then the eps-ball projection and the [0, 1] clip. After K iterations
the examples still iterating keep their last iterate, which is not checked again.

Only the examples still iterating are forwarded (the code's subset, and the compute FAT saves); the
models must be in eval mode, where an example's output and input gradient do not depend on which other
examples share its batch, so the subset changes nothing but cost. The code reorders its output (frozen
examples first, in freezing order, then the survivors), with labels and clean images in the same order;
this generator keeps the batch order instead: every loss here is a mean or sum over examples and BN batch
statistics are permutation invariant, so the step is the same up to float summation order
(tests/test_fat.py compares against the reordering transcription).

Reports (``AttackResult.reports``, each a float tensor of shape (B,) without gradient): ``kappa`` as above
and ``steps``, the number of PGD steps each example took (FAT's back-propagation count per example).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gin
import torch
from torch import Tensor, nn

from components.attacks.inits import Init
from components.attacks.objectives import Objective
from components.attacks.pgd import AttackResult, PGDGenerator, project
from components.modes import model_mode


class StopCriterion:
    """Decides per example whether an iterate has reached the point where the attack may stop."""

    def __call__(self, logits: Tensor, y: Tensor) -> Tensor:
        """Boolean (B,): the criterion holds for the iterate whose logits are given."""
        raise NotImplementedError


@gin.configurable
class Misclassified(StopCriterion):
    """FAT's criterion and GAIRAT's kappa: the prediction (``output.max(1)[1]``, as the code) is not y."""

    def __call__(self, logits: Tensor, y: Tensor) -> Tensor:
        return logits.max(1)[1] != y


@gin.configurable
class ProbabilityGap(StopCriterion):
    """P-SAT's difficulty as read here (*inferred*): ``d = max_{k != y} p_k - p_y`` in [-1, 1]; stop at
    ``d >= eta``.

    ``eta`` ramps linearly from ``start`` at epoch 1 to ``end`` at epoch ``ramp_epochs`` (1-based) and stays
    there (``set_epoch``). With ``end = 1`` the late attack is plain PGD (d reaches 1 only when p_y = 0 and
    one wrong class takes all the mass); ``eta = 0`` is "misclassified" up to ties.
    """

    def __init__(self, start: float = -1.0, end: float = 1.0, ramp_epochs: int = 1) -> None:
        if not (-1.0 <= start <= 1.0 and -1.0 <= end <= 1.0):
            raise ValueError(f"ProbabilityGap: start and end must lie in [-1, 1], got {start}, {end}")
        if not (isinstance(ramp_epochs, int) and ramp_epochs >= 1):
            raise ValueError(f"ProbabilityGap: ramp_epochs must be an integer >= 1, got {ramp_epochs!r}")
        self.start, self.end, self.ramp_epochs = float(start), float(end), ramp_epochs
        self.eta = self.start
        self.set_epoch(1, ramp_epochs)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        fraction = 1.0 if self.ramp_epochs == 1 else min(1.0, (epoch - 1) / (self.ramp_epochs - 1))
        self.eta = self.start + fraction * (self.end - self.start)

    def __call__(self, logits: Tensor, y: Tensor) -> Tensor:
        p = torch.softmax(logits.float(), dim=1)
        p_true = p.gather(1, y[:, None]).squeeze(1)
        p_wrong = p.scatter(1, y[:, None], float("-inf")).max(1)[0]
        return p_wrong - p_true >= self.eta


def _subset(ctx: Any, index: Tensor) -> Any:
    """An objective's per-batch context restricted to the examples in ``index`` (None stays None)."""
    if ctx is None:
        return None
    if isinstance(ctx, Tensor):
        return ctx[index]
    raise TypeError(f"EarlyStopPGD cannot take a subset of an objective context of type {type(ctx).__name__}")


@gin.configurable
class EarlyStopPGD(PGDGenerator):
    """PGD with a per-example stop (criterion + control counter ``tau``), escape noise and reports.

    * ``tau``: the extra steps an example takes once the criterion holds (FAT's ``tau``); ``None`` never
      stops (GAIRAT's GA-PGD). ``tau_schedule``: ``((last_epoch, tau), ...)`` in increasing epochs, 1-based,
      applied by ``set_epoch``: the first pair whose ``last_epoch`` is >= the epoch gives tau, after the
      last pair ``tau`` holds (FAT.py L77-86: ``((50, 0), (90, 1))`` and ``tau = 2``).
    * ``omega``: std of the Gaussian noise added to every step (FAT: 0.001; FAT for TRADES: 0).
    * ``bn_mode`` must be 'eval' (see the module doc).
    """

    reports = ("kappa", "steps")

    def __init__(
        self,
        objective: Objective = gin.REQUIRED,
        eps: float = gin.REQUIRED,
        step_size: float = gin.REQUIRED,
        steps: int = gin.REQUIRED,
        init: Init | None = None,
        bn_mode: str = "eval",
        criterion: StopCriterion | None = None,
        tau: int | None = 0,
        tau_schedule: Sequence[tuple[int, int]] = (),
        omega: float = 0.0,
    ) -> None:
        super().__init__(objective, eps, step_size, steps, init=init, bn_mode=bn_mode)
        if bn_mode != "eval":
            raise ValueError(
                "EarlyStopPGD: bn_mode must be 'eval': it forwards only the examples still iterating, which "
                "in train mode would change BatchNorm's batch statistics (FAT and GAIRAT attack in eval mode)"
            )
        self.criterion = criterion if criterion is not None else Misclassified()
        self.tau_schedule = tuple((int(e), int(t)) for e, t in tau_schedule)
        for value in [tau] + [t for _, t in self.tau_schedule]:
            if value is not None and not (isinstance(value, int) and value >= 0):
                raise ValueError(f"EarlyStopPGD: tau must be None or an integer >= 0, got {value!r}")
        if tau is None and self.tau_schedule:
            raise ValueError("EarlyStopPGD: tau=None (never stop) cannot have a tau_schedule")
        ends = [e for e, _ in self.tau_schedule]
        if ends != sorted(set(ends)):
            raise ValueError(f"EarlyStopPGD: tau_schedule epochs must increase, got {self.tau_schedule}")
        if not (isinstance(omega, (int, float)) and omega >= 0):
            raise ValueError(f"EarlyStopPGD: omega must be a number >= 0, got {omega!r}")
        self.final_tau = tau
        self.omega = float(omega)
        self.tau = tau
        self.set_epoch(1, 1)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Pick tau for this (1-based) epoch, and pass the epoch on to the criterion."""
        self.tau = next((t for last, t in self.tau_schedule if epoch <= last), self.final_tau)
        hook = getattr(self.criterion, "set_epoch", None)
        if callable(hook):
            hook(epoch, epochs)

    def __call__(self, models: Mapping[str, nn.Module], x: Tensor, y: Tensor) -> AttackResult:
        used = [models[n] for n in self.models_used]
        n = x.shape[0]
        kappa = torch.zeros(n, device=x.device)
        taken = torch.zeros(n, device=x.device)
        with model_mode(used, train=False):
            x_adv = self.init(x, self.eps).detach().clone()
            ctx = self.objective.prepare(models, x, y)
            control = torch.full((n,), 0 if self.tau is None else self.tau, device=x.device)
            active = torch.arange(n, device=x.device)  # the examples still iterating, in batch order
            with model_mode(used, train=None, freeze=True):
                for _ in range(self.steps):
                    xa = x_adv[active].requires_grad_(True)
                    ya = y[active]
                    loss, logits = self.objective(models, xa, ya, _subset(ctx, active))
                    hit = self.criterion(logits.detach(), ya)
                    kappa[active] += (~hit).float()
                    (grad,) = torch.autograd.grad(loss, xa)
                    if self.tau is None:
                        keep = None
                    else:
                        left = control[active]
                        control[active] = left - (hit & (left > 0)).to(left.dtype)
                        keep = ~(hit & (left == 0))
                    if keep is not None:
                        # One host sync per iteration: the subset's size decides the next forward's shape.
                        kept = keep.nonzero().squeeze(1)
                        active, xa, grad = active[kept], xa[kept], grad[kept]
                        if active.numel() == 0:
                            break
                    step = xa.detach() + self.step_size * grad.sign()
                    if self.omega > 0:
                        step = step + self.omega * torch.randn_like(step)
                    x_adv[active] = project(step, x[active], self.eps)
                    taken[active] += 1
        return AttackResult(inputs={"x_adv": x_adv.detach()}, reports={"kappa": kappa, "steps": taken})
