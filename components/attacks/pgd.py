"""PGD-style adversarial example generation for training, with a pluggable objective and init."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import gin
import torch
from torch import Tensor, nn

from components.attacks.inits import GaussianInit, Init
from components.attacks.objectives import Objective
from components.modes import model_mode

BN_MODES = ("eval", "train")


def project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Project onto the L-inf ball of radius eps around x, then onto the image box [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def check_eps(eps: float, step_size: float | None = None, what: str = "attack") -> None:
    """Reject radii that cannot be pixel-space L-inf budgets (a common slip: eps=8 meaning 8/255)."""
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and 0.0 < eps <= 1.0):
        raise ValueError(
            f"{what}: eps={eps!r} is out of range (0, 1]. Inputs are in [0,1] pixel space, so 8/255 is "
            "written 0.03137254901960784"
        )
    if step_size is not None and (
        isinstance(step_size, bool) or not (isinstance(step_size, (int, float)) and 0.0 < step_size <= 1.0)
    ):
        raise ValueError(f"{what}: step_size={step_size!r} is out of range (0, 1] (pixel space)")


@dataclass
class AttackResult:
    """What a generator hands to the training step: named inputs, any views it already computed, and
    per-example ``reports`` (e.g. GAIRAT's ``kappa``): tensors of shape (B,) without gradient that loss
    terms read by name (``Term.reports``; docs/architecture.md, "Generators that report")."""

    inputs: dict[str, Tensor]
    views: dict[str, Tensor] = field(default_factory=dict)
    reports: dict[str, Tensor] = field(default_factory=dict)


@gin.configurable
class PGDGenerator:
    """Iterated signed-gradient ascent on ``objective`` within the L-inf ball, from ``init``.

    * ``bn_mode``: mode of every model the objective runs while attacking ('eval' as in TRADES/LBGAT/D2R,
      'train' as in FGSM-PGI/PGK). Each model goes back to its own mode afterwards.
    * ``init_view``: also return the init point as input ``x_init`` and the attacked model's output there as
      view ``'<model>(x_init)'``, computed with parameter gradients so the loss can use it without a second
      forward (RegMix: step 1 reuses that forward's input gradient). Requires ``bn_mode='train'``, because
      the loss's views are train-mode forwards.
    * ``final_forward``: one more forward of the objective at the final x', without gradient, in the
      attack's BN mode. Rice et al.'s ``attack_pgd`` (used by AT-AWP, ``AT_AWP/train_cifar10.py`` L122-124)
      computes the per-example loss there to pick among restarts; with one restart it always keeps the
      only one, but in train mode that forward moves BN running statistics, so the faithful config runs it.
    * Only x' gets gradients during the attack (``torch.autograd.grad`` w.r.t. x'); x' is returned detached.
    """

    # The per-example reports this generator returns (names loss terms may read); PGD reports none.
    reports: tuple[str, ...] = ()

    def __init__(
        self,
        objective: Objective = gin.REQUIRED,
        eps: float = gin.REQUIRED,
        step_size: float = gin.REQUIRED,
        steps: int = gin.REQUIRED,
        init: Init | None = None,
        bn_mode: str = "eval",
        init_view: bool = False,
        final_forward: bool = False,
    ) -> None:
        check_eps(eps, step_size, "PGDGenerator")
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"PGDGenerator: steps must be an integer >= 1, got {steps!r}")
        if bn_mode not in BN_MODES:
            raise ValueError(f"PGDGenerator: bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        if init_view and bn_mode != "train":
            raise ValueError("PGDGenerator: init_view=True needs bn_mode='train' (the view feeds the loss)")
        self.objective = objective
        self.eps, self.step_size, self.steps = float(eps), float(step_size), steps
        self.init = init if init is not None else GaussianInit()
        self.bn_mode = bn_mode
        self.init_view = init_view
        self.final_forward = final_forward

    @property
    def models_used(self) -> tuple[str, ...]:
        return self.objective.models_used

    def _ascend(self, x_adv: Tensor, grad: Tensor, x: Tensor) -> Tensor:
        return project(x_adv.detach() + self.step_size * grad.sign(), x, self.eps)

    def __call__(self, models: Mapping[str, nn.Module], x: Tensor, y: Tensor) -> AttackResult:
        used = [models[n] for n in self.models_used]
        train = self.bn_mode == "train"
        views: dict[str, Tensor] = {}
        inputs: dict[str, Tensor] = {}
        # Each model goes back to its own mode (a model may hold parts in their own mode, e.g. a frozen BN).
        with model_mode(used, train=train):
            x_adv = self.init(x, self.eps).detach()
            first = 0
            ctx = self.objective.prepare(models, x, y)
            if self.init_view:
                # Forward once with parameter gradients: its output is both the loss's view at x_init
                # and the source of the first attack step's input gradient.
                x_init = x_adv.requires_grad_(True)
                loss, logits = self.objective(models, x_init, y, ctx)
                (grad,) = torch.autograd.grad(loss, x_init, retain_graph=True)
                inputs["x_init"] = x_init.detach()
                views[f"{self.objective.model}(x_init)"] = logits
                x_adv = self._ascend(x_init, grad, x)
                first = 1
            # Frozen parameters: the steps neither build nor store anything for weight gradients.
            with model_mode(used, train=None, freeze=True):
                for _ in range(first, self.steps):
                    x_adv.requires_grad_(True)
                    loss, _ = self.objective(models, x_adv, y, ctx)
                    (grad,) = torch.autograd.grad(loss, x_adv)
                    x_adv = self._ascend(x_adv, grad, x)
            if self.final_forward:
                with torch.no_grad():
                    self.objective(models, x_adv, y, ctx)
        inputs["x_adv"] = x_adv.detach()
        return AttackResult(inputs=inputs, views=views)
