"""RAT's TRADES training step, transcribed for the CPU (github.com/Alexkael/Randomized-Adversarial-Training
@010da0c, ``TRADES_first_second/trades_first_second.py`` L18-118 and ``train_first_second.py`` L113-128).

What tests/test_rat.py compares ``rat_trades_cifar10`` against. ``.cuda()`` is dropped; ``Variable`` becomes
``detach``; random draws take the tensor's dtype (the code draws float32 on the host) so a test can run in
float64; ``KLDivLoss(size_average=False)`` is ``reduction='sum'`` (the same value). Two arguments let
the test run it on a backbone other than the authors' WRN: ``fc`` names the classifier weight (the code
reads ``'fc.weight'``), and ``noised`` decides which parameters get weight noise (the code: ``'conv' in
name``, which on the authors' WRN-34-10 is every convolution).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def reg_gap(tl_gap: Tensor) -> Tensor:
    """trades_first_second.py L75-92, as written (loops included)."""
    tl_gap = tl_gap - torch.min(tl_gap)
    tl_gap = tl_gap / torch.sum(tl_gap)
    if len(tl_gap) == 10:
        cc = 0.8
    elif len(tl_gap) == 100:
        cc = 0.98
    tt = torch.zeros(len(tl_gap), len(tl_gap), dtype=tl_gap.dtype)
    for i in range(len(tt)):
        tt[i] = tl_gap
    for i in range(len(tt)):
        tt[i, i] = 0.0
    tt = cc * tt / tt.sum(1).reshape(-1, 1)
    for i in range(len(tt)):
        tt[i, i] = 1 - cc
    return tt


def trades_loss(
    model: nn.Module,
    x_natural: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer,
    step_size: float = 2 / 255,
    epsilon: float = 8 / 255,
    perturb_steps: int = 10,
    beta: float = 6.0,
    alpha: float = 0.2,
    fc: str = "fc.weight",
    noised: Callable[[str], bool] = lambda name: "conv" in name,
) -> Tensor:
    """trades_first_second.py L18-118 (the l_inf branch), with ``train_first_second.py``'s arguments."""
    model2 = copy.deepcopy(model)
    criterion_kl = nn.KLDivLoss(reduction="sum")
    model.eval()
    model2.eval()
    batch_size = len(x_natural)
    with torch.no_grad():
        for name, param in model2.named_parameters():
            if noised(name):
                param.add_(0.0001 * torch.randn(param.shape, dtype=param.dtype).detach())
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape, dtype=x_natural.dtype).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model2(x_adv), dim=1), F.softmax(model2(x_natural), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    optimizer.zero_grad()
    loss_natural = F.cross_entropy(model(x_natural), y)
    loss_natural.backward(retain_graph=True)
    for name, param in model.named_parameters():
        if name == fc:
            tl1_natural = abs(torch.sum(param.grad, 1))
            tl2_natural = torch.sum(param.grad, 1) ** 2
    optimizer.zero_grad()
    loss_adv = F.cross_entropy(model(x_adv), y)
    loss_adv.backward()
    for name, param in model.named_parameters():
        if name == fc:
            tl1_adv = abs(torch.sum(param.grad, 1))
            tl2_adv = torch.sum(param.grad, 1) ** 2
    tl1_gap = reg_gap(tl1_natural - tl1_adv)
    tl1_gap_ = reg_gap(tl1_adv - tl1_natural)
    reg_gap(tl2_natural - tl2_adv)  # tl2_gap, computed and never used (L96)
    tl2_gap_ = reg_gap(tl2_adv - tl2_natural)
    y1 = tl1_gap[y]
    y2 = tl1_gap_[y]
    yy1 = tl2_gap_[y]  # L101, as written
    yy2 = tl2_gap_[y]
    optimizer.zero_grad()
    loss_robust = (1.0 / batch_size) * criterion_kl(
        F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1)
    )
    loss_tl1 = (1.0 / batch_size) * criterion_kl(F.log_softmax(model(x_adv), dim=1), y1)
    loss_tl1_ = (1.0 / batch_size) * criterion_kl(F.log_softmax(model(x_natural), dim=1), y2)
    loss_tl2 = (1.0 / batch_size) * criterion_kl(F.log_softmax(model(x_adv), dim=1), yy1)
    loss_tl2_ = (1.0 / batch_size) * criterion_kl(F.log_softmax(model(x_natural), dim=1), yy2)
    first_loss = 0.5 * (loss_tl1 + loss_tl1_)
    second_loss = 0.5 * (loss_tl2 + loss_tl2_)
    return loss_natural * (1 - alpha) + alpha * first_loss + 0.5 * alpha * second_loss + beta * loss_robust


def rat_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, data: Tensor, target: Tensor, **kw: object
) -> Tensor:
    """train_first_second.py L113-128: zero_grad, trades_loss, backward, step."""
    optimizer.zero_grad()
    loss = trades_loss(model, data, target, optimizer, **kw)
    loss.backward()
    optimizer.step()
    return loss.detach()
