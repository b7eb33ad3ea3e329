"""SAT's early stop as robustflow defines it (an *inferred* reading of the paper; gin/methods/sat.gin):
the probability-gap criterion and its ramp by hand on a tiny linear model, and the experiments' wiring."""

from __future__ import annotations

import math

import pytest
import torch

from components.attacks import CEObjective, EarlyStopPGD, ProbabilityGap, ZeroInit
from components.experiment import experiment
from pipeline.config import load_config
from tests.support import DIM, binary_linear


def _gap(z: float) -> float:
    """d = p_0 - p_1 for logits [0, z] and label 1: the wrong class's probability minus the true one's."""
    p1 = 1 / (1 + math.exp(-z))
    return (1 - p1) - p1


def test_the_gap_by_hand():
    logits = torch.tensor([[0.0, 0.3], [0.0, -1.2], [2.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([1, 1, 0])
    e = [math.exp(2.0), math.exp(1.0)]
    gaps = [_gap(0.3), _gap(-1.2), e[1] / sum(e) - e[0] / sum(e)]
    for eta in (-0.5, 0.0, 0.2, 0.5):
        criterion = ProbabilityGap(start=eta, end=eta)
        assert criterion(logits, y).tolist() == [g >= eta for g in gaps], eta


def test_the_threshold_ramps_linearly_through_set_epoch():
    criterion = ProbabilityGap(start=-1.0, end=1.0, ramp_epochs=5)
    want = {1: -1.0, 2: -0.5, 3: 0.0, 4: 0.5, 5: 1.0, 6: 1.0, 50: 1.0}
    for epoch, eta in want.items():
        criterion.set_epoch(epoch, 100)
        assert criterion.eta == pytest.approx(eta), epoch
    with pytest.raises(ValueError, match="lie in"):
        ProbabilityGap(start=-2.0)


def test_early_stop_at_the_first_iterate_past_the_threshold_by_hand():
    # Logits [0, z] with z = 10 * mean(x) - 5: with x = 0.5 + m / 10 everywhere, z_0 = m, and each CE ascent
    # step of 0.01 per pixel (label 1) lowers z by 0.1. The attack stops at the first z_k whose gap reaches
    # eta.
    net = binary_linear(torch.full((DIM,), 10.0 / DIM), b=-5.0)
    margins = [0.05, 2.0, -0.6]
    x = torch.stack([torch.full((3, 8, 8), 0.5 + m / 10) for m in margins])
    y = torch.ones(3, dtype=torch.long)
    criterion = ProbabilityGap(start=0.2, end=0.2)
    gen = EarlyStopPGD(
        objective=CEObjective(),
        eps=0.2,
        step_size=0.01,
        steps=10,
        init=ZeroInit(),
        criterion=criterion,
        tau=0,
    )
    out = gen({"target": net}, x, y)
    for i, m in enumerate(margins):
        stop = next((k for k in range(10) if _gap(m - 0.1 * k) >= 0.2), 10)
        assert out.reports["steps"][i].item() == stop, i
        assert out.reports["kappa"][i].item() == stop, i
        torch.testing.assert_close(out.inputs["x_adv"][i], x[i] - 0.01 * stop)
    # By hand: example 0 stops at k = 5 (z = -0.45, gap 0.221; z_4 = -0.35 gives 0.173); example 1 never
    # (z_9 = 1.1); example 2 at the start (z = -0.6, gap 0.291).
    assert out.reports["steps"].tolist() == [5.0, 10.0, 0.0]
    # eta = -1 at the curriculum's start: every example stops at its start, the attack does nothing.
    gen.criterion = ProbabilityGap(start=-1.0, end=1.0, ramp_epochs=4)
    gen.set_epoch(1, 4)
    early = gen({"target": net}, x, y)
    assert early.reports["steps"].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(early.inputs["x_adv"], x)
    # eta = 1 at its end: nothing reaches it, plain PGD for everyone.
    gen.set_epoch(4, 4)
    assert gen({"target": net}, x, y).reports["steps"].tolist() == [10.0, 10.0, 10.0]


@pytest.mark.parametrize("name", ["sat_cifar10", "sat_cifar100"])
def test_sat_experiments_wire_the_curriculum(name):
    load_config(name, ["TARGET_BACKBONE = 'small_cnn'"])
    graph = experiment().graph
    criterion = graph.generator.criterion
    assert isinstance(criterion, ProbabilityGap) and graph.generator.tau == 0
    graph.set_epoch(1, 100)
    assert criterion.eta == -1.0
    graph.set_epoch(50, 100)
    assert criterion.eta == 1.0
    assert graph.loss.views == ["target(x_adv)"]
