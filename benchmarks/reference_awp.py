"""The authors' AT-AWP and TRADES-AWP training steps, transcribed for the CPU
(github.com/csdongxian/AWP @a7acf5d).

What the step tests (tests/test_awp.py) compare robustflow's configs against. ``.cuda()`` and
``nn.DataParallel`` are dropped (on one device DataParallel is a pass-through); everything else is the
code's order of operations (the code's ``X`` is written ``xs``). Random draws take the input's dtype (the
code draws float32 on the host), so a test can run the whole step in float64, where the attack's sign steps
do not flip on rounding. Each function returns what the tests compare; ``on_loss_forward`` lets a test read
the model's weights at the loss forward (the perturbed weights).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

EPS = 1e-20  # AT_AWP/utils_awp.py L5


def diff_in_weights(model: nn.Module, proxy: nn.Module) -> OrderedDict:
    """AT_AWP/utils_awp.py L8-18 (identical in trades_AWP/utils_awp.py)."""
    diff_dict = OrderedDict()
    model_state_dict = model.state_dict()
    proxy_state_dict = proxy.state_dict()
    for (old_k, old_w), (_new_k, new_w) in zip(model_state_dict.items(), proxy_state_dict.items()):
        if len(old_w.size()) <= 1:
            continue
        if "weight" in old_k:
            diff_w = new_w - old_w
            diff_dict[old_k] = old_w.norm() / (diff_w.norm() + EPS) * diff_w
    return diff_dict


def add_into_weights(model: nn.Module, diff: OrderedDict, coeff: float = 1.0) -> None:
    """AT_AWP/utils_awp.py L21-26."""
    names_in_diff = diff.keys()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in names_in_diff:
                param.add_(coeff * diff[name])


def calc_awp_at(
    model: nn.Module, proxy: nn.Module, proxy_optim: Optimizer, inputs_adv: Tensor, targets: Tensor
) -> OrderedDict:
    """AdvWeightPerturb.calc_awp, AT_AWP/utils_awp.py L37-49."""
    proxy.load_state_dict(model.state_dict())
    proxy.train()
    loss = -F.cross_entropy(proxy(inputs_adv), targets)
    proxy_optim.zero_grad()
    loss.backward()
    proxy_optim.step()
    return diff_in_weights(model, proxy)


def calc_awp_trades(
    model: nn.Module,
    proxy: nn.Module,
    proxy_optim: Optimizer,
    inputs_adv: Tensor,
    inputs_clean: Tensor,
    targets: Tensor,
    beta: float,
) -> OrderedDict:
    """TradesAWP.calc_awp, trades_AWP/utils_awp.py L37-53: forwards clean, adv, clean."""
    proxy.load_state_dict(model.state_dict())
    proxy.train()
    loss_natural = F.cross_entropy(proxy(inputs_clean), targets)
    loss_robust = F.kl_div(
        F.log_softmax(proxy(inputs_adv), dim=1), F.softmax(proxy(inputs_clean), dim=1), reduction="batchmean"
    )
    loss = -1.0 * (loss_natural + beta * loss_robust)
    proxy_optim.zero_grad()
    loss.backward()
    proxy_optim.step()
    return diff_in_weights(model, proxy)


def attack_pgd(
    model: nn.Module,
    xs: Tensor,
    y: Tensor,
    epsilon: float,
    alpha: float,
    attack_iters: int,
    normalize: Callable[[Tensor], Tensor],
) -> Tensor:
    """AT_AWP/train_cifar10.py L72-125, l_inf, one restart, no early stop, no mixup."""
    max_loss = torch.zeros(y.shape[0], dtype=xs.dtype)
    max_delta = torch.zeros_like(xs)
    delta = torch.zeros_like(xs)
    delta.uniform_(-epsilon, epsilon)
    delta = torch.max(torch.min(delta, 1 - xs), 0 - xs)  # clamp(delta, lower_limit-xs, upper_limit-xs)
    delta.requires_grad = True
    for _ in range(attack_iters):
        output = model(normalize(xs + delta))
        index = slice(None, None, None)
        loss = F.cross_entropy(output, y)
        loss.backward()
        grad = delta.grad.detach()
        d = delta[index, :, :, :]
        g = grad[index, :, :, :]
        x = xs[index, :, :, :]
        d = torch.clamp(d + alpha * torch.sign(g), min=-epsilon, max=epsilon)
        d = torch.max(torch.min(d, 1 - x), 0 - x)
        delta.data[index, :, :, :] = d
        delta.grad.zero_()
    all_loss = F.cross_entropy(model(normalize(xs + delta)), y, reduction="none")
    max_delta[all_loss >= max_loss] = delta.detach()[all_loss >= max_loss]
    max_loss = torch.max(max_loss, all_loss)
    return max_delta


def at_awp_step(
    model: nn.Module,
    proxy: nn.Module,
    opt: torch.optim.Optimizer,
    proxy_opt: torch.optim.Optimizer,
    xs: Tensor,
    y: Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    gamma: float = 0.01,
    awp_on: bool = True,
    on_loss_forward: Callable[[nn.Module], None] | None = None,
) -> Tensor:
    """One iteration of AT_AWP/train_cifar10.py L314-369 (PGD-10 8/255, 2/255), after the lr is set.

    The model is in train mode (as in every batch but the first of an epoch, see gin/methods/pgd_at_awp.gin).
    """
    mu = torch.tensor(mean).view(3, 1, 1)
    sd = torch.tensor(std).view(3, 1, 1)

    def normalize(x: Tensor) -> Tensor:
        return (x - mu) / sd

    delta = attack_pgd(model, xs, y, 8 / 255.0, 2 / 255.0, 10, normalize).detach()
    X_adv = normalize(torch.clamp(xs + delta[: xs.size(0)], min=0, max=1))
    model.train()
    if awp_on:
        awp = calc_awp_at(model, proxy, proxy_opt, X_adv, y)
        add_into_weights(model, awp, coeff=1.0 * gamma)
    if on_loss_forward is not None:
        on_loss_forward(model)
    robust_output = model(X_adv)
    robust_loss = F.cross_entropy(robust_output, y)
    opt.zero_grad()
    robust_loss.backward()
    opt.step()
    if awp_on:
        add_into_weights(model, awp, coeff=-1.0 * gamma)
    model(normalize(xs))  # the logging forward (L365): train mode, moves BN statistics
    return robust_loss.detach()


def perturb_input(
    model: nn.Module, x_natural: Tensor, step_size: float, epsilon: float, perturb_steps: int
) -> Tensor:
    """trades_AWP/train_trades_cifar.py L101-120, l_inf."""
    model.eval()
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape, dtype=x_natural.dtype).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = F.kl_div(
                F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1), reduction="sum"
            )
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    return x_adv


def trades_awp_step(
    model: nn.Module,
    proxy: nn.Module,
    optimizer: torch.optim.Optimizer,
    proxy_optim: torch.optim.Optimizer,
    x_natural: Tensor,
    target: Tensor,
    beta: float = 6.0,
    gamma: float = 0.005,
    awp_on: bool = True,
    on_loss_forward: Callable[[nn.Module], None] | None = None,
) -> Tensor:
    """One iteration of trades_AWP/train_trades_cifar.py L166-206 (8/255, 2/255, 10 steps)."""
    x_adv = perturb_input(model, x_natural, 2 / 255, 8 / 255, 10)
    model.train()
    if awp_on:
        awp = calc_awp_trades(model, proxy, proxy_optim, x_adv, x_natural, target, beta)
        add_into_weights(model, awp, coeff=1.0 * gamma)
    if on_loss_forward is not None:
        on_loss_forward(model)
    optimizer.zero_grad()
    logits_adv = model(x_adv)
    loss_robust = F.kl_div(
        F.log_softmax(logits_adv, dim=1), F.softmax(model(x_natural), dim=1), reduction="batchmean"
    )
    logits = model(x_natural)
    loss_natural = F.cross_entropy(logits, target)
    loss = loss_natural + beta * loss_robust
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if awp_on:
        add_into_weights(model, awp, coeff=-1.0 * gamma)
    return loss.detach()
