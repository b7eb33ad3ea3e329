"""Robust evaluation you can trust: several attacks, several radii, per-example worst case, and flags.

:func:`evaluate_robustness` runs a dict of attacks (``components.eval.attacks.PGD``/``CW``,
``components.eval.autoattack.AutoAttack``, or anything with the same call signature) over a loader at every
radius of ``eps_list``, and reports per radius the clean accuracy, the accuracy under each attack, and the
per-example worst case (an example counts as robust only if it is classified correctly clean and after every
attack). It also runs the checks of ``components.eval.checks`` and returns their flags with the numbers.

It is three steps, each its own function: planning (:func:`plan_radii`: which attacks run at which
radius), per-batch scoring (:class:`Tally` and :func:`score_batch`: running per-example counts), and flag
assembly (:func:`assemble_flags`: the checks that need every batch).

Precision: everything runs in float32, with autocast disabled even if the caller enabled it. bf16 would
change results: scoring in bf16 flips borderline predictions, and bf16 predictions inside PGD's early stop
freeze examples that fp32 still classifies correctly, which weakens the attack. ``amp=True`` (CUDA only)
runs the PGD/CW iterations in bf16 for speed; scoring and AutoAttack stay in fp32 even then.
(TF32 convolutions/matmuls follow the global torch.backends settings.)
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from components.eval import checks as eval_checks
from components.eval.attacks import EPS_8_255, PGD, EvalAttack
from components.eval.autoattack import model_device
from components.eval.report import EpsResult, EvalReport, format_eps
from components.modes import model_mode

#: Which attacks run at which radius, in the order the radii were asked for.
Plan = list[tuple[float, dict[str, EvalAttack]]]


# ------------------------------------------------------------------------------------- planning


def _at_eps(attack: EvalAttack, eps: float, scale_step: bool = False) -> EvalAttack:
    """``attack`` at radius ``eps``; a plain callable without ``with_eps`` must already have that radius."""
    if hasattr(attack, "with_eps"):
        return attack.with_eps(eps, scale_step=scale_step)
    if math.isclose(getattr(attack, "eps", float("nan")), eps, rel_tol=0, abs_tol=1e-9):
        return attack
    raise TypeError(f"{attack!r} has no with_eps() and its eps is not {eps!r}: it cannot run at that radius")


def plan_radii(
    attacks: Mapping[str, EvalAttack],
    eps_list: Sequence[float],
    curve_eps: Sequence[float] = (),
    curve_attacks: Sequence[str] = (),
) -> Plan:
    """Every attack at every radius of ``eps_list`` (protocol step size kept), then the ``curve_attacks``
    at each radius of ``curve_eps`` not already planned (step scaled with eps). Equal radii run once."""
    if not attacks:
        raise ValueError("evaluate_robustness: no attacks given")
    unknown = sorted(set(curve_attacks) - set(attacks))
    if unknown:
        raise ValueError(f"evaluate_robustness: curve_attacks {unknown} are not in attacks {sorted(attacks)}")
    plan: Plan = []

    def planned(eps: float) -> bool:
        return any(math.isclose(eps, e, rel_tol=0, abs_tol=1e-9) for e, _ in plan)

    for eps in eps_list:
        if not planned(eps):
            plan.append((eps, {n: _at_eps(a, eps) for n, a in attacks.items()}))
    for eps in curve_eps if curve_attacks else ():
        # A curve radius that is also a headline radius reuses the headline run (all attacks).
        if not planned(eps):
            plan.append((eps, {n: _at_eps(attacks[n], eps, scale_step=True) for n in curve_attacks}))
    if not plan:
        raise ValueError("evaluate_robustness: no radius to evaluate")
    return plan


# ------------------------------------------------------------------------------------- per-batch scoring


def _add(sums: dict[Any, Tensor], key: Any, value: Tensor) -> None:
    # Device tensors: adding them costs no host sync per batch.
    sums[key] = sums.get(key, 0) + value.sum()


@dataclass
class Tally:
    """Running per-example counts over the batches of one evaluation (tensors on the model's device).

    Accuracies are micro-averaged: correct examples over examples seen, so batch sizes do not matter.
    """

    n: int = 0
    num_classes: int = 0
    #: correct clean (a device tensor after the first batch).
    clean: Tensor | int = 0
    #: (eps, attack) -> correct after that attack.
    correct: dict[tuple[float, str], Tensor] = field(default_factory=dict)
    #: eps -> correct clean and after every attack at eps.
    worst: dict[float, Tensor] = field(default_factory=dict)
    #: (eps, attack, stage) -> still correct after that stage; with the examples it was counted over.
    stages: dict[tuple[float, str, str], Tensor] = field(default_factory=dict)
    stage_n: dict[tuple[float, str, str], int] = field(default_factory=dict)
    #: (eps, black-box attack or stage) -> examples it fooled that survived every white-box attack.
    extra_fooled: dict[tuple[float, str], Tensor] = field(default_factory=dict)
    #: (eps, attack) -> counts of invalid adversarial examples (components.eval.checks.count_violations).
    violations: dict[tuple[float, str], dict[str, int]] = field(default_factory=dict)
    model_flags: list[str] = field(default_factory=list)
    attack_flags: list[str] = field(default_factory=list)

    def count_clean(self, logits: Tensor, y: Tensor) -> Tensor:
        """Count one batch's clean predictions; returns which examples are correct."""
        clean_ok = logits.argmax(1) == y
        self.n += y.shape[0]
        self.num_classes = logits.shape[1]
        self.clean = self.clean + clean_ok.sum()
        return clean_ok

    def results(self, plan: Plan) -> list[EpsResult]:
        """One :class:`EpsResult` per planned radius, sorted by eps."""

        def frac(count: Tensor | int, n: int) -> float:
            # float32, as the torchmetrics MeanMetric these counts replace computed it (same numbers).
            return (torch.as_tensor(count).float() / n).item()

        clean_acc = frac(self.clean, self.n)
        results = []
        for eps, attacks in plan:
            stages: dict[str, dict[str, float]] = {}
            for (e, name, stage), count in self.stages.items():
                if e == eps:
                    stages.setdefault(name, {})[stage] = frac(count, self.stage_n[(e, name, stage)])
            acc = {n: frac(self.correct[(eps, n)], self.n) for n in attacks}
            worst = frac(self.worst[eps], self.n)
            results.append(EpsResult(eps, self.n, clean_acc, acc, worst, stages))
        return sorted(results, key=lambda r: r.eps)


def _attack_autocast(
    amp: bool, device: torch.device, attack: EvalAttack
) -> contextlib.AbstractContextManager:
    # Only the PGD-family iterations may run in bf16 (see the module docstring); AutoAttack stays fp32.
    if amp and device.type == "cuda" and isinstance(attack, PGD):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def score_batch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    clean_ok: Tensor,
    plan: Plan,
    tally: Tally,
    *,
    batch: int,
    seed: int,
    checks: bool,
    amp: bool,
    bar: Any = None,
) -> None:
    """Run every planned attack on one batch and add its per-example outcomes to ``tally``.

    Every attack at a given batch and radius starts from the same RNG state (``seed``, ``batch`` and the
    radius's index), so PGD-10/20/50 share their random start.
    """
    for i, (eps, attacks) in enumerate(plan):
        robust = clean_ok.clone()
        white_ok = clean_ok.clone()
        black_fooled: dict[str, Tensor] = {}
        for name, attack in attacks.items():
            if bar is not None:
                bar.set_postfix_str(f"eps={format_eps(eps)} {name}", refresh=False)
            torch.manual_seed(seed + 7919 * batch + 104729 * i)
            with torch.enable_grad(), _attack_autocast(amp, x.device, attack):
                x_adv = attack(model, x, y)
            if checks:
                counts = eval_checks.count_violations(x, x_adv, eps)
                total_counts = tally.violations.setdefault((eps, name), dict.fromkeys(counts, 0))
                for k, v in counts.items():
                    total_counts[k] += v
            with torch.no_grad():
                ok = model(x_adv.to(x.dtype)).argmax(1) == y
            _add(tally.correct, (eps, name), ok)
            robust &= ok
            before_black = _stage_outcomes(tally, eps, name, attack, clean_ok, black_fooled)
            if not getattr(attack, "white_box", True):
                black_fooled[name] = ~ok
            elif getattr(attack, "last_stages", None):
                white_ok &= before_black if before_black is not None else ok
            else:
                white_ok &= ok
            tally.attack_flags += getattr(attack, "flags", None) or []
        _add(tally.worst, eps, robust)
        for name, fooled in black_fooled.items():
            _add(tally.extra_fooled, (eps, name), white_ok & fooled)


def _stage_outcomes(
    tally: Tally,
    eps: float,
    name: str,
    attack: EvalAttack,
    clean_ok: Tensor,
    black_fooled: dict[str, Tensor],
) -> Tensor | None:
    """Count a multi-stage attack's per-stage survivors; note what its black-box stages fooled.

    Returns the examples still correct after the white-box stages that precede the first black-box one
    (None when no stage is black-box).
    """
    stages = getattr(attack, "last_stages", None) or {}
    black_stages = getattr(attack, "black_box_stages", ())
    before_black = None
    prev = clean_ok
    for stage, still in stages.items():
        key = (eps, name, stage)
        _add(tally.stages, key, still)
        tally.stage_n[key] = tally.stage_n.get(key, 0) + still.numel()
        if stage in black_stages:
            black_fooled[f"{name}/{stage}"] = prev & ~still
            if before_black is None:  # robust after the white-box stages
                before_black = prev
        prev = still
    return before_black


# ------------------------------------------------------------------------------------- flag assembly


def _group_flags(messages: Iterable[str]) -> list[str]:
    """Merge flags repeated per batch (equal up to the numbers in them) into one line with a count."""
    groups: dict[str, list[str]] = {}
    for m in messages:
        groups.setdefault(re.sub(r"\d+(\.\d+)?", "#", m), []).append(m)
    return [ms[0] + (f" (raised {len(ms)} times)" if len(ms) > 1 else "") for ms in groups.values()]


def _steps_flags(result: EpsResult, attacks: Mapping[str, EvalAttack]) -> list[str]:
    """Group attacks that differ only in steps (same ``family``) and check accuracy falls with steps."""
    families: dict[Any, dict[int, float]] = {}
    labels: dict[Any, str] = {}
    for name, attack in attacks.items():
        family, steps = getattr(attack, "family", None), getattr(attack, "steps", None)
        if family is None or steps is None:
            continue
        families.setdefault(family, {})[steps] = result.acc[name]
        labels[family] = getattr(attack, "name", name).split("-")[0]
    flags = []
    for family, by_steps in families.items():
        if len(by_steps) > 1:
            where = f"at eps={format_eps(result.eps)}"
            flags += eval_checks.check_more_steps(by_steps, what=labels[family], where=where)
    return flags


def assemble_flags(tally: Tally, results: Sequence[EpsResult], plan: Plan, checks: bool) -> list[str]:
    """Every flag, deduplicated, in a fixed order: model checks (first batch), clean accuracy near chance,
    invalid adversarial examples, steps monotonicity and black-box vs white-box per radius, then the
    attacks' own warnings grouped."""
    flags = list(tally.model_flags)
    if checks:
        clean_acc = results[0].clean_acc
        flags += eval_checks.check_clean_accuracy(clean_acc, tally.num_classes)
        for (eps, name), counts in tally.violations.items():
            flags += eval_checks.violation_flags(f"{name} at eps={format_eps(eps)}", eps, counts, tally.n)
        for r in results:
            flags += _steps_flags(r, dict(plan)[r.eps])
            extra = {
                f"{name} at eps={format_eps(r.eps)}": int(count.item())
                for (e, name), count in tally.extra_fooled.items()
                if e == r.eps
            }
            flags += eval_checks.check_black_box_vs_white_box(extra, tally.n)
    flags += _group_flags(tally.attack_flags)
    return list(dict.fromkeys(flags))


# ------------------------------------------------------------------------------------- the evaluation


def _batches(
    batches: Iterable[Sequence[Tensor]], device: torch.device, max_examples: int | None
) -> Iterator[tuple[Tensor, Tensor]]:
    """(x, y) on ``device`` from a loader of (x, y) or (x, y, index), cut at ``max_examples``."""
    seen = 0
    for batch in batches:
        if max_examples is not None and seen >= max_examples:
            return
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if max_examples is not None and seen + x.shape[0] > max_examples:
            x, y = x[: max_examples - seen], y[: max_examples - seen]
        seen += x.shape[0]
        yield x, y


def _progress_bar(
    batches: Iterable[Sequence[Tensor]], max_examples: int | None, suite: str | None, progress: bool
) -> Any:
    total = getattr(batches, "num_samples", None)
    if total is None and isinstance(batches, Sequence):
        total = sum(int(b[0].shape[0]) for b in batches)
    if max_examples is not None:
        total = max_examples if total is None else min(total, max_examples)
    return tqdm(
        total=total,
        unit="img",
        desc=f"eval {suite or ''}".strip(),
        file=sys.stderr,
        disable=None if progress else True,  # None: off when stderr is not a terminal
    )


def evaluate_robustness(
    model: nn.Module,
    batches: Iterable[Sequence[Tensor]],
    attacks: Mapping[str, EvalAttack],
    eps_list: Sequence[float] = (EPS_8_255,),
    progress: bool = True,
    *,
    curve_eps: Sequence[float] = (),
    curve_attacks: Sequence[str] = (),
    max_examples: int | None = None,
    checks: bool = True,
    large_eps: float | None = 0.5,
    seed: int = 0,
    amp: bool = False,
    suite: str | None = None,
) -> EvalReport:
    """Clean, per-attack and worst-case accuracy of ``model`` at every radius in ``eps_list``.

    * ``attacks``: name -> attack; the name becomes the metric (``pgd20`` -> ``pgd20_acc``). Each attack is
      re-instantiated at every radius with ``attack.with_eps(eps)`` (the protocol's step size is kept).
    * ``curve_eps`` / ``curve_attacks``: extra radii at which only the named attacks run, with the step
      scaled with eps (``with_eps(eps, scale_step=True)``), for the accuracy-vs-eps curve.
    * ``max_examples``: evaluate only the first examples of the loader (a subset, for quick looks).
    * ``checks``: run ``components.eval.checks`` (model checks on the first batch, the adversarial examples
      of every attack, steps monotonicity, black-box vs white-box, clean accuracy near chance);
      ``large_eps=None`` skips the extra PGD at eps 0.5.
    * ``seed``: every attack at a given batch and radius starts from the same RNG state, so PGD-10/20/50
      share their random start (PGD-50 then fools a superset of PGD-10's examples, and the numbers are
      reproducible); the caller's RNG state is restored afterwards.

    The model is put in eval mode with frozen parameters during the call and restored afterwards. Batches
    go to the model's device. Accuracies are micro-averaged: per-example 0/1 correctness summed over the
    batches. Single process: under DDP give every rank the whole loader.
    """
    plan = plan_radii(attacks, eps_list, curve_eps, curve_attacks)
    device = model_device(model)
    tally = Tally()
    bar = _progress_bar(batches, max_examples, suite, progress)
    fork = [device.index or 0] if device.type == "cuda" else []
    start = time.perf_counter()
    with (
        model_mode(model, train=False, freeze=True),
        torch.random.fork_rng(devices=fork),
        torch.autocast(device.type, enabled=False),
    ):
        for b, (x, y) in enumerate(_batches(batches, device, max_examples)):
            with torch.no_grad():
                clean_ok = tally.count_clean(model(x), y)
            if checks and b == 0:
                tally.model_flags += eval_checks.run_model_checks(model, x, y, large_eps=large_eps)
            score_batch(
                model, x, y, clean_ok, plan, tally, batch=b, seed=seed, checks=checks, amp=amp, bar=bar
            )
            bar.update(x.shape[0])
    bar.close()
    if tally.n == 0:
        raise ValueError("evaluate_robustness: the loader yielded no examples")
    results = tally.results(plan)
    return EvalReport(
        results=results,
        attacks={n: repr(a) for n, a in attacks.items()},
        flags=assemble_flags(tally, results, plan, checks),
        n_examples=tally.n,
        seconds=time.perf_counter() - start,
        suite=suite,
    )
