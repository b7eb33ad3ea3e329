"""Robust accuracy for model selection and reporting: the D2R/FGSM-PGK evaluation loop (METHODS.md 1.5).

PGD-k with a uniform random start, step 2/255, CE (or the CW margin) loss, and per-example early stop:
each step moves only the examples the model still classifies correctly. The model must be in eval mode.
"""

from __future__ import annotations

from collections.abc import Iterable

import gin
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.attacks.pgd import check_eps

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
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = model(x + delta)
            active = logits.argmax(1) == y if early_stop else torch.ones_like(y, dtype=torch.bool)
            (grad,) = torch.autograd.grad(loss_fn(logits, y), delta)
            stepped = (delta.detach() + step_size * grad.sign()).clamp(-eps, eps)
            stepped = (x + stepped).clamp(0, 1) - x
            delta = torch.where(active[:, None, None, None], stepped, delta.detach())
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
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    correct = torch.zeros(2, dtype=torch.long)
    count = 0
    try:
        for x, y, _ in batches:
            correct = correct.to(x.device)
            with torch.no_grad():
                correct[0] += (model(x).argmax(1) == y).sum()
            x_adv = pgd_eval_attack(model, x, y, eps=eps, step_size=step_size, steps=attack_steps)
            with torch.no_grad():
                correct[1] += (model(x_adv).argmax(1) == y).sum()
            count += y.shape[0]
    finally:
        for module, was_training in modes:
            module.training = was_training
    if count == 0:
        raise ValueError("robust_accuracy: the loader yielded no examples")
    clean, adv = (correct.double() / count).tolist()
    return {"clean_acc": clean, f"pgd{attack_steps}_acc": adv}
