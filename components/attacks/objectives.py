"""What a training-time attack maximises.

An objective is evaluated as ``objective(models, x_adv, y, ctx)`` and returns ``(loss, logits)``;
``ctx = objective.prepare(models, x, y)`` holds what is constant during the attack (the clean soft label),
so it is computed once per batch, not once per step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gin
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.losses import _full


class Objective:
    """Base class: the model that is attacked (``model``) and every model the objective runs."""

    model: str = "target"

    @property
    def models_used(self) -> tuple[str, ...]:
        return (self.model,)

    def prepare(self, models: Mapping[str, nn.Module], x: Tensor, y: Tensor) -> Any:
        return None

    def __call__(
        self, models: Mapping[str, nn.Module], x_adv: Tensor, y: Tensor, ctx: Any
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


@gin.configurable
class CEObjective(Objective):
    """Cross-entropy of the attacked model on x' (PGD-AT, RegMix's PGD-2), summed: sign steps ignore scale."""

    def __init__(self, model: str = "target") -> None:
        self.model = model

    def __call__(
        self, models: Mapping[str, nn.Module], x_adv: Tensor, y: Tensor, ctx: Any
    ) -> tuple[Tensor, Tensor]:
        logits = models[self.model](x_adv)
        return F.cross_entropy(_full(logits), y, reduction="sum"), logits


@gin.configurable
class SoftLabelKLObjective(Objective):
    """``sum KLdiv(model(x') || soft_label_model(x))``: the TRADES/LBGAT attack, and D2R's CAG.

    * TRADES / LBGAT: ``soft_label_model = 'target'`` (the target's own clean distribution).
    * CAG: ``soft_label_model = 'guide'`` (the guide's clean distribution is the target argument).

    The soft label is computed once per batch under ``no_grad`` in the attack's BN mode; in eval mode it
    is constant across steps, so recomputing it each step (as the authors' code does) would only cost time.
    The gradient w.r.t. x' equals that of the soft-label cross-entropy ``-sum p log softmax(model(x'))``.
    """

    def __init__(self, model: str = "target", soft_label_model: str = "target") -> None:
        self.model = model
        self.soft_label_model = soft_label_model

    @property
    def models_used(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.model, self.soft_label_model)))

    def prepare(self, models: Mapping[str, nn.Module], x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            return F.softmax(_full(models[self.soft_label_model](x)), dim=1)

    def __call__(
        self, models: Mapping[str, nn.Module], x_adv: Tensor, y: Tensor, ctx: Tensor
    ) -> tuple[Tensor, Tensor]:
        logits = models[self.model](x_adv)
        loss = F.kl_div(F.log_softmax(_full(logits), dim=1), ctx, reduction="sum")
        return loss, logits
