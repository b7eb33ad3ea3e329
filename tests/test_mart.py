"""MART, the worked example of docs/architecture.md: two loss terms and one gin file, checked against
hand-computed values and against a transcription of the authors' ``mart_loss`` (github.com/YisenWang/MART).
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from components.experiment import experiment
from components.losses import BoostedCE, MisclassificationAwareKL
from pipeline.config import load_config


def _softmax(z: list[float]) -> list[float]:
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_boosted_ce_by_hand():
    z = [[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]
    y = [0, 1]
    # Example 0 is right (wrong class k' = 1, the runner-up); example 1 is wrong (k' = 2, the top class).
    wrong = [1, 2]
    ce = sum(-math.log(_softmax(z[i])[y[i]]) for i in range(2)) / 2
    boost = sum(-math.log(1.0001 - _softmax(z[i])[wrong[i]] + 1e-12) for i in range(2)) / 2
    term = BoostedCE(view="target(x_adv)")
    got = term({"target(x_adv)": torch.tensor(z, dtype=torch.float64)}, torch.tensor(y))
    assert math.isclose(got.item(), ce + boost, rel_tol=1e-12)


def test_misclassification_aware_kl_by_hand():
    z_adv = [[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]
    z_nat = [[3.0, 0.0, 0.0], [0.5, 1.0, 0.0]]
    y = [0, 1]
    total = 0.0
    for i in range(2):
        p, q = _softmax(z_nat[i]), _softmax(z_adv[i])
        kl = sum(p[k] * (math.log(p[k]) - math.log(q[k] + 1e-12)) for k in range(3))
        total += kl * (1.0000001 - p[y[i]])
    term = MisclassificationAwareKL(input="target(x_adv)", target="target(x)")
    views = {"target(x_adv)": torch.tensor(z_adv, dtype=torch.float64), "target(x)": torch.tensor(z_nat)}
    views["target(x)"] = views["target(x)"].double()
    got = term(views, torch.tensor(y))
    assert math.isclose(got.item(), total / 2, rel_tol=1e-10)
    # The clean view comes first, so the training step runs the clean forward first.
    assert term.views == ("target(x)", "target(x_adv)")


def _authors_mart_loss(model, x_natural, y, step_size, epsilon, perturb_steps, beta):
    """mart.py's mart_loss, transcribed for the CPU (``.cuda()`` dropped, ``Variable`` as ``detach``)."""
    kl = nn.KLDivLoss(reduction="none")
    model.eval()
    batch_size = len(x_natural)
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_ce = F.cross_entropy(model(x_adv), y)
        grad = torch.autograd.grad(loss_ce, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    logits = model(x_natural)
    logits_adv = model(x_adv)
    adv_probs = F.softmax(logits_adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = torch.gather(nat_probs, 1, (y.unsqueeze(1)).long()).squeeze()
    loss_robust = (1.0 / batch_size) * torch.sum(
        torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * (1.0000001 - true_probs)
    )
    return loss_adv + float(beta) * loss_robust


def test_mart_cifar10_step_is_the_authors_code_on_resnet18():
    """Same loss, same gradients and same BatchNorm statistics as mart_loss on a real backbone."""
    load_config("mart_cifar10", ["TARGET_BACKBONE = 'resnet18'"])
    exp = experiment()
    graph = exp.graph.train()
    ref_model = copy.deepcopy(graph.target)
    torch.manual_seed(1)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))

    torch.manual_seed(2)
    ours = graph.step(x, y)["loss"]
    ours.backward()
    torch.manual_seed(2)
    theirs = _authors_mart_loss(ref_model, x, y, step_size=0.007, epsilon=0.031, perturb_steps=10, beta=6.0)
    theirs.backward()

    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    for (name, a), b in zip(graph.target.named_parameters(), ref_model.parameters()):
        # Float rounding only: the two sum the same terms in another order (about 1e-6 of 0.3 here).
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=5e-6, msg=name)
    for (name, a), b in zip(graph.target.named_buffers(), ref_model.buffers()):
        torch.testing.assert_close(a, b, msg=name)


def _bindings(text: str) -> list[str]:
    """Gin lines without comments and blank lines, whitespace-normalised."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [" ".join(line.split()) for line in lines if line]


def test_docs_architecture_shows_the_files_as_they_are():
    """The worked example in docs/architecture.md is the tested config, not a copy that drifts from it."""
    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "architecture.md").read_text()
    blocks = re.findall(r"```\n(.*?)```", doc, re.DOTALL)
    experiment = _bindings((root / "gin" / "mart_cifar10.gin").read_text())
    assert any(_bindings(b) == experiment for b in blocks), "docs/architecture.md: mart_cifar10.gin changed"
    method = " ".join(_bindings((root / "gin" / "methods" / "mart.gin").read_text()))
    loss_block = next(b for b in blocks if "WeightedLoss.terms" in b)
    assert " ".join(_bindings(loss_block)) in method, "docs/architecture.md: methods/mart.gin's terms changed"
    assert "# Requires: BETA" in (root / "gin" / "methods" / "mart.gin").read_text()


def _kl_grads(
    log_target: bool, z_clean: list[list[float]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    zn = torch.tensor(z_clean, requires_grad=True)
    za = torch.tensor([[1.0, 0.0, 0.0], [2.0, 1.0, 0.0]], requires_grad=True)
    term = MisclassificationAwareKL(input="target(x_adv)", target="target(x)", log_target=log_target)
    value = term({"target(x_adv)": za, "target(x)": zn}, torch.tensor([0, 1]))
    value.backward()
    return value, zn.grad, za.grad


def test_the_codes_kl_has_a_nan_gradient_where_a_clean_probability_underflows_and_log_target_does_not():
    # Example 0's clean logits are confident enough that softmax gives exact zeros in float32.
    confident = [[120.0, 0.0, -5.0], [0.5, 1.0, 0.0]]
    value, g_clean, _ = _kl_grads(False, confident)
    assert math.isfinite(value.item()) and torch.isnan(g_clean[0]).all()  # the faithful form, as mart.py
    value_lt, g_clean_lt, _ = _kl_grads(True, confident)
    assert torch.isfinite(g_clean_lt).all()
    torch.testing.assert_close(value_lt, value)
    # Away from underflow the switch changes nothing but rounding: same value and gradients.
    ordinary = [[3.0, 0.0, -1.0], [0.5, 1.0, 0.0]]
    for a, b in zip(_kl_grads(False, ordinary), _kl_grads(True, ordinary)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_stable_switches_marts_kl_to_log_target_and_the_faithful_config_does_not():
    load_config("mart_cifar10", ["TARGET_BACKBONE = 'small_cnn'"])
    (faithful,) = [
        t for _, t in experiment().graph.loss.terms.values() if isinstance(t, MisclassificationAwareKL)
    ]
    load_config("mart_cifar10,stable", ["TARGET_BACKBONE = 'small_cnn'"])
    (stable,) = [
        t for _, t in experiment().graph.loss.terms.values() if isinstance(t, MisclassificationAwareKL)
    ]
    assert faithful.log_target is False and stable.log_target is True
