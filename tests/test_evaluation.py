"""Evaluation (METHODS.md 1.5): PGD-k with a uniform start, step 2/255, per-example early stop; CW margin;
the attack classes (PGD, CW, AutoAttack) the evaluation suite runs.

The closed-form case is a binary linear model with logits ``[0, w.x + b]``: the logit difference is linear
in x, so the worst L-inf perturbation against class 1 is ``-eps * sign(w)`` (and ``+eps * sign(w)`` against
class 0), and every signed-gradient step moves every pixel by exactly the step size towards it.
"""

from __future__ import annotations

import pytest
import support
import torch
from support import DIM, SHAPE, conv_bn_net, synthetic, train_mlp
from torch import nn

from components.eval.attacks import (
    CW,
    EPS_8_255,
    PGD,
    STEP_2_255,
    EvalAttack,
    cw_margin_loss,
    pgd_eval_attack,
    robust_accuracy,
)
from components.eval.autoattack import AutoAttack

# Tiny tensors: intra-op threads only add contention when other jobs share the CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------- helpers


def weights(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(DIM, generator=g) * 0.02
    return torch.where(w.abs() < 1e-3, torch.full_like(w, 1e-3), w)  # every pixel has a definite sign


def binary_linear(w: torch.Tensor, b: float) -> nn.Module:
    """support's ``[0, w.x + b]`` model, in eval mode as evaluation expects."""
    return support.binary_linear(w, b).eval()


def margin(w: torch.Tensor, b: float, x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1) @ w + b


def mid_box(n: int, seed: int = 0) -> torch.Tensor:
    """Inputs in [0.4, 0.6]: x +- 8/255 never touches the box, so clipping does not bind."""
    g = torch.Generator().manual_seed(seed)
    return 0.4 + 0.2 * torch.rand(n, *SHAPE, generator=g)


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def labelled_batches(model: nn.Module, n_batches: int = 2, n: int = 16, seed: int = 0):
    """Random images labelled with the model's own clean prediction, except every 4th (made wrong)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        x = torch.rand(n, *SHAPE, generator=g)
        with torch.no_grad():
            pred = model.eval()(x).argmax(1)
        y = pred.clone()
        y[::4] = (pred[::4] + 1) % 10
        out.append((x, y, torch.arange(i * n, (i + 1) * n)))
    return out


# ------------------------------------------------------------------------------------- cw margin loss


def test_cw_margin_loss_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([2, 0, 1])
    # -(z_y - max_{j != y} z_j): -(2 - 3) = 1, -(5 - 1) = -4, -(0 - 0) = 0; batch mean -1.
    loss = cw_margin_loss(logits, y)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(-1.0)


def test_cw_margin_loss_gradient_pushes_true_logit_down_and_best_other_up():
    logits = torch.tensor([[1.0, 3.0, 2.0]], requires_grad=True)
    (grad,) = torch.autograd.grad(cw_margin_loss(logits, torch.tensor([2])), logits)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 1.0, -1.0]]))


def test_default_budget_is_8_255_with_step_2_255():
    assert EPS_8_255 == 8 / 255 and STEP_2_255 == 2 / 255


# ------------------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("early_stop", [True, False])
@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_pgd_reaches_the_closed_form_worst_case_on_a_robust_linear_model(loss, early_stop):
    w, x = weights(), mid_box(4)
    eps = EPS_8_255
    # Margin >= 0.5 even at the worst corner: every example stays correct (active) for all steps.
    b = eps * w.abs().sum().item() + 0.5 - margin(w, 0.0, x).min().item()
    model = binary_linear(w, b)
    y = torch.ones(4, dtype=torch.long)
    torch.manual_seed(0)
    # From any start in the ball the corner is at most 2 eps = 8 steps of 2/255 away; 10 steps reach it.
    x_adv = pgd_eval_attack(model, x, y, steps=10, loss=loss, early_stop=early_stop)
    expected = x - eps * w.sign().view(SHAPE)
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=1e-6)
    assert (margin(w, b, x_adv) > 0.49).all()
    assert not x_adv.requires_grad


def test_fewer_steps_than_the_distance_stop_short_of_the_corner():
    # 3 steps of 2/255 from the start delta_0: each pixel sits at max(delta_0 - 3 step, -eps) (w > 0 side).
    w, x = weights(), mid_box(2)
    eps, step = EPS_8_255, STEP_2_255
    b = eps * w.abs().sum().item() + 0.5 - margin(w, 0.0, x).min().item()
    model, y = binary_linear(w, b), torch.ones(2, dtype=torch.long)
    torch.manual_seed(3)
    delta0 = torch.empty_like(x).uniform_(-eps, eps)
    torch.manual_seed(3)
    x_adv = pgd_eval_attack(model, x, y, steps=3)
    s = w.sign().view(SHAPE)
    expected_delta = torch.clamp(delta0 - 3 * step * s, -eps, eps)
    torch.testing.assert_close(x_adv - x, expected_delta, rtol=0, atol=1e-6)


def test_early_stop_never_moves_an_example_misclassified_at_the_start():
    w = weights()
    x = mid_box(1).repeat(4, 1, 1, 1)
    eps = EPS_8_255
    b = eps * w.abs().sum().item() + 0.5 - margin(w, 0.0, x).min().item()
    model = binary_linear(w, b)
    # The model says class 1 everywhere in the ball: label 1 is never fooled, label 0 is always wrong.
    y = torch.tensor([1, 0, 1, 0])
    torch.manual_seed(5)
    start = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)

    torch.manual_seed(5)
    x_adv = pgd_eval_attack(model, x, y, steps=10, early_stop=True)
    s = w.sign().view(SHAPE)
    torch.testing.assert_close(x_adv[1::2], start[1::2], rtol=0, atol=1e-6)
    torch.testing.assert_close(x_adv[0::2], (x - eps * s)[0::2], rtol=0, atol=1e-6)

    # Without early stop the wrong examples are pushed on, towards +eps sign(w) (deeper into class 1).
    torch.manual_seed(5)
    x_adv = pgd_eval_attack(model, x, y, steps=10, early_stop=False)
    torch.testing.assert_close(x_adv[1::2], (x + eps * s)[1::2], rtol=0, atol=1e-6)


def test_early_stop_freezes_an_example_once_it_is_fooled():
    w, x = weights(), mid_box(1).repeat(4, 1, 1, 1)  # one image, four random starts
    eps, step = EPS_8_255, STEP_2_255
    l1 = w.abs().sum().item()
    # Clean margin 0.05 > 0, worst-corner margin 0.05 - eps * ||w||_1 < 0: the attack succeeds mid-way.
    b = 0.05 - margin(w, 0.0, x).min().item()
    model = binary_linear(w, b)
    y = torch.ones(4, dtype=torch.long)
    assert (margin(w, b, x) > 0).all() and (margin(w, b, x - eps * w.sign().view(SHAPE)) < 0).all()

    torch.manual_seed(1)
    full = pgd_eval_attack(model, x, y, steps=10, early_stop=False)
    torch.testing.assert_close(full, x - eps * w.sign().view(SHAPE), rtol=0, atol=1e-6)

    torch.manual_seed(1)
    stopped = pgd_eval_attack(model, x, y, steps=10, early_stop=True)
    m = margin(w, b, stopped)
    assert (m <= 0).all(), "every example ends fooled"
    # It was still correct before its last step, and one step moves the margin by at most step * ||w||_1.
    assert (m >= -step * l1 - 1e-5).all()
    assert (m > margin(w, b, full)).all(), "it stopped before the corner"
    assert (stopped - x).abs().max().item() <= eps + 1e-6


# ------------------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("restarts", [1, 3])
@pytest.mark.parametrize("early_stop", [True, False])
@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_pgd_eval_attack_stays_in_the_ball_and_the_box(loss, early_stop, restarts):
    model = conv_bn_net().eval()
    x, y, _ = labelled_batches(model, n_batches=1)[0]
    x[0] = 0.0  # the box binds on whole images
    x[1] = 1.0
    torch.manual_seed(0)
    x_adv = pgd_eval_attack(model, x, y, steps=5, loss=loss, early_stop=early_stop, restarts=restarts)
    assert x_adv.shape == x.shape and not torch.isnan(x_adv).any()
    assert (x_adv - x).abs().max().item() <= EPS_8_255 + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert not x_adv.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_more_restarts_never_unfool_an_example():
    model = conv_bn_net().eval()
    x, y, _ = labelled_batches(model, n_batches=1, n=32)[0]
    fooled = {}
    for restarts in (1, 3):
        torch.manual_seed(0)  # the first restart is the same draw in both runs
        x_adv = pgd_eval_attack(model, x, y, eps=16 / 255, steps=2, restarts=restarts)
        with torch.no_grad():
            fooled[restarts] = model(x_adv).argmax(1) != y
    assert (fooled[3] | ~fooled[1]).all()


def test_pgd_eval_attack_rejects_a_255_scale_eps():
    model = conv_bn_net().eval()
    x, y, _ = labelled_batches(model, n_batches=1, n=2)[0]
    with pytest.raises(ValueError, match=r"out of range \(0, 1\]"):
        pgd_eval_attack(model, x, y, eps=8)
    with pytest.raises(ValueError, match=r"step_size=2 is out of range"):
        pgd_eval_attack(model, x, y, step_size=2)


# ------------------------------------------------------------------------------------- robust accuracy


def test_robust_accuracy_counts_clean_and_pgd_accuracy_over_batches():
    model = conv_bn_net().eval()
    batches = labelled_batches(model)
    torch.manual_seed(0)
    acc = robust_accuracy(model, batches, attack_steps=10)
    assert set(acc) == {"clean_acc", "pgd10_acc"}
    # Every 4th label was made wrong: 24 of the 32 examples are clean-correct, by construction.
    assert acc["clean_acc"] == 0.75
    assert acc["pgd10_acc"] <= acc["clean_acc"]
    assert acc["pgd10_acc"] < acc["clean_acc"], "the attack fools at least one example"
    # Accuracies are fractions of 32 examples.
    assert (acc["pgd10_acc"] * 32) == pytest.approx(round(acc["pgd10_acc"] * 32))


def test_more_pgd_steps_never_give_higher_accuracy():
    # Same seed -> same random start and same first step; with early stop a fooled example stays fooled.
    model = conv_bn_net().eval()
    batches = labelled_batches(model)
    acc = {}
    for steps in (1, 10):
        torch.manual_seed(0)
        acc[steps] = robust_accuracy(model, batches, attack_steps=steps)[f"pgd{steps}_acc"]
    assert acc[10] <= acc[1] <= 0.75


def test_an_example_fooled_by_pgd1_is_also_fooled_by_pgd10():
    model = conv_bn_net().eval()
    x, y, _ = labelled_batches(model, n_batches=1, n=32)[0]
    fooled = {}
    for steps in (1, 10):
        torch.manual_seed(0)
        x_adv = pgd_eval_attack(model, x, y, steps=steps)
        with torch.no_grad():
            fooled[steps] = model(x_adv).argmax(1) != y
    assert (fooled[10] | ~fooled[1]).all()
    assert fooled[10].sum() > fooled[1].sum() > 0


def test_robust_accuracy_evaluates_in_eval_mode_and_restores_train_mode():
    model = conv_bn_net()
    batches = labelled_batches(model)
    model.train()
    modes: list[bool] = []
    model.register_forward_hook(lambda m, i, o: modes.append(m.training))
    bn_modes: list[bool] = []
    model[1].register_forward_hook(lambda m, i, o: bn_modes.append(m.training))
    before = bn_state(model)
    robust_accuracy(model, batches, attack_steps=2)
    # Every forward (clean, attack steps, adversarial) runs in eval mode: at least 1 + 2 + 1 per batch.
    assert len(modes) >= 2 * 4 and set(modes) == {False} and bn_modes == modes
    assert {m.training for m in model.modules()} == {True}
    for key, value in bn_state(model).items():
        assert torch.equal(value, before[key]), f"{key} moved during evaluation"


def test_robust_accuracy_keeps_an_eval_model_in_eval_mode():
    model = conv_bn_net().eval()
    robust_accuracy(model, labelled_batches(model, n_batches=1, n=4), attack_steps=1)
    assert {m.training for m in model.modules()} == {False}


def test_robust_accuracy_on_an_empty_loader_raises_and_restores_the_mode():
    model = conv_bn_net().train()
    with pytest.raises(ValueError, match="yielded no examples"):
        robust_accuracy(model, [], attack_steps=1)
    assert model.training


# ------------------------------------------------------------------------------------- attack classes


@pytest.fixture(scope="module")
def mlp():
    return train_mlp()


@pytest.mark.parametrize("cls", [PGD, CW])
def test_attack_class_reaches_the_closed_form_worst_case_on_a_linear_model(cls):
    w, x = weights(), mid_box(4)
    eps = EPS_8_255
    b = eps * w.abs().sum().item() + 0.5 - margin(w, 0.0, x).min().item()
    model, y = binary_linear(w, b), torch.ones(4, dtype=torch.long)
    torch.manual_seed(0)
    x_adv = cls(eps, steps=10)(model, x, y)
    torch.testing.assert_close(x_adv, x - eps * w.sign().view(SHAPE), rtol=0, atol=1e-6)
    # And against class 0 the worst case is the opposite corner, +eps * sign(w).
    torch.manual_seed(0)
    x_adv = cls(eps, steps=10)(binary_linear(-w, -b), x, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(x_adv, x - eps * w.sign().view(SHAPE), rtol=0, atol=1e-6)


def test_attack_classes_are_the_eval_loop_with_their_parameters():
    model = conv_bn_net().eval()
    x, y, _ = labelled_batches(model, n_batches=1)[0]
    for attack, kwargs in [
        (PGD(16 / 255, steps=3, step_size=1 / 255, restarts=2), dict(loss="ce")),
        (CW(16 / 255, steps=3, step_size=1 / 255, restarts=2), dict(loss="cw")),
    ]:
        torch.manual_seed(0)
        got = attack(model, x, y)
        torch.manual_seed(0)
        want = pgd_eval_attack(model, x, y, eps=16 / 255, step_size=1 / 255, steps=3, restarts=2, **kwargs)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert isinstance(attack, EvalAttack)


def test_attack_names_families_and_with_eps():
    pgd = PGD(EPS_8_255, steps=50)
    assert pgd.name == "PGD-50" and CW(EPS_8_255).name == "CW-20" and PGD(0.1, restarts=5).name == "PGD-20 x5"
    assert pgd.family == PGD(EPS_8_255, steps=10).family != CW(EPS_8_255, steps=10).family
    assert "steps=50" in repr(pgd) and repr(CW(EPS_8_255)).startswith("CW(")
    at4 = pgd.with_eps(4 / 255)
    assert (at4.eps, at4.step_size, at4.steps) == (4 / 255, STEP_2_255, 50) and pgd.eps == EPS_8_255
    scaled = pgd.with_eps(16 / 255, scale_step=True)
    assert scaled.step_size == pytest.approx(4 / 255) and isinstance(scaled, PGD)
    assert isinstance(CW(EPS_8_255).with_eps(0.031), CW)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eps=8), r"out of range \(0, 1\]"),
        (dict(eps=EPS_8_255, steps=0), "steps=0"),
        (dict(eps=EPS_8_255, restarts=0), "restarts=0"),
        (dict(eps=EPS_8_255, loss="dlr"), "loss='dlr'"),
    ],
)
def test_attack_classes_reject_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PGD(**kwargs)


# ------------------------------------------------------------------------------------- AutoAttack


def _aa_invariants(model, x, y, x_adv, eps):
    assert x_adv.shape == x.shape and torch.isfinite(x_adv).all()
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
        adv = (model(x_adv).argmax(1) == y).float().mean().item()
    assert adv <= clean
    return clean, adv


def test_autoattack_dev_on_a_tiny_model(mlp):
    x, y = synthetic(24, seed=2)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    aa = AutoAttack(EPS_8_255, version="dev", batch_size=16)
    x_adv = aa(mlp, x, y)
    clean, adv = _aa_invariants(mlp, x, y, x_adv, EPS_8_255)
    assert adv < clean, "APGD fools part of this model at 8/255"
    assert list(aa.last_stages) == ["apgd-ce", "apgd-t"] and aa.flags == []
    # Cumulative per-stage robustness: never regains an example; the last stage is the attack's result.
    ce, t = aa.last_stages["apgd-ce"], aa.last_stages["apgd-t"]
    assert (ce | ~t).all()
    with torch.no_grad():
        assert torch.equal(t, mlp(x_adv).argmax(1) == y)
    # The model is left as it was: eval mode, trainable, no gradients; the caller's RNG is untouched.
    assert not mlp.training and all(p.requires_grad and p.grad is None for p in mlp.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_autoattack_standard_with_few_examples(mlp):
    x, y = synthetic(8, seed=3)
    aa = AutoAttack(EPS_8_255, version="standard")
    x_adv = aa(mlp, x, y)
    _aa_invariants(mlp, x, y, x_adv, EPS_8_255)
    assert list(aa.last_stages) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert aa.stages == ("apgd-ce", "apgd-t", "fab-t", "square") and "standard" in aa.name


def test_autoattack_is_reproducible_and_moves_to_other_radii(mlp):
    x, y = synthetic(8, seed=4)
    aa = AutoAttack(EPS_8_255, version="dev")
    torch.testing.assert_close(aa(mlp, x, y), aa(mlp, x, y), rtol=0, atol=0)
    big = aa.with_eps(16 / 255)
    assert big.eps == 16 / 255 and aa.eps == EPS_8_255 and big.version == "dev"
    _, adv16 = _aa_invariants(mlp, x, y, big(mlp, x, y), 16 / 255)
    assert adv16 == 0.0


def test_autoattack_rejects_bad_parameters():
    with pytest.raises(ValueError, match="version='plus'"):
        AutoAttack(EPS_8_255, version="plus")
    with pytest.raises(ValueError, match=r"out of range \(0, 1\]"):
        AutoAttack(8)
    with pytest.raises(ValueError, match="batch_size=0"):
        AutoAttack(EPS_8_255, batch_size=0)
