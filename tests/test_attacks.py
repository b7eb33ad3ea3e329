"""Training-time attacks (METHODS.md 1.2, 2, 3.2, 3.4): inits, objectives and the PGD generator.

Every expected value is computed by hand (or by an independent formula) rather than by calling the code
under test twice. Models are tiny (a linear layer or a 2-layer conv net with BatchNorm on 3x8x8 inputs).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from support import DIM, SHAPE, batch, binary_linear, conv_bn_net, count_forwards
from torch import nn

from components.attacks import (
    CEObjective,
    GaussianInit,
    PGDGenerator,
    RandomSignInit,
    SoftLabelKLObjective,
    UniformInit,
    ZeroInit,
    check_eps,
    project,
)

EPS = 8 / 255
STEP = 2 / 255


# ----------------------------------------------------------------------------------------------- helpers


# Tiny tensors: intra-op threads only add contention when other jobs share the CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


def linear_net(seed: int, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(DIM, num_classes))


def constant_logits(logits: list[float]) -> nn.Module:
    """A model whose output is ``logits`` for every input (zero weights, bias = logits)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(DIM, len(logits)))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].bias.copy_(torch.tensor(logits))
    return net


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def all_modes(model: nn.Module) -> set[bool]:
    return {m.training for m in model.modules()}


OBJECTIVES = {
    "ce": lambda: CEObjective(),
    "trades_kl": lambda: SoftLabelKLObjective(model="target", soft_label_model="target"),
    "cag_kl": lambda: SoftLabelKLObjective(model="target", soft_label_model="guide"),
}
INITS = {
    "gaussian": lambda: GaussianInit(),
    "uniform": lambda: UniformInit(),
    "random_sign": lambda: RandomSignInit(),
    "zero": lambda: ZeroInit(),
}


# ----------------------------------------------------------------------------------------------- inits


def test_gaussian_init_has_std_0_001_and_is_not_clipped_to_the_box():
    torch.manual_seed(0)
    x = torch.cat([torch.zeros(32, *SHAPE), torch.ones(32, *SHAPE)])
    out = GaussianInit()(x, EPS)
    noise = out - x
    assert GaussianInit().std == 0.001
    assert noise.std().item() == pytest.approx(0.001, rel=0.03)
    assert noise.mean().abs().item() < 5e-5
    # Not clamped to [0,1]: at x = 0 about half the pixels go negative, at x = 1 about half exceed 1.
    assert (out[:32] < 0).float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert (out[32:] > 1).float().mean().item() == pytest.approx(0.5, abs=0.05)
    # Not clipped to the eps-ball either (it is far inside it), and it does not touch x.
    assert noise.abs().max().item() < EPS
    assert torch.equal(x[:32], torch.zeros(32, *SHAPE))


def test_gaussian_init_std_is_configurable():
    torch.manual_seed(1)
    x = torch.full((64, *SHAPE), 0.5)
    assert (GaussianInit(std=0.01)(x, EPS) - x).std().item() == pytest.approx(0.01, rel=0.03)


def test_uniform_init_fills_the_eps_ball_and_stays_in_the_box():
    torch.manual_seed(0)
    x = torch.rand(64, *SHAPE)
    out = UniformInit()(x, EPS)
    delta = out - x
    assert delta.abs().max().item() <= EPS + 1e-6
    assert out.min().item() >= 0.0 and out.max().item() <= 1.0
    # Interior pixels: U(-eps, eps) has mean 0 and std eps / sqrt(3), and reaches close to +-eps.
    interior = (x > EPS) & (x < 1 - EPS)
    d = delta[interior]
    assert d.mean().abs().item() < 0.02 * EPS
    assert d.std().item() == pytest.approx(EPS / math.sqrt(3), rel=0.03)
    assert d.max().item() > 0.99 * EPS and d.min().item() < -0.99 * EPS


def test_uniform_init_clips_at_the_box_edges():
    torch.manual_seed(0)
    x = torch.cat([torch.zeros(8, *SHAPE), torch.ones(8, *SHAPE)])
    out = UniformInit()(x, EPS)
    assert out.min().item() == 0.0 and out.max().item() == 1.0
    assert (out[:8] == 0).any() and (out[8:] == 1).any()


def test_random_sign_init_is_exactly_eps_away_unless_clipped_by_the_box():
    torch.manual_seed(0)
    x = torch.rand(64, *SHAPE)
    out = RandomSignInit()(x, EPS)
    delta = out - x
    assert out.min().item() >= 0.0 and out.max().item() <= 1.0
    interior = (x >= EPS) & (x <= 1 - EPS)
    torch.testing.assert_close(delta[interior].abs(), torch.full_like(delta[interior], EPS))
    # Both signs, about equally often.
    assert (delta[interior] > 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    # Near the edges the only difference is the clip: out == clamp(x + eps * sign).
    sign = torch.where(delta > 0, 1.0, -1.0)
    torch.testing.assert_close(out, (x + EPS * sign).clamp(0, 1))


def test_random_sign_init_at_the_box_corners():
    torch.manual_seed(0)
    zeros, ones = torch.zeros(16, *SHAPE), torch.ones(16, *SHAPE)
    lo, hi = RandomSignInit()(zeros, EPS), RandomSignInit()(ones, EPS)
    assert lo.unique().tolist() == pytest.approx([0.0, EPS])
    assert hi.unique().tolist() == pytest.approx([1 - EPS, 1.0])


def test_zero_init_is_a_copy_of_x():
    x = torch.rand(4, *SHAPE)
    out = ZeroInit()(x, EPS)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


# ----------------------------------------------------------------------------------- bad values / defaults


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": 8.0}, r"eps=8\.0 is out of range \(0, 1\]"),
        ({"eps": 8}, r"eps=8 is out of range \(0, 1\]"),
        ({"eps": 0.0}, r"eps=0\.0 is out of range \(0, 1\]"),
        ({"eps": -EPS}, r"out of range \(0, 1\]"),
        ({"step_size": -STEP}, r"step_size=.* is out of range \(0, 1\]"),
        ({"step_size": 0.0}, r"step_size=0\.0 is out of range \(0, 1\]"),
        ({"step_size": 2.0}, r"step_size=2\.0 is out of range \(0, 1\]"),
        ({"steps": 0}, r"steps must be an integer >= 1, got 0"),
        ({"steps": -1}, r"steps must be an integer >= 1"),
        ({"steps": 2.0}, r"steps must be an integer >= 1"),
        ({"bn_mode": "test"}, r"bn_mode must be one of \('eval', 'train'\)"),
    ],
)
def test_pgd_generator_rejects_bad_values_with_the_valid_range(kwargs, match):
    args = {"objective": CEObjective(), "eps": EPS, "step_size": STEP, "steps": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        PGDGenerator(**args)


def test_eps_8_error_explains_pixel_space():
    with pytest.raises(ValueError, match=r"8/255 is written 0\.0313"):
        check_eps(8, what="PGDGenerator")


def test_pgd_generator_defaults_are_the_trades_style_attack():
    gen = PGDGenerator(objective=CEObjective(), eps=0.031, step_size=0.007, steps=10)
    assert isinstance(gen.init, GaussianInit) and gen.init.std == 0.001
    assert gen.bn_mode == "eval" and gen.init_view is False
    assert (gen.eps, gen.step_size, gen.steps) == (0.031, 0.007, 10)


def test_project_clips_to_the_ball_then_to_the_box():
    x = torch.tensor([0.0, 0.5, 1.0, 0.5])
    x_adv = torch.tensor([-0.5, 0.9, 1.5, 0.49])
    torch.testing.assert_close(project(x_adv, x, 0.1), torch.tensor([0.0, 0.6, 1.0, 0.49]))


# ------------------------------------------------------------------------------- generator invariants


@pytest.mark.parametrize("bn", ["eval", "train"])
@pytest.mark.parametrize("init_name", sorted(INITS))
@pytest.mark.parametrize("obj_name", sorted(OBJECTIVES))
def test_pgd_invariants_for_every_objective_init_and_bn_mode(obj_name, init_name, bn):
    models = {"target": conv_bn_net(0).train(), "guide": conv_bn_net(1).train()}
    x, y = batch(8, seed=2)
    x_before = x.clone()
    gen = PGDGenerator(OBJECTIVES[obj_name](), EPS, STEP, steps=3, init=INITS[init_name](), bn_mode=bn)
    torch.manual_seed(3)
    result = gen(models, x, y)

    assert set(result.inputs) == {"x_adv"} and result.views == {}
    x_adv = result.inputs["x_adv"]
    assert x_adv.shape == x.shape
    assert not torch.isnan(x_adv).any()
    assert (x_adv - x).abs().max().item() <= EPS + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert not x_adv.requires_grad and x_adv.grad_fn is None
    assert torch.equal(x, x_before), "the attack must not modify the clean batch"
    for model in models.values():
        assert all_modes(model) == {True}, "every model goes back to train mode"
        for p in model.parameters():
            assert p.grad is None, "the attack takes input gradients only"
            assert p.requires_grad


@pytest.mark.parametrize("obj_name", sorted(OBJECTIVES))
def test_attack_increases_its_objective_on_a_fixed_model(obj_name):
    models = {"target": conv_bn_net(0).eval(), "guide": conv_bn_net(1).eval()}
    x, y = batch(16, seed=4)
    objective = OBJECTIVES[obj_name]()
    torch.manual_seed(5)
    x_adv = PGDGenerator(objective, EPS, STEP, steps=5)(models, x, y).inputs["x_adv"]
    with torch.no_grad():
        ctx = objective.prepare(models, x, y)
        clean, _ = objective(models, x, y, ctx)
        adv, _ = objective(models, x_adv, y, ctx)
    assert adv.item() > clean.item() + 1e-4
    if obj_name == "trades_kl":
        assert clean.item() == pytest.approx(0.0, abs=1e-5), "KL of the clean distribution with itself"


def test_eval_bn_mode_puts_models_in_eval_during_the_attack_and_restores_train_mode():
    target, guide = conv_bn_net(0).train(), conv_bn_net(1).train()
    target_calls, guide_calls = count_forwards(target), count_forwards(guide)
    bn_calls = count_forwards(target[1])
    before = {"target": bn_state(target), "guide": bn_state(guide)}
    x, y = batch(8)
    gen = PGDGenerator(SoftLabelKLObjective(soft_label_model="guide"), EPS, STEP, steps=4, bn_mode="eval")
    gen({"target": target, "guide": guide}, x, y)

    # METHODS.md 1.2.1: both target and guide in eval mode during CAG; 1.2.5: back to train mode after.
    assert target_calls == [False] * 4 and bn_calls == [False] * 4
    assert guide_calls == [False]
    assert all_modes(target) == {True} and all_modes(guide) == {True}
    # An eval-mode attack leaves the BN running statistics (and their batch counter) untouched.
    for name, model in (("target", target), ("guide", guide)):
        for key, value in bn_state(model).items():
            assert torch.equal(value, before[name][key]), f"{name}.{key} changed"


def test_train_bn_mode_updates_bn_statistics_once_per_forward_and_restores_eval_mode():
    target = conv_bn_net(0).eval()
    calls = count_forwards(target)
    before = bn_state(target)
    x, y = batch(8)
    PGDGenerator(CEObjective(), EPS, STEP, steps=3, init=RandomSignInit(), bn_mode="train")(
        {"target": target}, x, y
    )
    assert calls == [True] * 3, "FGSM-PGI/PGK: the attack runs in train mode"
    assert all_modes(target) == {False}, "the model goes back to its own (eval) mode"
    after = bn_state(target)
    assert not torch.equal(after["1.running_mean"], before["1.running_mean"])
    assert not torch.equal(after["4.running_var"], before["4.running_var"])
    assert after["1.num_batches_tracked"].item() == before["1.num_batches_tracked"].item() + 3


def test_each_model_gets_back_its_own_mode():
    target, guide = conv_bn_net(0).train(), conv_bn_net(1).eval()
    t_calls, g_calls = count_forwards(target), count_forwards(guide)
    x, y = batch(4)
    gen = PGDGenerator(SoftLabelKLObjective(soft_label_model="guide"), EPS, STEP, steps=2, bn_mode="train")
    gen({"target": target, "guide": guide}, x, y)
    assert t_calls == [True, True] and g_calls == [True]
    assert all_modes(target) == {True} and all_modes(guide) == {False}


def test_parameters_are_frozen_during_the_attack_and_their_grads_untouched():
    target = linear_net(0).train()
    frozen_during: list[bool] = []
    target.register_forward_hook(
        lambda m, i, o: frozen_during.append(not any(p.requires_grad for p in m.parameters()))
    )
    # A gradient already accumulated (e.g. by a previous backward) is neither cleared nor added to.
    for p in target.parameters():
        p.grad = torch.full_like(p, 7.0)
    x, y = batch(4)
    PGDGenerator(CEObjective(), EPS, STEP, steps=3)({"target": target}, x, y)
    assert frozen_during == [True] * 3
    for p in target.parameters():
        assert p.requires_grad
        assert torch.equal(p.grad, torch.full_like(p, 7.0))


def test_a_parameter_frozen_before_the_attack_stays_frozen():
    target = conv_bn_net(0)
    target[0].weight.requires_grad_(False)
    x, y = batch(4)
    PGDGenerator(CEObjective(), EPS, STEP, steps=2)({"target": target}, x, y)
    assert not target[0].weight.requires_grad
    assert all(p.requires_grad for n, p in target.named_parameters() if n != "0.weight")


# --------------------------------------------------------------------------------- hand-checked step


def test_one_ce_step_from_zero_init_is_x_plus_eps_sign_of_the_hand_gradient():
    # Logits [0, w.x]. For y = 1, d CE / dx = -(1 - p_1) w, so the step is -eps * sign(w);
    # for y = 0, d CE / dx = p_1 w, so the step is +eps * sign(w).
    torch.manual_seed(0)
    w = torch.randn(DIM) * 0.01
    w[w.abs() < 1e-4] = 1e-3  # no zero weight: every pixel has a definite sign
    model = binary_linear(w)
    x = torch.rand(4, *SHAPE)  # spans the whole box, so the [0,1] clip binds on some pixels
    y = torch.tensor([1, 0, 1, 0])
    x_adv = PGDGenerator(CEObjective(), EPS, EPS, steps=1, init=ZeroInit())({"target": model}, x, y)
    x_adv = x_adv.inputs["x_adv"]

    sign_w = w.sign().view(SHAPE)
    direction = torch.stack([-sign_w, sign_w, -sign_w, sign_w])
    expected = (x + EPS * direction).clamp(0.0, 1.0)
    assert torch.equal(x_adv, expected)
    clipped = ((x + EPS * direction) < 0) | ((x + EPS * direction) > 1)
    assert clipped.any() and (~clipped).any()


def test_steps_accumulate_and_are_projected_onto_the_eps_ball():
    # Constant gradient sign: 5 steps of eps/2 from x walk 2.5 eps, the projection stops them at eps.
    torch.manual_seed(0)
    w = torch.randn(DIM) * 0.01
    w[w.abs() < 1e-4] = 1e-3
    x = 0.25 + 0.5 * torch.rand(2, *SHAPE)  # far from the box edges
    y = torch.tensor([1, 1])
    gen = PGDGenerator(CEObjective(), EPS, EPS / 2, steps=5, init=ZeroInit())
    x_adv = gen({"target": binary_linear(w)}, x, y).inputs["x_adv"]
    torch.testing.assert_close(x_adv, x - EPS * w.sign().view(SHAPE), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ CAG and TRADES


def test_cag_objective_value_by_hand_on_constant_logits():
    # Target p_t = softmax([0, ln 3]) = [1/4, 3/4]; guide p_g = softmax([0, 0]) = [1/2, 1/2].
    # KL(p_g || p_t) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) per example; sum over the batch of 4.
    models = {"target": constant_logits([0.0, math.log(3.0)]), "guide": constant_logits([0.0, 0.0])}
    objective = SoftLabelKLObjective(model="target", soft_label_model="guide")
    x, y = batch(4, classes=2)
    ctx = objective.prepare(models, x, y)
    torch.testing.assert_close(ctx, torch.full((4, 2), 0.5))
    loss, logits = objective(models, x, y, ctx)
    assert loss.item() == pytest.approx(4 * 0.5 * math.log(4 / 3), rel=1e-6)
    torch.testing.assert_close(logits, torch.tensor([[0.0, math.log(3.0)]] * 4))
    # = soft-label CE (1/2 ln 4 + 1/2 ln 4/3) minus the guide's entropy (ln 2), per example.
    assert loss.item() == pytest.approx(4 * ((0.5 * math.log(4) + 0.5 * math.log(4 / 3)) - math.log(2)))


def test_cag_objective_is_soft_label_ce_minus_guide_entropy_and_has_its_gradient():
    models = {"target": conv_bn_net(0).eval(), "guide": conv_bn_net(1).eval()}
    objective = SoftLabelKLObjective(model="target", soft_label_model="guide")
    x, y = batch(6, seed=1)
    x_prime = (x + 0.02 * torch.randn_like(x)).clamp(0, 1).requires_grad_(True)
    ctx = objective.prepare(models, x, y)

    with torch.no_grad():
        p_g = F.softmax(models["guide"](x), dim=1)
    log_q = F.log_softmax(models["target"](x_prime), dim=1)
    soft_ce = -(p_g * log_q).sum()
    guide_entropy = -(p_g * p_g.log()).sum()

    loss, _ = objective(models, x_prime, y, ctx)
    torch.testing.assert_close(loss, soft_ce - guide_entropy, rtol=1e-5, atol=1e-5)
    (g_obj,) = torch.autograd.grad(loss, x_prime)
    (g_ce,) = torch.autograd.grad(soft_ce, x_prime)
    torch.testing.assert_close(g_obj, g_ce, rtol=1e-5, atol=1e-7)
    assert g_obj.abs().sum() > 0


def test_cag_soft_label_comes_from_the_guide_not_the_target():
    models = {"target": conv_bn_net(0).eval(), "guide": conv_bn_net(1).eval()}
    objective = SoftLabelKLObjective(model="target", soft_label_model="guide")
    x, y = batch(8)
    with torch.no_grad():
        guide_p, target_p = F.softmax(models["guide"](x), dim=1), F.softmax(models["target"](x), dim=1)
    ctx = objective.prepare(models, x, y)
    torch.testing.assert_close(ctx, guide_p)
    assert not torch.allclose(ctx, target_p, atol=1e-3)
    assert objective.models_used == ("target", "guide")


@pytest.mark.parametrize("source", ["guide", "target"])
def test_kl_attack_matches_the_authors_loop(source):
    """METHODS.md 1.2 (CAG, source='guide') and 2 (TRADES/LBGAT, source='target'), written out as in the
    authors' code: both models in eval mode, x' = x + 0.001 N(0, I), 10 x (0.007 sign step, project to
    x +- 0.031, clip to [0,1]), soft label recomputed every step with the 1e-5 log form."""
    target, guide = conv_bn_net(0), conv_bn_net(1)
    with torch.no_grad():  # non-trivial running statistics, so eval mode matters
        target(torch.rand(64, *SHAPE) * 2)
        guide(torch.rand(64, *SHAPE) * 2)
    target.train(), guide.train()
    models = {"target": target, "guide": guide}
    x, y = batch(8, seed=3)

    ref_target, ref_soft = copy.deepcopy(target).eval(), copy.deepcopy(models[source]).eval()
    torch.manual_seed(7)
    x_adv = x.detach() + 0.001 * torch.randn(x.shape)
    for _ in range(10):
        x_adv.requires_grad_(True)
        with torch.no_grad():
            p = F.softmax(ref_soft(x), dim=1)
        loss = (p * (torch.log(p + 1e-5) - F.log_softmax(ref_target(x_adv), dim=1))).sum()
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + 0.007 * torch.sign(grad)
        x_adv = torch.min(torch.max(x_adv, x - 0.031), x + 0.031).clamp(0.0, 1.0)

    torch.manual_seed(7)
    gen = PGDGenerator(SoftLabelKLObjective(soft_label_model=source), 0.031, 0.007, steps=10)
    out = gen(models, x, y).inputs["x_adv"]
    torch.testing.assert_close(out, x_adv, rtol=0, atol=1e-6)
    assert (out - x).abs().max().item() == pytest.approx(0.031, abs=1e-6)


def test_cag_generator_runs_the_guide_once_and_the_target_once_per_step():
    target, guide = conv_bn_net(0).train(), conv_bn_net(1).train()
    t_calls, g_calls = count_forwards(target), count_forwards(guide)
    gen = PGDGenerator(SoftLabelKLObjective(soft_label_model="guide"), 0.031, 0.007, steps=10)
    x, y = batch(4)
    gen({"target": target, "guide": guide}, x, y)
    assert len(g_calls) == 1, "the guide's clean soft label is computed once per batch"
    assert len(t_calls) == 10


def test_cag_attack_differs_from_the_trades_attack():
    # Same target, same start (seeded): only the soft label's source changes, and so does x_adv.
    models = {"target": conv_bn_net(0).eval(), "guide": conv_bn_net(1).eval()}
    x, y = batch(8)
    out = {}
    for source in ("target", "guide"):
        torch.manual_seed(0)
        gen = PGDGenerator(SoftLabelKLObjective(soft_label_model=source), EPS, STEP, steps=3)
        out[source] = gen(models, x, y).inputs["x_adv"]
    assert not torch.equal(out["target"], out["guide"])


def test_trades_objective_uses_the_targets_own_clean_distribution():
    target, guide = conv_bn_net(0).eval(), conv_bn_net(1).train()
    models = {"target": target, "guide": guide}
    objective = SoftLabelKLObjective(model="target", soft_label_model="target")
    assert objective.models_used == ("target",)
    x, y = batch(8)
    with torch.no_grad():
        expected = F.softmax(target(x), dim=1)
    ctx = objective.prepare(models, x, y)
    torch.testing.assert_close(ctx, expected)
    # KL(p_t(x) || p_t(x)) = 0 at the clean point, positive elsewhere.
    loss, _ = objective(models, x, y, ctx)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    by_hand = (expected * (expected.log() - F.log_softmax(target(x + 0.03), dim=1))).sum()
    torch.testing.assert_close(objective(models, x + 0.03, y, ctx)[0], by_hand, rtol=1e-5, atol=1e-6)


def test_trades_attack_never_touches_the_guide():
    # LBGAT: the TRADES attack runs on the target only; the guide is never switched to eval.
    target, guide = conv_bn_net(0).train(), conv_bn_net(1).train()
    t_calls, g_calls = count_forwards(target), count_forwards(guide)
    gen = PGDGenerator(SoftLabelKLObjective(soft_label_model="target"), EPS, STEP, steps=3)
    x, y = batch(4)
    gen({"target": target, "guide": guide}, x, y)
    assert g_calls == []
    assert t_calls == [False] * 4, "clean soft label + 3 steps, all in eval mode"
    assert all_modes(guide) == {True} and all_modes(target) == {True}


def test_ce_objective_is_summed_cross_entropy():
    model = linear_net(0)
    x, y = batch(5)
    loss, logits = CEObjective()({"target": model}, x, y, None)
    by_hand = -F.log_softmax(model(x), dim=1)[torch.arange(5), y].sum()
    torch.testing.assert_close(loss, by_hand)
    assert logits.shape == (5, 10)


def test_attack_restores_each_submodule_mode_and_leaves_frozen_parameters_frozen():
    """A model may hold parts in their own state (a BN kept in eval, a frozen layer): the attack runs
    every part in its mode and puts each back as it was; only the parameters it froze train again."""
    target = conv_bn_net(0).train()
    target[1].eval()
    target[0].weight.requires_grad_(False)
    bn_calls = count_forwards(target[1])
    x, y = batch(8)
    PGDGenerator(CEObjective(), EPS, STEP, steps=2, init=RandomSignInit(), bn_mode="train")(
        {"target": target}, x, y
    )
    assert bn_calls == [True, True], "bn_mode='train' puts every submodule in train mode"
    assert not target[1].training and all(m.training for i, m in enumerate(target) if i != 1)
    assert not target[0].weight.requires_grad
    assert all(p.requires_grad for n, p in target.named_parameters() if n != "0.weight")
    assert all(p.grad is None for p in target.parameters())
