"""The three parts of evaluate_robustness on their own: planning, per-batch scoring, flag assembly.

The end-to-end numbers and flags are pinned by test_eval_suite.py and test_eval_checks.py; these tests pin
each part's contract with stub attacks whose outcome is known example by example.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from components.eval.attacks import EPS_8_255, PGD, STEP_2_255
from components.eval.robustness import Tally, assemble_flags, plan_radii, score_batch

pytestmark = pytest.mark.usefixtures("one_thread")


class FirstPixel(nn.Module):
    """Class 1 iff the first pixel is above 0.5."""

    def forward(self, x: Tensor) -> Tensor:
        z = 100 * (x[:, 0, 0, 0] - 0.5)
        return torch.stack([torch.zeros_like(z), z], dim=1)


class Flip:
    """A stub attack that fools exactly the examples in ``fool`` (sets their first pixel across 0.5)."""

    def __init__(self, fool: list[int], eps: float = EPS_8_255, white_box: bool = True) -> None:
        self.fool, self.eps, self.white_box = fool, eps, white_box
        self.flags: list[str] = []

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x_adv = x.clone()
        x_adv[self.fool, 0, 0, 0] = 1 - x_adv[self.fool, 0, 0, 0]
        return x_adv


def _batch() -> tuple[Tensor, Tensor]:
    # First pixels 0.499 / 0.501: a flip moves them by 0.002 < 8/255, inside the ball and the box.
    x = torch.full((4, 1, 2, 2), 0.5)
    x[:, 0, 0, 0] = torch.tensor([0.499, 0.501, 0.499, 0.501])
    return x, torch.tensor([0, 1, 0, 1])


def test_plan_runs_every_attack_at_headline_radii_and_only_curve_attacks_at_curve_radii():
    attacks = {"pgd20": PGD(EPS_8_255, steps=20), "pgd50": PGD(EPS_8_255, steps=50)}
    plan = plan_radii(attacks, (EPS_8_255, 0.031, EPS_8_255), (4 / 255, EPS_8_255), ("pgd20",))
    assert [eps for eps, _ in plan] == [EPS_8_255, 0.031, 4 / 255]
    assert [sorted(a) for _, a in plan] == [["pgd20", "pgd50"], ["pgd20", "pgd50"], ["pgd20"]]
    # Headline radii keep the protocol's step; curve radii scale it with eps.
    assert plan[1][1]["pgd20"].step_size == STEP_2_255
    assert plan[2][1]["pgd20"].step_size == pytest.approx(STEP_2_255 / 2)
    # Without curve attacks the curve radii are not planned at all.
    assert [eps for eps, _ in plan_radii(attacks, (EPS_8_255,), (4 / 255,), ())] == [EPS_8_255]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (({}, (EPS_8_255,)), "no attacks given"),
        (({"a": Flip([])}, (EPS_8_255,), (), ("b",)), r"curve_attacks \['b'\] are not in attacks"),
        (({"a": Flip([])}, ()), "no radius to evaluate"),
    ],
)
def test_plan_rejects_what_cannot_be_evaluated(args, match):
    with pytest.raises(ValueError, match=match):
        plan_radii(*args)


def test_plan_keeps_a_plain_callable_only_at_its_own_radius():
    assert plan_radii({"a": (f := Flip([]))}, (EPS_8_255,))[0][1]["a"] is f
    with pytest.raises(TypeError, match="no with_eps"):
        plan_radii({"a": Flip([])}, (0.031,))


def test_scoring_counts_each_example_and_the_worst_case_across_batches():
    model, (x, y) = FirstPixel(), _batch()
    plan = plan_radii({"a": Flip([0]), "b": Flip([1, 2])}, (EPS_8_255,))
    tally = Tally()
    for b in range(2):
        clean_ok = tally.count_clean(model(x), y)
        score_batch(model, x, y, clean_ok, plan, tally, batch=b, seed=0, checks=True, amp=False)
    (r,) = tally.results(plan)
    assert tally.num_classes == 2
    assert (r.n, r.clean_acc, r.acc, r.worst_acc) == (8, 1.0, {"a": 0.75, "b": 0.5}, 0.25)
    assert tally.violations[(EPS_8_255, "a")] == {"shape": 0, "nan": 0, "ball": 0, "box": 0}
    assert assemble_flags(tally, [r], plan, checks=True) == []


def test_a_black_box_attack_that_beats_the_white_box_ones_is_flagged():
    model, (x, y) = FirstPixel(), _batch()
    plan = plan_radii({"white": Flip([0]), "square": Flip([0, 3], white_box=False)}, (EPS_8_255,))
    tally = Tally()
    clean_ok = tally.count_clean(model(x), y)
    score_batch(model, x, y, clean_ok, plan, tally, batch=0, seed=0, checks=True, amp=False)
    # Example 3 survived every white-box attack but not the black-box one.
    assert int(tally.extra_fooled[(EPS_8_255, "square")]) == 1
    flags = assemble_flags(tally, tally.results(plan), plan, checks=True)
    assert len(flags) == 1 and flags[0].startswith("[black-box-wins] square at eps=8/255 fooled 1/4")
    # checks=False keeps only the flags the attacks raise themselves, grouped.
    plan[0][1]["white"].flags += ["[autoattack] seen at step 1", "[autoattack] seen at step 2"]
    clean_ok = tally.count_clean(model(x), y)
    score_batch(model, x, y, clean_ok, plan, tally, batch=1, seed=0, checks=False, amp=False)
    assert assemble_flags(tally, tally.results(plan), plan, checks=False) == [
        "[autoattack] seen at step 1 (raised 2 times)"
    ]
