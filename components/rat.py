"""RAT's Taylor terms: KL to soft labels built from the classifier-layer gradients of the clean and
adversarial cross-entropy.

RAT (Jin et al., CVPR 2023; code: github.com/Alexkael/Randomized-Adversarial-Training @010da0c,
``TRADES_first_second/trades_first_second.py`` L57-117). The code approximates the first- and second-order
Taylor terms of its randomized-weight objective (README L21: "Appendix D", a Hadamard product in place of a
Kronecker product) as follows:

1. ``s_nat = fc.weight.grad.sum(1)`` after ``CE(model(x), y).backward()`` and ``s_adv`` likewise for x'
   (L59-73): one number per class. First order uses ``|s|``, second order ``s**2``.
2. ``reg_gap(v)`` (L75-92) turns a per-class gap into a C x C soft-label matrix; row ``y`` is the soft label.
3. ``tl1 = KL(gap(|s_nat|-|s_adv|)[y] || p(x'))``, ``tl1_ = KL(gap(|s_adv|-|s_nat|)[y] || p(x))``, and the
   second-order pair with ``s**2`` (L94-112); each ``KLDivLoss(size_average=False) / B``, i.e. batchmean.
   first = (tl1 + tl1_) / 2, second = (tl2 + tl2_) / 2 (L114-115).

The soft labels come from ``.grad`` values, so they are constants (no gradient through them).
"""

from __future__ import annotations

from collections.abc import Mapping

import gin
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.losses import Term, _full

__all__ = ["TaylorSoftLabelKL", "reg_gap"]


def reg_gap(gap: Tensor, cc: float) -> Tensor:
    """The code's ``reg_gap`` (L75-92): a C x C matrix whose row i is the shifted, normalised gap with its
    i-th entry removed, rescaled to sum to ``cc``, and ``1 - cc`` on the diagonal.

    NaN where the code gives NaN: all gaps equal (0 / 0), or a row without off-diagonal mass.
    """
    gap = gap - gap.min()
    gap = gap / gap.sum()
    k = gap.shape[0]
    tt = gap.expand(k, k).clone()
    tt.fill_diagonal_(0.0)
    tt = cc * tt / tt.sum(1).reshape(-1, 1)
    tt.fill_diagonal_(1.0 - cc)
    return tt


def _last_linear_weight(model: nn.Module) -> nn.Parameter:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("TaylorSoftLabelKL needs a model whose classifier is an nn.Linear (the code's fc)")
    return linears[-1].weight


@gin.configurable
class TaylorSoftLabelKL(Term):
    """RAT's first- (``order=1``) or second-order (``order=2``) Taylor term (module doc), unweighted.

    * ``cc``: mass off the diagonal of ``reg_gap`` (the code: 0.8 for 10 classes, 0.98 for 100, L79-82).
    * ``model``: whose classifier gradient is read: the weight of the model's last ``nn.Linear`` (the
      code's ``fc.weight``, the WRN classifier), bound by the graph through :meth:`bind_models`.
    * ``second_order_as_written``: the code's L101 sets ``yy1 = tl2_gap_[y]``, the same soft label as
      ``yy2``; the ``tl2_gap`` of L96 is computed and never used, which looks like a typo. True (faithful)
      transcribes it; False uses ``tl2_gap[y]`` for the adversarial half, as the first order does.
    """

    def __init__(
        self,
        order: int = gin.REQUIRED,
        cc: float = gin.REQUIRED,
        adv: str = "target(x_adv)",
        clean: str = "target(x)",
        model: str = "target",
        second_order_as_written: bool = True,
    ) -> None:
        if order not in (1, 2):
            raise ValueError(f"TaylorSoftLabelKL.order must be 1 or 2, got {order!r}")
        if isinstance(cc, bool) or not (isinstance(cc, (int, float)) and 0.0 < cc < 1.0):
            raise ValueError(f"TaylorSoftLabelKL.cc must be in (0, 1), got {cc!r}")
        self.adv, self.clean = self._register(adv, clean)
        self.order, self.cc, self.model = order, float(cc), model
        self.second_order_as_written = second_order_as_written
        self._weight: nn.Parameter | None = None

    def bind_models(self, models: Mapping[str, nn.Module]) -> None:
        """Called by the graph: find the classifier weight whose gradient the term reads."""
        if self.model not in models:
            raise ValueError(f"TaylorSoftLabelKL.model {self.model!r} is not one of {sorted(models)}")
        self._weight = _last_linear_weight(models[self.model])

    def _class_grad(self, logits: Tensor, y: Tensor) -> Tensor:
        # fc.weight.grad of the batch-mean CE, summed over the input features: one value per class.
        (g,) = torch.autograd.grad(F.cross_entropy(_full(logits), y), self._weight, retain_graph=True)
        return _full(g).sum(1)

    def soft_labels(self, views: Mapping[str, Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
        """(label for the adversarial KL, label for the clean KL), rows of ``reg_gap`` picked by ``y``."""
        if self._weight is None:
            raise RuntimeError("TaylorSoftLabelKL is not bound to a model (TrainingGraph binds it)")
        s_nat = self._class_grad(views[self.clean], y)
        s_adv = self._class_grad(views[self.adv], y)
        if self.order == 1:
            nat, adv = s_nat.abs(), s_adv.abs()
        else:
            nat, adv = s_nat**2, s_adv**2
        for_clean = reg_gap(adv - nat, self.cc)[y]
        if self.order == 2 and self.second_order_as_written:
            return for_clean, for_clean
        return reg_gap(nat - adv, self.cc)[y], for_clean

    def __call__(self, views: Mapping[str, Tensor], y: Tensor) -> Tensor:
        label_adv, label_clean = self.soft_labels(views, y)
        inv_b = 1.0 / y.shape[0]  # (1.0 / batch_size) * KLDivLoss(size_average=False)
        log_adv = F.log_softmax(_full(views[self.adv]), dim=1)
        log_clean = F.log_softmax(_full(views[self.clean]), dim=1)
        kl_adv = inv_b * F.kl_div(log_adv, label_adv, reduction="sum")
        kl_clean = inv_b * F.kl_div(log_clean, label_clean, reduction="sum")
        return 0.5 * (kl_adv + kl_clean)
