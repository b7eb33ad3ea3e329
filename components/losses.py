"""Loss terms over named views, and their weighted sum.

Every term reads views by name (``'target(x_adv)'``, ``'guide(x)'``, see ``components.views``) and the
labels, and returns a scalar. Conventions follow METHODS.md:

* ``KL(input, target)`` is PyTorch's argument order, ``F.kl_div(log_softmax(input), softmax(target))``,
  i.e. KL(q_target || q_input) in math notation: the *target* view is the distribution being matched.
* ``reduction='mean'`` averages over all B*K elements as the authors' code does (``torch.mean`` of the
  element-wise KL, ``nn.MSELoss()``), ``'batchmean'`` sums over classes and averages over the batch,
  ``'sum'`` sums everything. With K classes, mean = batchmean / K, so the weights are not portable
  between reductions.
* Nothing is detached unless a term is told to: gradients reach every model whose view a term reads.

Terms compute in float32 whatever the autocast dtype, because log-probability differences of
near-identical distributions lose everything in bf16.
"""

from __future__ import annotations

from collections.abc import Mapping

import gin
import torch
import torch.nn.functional as F
from torch import Tensor

from components.views import parse_view

REDUCTIONS = ("mean", "batchmean", "sum")


def _full(z: Tensor) -> Tensor:
    """Upcast half-precision logits to float32; leave float32/float64 as they are."""
    return z.float() if z.dtype in (torch.bfloat16, torch.float16) else z


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; use one of {REDUCTIONS}")
    return reduction


def _reduce(elementwise: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return elementwise.mean()
    if reduction == "batchmean":
        return elementwise.sum() / elementwise.shape[0]
    return elementwise.sum()


def kl_div(
    input_logits: Tensor, target_logits: Tensor, reduction: str = "mean", target_eps: float = 0.0
) -> Tensor:
    """KLdiv(input || target) = sum_k q_t (log q_t - log q_in), reduced as asked.

    ``target_eps > 0`` reproduces the authors' helper ``b * (log(b + eps) - a)`` exactly (eps only inside
    the log of the target probabilities); ``0`` is ``F.kl_div``. Both differentiate through both sides.
    """
    log_q_in = F.log_softmax(_full(input_logits), dim=1)
    if target_eps > 0:
        q_t = F.softmax(_full(target_logits), dim=1)
        elementwise = q_t * (torch.log(q_t + target_eps) - log_q_in)
    else:
        log_q_t = F.log_softmax(_full(target_logits), dim=1)
        elementwise = F.kl_div(log_q_in, log_q_t, reduction="none", log_target=True)
    return _reduce(elementwise, reduction)


class Term:
    """A loss term: reads the views named in ``views`` and the labels, returns a scalar tensor.

    A term may also read per-example values the attack generator reports (``reports``, e.g. GAIRAT's
    ``'kappa'``): they arrive in the same mapping as the views, under their names; the graph checks at
    build time that its generator produces every report a term names.
    """

    views: tuple[str, ...] = ()
    reports: tuple[str, ...] = ()

    def __call__(self, views: Mapping[str, Tensor], y: Tensor) -> Tensor:
        raise NotImplementedError

    def _register(self, *names: str) -> tuple[str, ...]:
        # Normalise spelling ('target( x )' -> 'target(x)') so equal views share one forward pass.
        self.views = tuple(str(parse_view(n)) for n in names)
        return self.views


@gin.configurable
class CrossEntropy(Term):
    """Mean cross-entropy of a view against the hard labels (batch mean)."""

    def __init__(self, view: str = gin.REQUIRED) -> None:
        (self.view,) = self._register(view)

    def __call__(self, views: Mapping[str, Tensor], y: Tensor) -> Tensor:
        return F.cross_entropy(_full(views[self.view]), y)


@gin.configurable
class LabelSmoothedCE(Term):
    """FGSM-PGI/PGK's label-smoothed CE: ``factor`` on the true class, (1-factor)/(K-1) on each other.

    Note this is not ``F.cross_entropy(label_smoothing=s)``, which puts 1-s+s/K on the true class.
    """

    def __init__(self, view: str = gin.REQUIRED, factor: float = 0.5) -> None:
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"LabelSmoothedCE.factor must be in (0, 1], got {factor}")
        (self.view,) = self._register(view)
        self.factor = factor

    def __call__(self, views: Mapping[str, Tensor], y: Tensor) -> Tensor:
        logits = _full(views[self.view])
        k = logits.shape[1]
        soft = torch.full_like(logits, (1.0 - self.factor) / (k - 1))
        soft.scatter_(1, y[:, None], self.factor)
        return -(soft * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


@gin.configurable
class MSE(Term):
    """Mean squared error between two views' logits, averaged over B*K (``nn.MSELoss()``)."""

    def __init__(
        self, input: str = gin.REQUIRED, target: str = gin.REQUIRED, detach_target: bool = False
    ) -> None:
        self.input, self.target = self._register(input, target)
        self.detach_target = detach_target

    def __call__(self, views: Mapping[str, Tensor], y: Tensor) -> Tensor:
        target = _full(views[self.target])
        if self.detach_target:
            target = target.detach()
        return F.mse_loss(_full(views[self.input]), target)


@gin.configurable
class KL(Term):
    """KLdiv(input || target) in PyTorch order (see module doc), with an explicit reduction."""

    def __init__(
        self,
        input: str = gin.REQUIRED,
        target: str = gin.REQUIRED,
        reduction: str = "mean",
        target_eps: float = 0.0,
        detach_target: bool = False,
    ) -> None:
        self.input, self.target = self._register(input, target)
        self.reduction = _check_reduction(reduction)
        self.target_eps = target_eps
        self.detach_target = detach_target

    def __call__(self, views: Mapping[str, Tensor], y: Tensor) -> Tensor:
        target = views[self.target]
        if self.detach_target:
            target = target.detach()
        return kl_div(views[self.input], target, self.reduction, self.target_eps)


@gin.configurable
class KLGap(Term):
    """D2R's symmetric gap |KLdiv(a || b) - KLdiv(b || a)|, gradient through both KLs and both views.

    With a = guide(x), b = target(x) this is the code's ``|kl1 - kl2|`` (METHODS.md 1.3).
    """

    def __init__(
        self, a: str = gin.REQUIRED, b: str = gin.REQUIRED, reduction: str = "mean", target_eps: float = 0.0
    ) -> None:
        self.a, self.b = self._register(a, b)
        self.reduction = _check_reduction(reduction)
        self.target_eps = target_eps

    def __call__(self, views: Mapping[str, Tensor], y: Tensor) -> Tensor:
        za, zb = views[self.a], views[self.b]
        ab = kl_div(za, zb, self.reduction, self.target_eps)
        ba = kl_div(zb, za, self.reduction, self.target_eps)
        return (ab - ba).abs()


@gin.configurable
class BoostedCE(Term):
    """MART's boosted cross-entropy (Wang et al. 2020): ``CE(z, y) - mean log(1.0001 - p_k' + 1e-12)``.

    ``k'`` is the most probable wrong class, picked as the authors' code picks it (the top two of an
    ``argsort`` of the probabilities, the first of them that is not ``y``), so ties break identically.
    The constants 1.0001 and 1e-12 are the code's.
    """

    def __init__(self, view: str = gin.REQUIRED) -> None:
        (self.view,) = self._register(view)

    def __call__(self, views: Mapping[str, Tensor], y: Tensor) -> Tensor:
        logits = _full(views[self.view])
        probs = F.softmax(logits, dim=1)
        top2 = torch.argsort(probs, dim=1)[:, -2:]
        wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
        return F.cross_entropy(logits, y) + F.nll_loss(torch.log(1.0001 - probs + 1e-12), wrong)


@gin.configurable
class MisclassificationAwareKL(Term):
    """MART's KL: ``(1/B) sum_i KLdiv(input_i || target_i) * (1.0000001 - p_y(target_i))``.

    The per-example KL (summed over classes, ``nn.KLDivLoss`` on ``log(p_input + 1e-12)``) is weighted by
    how badly the clean input is classified, so misclassified examples pull harder. As in the code,
    gradients reach both views, including through the weight. The views are registered target first:
    the clean forward comes before the adversarial one, as in the code, so BatchNorm statistics see the
    same order of batches.

    ``log_target`` (a stabilizer, off in the faithful config): take the target's log-probabilities from
    ``log_softmax`` instead of letting ``kl_div`` take ``log`` of its softmax. The value is the same up to
    rounding, but the code's form has a NaN gradient wherever a clean probability underflows to exactly 0
    (``d(p log p)/dp = log p + 1``), which a confident network reaches within a few dozen steps at lr 0.02
    (docs/stability.md).
    """

    def __init__(
        self, input: str = gin.REQUIRED, target: str = gin.REQUIRED, log_target: bool = False
    ) -> None:
        self.target, self.input = self._register(target, input)
        self.log_target = log_target

    def __call__(self, views: Mapping[str, Tensor], y: Tensor) -> Tensor:
        p_input = F.softmax(_full(views[self.input]), dim=1)
        log_input = torch.log(p_input + 1e-12)
        if self.log_target:
            log_p_target = F.log_softmax(_full(views[self.target]), dim=1)
            p_target = log_p_target.exp()
            per_example = F.kl_div(log_input, log_p_target, reduction="none", log_target=True).sum(dim=1)
        else:
            p_target = F.softmax(_full(views[self.target]), dim=1)
            per_example = F.kl_div(log_input, p_target, reduction="none").sum(dim=1)
        p_true = p_target.gather(1, y[:, None]).squeeze(1)
        return (1.0 / y.shape[0]) * torch.sum(per_example * (1.0000001 - p_true))


@gin.configurable
class WeightedLoss:
    """The training objective: ``sum_i w_i * term_i`` over named, weighted terms.

    ``terms`` maps a term name (used in metric names ``train/loss/<name>``) to ``(weight, term)``.
    Weights are plain numbers, normally gin macros (ALPHA, BETA, GAMMA, LAMBDA), so a config, an override
    and an Optuna trial all set them the same way.
    """

    def __init__(self, terms: Mapping[str, tuple[float, Term]] = gin.REQUIRED) -> None:
        if not terms:
            raise ValueError("WeightedLoss.terms is empty: list at least one (weight, term)")
        self.terms: dict[str, tuple[float, Term]] = {}
        for name, entry in terms.items():
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[1], Term)):
                raise ValueError(f"loss term {name!r} must be (weight, term), got {entry!r}")
            weight = float(entry[0])
            self.terms[name] = (weight, entry[1])

    @property
    def views(self) -> list[str]:
        """Every view the terms read, in order of first use, each once."""
        return list(dict.fromkeys(v for _, term in self.terms.values() for v in term.views))

    @property
    def reports(self) -> list[str]:
        """Every generator report the terms read, each once."""
        return list(dict.fromkeys(r for _, term in self.terms.values() for r in term.reports))

    def __call__(self, views: Mapping[str, Tensor], y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the weighted total and each term's unweighted value (tensors: no host sync)."""
        parts = {name: term(views, y) for name, (_, term) in self.terms.items()}
        total = sum(w * parts[name] for name, (w, _) in self.terms.items())
        return total, parts
