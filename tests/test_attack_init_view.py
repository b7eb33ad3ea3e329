"""RegMix's generator feature (METHODS.md 3.2): ``PGDGenerator(init_view=True)`` returns the init point and
the target's train-mode view there, whose forward also gives the first attack step's input gradient.

Expected values are computed by hand or by a hand-written RegMix loop, on tiny models.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from support import DIM, SHAPE, batch, binary_linear, conv_bn_net, count_forwards

from components.attacks import CEObjective, PGDGenerator, RandomSignInit

EPS = 8 / 255
STEP = 2 / 255

pytestmark = pytest.mark.usefixtures("one_thread")


def regmix_generator(steps: int = 2, step_size: float = EPS / 2) -> PGDGenerator:
    return PGDGenerator(
        CEObjective(), EPS, step_size, steps=steps, init=RandomSignInit(), bn_mode="train", init_view=True
    )


def test_init_view_returns_x_init_x_adv_and_the_target_view():
    target = conv_bn_net(0).train()
    x, y = batch(8, low=0.1, high=0.9)
    torch.manual_seed(0)
    result = regmix_generator()({"target": target}, x, y)
    assert set(result.inputs) == {"x_init", "x_adv"}
    assert set(result.views) == {"target(x_init)"}
    x_init, x_adv = result.inputs["x_init"], result.inputs["x_adv"]
    assert not x_init.requires_grad and not x_adv.requires_grad
    # delta_initial = eps * sign(U(-1, 1)) per pixel: exactly eps away from x (x is far from the edges).
    torch.testing.assert_close((x_init - x).abs(), torch.full_like(x, EPS))
    assert (x_adv - x).abs().max().item() <= EPS + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0


def test_init_view_x_init_is_clipped_to_the_box():
    target = conv_bn_net(0).train()
    x = torch.cat([torch.zeros(2, *SHAPE), torch.ones(2, *SHAPE)])
    y = torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)
    x_init = regmix_generator()({"target": target}, x, y).inputs["x_init"]
    assert x_init[:2].unique().tolist() == pytest.approx([0.0, EPS])
    assert x_init[2:].unique().tolist() == pytest.approx([1 - EPS, 1.0])


def test_init_view_equals_a_fresh_train_mode_forward_and_backpropagates_into_the_parameters():
    target = conv_bn_net(0).train()
    x, y = batch(8)
    torch.manual_seed(0)
    result = regmix_generator()({"target": target}, x, y)
    view = result.views["target(x_init)"]
    assert view.grad_fn is not None and view.requires_grad
    torch.testing.assert_close(view, target(result.inputs["x_init"]), rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in target.parameters()), "the attack itself leaves no parameter grad"
    # The RegMix loss uses the view and a later train-mode forward at x_adv in one backward.
    loss = F.cross_entropy(view, y) + F.cross_entropy(target(result.inputs["x_adv"]), y)
    loss.backward()
    for name, p in target.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_init_view_first_step_reuses_the_init_forward():
    for steps in (1, 2, 3):
        target = conv_bn_net(0).train()
        calls = count_forwards(target)
        x, y = batch(4)
        regmix_generator(steps=steps)({"target": target}, x, y)
        assert calls == [True] * steps, f"steps={steps}: one forward per step, the first is the view's"


def test_init_view_single_step_is_hand_computable():
    # Logits [0, w.x], y = 1: the step from x_init is -step * sign(w), projected to x +- eps and [0,1].
    torch.manual_seed(0)
    w = torch.randn(DIM) * 0.01
    w[w.abs() < 1e-4] = 1e-3
    x = 0.25 + 0.5 * torch.rand(3, *SHAPE)
    y = torch.ones(3, dtype=torch.long)
    torch.manual_seed(1)
    result = regmix_generator(steps=1)({"target": binary_linear(w)}, x, y)
    x_init = result.inputs["x_init"]
    expected = torch.min(torch.max(x_init - (EPS / 2) * w.sign().view(SHAPE), x - EPS), x + EPS)
    torch.testing.assert_close(result.inputs["x_adv"], expected.clamp(0, 1), rtol=0, atol=1e-7)
    # Pixels that started at +eps moved by eps/2 towards -sign(w); pixels at -eps could not move further.
    moved = (result.inputs["x_adv"] - x_init).abs()
    assert set(torch.round(moved / (EPS / 2)).unique().tolist()) <= {0.0, 1.0}


def test_init_view_pgd2_matches_a_hand_written_regmix_loop():
    """METHODS.md 3.4: delta_initial = eps sign(U(-1,1)) clipped to the box; PGD-2 (step eps/2) on CE in
    train mode, the first step from the gradient of the init forward; project to x +- eps and [0,1]."""
    target = conv_bn_net(0).train()
    ref = copy.deepcopy(target)
    x, y = batch(8, seed=5)

    torch.manual_seed(11)
    x_init = (x + EPS * torch.empty_like(x).uniform_(-1.0, 1.0).sign()).clamp(0.0, 1.0)
    x_adv = x_init
    for _ in range(2):
        x_adv = x_adv.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(ref(x_adv), y, reduction="sum"), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + (EPS / 2) * grad.sign(), x - EPS), x + EPS).clamp(0, 1)
    with torch.no_grad():
        view = ref(x_init)

    torch.manual_seed(11)
    result = regmix_generator(steps=2)({"target": target}, x, y)
    assert torch.equal(result.inputs["x_init"], x_init)
    torch.testing.assert_close(result.inputs["x_adv"], x_adv, rtol=0, atol=1e-6)
    torch.testing.assert_close(result.views["target(x_init)"].detach(), view)


def test_init_view_requires_train_bn_mode():
    with pytest.raises(ValueError, match="init_view=True needs bn_mode='train'"):
        PGDGenerator(CEObjective(), EPS, EPS / 2, 2, init=RandomSignInit(), bn_mode="eval", init_view=True)
