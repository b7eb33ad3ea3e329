"""Evaluation checks: each flag fires on a model built to trip it and stays quiet on a normal trained model.

The normal model is a small MLP trained for about a second on ten well-separated synthetic classes: it is
~100% accurate clean, partly robust at 8/255, and every example falls at eps = 0.5, so every check has
something to say about it (and says nothing).
"""

from __future__ import annotations

import pytest
import torch
from support import synthetic, train_mlp
from torch import nn

from components.eval import checks
from components.eval.attacks import CW, EPS_8_255, PGD
from components.eval.autoattack import AutoAttack
from components.eval.robustness import evaluate_robustness

# Tiny tensors: intra-op threads only add contention when other jobs share the CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mlp():
    return train_mlp()


@pytest.fixture(scope="module")
def data():
    return synthetic(64, seed=2)


def tags(flags: list[str]) -> set[str]:
    return {f.split("]")[0] + "]" for f in flags}


class Wrap(nn.Module):
    """``net`` behind an input or output transformation that trips one check."""

    def __init__(self, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.net, self.kind = net, kind
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "round":  # 8-bit quantization: zero gradient everywhere
            x = torch.round(x * 255) / 255
        elif self.kind == "sign":  # binarization: zero gradient everywhere
            x = 0.5 + 0.1 * torch.sign(x - 0.5)
        elif self.kind == "straight-through":  # the same rounding with a BPDA-style identity gradient
            x = x + (torch.round(x * 255) / 255 - x).detach()
        elif self.kind == "noise":
            x = x + 0.05 * torch.randn_like(x)
        elif self.kind == "dropout":
            x = self.drop(x)
        out = self.net(x)
        return out.softmax(1) if self.kind == "softmax" else out


# ------------------------------------------------------------------------------ quiet on a normal model


def test_no_flag_on_a_normal_trained_model(mlp, data):
    x, y = data
    with torch.no_grad():
        assert (mlp(x).argmax(1) == y).float().mean() > 0.95
    assert checks.run_model_checks(mlp, x, y) == []
    x_adv = PGD(EPS_8_255)(mlp, x, y)
    assert checks.check_adversarial_examples(x, x_adv, EPS_8_255) == []
    assert checks.check_clean_accuracy(1.0, 10) == []


def test_the_suite_raises_no_flag_on_a_normal_trained_model(mlp, data):
    x, y = data
    attacks = {
        "pgd10": PGD(EPS_8_255, steps=10),
        "pgd50": PGD(EPS_8_255, steps=50),
        "cw20": CW(EPS_8_255),
        "aa": AutoAttack(EPS_8_255, version="standard"),
    }
    report = evaluate_robustness(mlp, [(x[:16], y[:16])], attacks, progress=False)
    assert report.flags == []
    r = report.result(EPS_8_255)
    assert r.worst_acc < r.clean_acc and r.acc["pgd50"] <= r.acc["pgd10"]


# ------------------------------------------------------------------------------------- each flag fires


def test_probabilities_are_flagged(mlp, data):
    x, y = data
    flags = checks.check_logits(Wrap(mlp, "softmax").eval(), x)
    assert tags(flags) == {"[probabilities]"} and "logits" in flags[0]
    assert checks.check_logits(mlp, x) == []


@pytest.mark.parametrize("kind", ["round", "sign"])
def test_a_non_differentiable_step_is_flagged_as_zero_gradient(mlp, data, kind):
    x, y = data
    flags = checks.check_gradient_masking(Wrap(mlp, kind).eval(), x, y)
    assert tags(flags) == {"[zero-gradient]"} and flags[0].startswith(f"[zero-gradient] {len(y)}/{len(y)}")


def test_a_straight_through_gradient_is_not_flagged(mlp, data):
    x, y = data
    assert checks.check_gradient_masking(Wrap(mlp, "straight-through").eval(), x, y) == []


def test_a_model_with_no_path_from_input_to_loss_is_flagged(data):
    x, y = data

    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.randn(10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bias.expand(x.shape[0], 10)

    assert tags(checks.check_gradient_masking(Constant().eval(), x, y)) == {"[zero-gradient]"}


@pytest.mark.parametrize("kind", ["noise", "dropout"])
def test_a_randomized_forward_is_flagged(mlp, data, kind):
    x, y = data
    model = Wrap(mlp, kind)
    model.train(kind == "dropout")  # dropout left on (train mode); noise added even in eval mode
    flags = checks.check_deterministic(model, x)
    assert tags(flags) == {"[randomized]"}
    assert checks.check_deterministic(mlp, x) == []


def test_a_model_left_in_train_mode_is_flagged(mlp, data):
    x, y = data
    model = nn.Sequential(nn.BatchNorm2d(3), mlp)
    model.train()
    flags = checks.check_eval_mode(model)
    assert tags(flags) == {"[eval-mode]"} and "model.eval()" in flags[0]
    # The check runs no forward; the determinism check on this model leaves its BN statistics alone.
    before = model[0].running_mean.clone()
    checks.check_deterministic(model, x)
    assert torch.equal(model[0].running_mean, before)
    assert checks.check_eval_mode(model.eval()) == []


def test_a_masked_model_survives_a_huge_eps_and_is_flagged(mlp, data):
    x, y = data
    flags = checks.check_large_eps(Wrap(mlp, "round").eval(), x, y, eps=0.5)
    assert tags(flags) == {"[large-eps]"} and "eps=0.5" in flags[0]
    assert checks.check_large_eps(mlp, x, y, eps=0.5) == []


def test_invalid_adversarial_examples_are_flagged(data):
    x, _ = data
    eps = EPS_8_255
    assert checks.check_adversarial_examples(x, (x + eps).clamp(0, 1), eps) == []
    outside = x + 2 * eps * torch.sign(torch.randn_like(x))
    flags = checks.check_adversarial_examples(x, outside.clamp(0, 1), eps, attack="PGD-20")
    assert tags(flags) == {"[invalid-adversarial]"} and "PGD-20" in flags[0] and "L-inf ball" in flags[0]
    zeros = torch.zeros_like(x)
    box = x.clone()
    box[0] = -0.01  # inside the ball of a dark image, outside the box
    assert "image box" in checks.check_adversarial_examples(zeros[:1], box[:1], eps)[0]
    nan = x.clone()
    nan[3, 0, 0, 0] = float("nan")
    flags = checks.check_adversarial_examples(x, nan, eps)
    assert len(flags) == 1 and "1/64" in flags[0] and "NaN" in flags[0]
    assert "wrong shape" in checks.check_adversarial_examples(x, x[:, :1], eps)[0]


def test_more_steps_giving_higher_accuracy_is_flagged():
    assert checks.check_more_steps({10: 0.55, 20: 0.54, 50: 0.53}) == []
    assert checks.check_more_steps({10: 0.55, 50: 0.551}) == [], "within AutoAttack's 0.2% tolerance"
    flags = checks.check_more_steps({10: 0.50, 20: 0.49, 50: 0.56}, what="PGD")
    assert tags(flags) == {"[more-steps-weaker]"} and "PGD-50" in flags[0] and "PGD-20" in flags[0]


def test_black_box_beating_white_box_is_flagged():
    assert checks.check_black_box_vs_white_box({"square": 0}, 1000) == []
    assert checks.check_black_box_vs_white_box({"square": 2}, 1000) == [], "0.2% tolerance"
    flags = checks.check_black_box_vs_white_box({"aa/square": 5}, 64)
    assert tags(flags) == {"[black-box-wins]"} and "5/64" in flags[0]


def test_clean_accuracy_at_chance_and_inputs_outside_the_box_are_flagged(data):
    x, _ = data
    assert tags(checks.check_clean_accuracy(0.11, 10)) == {"[chance-level]"}
    assert checks.check_inputs(x) == []
    assert tags(checks.check_inputs((x - 0.5) / 0.25)) == {"[input-range]"}


# ------------------------------------------------------------------------------------- through the suite


def test_the_suite_flags_square_beating_the_gradient_attacks_on_a_masked_model(mlp, data):
    x, y = data
    masked = Wrap(mlp, "round").eval()
    attacks = {"pgd20": PGD(EPS_8_255), "aa": AutoAttack(EPS_8_255, version="standard")}
    report = evaluate_robustness(masked, [(x[:24], y[:24])], attacks, progress=False)
    found = tags(report.flags)
    assert {"[zero-gradient]", "[large-eps]", "[black-box-wins]", "[autoattack]"} <= found
    assert any("aa/square" in f for f in report.flags)
    stages = report.result(EPS_8_255).stages["aa"]
    assert stages["square"] < stages["fab-t"], "Square fools what the gradient attacks cannot"


def test_the_suite_flags_randomized_and_probability_models(mlp, data):
    x, y = data
    for kind, tag in [("noise", "[randomized]"), ("softmax", "[probabilities]")]:
        report = evaluate_robustness(
            Wrap(mlp, kind), [(x[:16], y[:16])], {"pgd10": PGD(EPS_8_255, steps=10)}, progress=False
        )
        assert tag in tags(report.flags), report.flags


class CheatingPGD(PGD):
    """A broken attack: steps past the ball (``overshoot``) or gives up when given more steps (``lazy``)."""

    def __init__(self, eps: float = EPS_8_255, steps: int = 20, mode: str = "overshoot") -> None:
        super().__init__(eps, steps=steps)
        self.mode = mode

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.mode == "lazy" and self.steps > 10:
            return x.clone()
        x_adv = super().__call__(model, x, y)
        return (x + 3 * (x_adv - x)).clamp(0, 1) if self.mode == "overshoot" else x_adv


def test_the_suite_flags_attacks_that_leave_the_ball_or_weaken_with_more_steps(mlp, data):
    x, y = data
    attacks = {"pgd20": CheatingPGD(mode="overshoot")}
    report = evaluate_robustness(mlp, [(x[:16], y[:16])], attacks, progress=False, large_eps=None)
    assert tags(report.flags) == {"[invalid-adversarial]"} and "pgd20 at eps=8/255" in report.flags[0]

    attacks = {"pgd10": CheatingPGD(steps=10, mode="lazy"), "pgd50": CheatingPGD(steps=50, mode="lazy")}
    report = evaluate_robustness(mlp, [(x[:16], y[:16])], attacks, progress=False, large_eps=None)
    assert tags(report.flags) == {"[more-steps-weaker]"}
    assert "PGD-50 at eps=8/255" in report.flags[0] and "PGD-10" in report.flags[0]


def test_the_suite_flags_a_model_stuck_in_train_mode(mlp, data):
    x, y = data

    class StuckInTraining(nn.Module):
        # A module whose train() ignores the requested mode: model.eval() cannot switch it off.
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def train(self, mode: bool = True) -> nn.Module:
            self.net.train(mode)
            self.training = True
            return self

    report = evaluate_robustness(
        StuckInTraining(), [(x[:8], y[:8])], {"pgd10": PGD(EPS_8_255, steps=10)}, progress=False
    )
    assert "[eval-mode]" in tags(report.flags)


def _broken(mlp: nn.Module, where: str) -> nn.Module:
    """A copy of ``mlp`` with NaN weights (``weights``) or finite weights but infinite logits (``logits``)."""
    import copy

    net = copy.deepcopy(mlp)
    if where == "weights":
        with torch.no_grad():
            next(net.parameters())[0, 0] = float("nan")
        return net

    class Overflow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x) * float("inf")

    return Overflow()


def test_non_finite_weights_and_logits_are_flagged_by_name(mlp, data):
    x, y = data
    flags = checks.check_finite(_broken(mlp, "weights"), x)
    assert len(flags) == 2 and all(f.startswith("[non-finite]") for f in flags), flags
    assert "parameter/buffer" in flags[0] and f"{x.shape[0]}/{x.shape[0]} inputs" in flags[1]
    (flag,) = checks.check_finite(_broken(mlp, "logits"), x)
    assert flag.startswith("[non-finite] the logits")
    assert checks.check_finite(mlp, x) == []


def test_the_suite_names_non_finite_weights_instead_of_randomized(mlp, data):
    x, y = data
    report = evaluate_robustness(
        _broken(mlp, "weights"), [(x[:16], y[:16])], {"pgd10": PGD(EPS_8_255, steps=10)}, progress=False
    )
    assert "[non-finite]" in tags(report.flags), report.flags
    assert "[randomized]" not in tags(report.flags)
