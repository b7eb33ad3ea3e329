"""LAS-AT's strategy-driven attack: per-example epsilon, iterations and step size drawn from a network.

LAS-AT (Jia et al., CVPR 2022; jiaxiaojunQAQ/LAS-AT) lets a *strategy network* read the clean batch and
pick, per example, an attack from candidate lists. Everything here follows
``LAS_PGD_AT/LAS_AT_train_cifar10.py`` (cited as L<n>):

* ``StrategySpace``: the candidate lists (``--epsilon_types`` etc., L38-41; epsilon and step in 1/255).
* ``sample_strategy``: one ``Categorical(softmax(logits))`` per head, sampled in head order, keeping the
  log-probabilities for the policy gradient (``select_action``, L183-237). Sampling is stochastic whether
  the network is in train or eval mode, as in the code (its argmax strategy is computed but never used).
* ``StrategyPGDGenerator``: ``Attack_policy_batch`` (L312-357) as a training generator. The start is
  U(-8/255, 8/255) whatever the sampled epsilon, drawn per channel and clipped to the image box; the loop
  runs max(iterations) times over the whole batch, and an example whose own budget is spent is masked out
  of the update ``delta = clip(delta + mask * alpha_i * sign(g), -eps_i, eps_i)`` (then the box). The
  target is in eval mode (``Get_delta``, L358-362). The iterate is kept as ``delta`` (as the code does),
  not as ``x + delta``, so the two round identically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import gin
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Categorical

from components.attacks.objectives import CEObjective, Objective
from components.attacks.pgd import BN_MODES, AttackResult, check_eps
from components.modes import model_mode


def _candidates(name: str, values: Sequence[int | float]) -> tuple[float, ...]:
    values = tuple(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 for v in values):
        raise ValueError(f"StrategySpace.{name} must be a non-empty list of positive numbers, got {values!r}")
    return values


@gin.configurable
class StrategySpace:
    """The candidate attack parameters, one strategy head each: attacks, epsilons, iterations, step sizes.

    ``epsilons`` and ``step_sizes`` are in 1/255 units as on the authors' command line (``--epsilon_types 3
    4 ... 15``); ``iterations`` are integers. ``attacks`` names the attack methods; the code has one,
    ``'IFGSM'`` (its head still samples, and its log-probability enters the policy loss).
    """

    def __init__(
        self,
        epsilons: Sequence[int | float] = gin.REQUIRED,
        iterations: Sequence[int] = gin.REQUIRED,
        step_sizes: Sequence[int | float] = gin.REQUIRED,
        attacks: Sequence[str] = ("IFGSM",),
    ) -> None:
        if tuple(attacks) != ("IFGSM",):
            raise ValueError(f"StrategySpace.attacks: only ('IFGSM',) is implemented, got {tuple(attacks)!r}")
        self.attacks = tuple(attacks)
        self.epsilons = _candidates("epsilons", epsilons)
        self.iterations = tuple(int(v) for v in _candidates("iterations", iterations))
        self.step_sizes = _candidates("step_sizes", step_sizes)
        check_eps(max(self.epsilons) / 255.0, max(self.step_sizes) / 255.0, "StrategySpace")

    @property
    def head_sizes(self) -> tuple[int, ...]:
        """Number of candidates per head, in the strategy network's head order."""
        return (len(self.attacks), len(self.epsilons), len(self.iterations), len(self.step_sizes))


@dataclass
class Strategy:
    """One sampled strategy per example: the chosen indices, their log-probabilities and the values."""

    actions: tuple[Tensor, ...]
    log_probs: tuple[Tensor, ...]
    eps: Tensor  # (B,) pixel units
    step_size: Tensor  # (B,) pixel units
    iterations: Tensor  # (B,) integers


def sample_strategy(model: nn.Module, x: Tensor, space: StrategySpace) -> Strategy:
    """Run the strategy network on ``x`` and sample each head from ``Categorical(softmax(logits))``.

    Heads are sampled in order (method, epsilon, iterations, step), so a seeded run draws what the code
    draws. ``log_probs`` carry gradients into ``model`` when called with gradients enabled.
    """
    outputs = model(x)
    if len(outputs) != len(space.head_sizes):
        raise ValueError(f"the strategy network has {len(outputs)} heads, the space {len(space.head_sizes)}")
    actions, log_probs = [], []
    for logits in outputs:
        dist = Categorical(F.softmax(logits.float(), dim=-1))
        action = dist.sample()
        actions.append(action)
        log_probs.append(dist.log_prob(action))
    _, eps_idx, iters_idx, step_idx = actions
    device = x.device
    # float32(e / 255) per candidate, as the code's (e / 255.) / std with std = 1.
    eps = torch.tensor([e / 255.0 for e in space.epsilons], dtype=torch.float32, device=device)[eps_idx]
    steps = torch.tensor([s / 255.0 for s in space.step_sizes], dtype=torch.float32, device=device)[step_idx]
    iters = torch.tensor(space.iterations, dtype=torch.long, device=device)[iters_idx]
    return Strategy(tuple(actions), tuple(log_probs), eps, steps, iters)


def uniform_channel_init(x: Tensor, radius: float) -> Tensor:
    """``delta ~ U(-radius, radius)``, channel by channel as the code does, clipped so x + delta is in [0, 1].

    Drawing per channel (``delta[:, c].uniform_``) reproduces the code's random numbers under a seed.
    """
    delta = torch.zeros_like(x)
    for c in range(x.shape[1]):
        delta[:, c].uniform_(-radius, radius)
    return clip_to_box(delta, x)


def clip_to_box(delta: Tensor, x: Tensor) -> Tensor:
    """The code's ``clamp(delta, lower_limit - X, upper_limit - X)`` with limits 0 and 1."""
    return torch.max(torch.min(delta, 1.0 - x), -x)


@gin.configurable
class StrategyPGDGenerator:
    """The LAS-AT attack: a strategy per example from ``strategy`` (a named model), PGD on ``model`` with it.

    * ``space``: the candidate lists the strategy network's heads index.
    * ``init_radius``: the start's half-width, 8/255 in the code whatever epsilon is sampled.
    * ``bn_mode``: the attacked model's mode while attacking ('eval' in the code). The strategy network runs
      in eval mode without gradients for the target's step (``Strategy_model.eval()``, L643).
    * ``objective``: what each step ascends (CE on the target; the code's batch-mean CE has the same sign).
    """

    init_view = False  # no x_init view (TrainingGraph reads this of every generator)

    def __init__(
        self,
        space: StrategySpace = gin.REQUIRED,
        strategy: str = "strategy",
        objective: Objective | None = None,
        init_radius: float = 8 / 255,
        bn_mode: str = "eval",
    ) -> None:
        check_eps(init_radius, what="StrategyPGDGenerator.init_radius")
        if bn_mode not in BN_MODES:
            raise ValueError(f"StrategyPGDGenerator: bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        self.space = space
        self.strategy = strategy
        self.objective = objective if objective is not None else CEObjective()
        self.init = None  # the start is fixed (uniform_channel_init); no pluggable Init
        self.init_radius = float(init_radius)
        self.bn_mode = bn_mode

    @property
    def models_used(self) -> tuple[str, ...]:
        return (*self.objective.models_used, self.strategy)

    @property
    def steps(self) -> int:
        """The most attack steps a batch can run (the largest candidate): what the bench counts."""
        return max(self.space.iterations)

    def sample(self, models: Mapping[str, nn.Module], x: Tensor, train: bool) -> Strategy:
        """A strategy for each example of ``x``; ``train=True``: train mode with gradients (policy update)."""
        model = models[self.strategy]
        with model_mode(model, train=train), torch.set_grad_enabled(train):
            return sample_strategy(model, x, self.space)

    def attack(self, models: Mapping[str, nn.Module], x: Tensor, y: Tensor, strategy: Strategy) -> Tensor:
        """``x + delta`` after the masked per-example PGD of ``strategy`` (detached)."""
        used = [models[n] for n in self.objective.models_used]
        eps = strategy.eps.view(-1, 1, 1, 1).to(x.dtype)
        alpha = strategy.step_size.view(-1, 1, 1, 1).to(x.dtype)
        # One host read per batch: the loop runs as long as the largest sampled budget, as in the code.
        steps = int(strategy.iterations.max())
        with model_mode(used, train=self.bn_mode == "train", freeze=True):
            delta = uniform_channel_init(x, self.init_radius)
            ctx = self.objective.prepare(models, x, y)
            for t in range(steps):
                delta.requires_grad_(True)
                loss, _ = self.objective(models, x + delta, y, ctx)
                (grad,) = torch.autograd.grad(loss, delta)
                mask = (strategy.iterations > t).to(x.dtype).view(-1, 1, 1, 1)
                delta = torch.max(torch.min(delta.detach() + mask * alpha * grad.sign(), eps), -eps)
                delta = clip_to_box(delta, x)
        return (x + delta).detach()

    def __call__(self, models: Mapping[str, nn.Module], x: Tensor, y: Tensor) -> AttackResult:
        strategy = self.sample(models, x, train=False)
        return AttackResult(inputs={"x_adv": self.attack(models, x, y, strategy)})
