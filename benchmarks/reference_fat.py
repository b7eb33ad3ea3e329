"""The authors' FAT, FAT-for-TRADES and GAIRAT training steps, transcribed for the CPU (tests compare).

Sources, read at the commits TABLE1-METHODS.md lists:

* zjfheart/Friendly-Adversarial-Training 80a0640: ``earlystop.py`` L5-113, ``FAT.py`` L52-69,
  ``FAT_for_TRADES.py`` L48-82;
* zjfheart/Geometry-aware-Instance-reweighted-Adversarial-Training 16813b5: ``attack_generator.py`` L20-53
  (``GA_PGD``), ``GAIR.py`` L5-17, ``GAIRAT.py`` L126-153.

Changes, all mechanical: ``.cuda()`` dropped; ``reshape(-1, 3, 32, 32)`` as ``reshape(-1, *shape)``; the
random draws are injectable so a test gives both sides the same noise: ``uniform(shape, eps)`` stands for
``torch.from_numpy(np.random.uniform(-eps, eps, shape)).float()`` and ``randn(shape)`` for
``torch.randn(shape)`` (the defaults are the code's). Everything else, including the per-example Python
loop, the subset bookkeeping and the output reordering, is the code's.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

Draw = Callable[..., Tensor]


def numpy_uniform(shape: torch.Size, eps: float) -> Tensor:
    """The code's uniform start noise: ``np.random.uniform(-eps, eps, shape)`` as float32."""
    return torch.from_numpy(np.random.uniform(-eps, eps, shape)).float()


def earlystop(
    model: nn.Module,
    data: Tensor,
    target: Tensor,
    step_size: float,
    epsilon: float,
    perturb_steps: int,
    tau: int,
    randominit_type: str,
    loss_fn: str,
    rand_init: bool = True,
    omega: float = 0.0,
    uniform: Draw = numpy_uniform,
    randn: Draw = torch.randn,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """``earlystop.py`` L5-113 (after 6e461e0): friendly adversarial data, reordered frozen-first."""
    model.eval()
    shape = data.shape[1:]
    K = perturb_steps
    count = 0
    output_target = []
    output_adv = []
    output_natural = []
    control = torch.ones(len(target)) * tau
    if rand_init:
        if randominit_type == "normal_distribution_randominit":
            iter_adv = data.detach() + 0.001 * randn(data.shape).detach()
            iter_adv = torch.clamp(iter_adv, 0.0, 1.0)
        if randominit_type == "uniform_randominit":
            iter_adv = data.detach() + uniform(data.shape, epsilon)
            iter_adv = torch.clamp(iter_adv, 0.0, 1.0)
    else:
        iter_adv = data.detach()
    iter_clean_data = data.detach()
    iter_target = target.detach()
    output_iter_clean_data = model(data)
    while K > 0:
        iter_adv.requires_grad_()
        output = model(iter_adv)
        pred = output.max(1, keepdim=True)[1]
        output_index = []
        iter_index = []
        for idx in range(len(pred)):
            if pred[idx] != iter_target[idx]:
                if control[idx] == 0:
                    output_index.append(idx)
                else:
                    control[idx] -= 1
                    iter_index.append(idx)
            else:
                iter_index.append(idx)
        if len(output_index) != 0:
            if len(output_target) == 0:
                output_adv = iter_adv[output_index].reshape(-1, *shape)
                output_natural = iter_clean_data[output_index].reshape(-1, *shape)
                output_target = iter_target[output_index].reshape(-1)
            else:
                output_adv = torch.cat((output_adv, iter_adv[output_index].reshape(-1, *shape)), dim=0)
                output_natural = torch.cat(
                    (output_natural, iter_clean_data[output_index].reshape(-1, *shape)), dim=0
                )
                output_target = torch.cat((output_target, iter_target[output_index].reshape(-1)), dim=0)
        model.zero_grad()
        with torch.enable_grad():
            if loss_fn == "cent":
                loss_adv = nn.CrossEntropyLoss(reduction="mean")(output, iter_target)
            if loss_fn == "kl":
                criterion_kl = nn.KLDivLoss(reduction="sum")  # size_average=False
                loss_adv = criterion_kl(
                    F.log_softmax(output, dim=1), F.softmax(output_iter_clean_data, dim=1)
                )
        loss_adv.backward(retain_graph=True)
        grad = iter_adv.grad
        if len(iter_index) != 0:
            control = control[iter_index]
            iter_adv = iter_adv[iter_index]
            iter_clean_data = iter_clean_data[iter_index]
            iter_target = iter_target[iter_index]
            output_iter_clean_data = output_iter_clean_data[iter_index]
            grad = grad[iter_index]
            eta = step_size * grad.sign()
            iter_adv = iter_adv.detach() + eta + omega * randn(iter_adv.shape).detach()
            iter_adv = torch.min(torch.max(iter_adv, iter_clean_data - epsilon), iter_clean_data + epsilon)
            iter_adv = torch.clamp(iter_adv, 0, 1)
            count += len(iter_target)
        else:
            output_adv = output_adv.detach()
            return output_adv, output_target, output_natural, count
        K = K - 1
    if len(output_target) == 0:
        output_target = iter_target.reshape(-1).squeeze()
        output_adv = iter_adv.reshape(-1, *shape)
        output_natural = iter_clean_data.reshape(-1, *shape)
    else:
        output_adv = torch.cat((output_adv, iter_adv.reshape(-1, *shape)), dim=0)
        output_target = torch.cat((output_target, iter_target.reshape(-1)), dim=0).squeeze()
        output_natural = torch.cat((output_natural, iter_clean_data.reshape(-1, *shape)), dim=0)
    output_adv = output_adv.detach()
    return output_adv, output_target, output_natural, count


def fat_tau(epoch: int) -> int:
    """``FAT.py`` L77-86 ``adjust_tau`` with dynamic tau, called with the 1-based epoch (L174)."""
    if epoch <= 50:
        return 0
    if epoch <= 90:
        return 1
    return 2


def fat_trades_tau(epoch: int) -> int:
    """``FAT_for_TRADES.py`` L90-101 ``adjust_tau`` with dynamic tau."""
    if epoch <= 30:
        return 0
    if epoch <= 50:
        return 1
    if epoch <= 70:
        return 2
    return 3


def fat_step(model: nn.Module, data: Tensor, target: Tensor, tau: int, **draws: Draw) -> Tensor:
    """``FAT.py`` L52-69 up to ``backward`` (the caller steps): friendly data, train mode, mean CE."""
    output_adv, output_target, output_natural, count = earlystop(
        model, data, target, step_size=0.007, epsilon=0.031, perturb_steps=10, tau=tau,
        randominit_type="uniform_randominit", loss_fn="cent", rand_init=True, omega=0.001, **draws,
    )  # fmt: skip
    model.train()
    model.zero_grad()
    output = model(output_adv)
    loss = nn.CrossEntropyLoss(reduction="mean")(output, output_target)
    loss.backward()
    return loss


def trades_loss(adv_logits: Tensor, natural_logits: Tensor, target: Tensor, beta: float) -> Tensor:
    """``FAT_for_TRADES.py`` L48-56 ``TRADES_loss``."""
    batch_size = len(target)
    criterion_kl = nn.KLDivLoss(reduction="sum")
    loss_natural = nn.CrossEntropyLoss(reduction="mean")(natural_logits, target)
    loss_robust = (1.0 / batch_size) * criterion_kl(
        F.log_softmax(adv_logits, dim=1), F.softmax(natural_logits, dim=1)
    )
    return loss_natural + beta * loss_robust


def fat_trades_step(
    model: nn.Module, data: Tensor, target: Tensor, tau: int, beta: float = 6.0, **draws: Draw
) -> Tensor:
    """``FAT_for_TRADES.py`` L62-81 up to ``backward``: clean forward first, then adversarial."""
    output_adv, output_target, output_natural, count = earlystop(
        model, data, target, step_size=0.007, epsilon=0.031, perturb_steps=10, tau=tau,
        randominit_type="normal_distribution_randominit", loss_fn="kl", rand_init=True, omega=0.0, **draws,
    )  # fmt: skip
    model.train()
    model.zero_grad()
    natural_logits = model(output_natural)
    adv_logits = model(output_adv)
    loss = trades_loss(adv_logits, natural_logits, output_target, beta)
    loss.backward()
    return loss


def ga_pgd(
    model: nn.Module,
    data: Tensor,
    target: Tensor,
    epsilon: float,
    step_size: float,
    num_steps: int,
    uniform: Draw = numpy_uniform,
) -> tuple[Tensor, Tensor]:
    """``attack_generator.py`` L20-53, the ``category='Madry'``, ``loss_fn='cent'`` path GAIRAT uses."""
    model.eval()
    Kappa = torch.zeros(len(data))
    x_adv = data.detach() + uniform(data.shape, epsilon)
    x_adv = torch.clamp(x_adv, 0.0, 1.0)
    for k in range(num_steps):  # noqa: B007  (the code's loop variable)
        x_adv.requires_grad_()
        output = model(x_adv)
        predict = output.max(1, keepdim=True)[1]
        for p in range(len(x_adv)):
            if predict[p] == target[p]:
                Kappa[p] += 1
        model.zero_grad()
        with torch.enable_grad():
            loss_adv = nn.CrossEntropyLoss(reduction="mean")(output, target)
        loss_adv.backward()
        eta = step_size * x_adv.grad.sign()
        x_adv = x_adv.detach() + eta
        x_adv = torch.min(torch.max(x_adv, data - epsilon), data + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv.detach(), Kappa


def gair(num_steps: int, Kappa: Tensor, Lambda: float, func: str) -> Tensor:  # noqa: N803  (the code's names)
    """``GAIR.py`` L5-17."""
    if func == "Tanh":
        reweight = ((Lambda + (int(num_steps / 2) - Kappa) * 5 / (int(num_steps / 2))).tanh() + 1) / 2
        normalized_reweight = reweight * len(reweight) / reweight.sum()
    elif func == "Sigmoid":
        reweight = (Lambda + (int(num_steps / 2) - Kappa) * 5 / (int(num_steps / 2))).sigmoid()
        normalized_reweight = reweight * len(reweight) / reweight.sum()
    elif func == "Discrete":
        reweight = ((num_steps + 1) - Kappa) / (num_steps + 1)
        normalized_reweight = reweight * len(reweight) / reweight.sum()
    return normalized_reweight


def adjust_lambda(epoch: int, epochs: int = 120, lam: float = -1.0) -> float:
    """``GAIRAT.py`` L162-194 with the defaults (``Lambda_max = inf``, 'fixed'); ``epoch`` is 1-based."""
    if epochs >= 110:
        return lam if epoch >= 60 else float("inf")
    return lam if epoch >= 30 else float("inf")


def gairat_step(
    model: nn.Module, data: Tensor, target: Tensor, epoch: int, uniform: Draw = numpy_uniform
) -> Tensor:
    """``GAIRAT.py`` L126-153 up to ``backward``; ``epoch`` is the code's 0-based epoch."""
    Lambda = adjust_lambda(epoch + 1)
    x_adv, Kappa = ga_pgd(model, data, target, 0.031, 0.007, 10, uniform=uniform)
    model.train()
    model.zero_grad()
    logit = model(x_adv)
    if (epoch + 1) >= 60:
        loss = nn.CrossEntropyLoss(reduction="none")(logit, target)
        normalized_reweight = gair(10, Kappa, Lambda, "Tanh")
        loss = loss.mul(normalized_reweight).mean()
    else:
        loss = nn.CrossEntropyLoss(reduction="mean")(logit, target)
    loss.backward()
    return loss
