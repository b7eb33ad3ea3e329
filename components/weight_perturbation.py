"""Weight-space parts of a step: adversarial weight perturbation (AWP) and the private model copies it uses.

AWP (Wu, Xia, Wang, "Adversarial Weight Perturbation Helps Robust Generalization", NeurIPS 2020,
arXiv 2004.05884; code: github.com/csdongxian/AWP @a7acf5d, ``AT_AWP/utils_awp.py``,
``trades_AWP/utils_awp.py``) trains at perturbed weights: after the attack, a proxy copy of the model takes
one SGD step *up* the training loss; the per-layer rescaled difference ``v`` is added to the model
(``w + gamma * v``) before the loss forward, and subtracted again after the optimizer step, so the update
is ``w <- w - lr * update(w + gamma * v)``.

:class:`ModelShadow` is the shared part: a private copy of a model refreshed from its state each step. AWP's
proxy is one; RAT's attack on a weight-noised copy (``components.attacks.noisy_copy``) is another. A copy
keeps the real model's BatchNorm statistics untouched: its own forwards move only its own statistics,
which the next refresh overwrites.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import gin
import torch
from torch import Tensor, nn

from components import distributed as dist
from components.losses import WeightedLoss
from components.modes import model_mode
from components.views import parse_view

__all__ = ["AWP", "ModelShadow", "awp_direction"]

# utils_awp.py L5: keeps the rescaling finite for a layer the proxy step did not move.
_EPS = 1e-20


class ModelShadow:
    """A private copy of one model, refreshed from it (parameters and buffers) by :meth:`sync`.

    ``load_state_dict`` into a kept copy is what ``proxy.load_state_dict(model.state_dict())`` does in AWP's
    ``calc_awp`` and equals RAT's per-step ``copy.deepcopy(model)`` in state, without a new module per step.
    The copy is rebuilt when the model is another object or moved to another device or dtype. It is a plain
    attribute of its owner, not a registered submodule, so it never enters a checkpoint or an optimizer.
    """

    def __init__(self) -> None:
        self._copy: nn.Module | None = None
        self._key: tuple[int, torch.device, torch.dtype] | None = None

    def sync(self, model: nn.Module) -> nn.Module:
        """The copy, holding exactly ``model``'s current parameters and buffers."""
        ref = next(model.parameters())
        key = (id(model), ref.device, ref.dtype)
        if self._copy is None or self._key != key:
            self._copy = copy.deepcopy(model)
            for p in self._copy.parameters():
                p.grad = None
                p.requires_grad_(True)
            self._key = key
        else:
            self._copy.load_state_dict(model.state_dict())
        return self._copy


def perturbed_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters AWP perturbs: those with more than one dimension whose name contains ``'weight'``.

    ``diff_in_weights`` (utils_awp.py L8-18) walks the state_dict, skips every entry with <= 1 dimension
    (biases, BN affine parameters and buffers) and keeps keys containing 'weight': conv and linear kernels.
    ``add_into_weights`` then adds only into named parameters, so walking the parameters is the same set.
    """
    return [(n, p) for n, p in model.named_parameters() if p.dim() > 1 and "weight" in n]


def awp_direction(model: nn.Module, proxy: nn.Module) -> dict[str, Tensor]:
    """``v = ||w|| / (||w_proxy - w|| + 1e-20) * (w_proxy - w)`` per perturbed layer (utils_awp.py L8-18).

    Each layer's direction has the Frobenius norm of that layer's weights; gamma scales it.
    """
    proxy_params = dict(proxy.named_parameters())
    out = {}
    for name, w in perturbed_parameters(model):
        diff = proxy_params[name].detach() - w.detach()
        out[name] = w.detach().norm() / (diff.norm() + _EPS) * diff
    return out


@gin.configurable
class AWP:
    """Adversarial weight perturbation of one model, as a part of the training step.

    * ``gamma``: the perturbation's size relative to each layer's weight norm (AT-AWP 0.01, TRADES-AWP 0.005).
    * ``warmup_epochs``: epochs trained without perturbation before it starts (1-based epochs from
      ``TrainingGraph.set_epoch``; AWP is on from epoch ``warmup_epochs + 1``).
    * ``proxy_lr``: the proxy's plain-SGD step size (AT-AWP 0.01, TRADES-AWP 0.1). The rescaling cancels it
      up to float rounding; it is kept because ``w_proxy - w`` rounds differently at different sizes.
    * ``objective``: the loss the proxy ascends, a ``WeightedLoss`` over views. ``None`` (the default) takes
      the method's own training loss (``TrainingGraph.loss``), which is what both of the authors' scripts
      do: AT-AWP ascends CE(proxy(x_adv)), TRADES-AWP CE(proxy(x)) + beta * KL_batchmean(proxy(x_adv) ||
      proxy(x)), each exactly its method's loss.
    * ``model``: the perturbed model (``'target'``).

    The proxy pass (``calc_awp``): the proxy is refreshed from the model, put in train mode, computes each
    view of the objective once, and takes one SGD step on the negated objective. Views of other models (a
    guide) are computed by their own refreshed copies in train mode without gradient, so no real model's
    BatchNorm statistics move and only the proxy steps. The order of the proxy's forwards has no effect on
    the direction: the proxy runs in train mode (outputs depend on batch statistics only) and its own running
    statistics are overwritten at the next refresh; so TRADES-AWP's clean, adv, clean order and one clean
    forward give the same ``v`` (tests/test_awp.py checks this against the transcription).

    Not supported under torchrun: each rank would compute its own direction from its shard and the replicas
    would drift (weight decay and momentum act on the perturbed weights); the authors use one DataParallel
    direction. It raises before the first perturbed step.
    """

    def __init__(
        self,
        gamma: float = gin.REQUIRED,
        warmup_epochs: int = 0,
        proxy_lr: float = 0.01,
        objective: WeightedLoss | None = None,
        model: str = "target",
    ) -> None:
        if isinstance(gamma, bool) or not (isinstance(gamma, (int, float)) and gamma > 0):
            raise ValueError(f"AWP.gamma must be a number > 0, got {gamma!r}")
        if isinstance(warmup_epochs, bool) or not (isinstance(warmup_epochs, int) and warmup_epochs >= 0):
            raise ValueError(f"AWP.warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
        if isinstance(proxy_lr, bool) or not (isinstance(proxy_lr, (int, float)) and proxy_lr > 0):
            raise ValueError(f"AWP.proxy_lr must be a number > 0, got {proxy_lr!r}")
        self.gamma, self.warmup_epochs, self.proxy_lr = float(gamma), warmup_epochs, float(proxy_lr)
        self.objective = objective
        self.model = model
        self.active = warmup_epochs == 0
        self._shadows: dict[str, ModelShadow] = {}
        self._applied: tuple[nn.Module, dict[str, Tensor]] | None = None

    def bind(self, models: Mapping[str, nn.Module], loss: WeightedLoss) -> None:
        """Called by the graph: check the names, and take the method's loss when no objective is given."""
        if self.model not in models:
            raise ValueError(f"AWP.model {self.model!r} is not one of the models {sorted(models)}")
        if self.objective is None:
            self.objective = loss
        terms = getattr(self.objective, "terms", {})
        bound = [n for n, (_, t) in terms.items() if callable(getattr(t, "bind_models", None))]
        if bound:
            raise ValueError(
                f"AWP's proxy objective has terms that read the real model's parameters ({bound}, e.g. RAT's "
                "Taylor terms); the proxy cannot evaluate them. Set AWP.objective to a WeightedLoss without "
                "them (RAT's own AWP variant ascends the TRADES loss)"
            )
        if not any(parse_view(v).model == self.model for v in self.objective.views):
            raise ValueError(
                f"AWP's objective reads no view of the perturbed model {self.model!r} "
                f"(views: {self.objective.views}): the proxy step would not move it"
            )

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Epochs 1..warmup_epochs train unperturbed (the authors' ``epoch >= args.awp_warmup`` test)."""
        self.active = epoch > self.warmup_epochs

    @property
    def applied(self) -> bool:
        """Whether the model holds perturbed weights now (between :meth:`perturb` and :meth:`restore`)."""
        return self._applied is not None

    def _shadow(self, name: str, model: nn.Module) -> nn.Module:
        return self._shadows.setdefault(name, ModelShadow()).sync(model)

    def direction(
        self, models: Mapping[str, nn.Module], inputs: Mapping[str, Tensor], y: Tensor
    ) -> dict[str, Tensor]:
        """``calc_awp``: one proxy SGD step up the objective, then the per-layer rescaled difference."""
        model = models[self.model]
        proxy = self._shadow(self.model, model)
        proxy.train()
        views: dict[str, Tensor] = {}
        for name in self.objective.views:
            view = parse_view(name)
            if view.model == self.model:
                views[name] = proxy(inputs[view.input])
            else:
                other = self._shadow(view.model, models[view.model])
                with model_mode(other, train=True), torch.no_grad():
                    views[name] = other(inputs[view.input])
        total, _ = self.objective(views, y)
        params = [p for p in proxy.parameters() if p.requires_grad]
        grads = torch.autograd.grad(-total, params, allow_unused=True)
        with torch.no_grad():
            # proxy_optim = SGD(proxy.parameters(), lr) with no momentum or decay; unused parameters
            # (no gradient) stay, so their direction is 0.
            for p, g in zip(params, grads):
                if g is not None:
                    p.add_(g, alpha=-self.proxy_lr)
        return awp_direction(model, proxy)

    def perturb(self, models: Mapping[str, nn.Module], inputs: Mapping[str, Tensor], y: Tensor) -> None:
        """Compute the direction and add ``gamma * v`` to the model's weights, unless still warming up."""
        if not self.active:
            return
        if self._applied is not None:
            raise RuntimeError("AWP.perturb called twice without restore: the weights are already perturbed")
        if dist.is_distributed():
            raise RuntimeError("AWP under torchrun is not supported (see AWP's docstring); train on one GPU")
        diff = self.direction(models, inputs, y)
        model = models[self.model]
        self._add(model, diff, self.gamma)
        self._applied = (model, diff)

    def restore(self) -> None:
        """Subtract ``gamma * v`` again (``restore``, utils_awp.py L54-55); a no-op when none is applied."""
        if self._applied is None:
            return
        model, diff = self._applied
        self._applied = None
        self._add(model, diff, -self.gamma)

    @staticmethod
    def _add(model: nn.Module, diff: Mapping[str, Tensor], coeff: float) -> None:
        # add_into_weights (utils_awp.py L21-26): param.add_(coeff * diff[name]), in place, no grad.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in diff:
                    p.add_(coeff * diff[name])
