"""The evaluation attacks PGD and CW, and the PGD-20 accuracy of model selection (METHODS.md 1.5).

PGD-k with a uniform random start, step 2/255, CE (or the CW margin) loss, and per-example early stop:
each step moves only the examples the model still classifies correctly. The model must be in eval mode.

The attack classes :class:`PGD` and :class:`CW` wrap that loop in the fra31/auto-attack style (parameters in
the constructor, ``attack(model, x, y) -> x_adv``) so that the evaluation suite (``components.eval.suite``)
can run them, and AutoAttack (``components.eval.autoattack``), side by side at several radii.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import gin
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.attacks.pgd import check_eps
from components.modes import model_mode

EPS_8_255 = 8 / 255
STEP_2_255 = 2 / 255


def cw_margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """The CW-inf objective as in the authors' eval code: mean of -(z_y - max_{j != y} z_j)."""
    z = logits.float()
    true = z.gather(1, y[:, None]).squeeze(1)
    other = z.masked_fill(F.one_hot(y, z.shape[1]).bool(), float("-inf")).amax(dim=1)
    return -(true - other).mean()


@gin.configurable
def pgd_eval_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float = EPS_8_255,
    step_size: float = STEP_2_255,
    steps: int = 20,
    loss: str = "ce",
    restarts: int = 1,
    early_stop: bool = True,
) -> Tensor:
    """Return x_adv for one batch; over restarts, keep for each example the first delta that fools it."""
    check_eps(eps, step_size, "pgd_eval_attack")
    loss_fn = {"ce": lambda z, t: F.cross_entropy(z.float(), t), "cw": cw_margin_loss}[loss]
    best = torch.zeros_like(x)
    still_correct = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(restarts):
        delta = torch.empty_like(x).uniform_(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
        # With early stop a fooled example's delta never moves again, and an eval-mode model scores each
        # example on its own, so it stays fooled: later steps run on the examples still correct only
        # (the same adversarial examples; a weak model's batch shrinks to a few examples in a few steps).
        # The loss is a mean over the examples run, and only its gradient's sign is used.
        idx = torch.arange(x.shape[0], device=x.device)
        for _ in range(steps):
            xs, ys, d = x[idx], y[idx], delta[idx].requires_grad_(True)
            logits = model(xs + d)
            active = logits.argmax(1) == ys if early_stop else torch.ones_like(ys, dtype=torch.bool)
            (grad,) = torch.autograd.grad(loss_fn(logits, ys), d)
            stepped = (d.detach() + step_size * grad.sign()).clamp(-eps, eps)
            stepped = (xs + stepped).clamp(0, 1) - xs
            delta[idx] = torch.where(active[:, None, None, None], stepped, d.detach())
            if early_stop:
                idx = idx[active]
                # METHODS 1.5: the loop breaks once every example is fooled (same result, fewer forwards).
                if idx.numel() == 0:
                    break
        if restarts == 1:
            return (x + delta).detach()
        with torch.no_grad():
            fooled = model(x + delta).argmax(1) != y
        # Keep the first restart that fools an example; for the others the last restart's delta.
        best = torch.where(still_correct[:, None, None, None], delta, best)
        still_correct &= ~fooled
    return (x + best).detach()


def robust_accuracy(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor, Tensor]],
    attack_steps: int = 20,
    eps: float = EPS_8_255,
    step_size: float = STEP_2_255,
) -> dict[str, float]:
    """Clean and PGD-``attack_steps`` accuracy of ``model`` (put in eval mode here) over a loader."""
    correct = torch.zeros(2, dtype=torch.long)
    count = 0
    # Frozen parameters: the attack needs input gradients only (the model is unchanged afterwards).
    with model_mode(model, train=False, freeze=True):
        for x, y, _ in batches:
            correct = correct.to(x.device)
            with torch.no_grad():
                correct[0] += (model(x).argmax(1) == y).sum()
            x_adv = pgd_eval_attack(model, x, y, eps=eps, step_size=step_size, steps=attack_steps)
            with torch.no_grad():
                correct[1] += (model(x_adv).argmax(1) == y).sum()
            count += y.shape[0]
    if count == 0:
        raise ValueError("robust_accuracy: the loader yielded no examples")
    clean, adv = (correct.double() / count).tolist()
    return {"clean_acc": clean, f"pgd{attack_steps}_acc": adv}


# ------------------------------------------------------------------------------------- attack classes


@runtime_checkable
class EvalAttack(Protocol):
    """What the evaluation suite runs: an L-inf attack of radius ``eps`` (pixel space, inputs in [0, 1]).

    ``attack(model, x, y)`` returns ``x_adv`` of the shape of ``x``; the suite scores it itself. ``with_eps``
    returns a copy at another radius, so one attack definition serves every point of an accuracy-vs-eps
    curve. Optional attributes the suite and its checks read when present: ``white_box`` (bool), ``steps``
    and ``family`` (attacks that differ only in steps), ``last_stages`` and ``flags`` (AutoAttack).
    """

    eps: float

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor: ...

    def with_eps(self, eps: float, scale_step: bool = False) -> EvalAttack: ...


@gin.configurable
class PGD:
    """PGD-``steps`` for evaluation (METHODS 1.5): uniform random start, signed steps of ``step_size``,
    per-example early stop, ``restarts`` random restarts (an example counts as fooled if any restart
    fools it), loss ``'ce'`` or ``'cw'`` (the CW margin). A thin wrapper around :func:`pgd_eval_attack`.
    """

    white_box = True

    def __init__(
        self,
        eps: float = EPS_8_255,
        steps: int = 20,
        step_size: float = STEP_2_255,
        restarts: int = 1,
        loss: str = "ce",
    ) -> None:
        name = type(self).__name__
        check_eps(eps, step_size, name)
        if loss not in ("ce", "cw"):
            raise ValueError(f"{name}: loss={loss!r}; expected 'ce' or 'cw'")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{name}: steps={steps!r} must be a positive int")
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
            raise ValueError(f"{name}: restarts={restarts!r} must be a positive int")
        self.eps, self.steps, self.step_size, self.restarts, self.loss = eps, steps, step_size, restarts, loss

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Adversarial examples for one batch; ``model`` must already be in eval mode."""
        return pgd_eval_attack(
            model,
            x,
            y,
            eps=self.eps,
            step_size=self.step_size,
            steps=self.steps,
            loss=self.loss,
            restarts=self.restarts,
            early_stop=True,
        )

    def with_eps(self, eps: float, scale_step: bool = False) -> PGD:
        """A copy at radius ``eps``; ``scale_step`` keeps the step a fixed fraction of eps (for curves)."""
        step = self.step_size * eps / self.eps if scale_step else self.step_size
        check_eps(eps, step, type(self).__name__)
        other = copy.copy(self)
        other.eps, other.step_size = eps, step
        return other

    @property
    def name(self) -> str:
        """Human-readable name such as ``PGD-20`` or ``CW-20 x5``."""
        kind = "CW" if self.loss == "cw" else "PGD"
        return f"{kind}-{self.steps}" + (f" x{self.restarts}" if self.restarts > 1 else "")

    @property
    def family(self) -> tuple[object, ...]:
        """Attacks with equal ``family`` differ only in steps: more steps must never raise accuracy."""
        return ("pgd", self.loss, self.eps, self.step_size, self.restarts)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(eps={self.eps:.6g}, steps={self.steps}, step_size={self.step_size:.6g}, "
            f"restarts={self.restarts}, loss={self.loss!r})"
        )


@gin.configurable
class CW(PGD):
    """CW-inf as in the D2R/PGK evaluation code: :class:`PGD` on the CW margin ``-(z_y - max_{j!=y} z_j)``."""

    def __init__(
        self, eps: float = EPS_8_255, steps: int = 20, step_size: float = STEP_2_255, restarts: int = 1
    ) -> None:
        super().__init__(eps, steps=steps, step_size=step_size, restarts=restarts, loss="cw")

    def __repr__(self) -> str:
        return (
            f"CW(eps={self.eps:.6g}, steps={self.steps}, step_size={self.step_size:.6g}, "
            f"restarts={self.restarts})"
        )
