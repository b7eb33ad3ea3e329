"""LAS-AT (jiaxiaojunQAQ/LAS-AT): the strategy-driven attack by hand, and the whole training step (the
strategy's policy-gradient update, then the target's step) against a transcription of the authors' code
(``benchmarks/reference_las_at.py``) on ResNet-18, from the same weights, batch and seed."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from support import SHAPE, TINY, binary_linear, fit_tiny

from benchmarks import reference_las_at as ref
from components.attacks import CEObjective, Strategy, StrategyPGDGenerator, StrategySpace
from components.attacks.strategy import uniform_channel_init
from components.backbones.strategy_net import build_strategy_net
from components.experiment import experiment
from components.guard import TrainingDivergedError
from components.losses import LabelSmoothedCE
from pipeline.config import load_config

CPU = torch.device("cpu")


def test_label_smoothed_ce_is_the_codes_label_smoothing_by_hand():
    # _label_smoothing (L89-94) with CIFAR-100's factor 0.6: 0.6 on the true class, 0.4/99 elsewhere.
    z = torch.linspace(-2.0, 3.0, 100, dtype=torch.float64)[None].repeat(2, 1)
    z[1] = z[1].flip(0)
    y = torch.tensor([7, 42])
    total = 0.0
    for i in range(2):
        zi = z[i].tolist()
        log_norm = math.log(sum(math.exp(v) for v in zi))
        total += sum(-(0.6 if k == y[i] else 0.4 / 99) * (zi[k] - log_norm) for k in range(100))
    got = LabelSmoothedCE(view="target(x_adv)", factor=0.6)({"target(x_adv)": z}, y)
    assert math.isclose(got.item(), total / 2, rel_tol=1e-12)
    theirs = ref.LabelSmoothLoss(z, torch.tensor(ref._label_smoothing(y, 0.6, 100)))
    assert math.isclose(got.item(), theirs.item(), rel_tol=1e-12)


def test_the_attack_masks_each_examples_own_budget_by_hand():
    """A linear model's CE gradient has the constant sign of w (label 0), so after the masked loop
    example i sits at clip(delta0 + min(k, iters_i) * alpha_i * sign(w), +-eps_i) for every k."""
    w = torch.randn(SHAPE[0] * SHAPE[1] * SHAPE[2], generator=torch.Generator().manual_seed(3))
    model = binary_linear(w)
    x = torch.full((3, *SHAPE), 0.5)
    y = torch.zeros(3, dtype=torch.long)
    eps = torch.tensor([4 / 255, 8 / 255, 15 / 255])
    alpha = torch.tensor([1 / 255, 3 / 255, 2 / 255])
    iters = torch.tensor([1, 3, 6])
    space = StrategySpace(epsilons=(4, 8, 15), iterations=(1, 3, 6), step_sizes=(1, 2, 3))
    gen = StrategyPGDGenerator(space=space, objective=CEObjective())
    strategy = Strategy(actions=(), log_probs=(), eps=eps, step_size=alpha, iterations=iters)
    torch.manual_seed(5)
    x_adv = gen.attack({"target": model}, x, y, strategy)
    torch.manual_seed(5)
    delta0 = uniform_channel_init(x, 8 / 255)
    sign = w.sign().view(SHAPE)
    for i in range(3):
        expected = delta0[i].clone()
        for _ in range(int(iters[i])):
            expected = torch.clamp(expected + alpha[i] * sign, -eps[i].item(), eps[i].item())
        torch.testing.assert_close(x_adv[i] - x[i], expected, rtol=0, atol=1e-7)
    # The start is 8/255 wide whatever eps: example 0 (eps 4/255) starts outside its own ball.
    assert delta0[0].abs().max() > 4 / 255


def test_strategy_space_and_network_heads():
    space = StrategySpace(epsilons=range(3, 16), iterations=range(3, 15), step_sizes=range(1, 6))
    assert space.head_sizes == (1, 13, 12, 5)
    net = build_strategy_net(name="resnet18", space=space)
    out = net(torch.rand(2, 3, 32, 32))
    assert [o.shape for o in out] == [torch.Size([2, k]) for k in (1, 13, 12, 5)]
    assert [h.in_features for h in net.heads] == [512] * 4  # ResNet18_Strategy: avg_pool 4 -> 512
    tiny = build_strategy_net(name="resnet18_tiny", space=space)
    assert [h.in_features for h in tiny.heads] == [2048] * 4  # TinyImageNet_StrategyNet: 512*4
    with pytest.raises(ValueError, match="eps=.* out of range"):
        StrategySpace(epsilons=(300,), iterations=(3,), step_sizes=(1,))
    with pytest.raises(ValueError, match="iterations"):
        StrategySpace(epsilons=(8,), iterations=(), step_sizes=(1,))


def _build(overrides: list[str]):
    load_config("las_at_cifar10", ["TARGET_BACKBONE = 'resnet18'", *overrides])
    exp = experiment()
    graph = exp.graph.train()
    return exp, graph


def _assert_same_model(ours: torch.nn.Module, theirs: torch.nn.Module, grads: bool = True) -> None:
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
        if grads:
            # Float rounding only: the code's batch-mean CE vs a sum in the attack, same signs.
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=5e-6, msg=name)
    for (name, a), b in zip(ours.named_buffers(), theirs.buffers()):
        torch.testing.assert_close(a, b, msg=name)


def test_las_at_target_step_is_the_authors_code_on_resnet18():
    """A batch without a strategy update: sampled strategy, masked attack, label-smoothed CE, SGD step.
    Candidate iterations (3, 4, 5) keep it CPU-sized; the masking is checked by hand above."""
    exp, graph = _build(["STRATEGY_BACKBONE = 'resnet18'", "STRATEGY_ITERATIONS = (3, 4, 5)"])
    ref_target, ref_strategy = copy.deepcopy(graph.target), copy.deepcopy(graph.attacker.model)
    strategy_before = copy.deepcopy(graph.attacker.model.state_dict())
    optimizer = exp.trainer.optimizer_fn(graph.models)
    ref_optimizer = torch.optim.SGD(ref_target.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    torch.manual_seed(1)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))

    torch.manual_seed(2)
    out = exp.trainer.train_step(graph, optimizer, x, y, CPU)
    torch.manual_seed(2)
    theirs = ref.target_step(
        ref_strategy, ref_target, ref_optimizer, x, y, ref.Args(attack_iters_types=[3, 4, 5])
    )

    assert "attacker" not in out  # call 1 of every 20: no strategy update
    torch.testing.assert_close(out["loss"], theirs, rtol=1e-6, atol=1e-7)
    _assert_same_model(graph.target, ref_target)
    # The strategy network only sampled (eval mode): its weights and BN statistics are untouched.
    for k, v in graph.attacker.model.state_dict().items():
        assert torch.equal(v, strategy_before[k]), k


@pytest.mark.slow
def test_las_at_update_step_is_the_authors_code_on_resnet18(monkeypatch):
    """A batch with a strategy update (every = 1 here): the policy step on the look-ahead reward, then
    the target step, as the code's train() runs them. Sizes shrunk for the CPU: candidate iterations
    (1, 2, 3) and a 3-step look-ahead PGD (2 restarts)."""
    exp, graph = _build(
        [
            "STRATEGY_BACKBONE = 'resnet18'",
            "PolicyGradientAttacker.every = 1",
            "STRATEGY_ITERATIONS = (1, 2, 3)",
            "ATTACK_STEPS = 3",
        ]
    )
    ref_target, ref_strategy = copy.deepcopy(graph.target), copy.deepcopy(graph.attacker.model)
    optimizer = exp.trainer.optimizer_fn(graph.models)
    ref_optimizer = torch.optim.SGD(ref_target.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    ref_policy_optimizer = torch.optim.SGD(ref_strategy.parameters(), lr=1e-4)
    args = ref.Args(attack_iters_types=[1, 2, 3], pgd_iters=3)
    torch.manual_seed(1)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    # Keep both look-ahead copies (each side deep-copies the target once) to compare them afterwards.
    copies, depth, deepcopy = [], [0], copy.deepcopy

    def recording_deepcopy(obj, *args):
        depth[0] += 1  # copy.deepcopy recurses through the module attribute: record the outer call only
        try:
            result = deepcopy(obj, *args)
        finally:
            depth[0] -= 1
        if depth[0] == 0:
            copies.append(result)
        return result

    monkeypatch.setattr(copy, "deepcopy", recording_deepcopy)

    torch.manual_seed(2)
    out = exp.trainer.train_step(graph, optimizer, x, y, CPU)
    torch.manual_seed(2)
    policy_loss, reward, r1, r2, r3 = ref.strategy_step(
        ref_strategy, ref_policy_optimizer, ref_target, x, y, 0.1, args
    )
    theirs = ref.target_step(ref_strategy, ref_target, ref_optimizer, x, y, args)

    monkeypatch.undo()
    # The look-ahead copies after their SGD step and train-mode PGD: weights and BN statistics.
    ours_copy, their_copy = [c for c in copies if isinstance(c, type(graph.target))]
    _assert_same_model(ours_copy, their_copy, grads=False)
    learned = out["attacker"]
    for key, value in (("reward", reward), ("r1", r1), ("r2", r2), ("r3", r3)):
        torch.testing.assert_close(learned[key], value.float(), rtol=1e-6, atol=1e-7, msg=key)
    torch.testing.assert_close(learned["policy_loss"], policy_loss, rtol=1e-6, atol=1e-6)
    # The strategy's clipped gradients (left in .grad after its step), its weights and BN statistics.
    _assert_same_model(graph.attacker.model, ref_strategy)
    torch.testing.assert_close(out["loss"], theirs, rtol=1e-6, atol=1e-7)
    _assert_same_model(graph.target, ref_target)


def test_the_look_ahead_copy_leaves_the_target_alone():
    load_config("las_at_cifar10,smoke", ["PolicyGradientAttacker.every = 1"])
    graph = experiment().graph.train()
    before = copy.deepcopy(graph.target.state_dict())
    strategy_before = copy.deepcopy(graph.attacker.model.state_dict())
    torch.manual_seed(0)
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    out = graph.update_attacker(x, y, lr=0.1)
    assert set(out) == {"policy_loss", "reward", "r1", "r2", "r3"}
    for k, v in graph.target.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights and BN statistics
    assert all(p.grad is None for p in graph.target.parameters())
    assert graph.target.training  # its mode is restored
    changed = [
        k for k, v in graph.attacker.model.state_dict().items() if not torch.equal(v, strategy_before[k])
    ]
    assert changed, "the strategy network did not learn"


def test_the_strategy_is_not_trained_by_the_targets_optimizer_nor_the_target():
    load_config("las_at_cifar10,smoke")
    exp = experiment()
    graph = exp.graph
    strategy = set(map(id, graph.attacker.model.parameters()))
    optimizer = exp.trainer.optimizer_fn(graph.models)
    assert not strategy & {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert "strategy" not in graph.models and graph.target is graph.models["target"]
    assert set(graph.all_models) == {"target", "strategy"}


def _fit(tmp_path, stop_after_steps=None, resume_from=None, overrides=""):
    """Train the tiny LAS-AT smoke config for 2 epochs (4 steps each, a strategy update every 3; candidate
    iterations 2, 3 to keep it short)."""
    base = f"EPOCHS = 2; {TINY}; PolicyGradientAttacker.every = 3; STRATEGY_ITERATIONS = (2, 3)"
    return fit_tiny("las_at_cifar10,smoke", base + overrides, tmp_path, stop_after_steps, resume_from)


@pytest.mark.slow
def test_resume_continues_the_strategy_identically(shared_data, tmp_path):
    """Updates at steps 3 and 6: one in each epoch, so the resumed epoch needs the saved strategy, its
    optimizer (momentum, as CIFAR-100's), its schedule and the call count."""
    momentum = "; STRATEGY_MOMENTUM = 0.9; STRATEGY_WEIGHT_DECAY = 5e-4"
    full, full_exp = _fit(tmp_path / "full", overrides=momentum)
    stopped, _ = _fit(tmp_path / "cut", stop_after_steps=6, overrides=momentum)
    assert stopped is None
    resumed, resumed_exp = _fit(
        tmp_path / "cut", resume_from=tmp_path / "cut" / "last.pt", overrides=momentum
    )
    assert "train/attacker/policy_loss" in full.history[0] and "train/attacker/reward" in full.history[1]
    for a, b in zip(full.history, resumed.history):
        for key in a:
            if key not in ("epoch_time_s", "train/images_per_s"):
                assert a[key] == b[key], key
    for name, model in full_exp.graph.all_models.items():
        theirs = resumed_exp.graph.all_models[name].state_dict()
        for k, v in model.state_dict().items():
            assert torch.equal(v, theirs[k]), f"{name}.{k}"
    a, b = full_exp.graph.attacker, resumed_exp.graph.attacker
    assert a.calls == b.calls == 8
    for pa, pb in zip(a.optimizer.state.values(), b.optimizer.state.values()):
        assert torch.equal(pa["momentum_buffer"], pb["momentum_buffer"])


def test_a_non_finite_policy_loss_stops_the_run_naming_it(shared_data, tmp_path):
    with pytest.raises(TrainingDivergedError, match="attacker/policy_loss") as err:
        _fit(tmp_path, overrides="; LookaheadReward.weights = (1e400, 1.0, 1.0)")
    assert err.value.term == "attacker/policy_loss" and err.value.step == 3
