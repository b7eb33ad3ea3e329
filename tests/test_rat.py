"""RAT (TRADES): reg_gap and the Taylor soft labels by hand, the noisy-copy attack, and one whole step of
``rat_trades_cifar10`` against a transcription of the authors' ``trades_loss`` (benchmarks/reference_rat.py,
github.com/Alexkael/Randomized-Adversarial-Training): loss, gradients, weights after the step and the
BatchNorm statistics of its eight train-mode forwards.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from benchmarks import reference_rat as ref
from components.attacks.noisy_copy import NoisyCopyGenerator, noised_parameters
from components.experiment import experiment
from components.rat import TaylorSoftLabelKL, reg_gap
from pipeline.config import load_config

CPU = torch.device("cpu")


def test_reg_gap_by_hand():
    # gap [0, 1, 3] -> shifted and normalised [0, 1/4, 3/4]; row i drops entry i, is rescaled to cc = 0.8,
    # and gets 1 - cc = 0.2 on the diagonal.
    got = reg_gap(torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64), 0.8)
    expected = [[0.2, 0.8 * 0.25, 0.8 * 0.75], [0.0, 0.2, 0.8], [0.0, 0.8, 0.2]]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("classes", [10, 100])
def test_reg_gap_is_the_codes_with_its_cc(classes):
    torch.manual_seed(0)
    gap = torch.randn(classes, dtype=torch.float64)
    cc = {10: 0.8, 100: 0.98}[classes]
    torch.testing.assert_close(reg_gap(gap, cc), ref.reg_gap(gap))


def test_taylor_term_by_hand_on_a_linear_classifier():
    """s_c = dCE/dW summed over features = (1/B) sum_i (p_ic - [y_i = c]) sum_d h_id, with math."""
    h_nat, h_adv = [[1.0, 2.0], [0.5, -1.0]], [[0.0, 1.0], [2.0, 1.0]]
    w = [[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2]]
    y = [0, 2]
    fc = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor(w))

    def logits(h):
        return [[sum(wk[d] * hi[d] for d in range(2)) for wk in w] for hi in h]

    def softmax(z):
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    def s(h):
        p = [softmax(z) for z in logits(h)]
        return [sum((p[i][c] - (y[i] == c)) * sum(h[i]) for i in range(2)) / 2 for c in range(3)]

    def gap_rows(v, cc=0.8):
        m = min(v)
        g = [(a - m) / sum(b - m for b in v) for a in v]
        rows = []
        for i in range(3):
            off = [0.0 if k == i else g[k] for k in range(3)]
            rows.append([1 - cc if k == i else cc * off[k] / sum(off) for k in range(3)])
        return rows

    def kl(label, z):
        lp = [math.log(q) for q in softmax(z)]
        return sum(t * (math.log(t) - lp[k]) for k, t in enumerate(label) if t > 0)

    s_nat, s_adv = s(h_nat), s(h_adv)
    z_nat, z_adv = logits(h_nat), logits(h_adv)
    for order in (1, 2):
        f = abs if order == 1 else (lambda v: v * v)
        nat, adv = [f(v) for v in s_nat], [f(v) for v in s_adv]
        for_clean = gap_rows([a - n for a, n in zip(adv, nat)])
        for_adv = gap_rows([n - a for n, a in zip(nat, adv)]) if order == 1 else for_clean
        pairs = [kl(for_adv[y[i]], z_adv[i]) + kl(for_clean[y[i]], z_nat[i]) for i in range(2)]
        expected = 0.5 * sum(pairs) / 2
        term = TaylorSoftLabelKL(order=order, cc=0.8)
        term.bind_models({"target": nn.Sequential(fc)})
        hn, ha = torch.tensor(h_nat, requires_grad=True), torch.tensor(h_adv, requires_grad=True)
        views = {"target(x)": fc(hn), "target(x_adv)": fc(ha)}
        got = term(views, torch.tensor(y))
        assert math.isclose(got.item(), expected, rel_tol=1e-5), order


def test_second_order_as_written_uses_one_label_for_both_halves_and_the_switch_does_not():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10))
    x, x_adv, y = torch.rand(4, 3, 2, 2), torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 3])
    labels = {}
    for as_written in (True, False):
        term = TaylorSoftLabelKL(order=2, cc=0.8, second_order_as_written=as_written)
        term.bind_models({"target": model})
        labels[as_written] = term.soft_labels({"target(x)": model(x), "target(x_adv)": model(x_adv)}, y)
    assert torch.equal(labels[True][0], labels[True][1])
    assert not torch.allclose(labels[False][0], labels[False][1])
    assert torch.equal(labels[True][1], labels[False][1])


def test_the_code_name_rule_is_every_convolution_on_the_authors_wrn():
    # On WRN-34-10 (the authors' network), 'conv' in name selects exactly the Conv2d parameters.
    load_config("rat_trades_cifar10", ["TARGET_BACKBONE = 'wrn34_10'"])
    wrn = experiment().graph.target
    by_name = {id(p) for n, p in wrn.named_parameters() if "conv" in n}
    assert by_name == {id(p) for p in noised_parameters(wrn, None)}


def test_the_noisy_copy_leaves_the_model_alone():
    load_config("rat_trades_cifar10,smoke")
    graph = experiment().graph.train()
    assert isinstance(graph.generator, NoisyCopyGenerator)
    assert graph.generator.steps == 3 and graph.generator.bn_mode == "eval"  # the wrapped PGD's, under smoke
    copy.deepcopy(graph.generator)
    model = graph.target
    state = copy.deepcopy(model.state_dict())
    torch.manual_seed(0)
    noisy = graph.generator.noisy_copies(graph.models)["target"]
    graph.generator(graph.models, torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert model.training
    convs = {id(p) for p in noised_parameters(noisy, None)}
    for (_, a), (name, b) in zip(model.named_parameters(), noisy.named_parameters()):
        if id(b) in convs:
            assert 0 < (a - b).abs().max() < 1e-3, name  # 1e-4 N(0, 1)
        else:
            assert torch.equal(a, b), name


@pytest.mark.slow
def test_rat_trades_step_is_the_authors_code_on_resnet18():
    """rat_trades_cifar10 on a ResNet-18 against train_first_second.py's step, in float64 (the code's float32
    attack sign steps can flip on rounding; in float64 the two agree to 1e-12)."""
    load_config("rat_trades_cifar10", ["TARGET_BACKBONE = 'resnet18'"])
    exp = experiment()
    graph = exp.graph.train().double()
    model = graph.target
    theirs = copy.deepcopy(model)
    optimizer = exp.trainer.optimizer_fn(graph.models)
    opt = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    convs = {f"{name}.weight" for name, m in theirs.named_modules() if isinstance(m, nn.Conv2d)}
    torch.manual_seed(1)
    x, y = torch.rand(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))

    torch.manual_seed(2)
    out = exp.trainer.train_step(graph, optimizer, x, y, CPU)
    torch.manual_seed(2)
    # ResNet-18 names its classifier 'linear' and its shortcut convolutions 'shortcut.0': the code's rules
    # ('fc.weight', 'conv' in name) applied to what they select on the authors' WRN (the test above).
    ref_loss = ref.rat_step(theirs, opt, x, y, fc="linear.weight", noised=lambda name: name in convs)

    tight = {"rtol": 1e-9, "atol": 1e-11}
    torch.testing.assert_close(out["loss"], ref_loss, **tight)
    for (name, a), b in zip(model.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **tight, msg=name)
        torch.testing.assert_close(a, b, **tight, msg=name)
    for (name, a), b in zip(model.named_buffers(), theirs.buffers()):
        torch.testing.assert_close(a, b, **tight, msg=name)
    assert int(model.bn1.num_batches_tracked) == 8  # eight train-mode forwards
