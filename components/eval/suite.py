"""Named evaluation suites: which attacks, at which radii, on how many examples.

:func:`get_suite` returns ``quick`` for a fast look during development, ``paper`` for the METHODS 1.5
protocol, ``full`` for the paper numbers plus AutoAttack-dev and an accuracy-vs-eps curve. A
:class:`Suite` runs through :func:`components.eval.robustness.evaluate_robustness` and returns its
:class:`components.eval.report.EvalReport`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from components.eval.attacks import CW, EPS_8_255, PGD, STEP_2_255, EvalAttack
from components.eval.autoattack import AutoAttack
from components.eval.report import EvalReport
from components.eval.robustness import evaluate_robustness

#: The radius the D2R/LBGAT code evaluates AutoAttack at (``args.epsilon``, METHODS 1.5).
EPS_0031 = 0.031
#: Radii of the accuracy-vs-eps curve in the ``full`` suite: 2/255, 4/255, ..., 16/255.
CURVE_EPS = tuple(k / 255 for k in range(2, 17, 2))
SUITE_NAMES = ("quick", "paper", "full")


@dataclass
class Suite:
    """A named evaluation plan: which attacks, at which radii, on how many examples."""

    name: str
    attacks: dict[str, EvalAttack]
    eps_list: tuple[float, ...]
    curve_eps: tuple[float, ...] = ()
    curve_attacks: tuple[str, ...] = ()
    max_examples: int | None = None

    def run(
        self, model: nn.Module, batches: Iterable[Sequence[Tensor]], progress: bool = True, **kwargs: Any
    ) -> EvalReport:
        """:func:`evaluate_robustness` with this suite's plan; ``kwargs`` go to it (``seed``, ``checks``)."""
        return evaluate_robustness(
            model,
            batches,
            self.attacks,
            self.eps_list,
            progress,
            curve_eps=self.curve_eps,
            curve_attacks=self.curve_attacks,
            max_examples=kwargs.pop("max_examples", self.max_examples),
            suite=self.name,
            **kwargs,
        )


def paper_attacks(eps: float = EPS_8_255, aa_batch_size: int = 256) -> dict[str, EvalAttack]:
    """METHODS 1.5: PGD-10/20/50 and CW-20 (uniform start, step 2/255, early stop), AutoAttack standard."""
    return {
        "pgd10": PGD(eps, steps=10, step_size=STEP_2_255),
        "pgd20": PGD(eps, steps=20, step_size=STEP_2_255),
        "pgd50": PGD(eps, steps=50, step_size=STEP_2_255),
        "cw20": CW(eps, steps=20, step_size=STEP_2_255),
        "aa": AutoAttack(eps, version="standard", batch_size=aa_batch_size),
    }


def get_suite(
    name: str,
    *,
    eps: float = EPS_8_255,
    with_0031: bool = False,
    max_examples: int | None = None,
    aa_batch_size: int = 256,
) -> Suite:
    """The named suite:

    * ``quick``: PGD-20 and CW-20 at ``eps`` on the first 1000 examples (``max_examples`` overrides).
    * ``paper``: METHODS 1.5, PGD-10/20/50, CW-20 and AutoAttack standard at ``eps`` (8/255), and also at
      0.031 (the D2R code's AutoAttack radius) when ``with_0031``; all examples.
    * ``full``: ``paper`` plus AutoAttack dev (``aa_dev``) and PGD-20 at 2/255, 4/255, ..., 16/255 (step
      eps/4) for the accuracy-vs-eps curve; all examples.
    """
    eps_list = (eps, EPS_0031) if with_0031 else (eps,)
    if name == "quick":
        attacks: dict[str, EvalAttack] = {"pgd20": PGD(eps, steps=20), "cw20": CW(eps, steps=20)}
        return Suite("quick", attacks, (eps,), max_examples=1000 if max_examples is None else max_examples)
    if name == "paper":
        return Suite("paper", paper_attacks(eps, aa_batch_size), eps_list, max_examples=max_examples)
    if name == "full":
        attacks = paper_attacks(eps, aa_batch_size)
        attacks["aa_dev"] = AutoAttack(eps, version="dev", batch_size=aa_batch_size)
        return Suite(
            "full",
            attacks,
            eps_list,
            curve_eps=CURVE_EPS,
            curve_attacks=("pgd20",),
            max_examples=max_examples,
        )
    raise ValueError(f"unknown evaluation suite {name!r}; expected one of {SUITE_NAMES}")
