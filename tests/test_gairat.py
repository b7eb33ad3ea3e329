"""GAIRAT: kappa as a generator report, the GAIR weights by hand, the burn-in and lambda through set_epoch,
and a whole training step of gairat_cifar10 against the authors' GA_PGD / GAIR / GAIRAT.py step
(benchmarks/reference_fat.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from benchmarks import reference_fat as ref
from components.attacks import CEObjective, PGDGenerator
from components.experiment import experiment
from components.graph import TrainingGraph
from components.losses import WeightedLoss
from components.weighting import GAIRWeightedCE, gair_weights
from pipeline.config import load_config
from tests.support import Recorder, assert_same_step, conv_bn_net, half_self_labelled, step_both


def test_tanh_weights_by_hand():
    kappa = [0.0, 5.0, 10.0, 3.0]
    # K = 10, int(K/2) = 5: w = (tanh(lam + (5 - kappa) * 5 / 5) + 1) / 2, then w * B / sum(w).
    raw = [(math.tanh(-1.0 + (5 - k)) + 1) / 2 for k in kappa]
    want = [w * 4 / sum(raw) for w in raw]
    got = gair_weights(torch.tensor(kappa, dtype=torch.float64), steps=10, lam=-1.0)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    # lam = inf (the burn-in's lambda) gives every example weight 1.
    torch.testing.assert_close(gair_weights(torch.tensor(kappa), 10, math.inf), torch.ones(4))
    # The other two functions of GAIR.py, by hand.
    sig = [1 / (1 + math.exp(-(-1.0 + (5 - k)))) for k in kappa]
    torch.testing.assert_close(
        gair_weights(torch.tensor(kappa, dtype=torch.float64), 10, -1.0, "sigmoid"),
        torch.tensor([w * 4 / sum(sig) for w in sig], dtype=torch.float64),
    )
    disc = [(11 - k) / 11 for k in kappa]
    torch.testing.assert_close(
        gair_weights(torch.tensor(kappa, dtype=torch.float64), 10, -1.0, "discrete"),
        torch.tensor([w * 4 / sum(disc) for w in disc], dtype=torch.float64),
    )
    # Bit for bit the code's GAIR() on float32 kappa.
    k32 = torch.tensor([0.0, 1.0, 2.0, 7.0, 10.0])
    assert torch.equal(gair_weights(k32, 10, -1.0), ref.gair(10, k32, -1.0, "Tanh"))


def test_weighted_ce_by_hand_and_no_gradient_through_kappa():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1])
    kappa = torch.tensor([10.0, 0.0, 4.0], dtype=torch.float64, requires_grad=True)
    term = GAIRWeightedCE(view="target(x_adv)", steps=10)
    views = {"target(x_adv)": logits, "kappa": kappa}
    term.set_epoch(59, 120)  # burn-in: plain mean CE
    ce = [-math.log(math.exp(2) / (math.exp(2) + 1)), -math.log(1 / (1 + math.e)), math.log(2)]
    assert term(views, y).item() == pytest.approx(sum(ce) / 3, rel=1e-12)
    term.set_epoch(60, 120)  # weighted from the 60th epoch, lambda -1
    raw = [(math.tanh(-1.0 + (5 - k)) + 1) / 2 for k in (10, 0, 4)]
    w = [r * 3 / sum(raw) for r in raw]
    value = term(views, y)
    assert value.item() == pytest.approx(sum(c * wi for c, wi in zip(ce, w)) / 3, rel=1e-12)
    value.backward()
    assert kappa.grad is None and logits.grad is not None
    assert term.reports == ("kappa",) and term.views == ("target(x_adv)",)


def test_burn_in_and_lambda_follow_the_code_through_set_epoch():
    load_config("gairat_cifar10", ["TARGET_BACKBONE = 'small_cnn'"])
    graph = experiment().graph
    (term,) = [t for _, t in graph.loss.terms.values()]
    for epoch in range(1, 121):
        graph.set_epoch(epoch, 120)
        # GAIRAT.py: train(epoch) weights when (epoch + 1) >= 60, its epoch 0-based; adjust_Lambda(epoch + 1).
        code_epoch = epoch - 1
        assert term.weighted == ((code_epoch + 1) >= 60), epoch
        assert term.current_lam == ref.adjust_lambda(code_epoch + 1), epoch
    assert graph.generator.tau is None


def test_a_term_reading_a_report_the_generator_lacks_fails_at_build():
    gen = PGDGenerator(objective=CEObjective(), eps=0.03, step_size=0.01, steps=2)
    loss = WeightedLoss(terms={"gair": (1.0, GAIRWeightedCE(view="target(x_adv)", steps=10))})
    with pytest.raises(ValueError, match="reads the report 'kappa', which PGDGenerator does not produce"):
        TrainingGraph(models={"target": conv_bn_net()}, generator=gen, loss=loss)


def _uniform(shape, eps):
    return torch.empty(shape).uniform_(-eps, eps)


def test_gairat_cifar10_step_is_the_authors_code_on_resnet18(monkeypatch):
    """Epoch 60 (1-based), the first weighted one; the burn-in before it is plain mean CE (tests above)."""
    load_config("gairat_cifar10", ["TARGET_BACKBONE = 'resnet18'"])
    graph = experiment().graph
    graph.set_epoch(60, 120)
    ref_model = copy.deepcopy(graph.target)
    x, y = half_self_labelled(graph.target)  # kappa spreads over 0..10
    graph.train()
    graph.generator = ours_attack = Recorder(graph.generator)
    theirs_attack = Recorder(ref.ga_pgd)
    monkeypatch.setattr(ref, "ga_pgd", theirs_attack)

    ours, theirs = step_both(graph, ref_model, x, y, ref.gairat_step, epoch=59, uniform=_uniform)

    kappa = ours_attack.last.reports["kappa"]
    assert torch.equal(kappa, theirs_attack.last[1])
    assert torch.equal(ours_attack.last.inputs["x_adv"], theirs_attack.last[0])
    assert len(set(kappa.tolist())) >= 3, kappa
    # The weights are far from 1 here, so the weighted and the plain loss differ.
    assert (gair_weights(kappa, 10, -1.0) - 1).abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert_same_step(graph.target, ref_model)
