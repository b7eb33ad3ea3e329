"""FAT and FAT for TRADES: the early-stopped generator by hand on a linear model, its tau schedule through
set_epoch, and whole training steps of fat_cifar10 / fat_trades_cifar10 against the authors' code
(benchmarks/reference_fat.py, a transcription of zjfheart/Friendly-Adversarial-Training)."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks import reference_fat as ref
from components.attacks import CEObjective, EarlyStopPGD, ZeroInit
from components.experiment import experiment
from components.schedules import PaperStepSchedule
from pipeline.config import load_config
from tests.support import DIM, Recorder, assert_same_step, binary_linear, half_self_labelled, step_both


def _linear_batch(
    margins: list[float], labels: list[int]
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """Logits [0, mean(x) + b] with x = 0.5 everywhere per example: the logit gap of example i starts at
    margins[i] (b = margins[i] - 0.5 would differ per example, so the margin goes into x instead)."""
    net = binary_linear(torch.full((DIM,), 1.0 / DIM), b=-0.5)
    x = torch.stack([torch.full((3, 8, 8), 0.5 + m) for m in margins])
    return net, x, torch.tensor(labels)


def _generator(tau, steps=10, step_size=0.01, eps=0.2) -> EarlyStopPGD:
    return EarlyStopPGD(
        objective=CEObjective(), eps=eps, step_size=step_size, steps=steps, init=ZeroInit(), tau=tau
    )


def test_early_stop_by_hand_on_a_linear_model():
    # The ascent moves every pixel by -0.01 (label 1) or +0.01 (label 0) per step, so the logit gap
    # z_k = margin -/+ 0.01 k. Label 1 is right while z_k > 0; label 0 while z_k < 0 (no ties below).
    net, x, y = _linear_batch([0.035, -0.015, -0.025, 0.5], [1, 1, 0, 1])
    # tau = 1. Example 0: right at k = 0..3, wrong at k = 4 (counter 1 -> 0, steps), wrong at k = 5 with
    # counter 0: done at x_5, the iterate before that iteration's step. Example 1: wrong at the start
    # (counter -> 0), steps, wrong at k = 1: done at x_1. Example 2 (label 0): right at k = 0..2, wrong at
    # k = 3 and 4: done at x_4. Example 3 never flips: 10 steps, x_10.
    out = _generator(tau=1)({"target": net}, x, y)
    expected_steps = torch.tensor([5.0, 1.0, 4.0, 10.0])
    torch.testing.assert_close(out.reports["steps"], expected_steps)
    torch.testing.assert_close(out.reports["kappa"], torch.tensor([4.0, 0.0, 3.0, 10.0]))
    direction = torch.tensor([-1.0, -1.0, 1.0, -1.0])
    want = x + (0.01 * expected_steps * direction)[:, None, None, None]
    torch.testing.assert_close(out.inputs["x_adv"], want)
    # tau = 0: example 0 is done at x_4 (the first wrong iterate), example 1 at the start itself.
    out0 = _generator(tau=0)({"target": net}, x, y)
    torch.testing.assert_close(out0.reports["steps"], torch.tensor([4.0, 0.0, 3.0, 10.0]))
    torch.testing.assert_close(out0.inputs["x_adv"][1], x[1])


def test_tau_none_never_stops_and_kappa_counts_right_iterates_of_the_first_k():
    net, x, y = _linear_batch([0.035, -0.015, -0.025, 0.5], [1, 1, 0, 1])
    out = _generator(tau=None)({"target": net}, x, y)
    # GA-PGD: all 10 steps for everyone; kappa counts the right ones among x_0..x_9 (x_10 is not checked).
    torch.testing.assert_close(out.reports["steps"], torch.full((4,), 10.0))
    torch.testing.assert_close(out.reports["kappa"], torch.tensor([4.0, 0.0, 3.0, 10.0]))
    # The same with 4 steps: example 3 is right at x_0..x_3, so kappa 4, not 5.
    out4 = _generator(tau=None, steps=4)({"target": net}, x, y)
    torch.testing.assert_close(out4.reports["kappa"], torch.tensor([4.0, 0.0, 3.0, 4.0]))


def test_bad_arguments_fail_before_work():
    with pytest.raises(ValueError, match="bn_mode must be 'eval'"):
        EarlyStopPGD(objective=CEObjective(), eps=0.03, step_size=0.01, steps=3, bn_mode="train")
    with pytest.raises(ValueError, match="tau must be None or an integer"):
        EarlyStopPGD(objective=CEObjective(), eps=0.03, step_size=0.01, steps=3, tau=-1)
    with pytest.raises(ValueError, match="must increase"):
        EarlyStopPGD(
            objective=CEObjective(), eps=0.03, step_size=0.01, steps=3, tau_schedule=((90, 1), (50, 0))
        )
    with pytest.raises(ValueError, match="cannot have a tau_schedule"):
        EarlyStopPGD(
            objective=CEObjective(), eps=0.03, step_size=0.01, steps=3, tau=None, tau_schedule=((5, 1),)
        )


@pytest.mark.parametrize(
    ("name", "authors"), [("fat_cifar10", ref.fat_tau), ("fat_trades_cifar10", ref.fat_trades_tau)]
)
def test_tau_follows_the_codes_adjust_tau_through_set_epoch(name, authors):
    load_config(name, ["TARGET_BACKBONE = 'small_cnn'"])
    graph = experiment().graph
    epochs = 120 if name == "fat_cifar10" else 85
    for epoch in range(1, epochs + 1):
        graph.set_epoch(epoch, epochs)
        assert graph.generator.tau == authors(epoch), epoch


def test_fat_lr_schedule_is_the_codes_per_epoch():
    def fat_lr(epoch):  # FAT.py L89-99, called with epoch + 1
        lr = 0.1
        if epoch >= 60:
            lr = 0.1 * 0.1
        if epoch >= 90:
            lr = 0.1 * 0.01
        if epoch >= 110:
            lr = 0.1 * 0.005
        return lr

    def gairat_lr(t):  # GAIRAT.py L76-86 (epochs >= 110), called with epoch + 1
        if t / 120 < 0.5:
            return 0.1
        if t / 120 < 0.75:
            return 0.1 / 10.0
        if t / 120 < (11 / 12):
            return 0.1 / 100.0
        return 0.1 / 200.0

    load_config("fat_cifar10", ["TARGET_BACKBONE = 'small_cnn'"])
    schedule = experiment().trainer.schedule
    assert isinstance(schedule, PaperStepSchedule)
    schedule.bind(steps_per_epoch=3, epochs=120)
    for epoch in range(1, 121):
        for i in range(3):
            got = 0.1 * schedule((epoch - 1) * 3 + i)
            assert (
                got == pytest.approx(fat_lr(epoch), rel=1e-12) == pytest.approx(gairat_lr(epoch), rel=1e-12)
            )


def _uniform(shape, eps):
    """The start noise as robustflow's UniformInit draws it (torch, not numpy): same seed, same noise."""
    return torch.empty(shape).uniform_(-eps, eps)


def _permutation(natural: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Row i of the code's reordered clean output is x[perm[i]]."""
    matches = (natural[:, None] == x[None]).flatten(2).all(2)
    assert (matches.sum(1) == 1).all()
    return matches.float().argmax(1)


def _compare_step(
    name: str, backbone: str, epoch: int, epochs: int, authors_step, tau: int, monkeypatch
) -> None:
    load_config(name, [f"TARGET_BACKBONE = '{backbone}'"])
    graph = experiment().graph
    graph.set_epoch(epoch, epochs)
    assert graph.generator.tau == tau
    ref_model = copy.deepcopy(graph.target)
    x, y = half_self_labelled(graph.target)
    graph.train()
    graph.generator = ours_attack = Recorder(graph.generator)
    theirs_attack = Recorder(ref.earlystop)
    monkeypatch.setattr(ref, "earlystop", theirs_attack)

    ours, theirs = step_both(graph, ref_model, x, y, authors_step, tau=tau, uniform=_uniform)

    # The code reorders (done examples first); robustflow keeps batch order. Same examples, same labels.
    adv, target, natural, count = theirs_attack.last
    perm = _permutation(natural, x)
    torch.testing.assert_close(adv, ours_attack.last.inputs["x_adv"][perm], rtol=0, atol=1e-6)
    assert torch.equal(target, y[perm])
    assert count == int(ours_attack.last.reports["steps"].sum())
    assert 0 < count < 10 * len(y), "the batch should mix early-stopped and full-length examples"
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert_same_step(graph.target, ref_model)  # the code's batch is reordered: summed in another order


def test_fat_cifar10_step_is_the_authors_code_on_resnet18(monkeypatch):
    """Epoch 60: tau = 1, so the control counter matters; the same omega noise on both sides."""
    _compare_step("fat_cifar10", "resnet18", 60, 120, ref.fat_step, 1, monkeypatch)


def test_fat_trades_cifar10_step_is_the_authors_code_on_preact_resnet18(monkeypatch):
    """Epoch 40: tau = 1; clean forward before the adversarial one, CE + 6 KL/B."""
    _compare_step("fat_trades_cifar10", "preact_resnet18", 40, 85, ref.fat_trades_step, 1, monkeypatch)
