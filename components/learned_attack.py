"""A learned attacker: a named model that chooses the attack, trained by its own optimizer and loss.

DESIGN.md: "a learned attacker (LAS-AT's strategy network) is one more named model with its own optimizer
and its own loss terms". ``TrainingGraph.attacker`` holds one; the trainer calls ``update`` before every
target step (``Trainer.train_step``), and the attacker decides when it learns (every ``every`` calls).
Its model is *not* in ``TrainingGraph.models``: the target's optimizer, ``graph.target``, evaluation and
the registry never see it. The generator reads it by name through ``TrainingGraph.all_models``; its
weights, optimizer, schedule and call count travel in the epoch checkpoint (``training_state``).

LAS-AT (Jia et al., CVPR 2022, jiaxiaojunQAQ/LAS-AT, ``LAS_PGD_AT/LAS_AT_train_cifar10.py``, cited L<n>):
the strategy network is trained by REINFORCE on a batch-scalar reward with no baseline (L596-634):

    policy_loss = sum_heads mean_i(-log pi(a_ij | x_i) * R),   R = a R1 + b R2 + c R3   (L364-411)

R1 is the target's (eval-mode) CE on the strategy's adversarial batch, clipped to [0, 10]; R2 and R3 are the
robust (PGD-10, 2 restarts) and clean accuracy, times 4 and 2, of a one-step *look-ahead copy* of the
target trained on that batch (``LookaheadReward``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Mapping
from typing import Any

import gin
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.attacks.strategy import StrategyPGDGenerator, clip_to_box, uniform_channel_init
from components.losses import Term
from components.modes import model_mode
from components.optim import sgd
from components.schedules import Schedule, make_lr_scheduler

Autocast = Callable[[], contextlib.AbstractContextManager]


def lookahead_pgd(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, alpha: float, steps: int, restarts: int
) -> Tensor:
    """``attack_pgd`` (L240-266): PGD with restarts, in whatever mode ``model`` is (train, in the code).

    Each restart starts U(-eps, eps) (per channel, clipped to the box); a step updates only the examples
    the model still classifies correctly and the restart stops once none is left (a host read per step:
    the number of forwards, and so the BN statistics they move, depends on it). Each example keeps the
    restart with the larger per-example CE (ties go to the later one, ``>=``). Returns delta.
    """
    best_loss = torch.zeros(y.shape[0], device=x.device)
    best = torch.zeros_like(x)
    for _ in range(restarts):
        delta = uniform_channel_init(x, eps)
        for _ in range(steps):
            delta.requires_grad_(True)
            out = model(x + delta)
            correct = out.max(1)[1] == y
            if not bool(correct.any()):
                break
            (grad,) = torch.autograd.grad(F.cross_entropy(out.float(), y), delta)
            step = torch.clamp(delta.detach() + alpha * grad.sign(), -eps, eps)
            delta = torch.where(correct[:, None, None, None], clip_to_box(step, x), delta.detach())
        with torch.no_grad():
            loss = F.cross_entropy(model(x + delta).float(), y, reduction="none")
        better = loss >= best_loss
        best = torch.where(better[:, None, None, None], delta.detach(), best)
        best_loss = torch.max(best_loss, loss)
    return best


@gin.configurable
class LookaheadReward:
    """LAS-AT's reward (``Get_reward``, L364-411) for a strategy's adversarial batch ``x_adv``.

    * R1 = clip(CE_mean(target(x_adv)), 0, ``r1_clip``), target in eval mode.
    * A deep copy of the target takes one step of a fresh SGD (the target's current lr, ``momentum``,
      ``weight_decay``) on ``loss`` (a term reading ``'<model>(x_adv)'``, the code's label-smoothed CE) in
      train mode (``train_target_model``, L269-280). The real target is not touched.
    * PGD-``steps`` (``eps``, ``step_size``, ``restarts``) on the copy, still in train mode (its BN running
      statistics move with every forward), then in eval mode R2 = ``r2_weight`` x robust accuracy and
      R3 = ``r3_weight`` x clean accuracy, each clipped to +-``r23_clip``.
    * reward = a R1 + b R2 + c R3 with ``(a, b, c) = weights``.
    """

    def __init__(
        self,
        loss: Term = gin.REQUIRED,
        model: str = "target",
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        eps: float = 8 / 255,
        step_size: float = 2 / 255,
        steps: int = 10,
        restarts: int = 2,
        r1_clip: float = 10.0,
        r2_weight: float = 4.0,
        r3_weight: float = 2.0,
        r23_clip: float = 10.0,
        weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
    ) -> None:
        expected = f"{model}(x_adv)"
        if tuple(loss.views) != (expected,):
            raise ValueError(f"LookaheadReward.loss must read only {expected!r}, it reads {loss.views}")
        if not (isinstance(steps, int) and steps >= 1 and isinstance(restarts, int) and restarts >= 1):
            raise ValueError(
                f"LookaheadReward: steps and restarts must be integers >= 1, got {steps}, {restarts}"
            )
        if len(weights) != 3:
            raise ValueError(f"LookaheadReward.weights must be (a, b, c), got {weights!r}")
        self.loss, self.model = loss, model
        self.momentum, self.weight_decay = momentum, weight_decay
        self.eps, self.step_size, self.steps, self.restarts = eps, step_size, steps, restarts
        self.r1_clip, self.r2_weight, self.r3_weight, self.r23_clip = r1_clip, r2_weight, r3_weight, r23_clip
        self.weights = tuple(float(w) for w in weights)

    def __call__(
        self,
        models: Mapping[str, nn.Module],
        x: Tensor,
        y: Tensor,
        x_adv: Tensor,
        lr: float,
        autocast: Autocast = contextlib.nullcontext,
    ) -> dict[str, Tensor]:
        """``{'reward', 'r1', 'r2', 'r3'}`` as device scalars (the reward detached)."""
        target = models[self.model]
        with model_mode(target, train=False), torch.no_grad(), autocast():
            r1 = F.cross_entropy(target(x_adv).float(), y).clamp(0.0, self.r1_clip)
        shadow = copy.deepcopy(target)
        shadow.train()
        with autocast():
            shadow_loss = self.loss({f"{self.model}(x_adv)": shadow(x_adv)}, y)
        opt = torch.optim.SGD(
            shadow.parameters(), lr=lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        opt.zero_grad()
        shadow_loss.backward()
        opt.step()
        shadow.requires_grad_(False)  # the attack needs input gradients only
        with autocast():
            delta = lookahead_pgd(shadow, x, y, self.eps, self.step_size, self.steps, self.restarts)
            shadow.eval()
            with torch.no_grad():
                robust = (shadow(x + delta).max(1)[1] == y).sum()
                clean = (shadow(x).max(1)[1] == y).sum()
        # The code reads the counts to Python, scales them in double and makes float32 tensors.
        n = y.shape[0]
        r2 = (robust.double() / n * self.r2_weight).float().clamp(-self.r23_clip, self.r23_clip)
        r3 = (clean.double() / n * self.r3_weight).float().clamp(-self.r23_clip, self.r23_clip)
        a, b, c = self.weights
        reward = a * r1 + b * r2 + c * r3
        return {"reward": reward.detach(), "r1": r1.detach(), "r2": r2, "r3": r3}


class LearnedAttacker(nn.Module):
    """The interface ``TrainingGraph`` and ``Trainer`` use; see the module docstring.

    * ``models``: the named models it owns (kept out of ``TrainingGraph.models``).
    * ``metric_names``: what ``update`` returns when it learned (``train/<name>/<metric>``, and the guard).
    * ``bind(steps_per_epoch, epochs)``: called by the trainer once the run's length is known (``bind()``
      without them outside a run).
    * ``update(models, generator, x, y, lr, autocast)``: before each target step; ``None`` when it did not
      learn this call.
    * ``training_state`` / ``load_training_state``: what the epoch checkpoint keeps.
    """

    metric_names: tuple[str, ...] = ()

    @property
    def models(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def bind(self, steps_per_epoch: int | None = None, epochs: int | None = None) -> None:
        raise NotImplementedError

    def update(
        self,
        models: Mapping[str, nn.Module],
        generator: Any,
        x: Tensor,
        y: Tensor,
        lr: float,
        autocast: Autocast = contextlib.nullcontext,
    ) -> dict[str, Tensor] | None:
        raise NotImplementedError

    def training_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_training_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


@gin.configurable
class PolicyGradientAttacker(LearnedAttacker):
    """LAS-AT's strategy update: REINFORCE on ``reward`` every ``every`` calls (L596-634).

    * ``model``: the strategy network, named ``name`` (the generator's ``strategy``).
    * ``optimizer``: ``optimizer({name: model})`` (``sgd`` scoped, e.g. ``strategy/sgd``).
    * ``schedule``: the code's ``MultiStepLR`` over the *target's* iterations, stepped once per strategy
      update (L512-515), so with updates every 20 batches it never reaches a milestone; None: constant.
    * ``grad_clip_norm``: ``clip_grad_norm_`` on the strategy's gradients before its step (1.0, L632).
    * Call ``n`` (1-based, counted over the whole run and kept in the checkpoint) learns when
      ``n % every == 0``, as the code's global ``curr_step`` (L594-596).
    """

    metric_names = ("policy_loss", "reward", "r1", "r2", "r3")

    def __init__(
        self,
        model: nn.Module = gin.REQUIRED,
        reward: LookaheadReward = gin.REQUIRED,
        name: str = "strategy",
        every: int = 20,
        optimizer: Callable[..., torch.optim.Optimizer] = sgd,
        schedule: Schedule | None = None,
        grad_clip_norm: float | None = 1.0,
    ) -> None:
        super().__init__()
        if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
            raise ValueError(f"PolicyGradientAttacker.every must be an integer >= 1, got {every!r}")
        if grad_clip_norm is not None and not grad_clip_norm > 0:
            raise ValueError(
                f"PolicyGradientAttacker.grad_clip_norm must be > 0 or None, got {grad_clip_norm!r}"
            )
        self.name = name
        self.model = model
        self.reward = reward
        self.every = every
        self.optimizer_fn, self.schedule, self.grad_clip_norm = optimizer, schedule, grad_clip_norm
        self.calls = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    @property
    def models(self) -> dict[str, nn.Module]:
        return {self.name: self.model}

    def bind(self, steps_per_epoch: int | None = None, epochs: int | None = None) -> None:
        """Create the optimizer, and its schedule for a run of ``epochs`` x ``steps_per_epoch`` target steps
        (without them, as outside ``Trainer.fit``: a constant lr)."""
        self.optimizer = self.optimizer_fn(self.models)
        self.scheduler = None
        if self.schedule is not None and steps_per_epoch is not None and epochs is not None:
            self.scheduler = make_lr_scheduler(self.optimizer, self.schedule, steps_per_epoch, epochs)

    def update(
        self,
        models: Mapping[str, nn.Module],
        generator: StrategyPGDGenerator,
        x: Tensor,
        y: Tensor,
        lr: float,
        autocast: Autocast = contextlib.nullcontext,
    ) -> dict[str, Tensor] | None:
        """A policy-gradient step on the clean batch ``x`` every ``every`` calls; the target is unchanged."""
        self.calls += 1
        if self.calls % self.every:
            return None
        if self.optimizer is None:  # used outside Trainer.fit (bench, tests): no schedule
            self.bind()
        with autocast():
            strategy = generator.sample(models, x, train=True)
            x_adv = generator.attack(models, x, y, strategy)
        out = self.reward(models, x, y, x_adv, lr, autocast)
        policy_loss = sum((-lp * out["reward"]).mean() for lp in strategy.log_probs)
        self.optimizer.zero_grad(set_to_none=True)
        if not bool(torch.isfinite(policy_loss)):
            # Keep the strategy's weights finite and report the loss: the divergence guard stops the run
            # naming attacker/policy_loss. (NaN weights would instead fail the next sampling with an
            # opaque Categorical error.) One host read per update; the look-ahead reads more.
            return {"policy_loss": policy_loss.detach(), **out}
        policy_loss.backward()
        if self.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return {"policy_loss": policy_loss.detach(), **out}

    def training_state(self) -> dict[str, Any]:
        if self.optimizer is None:
            raise RuntimeError("PolicyGradientAttacker.training_state before bind()")
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "calls": self.calls,
        }

    def load_training_state(self, state: dict[str, Any]) -> None:
        if self.optimizer is None:
            raise RuntimeError("PolicyGradientAttacker.load_training_state before bind()")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.calls = int(state["calls"])
