"""AWP: the weight perturbation by hand, and whole AT-AWP / TRADES-AWP steps against the authors' code
(benchmarks/reference_awp.py, github.com/csdongxian/AWP): the same loss, gradients, perturbed weights at the
loss forward, restored weights after the step, and BatchNorm statistics. Also the `awp` profile on the
target+guide methods.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from benchmarks import reference_awp as ref
from components.experiment import experiment
from components.schedules import PiecewiseSchedule
from components.weight_perturbation import AWP, awp_direction
from pipeline.config import load_config

CPU = torch.device("cpu")


def test_awp_direction_by_hand():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    proxy = copy.deepcopy(model)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # ||w|| = 5
        proxy[0].weight.copy_(torch.tensor([[3.0, 1.0], [0.0, 4.0]]))  # w_proxy - w = [[0, 1], [0, 0]]
        proxy[0].bias.add_(1.0)
        proxy[1].weight.add_(1.0)
    v = awp_direction(model, proxy)
    # Only >1-dim 'weight' parameters: the Linear kernel; not its bias, not BN's affine weight (1-dim).
    assert list(v) == ["0.weight"]
    expected = torch.tensor([[0.0, 5.0], [0.0, 0.0]])  # ||w|| / ||diff|| * diff = 5 / 1 * diff
    torch.testing.assert_close(v["0.weight"], expected)


def test_awp_perturb_and_restore_by_hand_and_its_warm_up():
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 4.0]]))
    loss_w = []

    class Objective:  # stands for a WeightedLoss: maximise sum(model(x)) = w . x
        views = ["target(x)"]

        def __call__(self, views, y):
            loss_w.append(1)
            return views["target(x)"].sum(), {}

    awp = AWP(gamma=0.1, warmup_epochs=2, proxy_lr=0.5, objective=Objective())
    awp.bind({"target": model}, None)
    x = torch.tensor([[1.0, 0.0]])
    awp.set_epoch(2, 10)  # epochs 1-2 are warm-up: nothing happens
    awp.perturb({"target": model}, {"x": x}, torch.zeros(1))
    assert not awp.applied and loss_w == []
    awp.set_epoch(3, 10)
    awp.perturb({"target": model}, {"x": x}, torch.zeros(1))
    # The proxy ascends w . x: w_proxy - w = 0.5 * x = [0.5, 0]; v = 5 / 0.5 * [0.5, 0] = [5, 0].
    torch.testing.assert_close(model[0].weight, torch.tensor([[3.0 + 0.1 * 5.0, 4.0]]))
    awp.restore()
    torch.testing.assert_close(model[0].weight, torch.tensor([[3.0, 4.0]]))
    assert not awp.applied


def _authors_piecewise(t: float, epochs: int) -> float:
    # AT_AWP/train_cifar10.py L261-267 with lr_max = 1.
    if t / epochs < 0.5:
        return 1.0
    elif t / epochs < 0.75:
        return 1.0 / 10.0
    return 1.0 / 100.0


@pytest.mark.parametrize("epochs, n", [(4, 3), (200, 391), (10, 7)])
def test_piecewise_schedule_is_the_authors_per_iteration_lr(epochs, n):
    schedule = PiecewiseSchedule().bind(n, epochs)
    for epoch in range(epochs):
        for i in range(n):
            expected = _authors_piecewise(epoch + (i + 1) / n, epochs)
            assert math.isclose(schedule(epoch * n + i), expected, rel_tol=1e-12), (epoch, i)


class _LossForwardWeights:
    """Records the model's weights at its train-mode forwards with parameter gradients on a plain input:
    the loss forward (attack steps freeze the parameters or differentiate the input; proxy copies and
    statistics-only forwards are other modules or run without gradient)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.seen = model, []
        model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        if module is not self.model or not module.training or not torch.is_grad_enabled():
            return
        if args[0].requires_grad or not any(p.requires_grad for p in module.parameters()):
            return
        self.seen.append({n: p.detach().clone() for n, p in module.named_parameters()})


def _compare(graph_model, ref_model, out_loss, ref_loss, perturbed, ref_perturbed, strip=""):
    tight = {"rtol": 1e-9, "atol": 1e-11}  # float64
    torch.testing.assert_close(out_loss, ref_loss, **tight)
    ours = {n.removeprefix(strip): p for n, p in graph_model.named_parameters()}
    theirs = dict(ref_model.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in theirs.items():
        torch.testing.assert_close(perturbed[name], ref_perturbed[name], **tight, msg=name)
        torch.testing.assert_close(ours[name].grad, p.grad, **tight, msg=name)
        torch.testing.assert_close(ours[name], p, **tight, msg=name)
    buffers = graph_model.named_buffers()
    ours_b = {n.removeprefix(strip): b for n, b in buffers if not n.startswith("normalize")}
    for name, b in ref_model.named_buffers():
        torch.testing.assert_close(ours_b[name], b, **tight, msg=name)


def _both_steps(config, epoch, proxy_lr, authors_step, reference_model, **kw):
    """One trainer step of ``config`` (ResNet-18, float64) and ``authors_step`` from the same weights, batch
    and noise. float64: in float32 the attack's sign steps flip on rounding (the code's ``X + delta``
    against x' here) and the trajectories part within ten steps; in float64 the two agree to ~1e-15."""
    load_config(config, ["TARGET_BACKBONE = 'resnet18'"])
    exp = experiment()
    graph = exp.graph.train().double()
    graph.set_epoch(epoch, exp.trainer.epochs)
    theirs = copy.deepcopy(reference_model(graph.target)).train()
    proxy = copy.deepcopy(theirs)
    opt = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    proxy_opt = torch.optim.SGD(proxy.parameters(), lr=proxy_lr)
    optimizer = exp.trainer.optimizer_fn(graph.models)
    before = {n: p.detach().clone() for n, p in theirs.named_parameters()}
    torch.manual_seed(1)
    x, y = torch.rand(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
    seen = _LossForwardWeights(graph.target)
    torch.manual_seed(2)
    out = exp.trainer.train_step(graph, optimizer, x, y, CPU)
    ref_seen = []
    torch.manual_seed(2)
    ref_loss = authors_step(
        theirs, proxy, opt, proxy_opt, x, y,
        on_loss_forward=lambda m: ref_seen.append({n: p.detach().clone() for n, p in m.named_parameters()}),
        **kw,
    )  # fmt: skip
    assert not graph.perturbation.applied
    return graph, theirs, before, out["loss"], ref_loss, seen.seen, ref_seen


@pytest.mark.slow
def test_at_awp_step_is_the_authors_code_on_resnet18():
    """pgd_at_awp_cifar10 on a ResNet-18: attack (train mode), proxy, perturbed loss, step, restore, the
    logging forward, as AT_AWP/train_cifar10.py L314-369 runs them."""
    graph, theirs, before, loss, ref_loss, seen, ref_seen = _both_steps(
        "pgd_at_awp_cifar10", 1, 0.01, ref.at_awp_step, lambda m: m.net,  # NormalizedNet: the code normalizes
        mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616),
    )  # fmt: skip
    assert len(seen) == 1
    perturbed = {n.removeprefix("net."): p for n, p in seen[0].items()}
    _compare(graph.target, theirs, loss, ref_loss, perturbed, ref_seen[0], strip="net.")
    # The loss forward ran at w + gamma v, not at w; the step's weights are the restored ones.
    assert not torch.equal(perturbed["conv1.weight"], before["conv1.weight"])
    assert not torch.equal(perturbed["linear.weight"], theirs.linear.weight)


@pytest.mark.slow
def test_trades_awp_step_is_the_authors_code_on_resnet18():
    """trades_awp_cifar10 after its warm-up (epoch 10: `epoch >= args.awp_warmup`, 1-based): eval-mode
    attack, the clean/adv/clean proxy, the adv, clean, clean loss forwards at the perturbed weights, step,
    restore (train_trades_cifar.py L166-206)."""
    graph, theirs, before, loss, ref_loss, seen, ref_seen = _both_steps(
        "trades_awp_cifar10", 10, 0.1, ref.trades_awp_step, lambda m: m
    )
    assert len(seen) == 2  # target(x_adv), target(x); the third forward runs without gradient
    assert all(torch.equal(seen[0][n], seen[1][n]) for n in seen[0])
    _compare(graph.target, theirs, loss, ref_loss, seen[0], ref_seen[0])
    assert not torch.equal(seen[0]["conv1.weight"], before["conv1.weight"])


def test_trades_awp_warm_up_trains_unperturbed_until_epoch_10():
    load_config("trades_awp_cifar10", ["TARGET_BACKBONE = 'small_cnn'"])  # smoke sets no warm-up
    graph = experiment().graph.train()
    for epoch, active in ((1, False), (9, False), (10, True), (200, True)):
        graph.set_epoch(epoch, 200)
        assert graph.perturbation.active is active, epoch


def test_a_failing_step_leaves_no_perturbed_weights_behind():
    load_config("pgd_at_awp_cifar10,smoke")
    exp = experiment()
    graph = exp.graph.train()
    before = [p.detach().clone() for p in graph.target.parameters()]

    def broken(views, y):
        raise FloatingPointError("a term failed")

    graph.loss.__class__ = type("Broken", (type(graph.loss),), {"__call__": lambda self, v, y: broken(v, y)})
    with pytest.raises(FloatingPointError):
        graph.step(torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert not graph.perturbation.applied
    assert all(torch.equal(a, b) for a, b in zip(before, graph.target.parameters()))


@pytest.mark.parametrize("spec", ["d2r_cag_cifar10,awp,smoke", "lbgat_cifar100,awp,smoke"])
def test_awp_profile_perturbs_the_target_of_target_guide_methods(spec):
    """`awp` on LBGAT / D2R-CAG builds and steps: the target's loss forward runs perturbed, the guide's does
    not, both train, the weights are restored, and the proxy pass moves neither model's BN statistics (the
    guide's running stats equal those of the same step without AWP)."""
    stats = {}
    for with_awp in (True, False):
        load_config(spec if with_awp else spec.replace(",awp", ""))
        exp = experiment()
        graph = exp.graph.train()
        size, classes = 32, graph.target.fc.out_features
        torch.manual_seed(0)
        x, y = torch.rand(4, 3, size, size), torch.randint(0, classes, (4,))
        before = {n: [p.detach().clone() for p in m.parameters()] for n, m in graph.models.items()}
        seen = {n: _LossForwardWeights(m) for n, m in graph.models.items()}
        optimizer = exp.trainer.optimizer_fn(graph.models)
        out = exp.trainer.train_step(graph, optimizer, x, y, CPU)
        assert torch.isfinite(out["loss"])
        for n, m in graph.models.items():
            assert any(not torch.equal(a, b) for a, b in zip(before[n], m.parameters())), n
        stats[with_awp] = [b.clone() for b in graph.models["guide"].buffers()]
        target_at_loss = list(seen["target"].seen[0].values())
        guide_at_loss = list(seen["guide"].seen[0].values())
        assert all(torch.equal(a, b) for a, b in zip(before["guide"], guide_at_loss))
        perturbed = any(not torch.equal(a, b) for a, b in zip(before["target"], target_at_loss))
        assert perturbed is with_awp
        if with_awp:
            assert isinstance(graph.perturbation, AWP) and not graph.perturbation.applied
    for a, b in zip(stats[True], stats[False]):
        torch.testing.assert_close(a, b)


def test_awp_on_a_method_whose_terms_read_the_model_asks_for_an_objective():
    # RAT's Taylor terms differentiate the real model's classifier; the proxy cannot evaluate them.
    with pytest.raises(ValueError, match="Set AWP.objective"):
        load_config("rat_trades_cifar10,awp,smoke")
        experiment()
