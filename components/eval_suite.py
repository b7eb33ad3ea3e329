"""Robust evaluation you can trust: several attacks, several radii, per-example worst case, and flags.

:func:`evaluate_robustness` runs a dict of attacks (``components.evaluation.PGD``/``CW``,
``components.autoattack_eval.AutoAttack``, or anything with the same call signature) over a loader at every
radius of ``eps_list``, and reports per radius the clean accuracy, the accuracy under each attack, and the
per-example worst case (an example counts as robust only if it is classified correctly clean and after every
attack). It also runs the checks of ``components.eval_checks`` and returns their flags with the numbers.

Named suites (:func:`get_suite`): ``quick`` for a fast look during development, ``paper`` for the METHODS 1.5
protocol, ``full`` for the paper numbers plus AutoAttack-dev and an accuracy-vs-eps curve.

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
from torchmetrics.aggregation import MeanMetric, SumMetric
from tqdm.auto import tqdm

from components import eval_checks
from components.autoattack_eval import AutoAttack, model_device
from components.evaluation import CW, EPS_8_255, PGD, STEP_2_255, EvalAttack

#: The radius reported without a suffix in metric names.
PRIMARY_EPS = EPS_8_255
#: The radius the D2R/LBGAT code evaluates AutoAttack at (``args.epsilon``, METHODS 1.5).
EPS_0031 = 0.031
#: Radii of the accuracy-vs-eps curve in the ``full`` suite: 2/255, 4/255, ..., 16/255.
CURVE_EPS = tuple(k / 255 for k in range(2, 17, 2))
SUITE_NAMES = ("quick", "paper", "full")


def format_eps(eps: float) -> str:
    """``8/255`` for multiples of 1/255, else a short decimal (``0.031``)."""
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:g}"


def metric_suffix(eps: float, primary_eps: float = PRIMARY_EPS) -> str:
    """Metric-name suffix for radius ``eps``: empty for the primary radius, else e.g. ``_eps0.031``.

    MLflow metric names allow only alphanumerics and ``_ - . : / space`` (no ``@``), hence ``_eps``.
    """
    return "" if math.isclose(eps, primary_eps, rel_tol=0, abs_tol=1e-9) else f"_eps{eps:.4g}"


# ------------------------------------------------------------------------------------- report


@dataclass
class EpsResult:
    """Accuracies (fractions in [0, 1]) at one radius, over ``n`` examples."""

    eps: float
    n: int
    clean_acc: float
    #: attack name -> accuracy on that attack's adversarial examples.
    acc: dict[str, float]
    #: Fraction correct clean and after every attack in ``acc`` (the per-example worst case).
    worst_acc: float
    #: Per-stage cumulative accuracies of multi-stage attacks, e.g. ``{'aa': {'apgd-ce': .., 'square': ..}}``.
    stages: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class EvalReport:
    """The outcome of :func:`evaluate_robustness`: numbers per radius, attack descriptions, and flags.

    ``flags`` are warnings that the numbers may overestimate robustness; an empty list means every check
    passed. The caller prints and logs them (they are also in :meth:`to_markdown` and :meth:`to_dict`).
    """

    results: list[EpsResult]
    attacks: dict[str, str]
    flags: list[str]
    n_examples: int
    seconds: float = 0.0
    suite: str | None = None

    def result(self, eps: float) -> EpsResult:
        """The result at radius ``eps``."""
        for r in self.results:
            if math.isclose(r.eps, eps, rel_tol=0, abs_tol=1e-9):
                return r
        raise KeyError(f"no result at eps={eps!r}; evaluated: {[format_eps(r.eps) for r in self.results]}")

    @property
    def primary(self) -> EpsResult:
        """The result at 8/255 if evaluated, else at the first radius with the most attacks."""
        try:
            return self.result(PRIMARY_EPS)
        except KeyError:
            return max(self.results, key=lambda r: len(r.acc))

    def to_metrics(self, prefix: str = "test/", primary_eps: float = PRIMARY_EPS) -> dict[str, float]:
        """Flat ``{name: accuracy}`` for MLflow: ``test/clean_acc``, ``test/pgd20_acc``, ``test/aa_acc``,
        ``test/worst_acc`` ... at ``primary_eps``; at other radii the same names with :func:`metric_suffix`
        (``test/aa_acc_eps0.031``). Multi-stage attacks add ``<name>_<stage>_acc`` (``aa_apgd-ce_acc``)."""
        out: dict[str, float] = {}
        for r in self.results:
            s = metric_suffix(r.eps, primary_eps)
            out[f"{prefix}clean_acc{s}"] = r.clean_acc
            for name, acc in r.acc.items():
                out[f"{prefix}{name}_acc{s}"] = acc
            out[f"{prefix}worst_acc{s}"] = r.worst_acc
            for name, stages in r.stages.items():
                for stage, acc in stages.items():
                    out[f"{prefix}{name}_{stage}_acc{s}"] = acc
        out[f"{prefix}eval_flags"] = float(len(self.flags))
        return out

    def accuracy_vs_eps(self) -> dict[str, list[tuple[float, float]]]:
        """Data for the accuracy-vs-eps plot: series name (``clean``, each attack, ``worst``) -> sorted
        ``(eps, accuracy)`` points, one per radius at which the series was evaluated."""
        series: dict[str, list[tuple[float, float]]] = {"clean": []}
        for r in sorted(self.results, key=lambda r: r.eps):
            series["clean"].append((r.eps, r.clean_acc))
            for name, acc in r.acc.items():
                series.setdefault(name, []).append((r.eps, acc))
            series.setdefault("worst", []).append((r.eps, r.worst_acc))
        return series

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-serializable (for an artifact next to the metrics)."""
        return {
            "suite": self.suite,
            "n_examples": self.n_examples,
            "seconds": self.seconds,
            "threat_model": "Linf",
            "attacks": dict(self.attacks),
            "results": [
                {
                    "eps": r.eps,
                    "eps_label": format_eps(r.eps),
                    "n": r.n,
                    "clean_acc": r.clean_acc,
                    "acc": dict(r.acc),
                    "worst_acc": r.worst_acc,
                    "stages": {k: dict(v) for k, v in r.stages.items()},
                }
                for r in self.results
            ],
            "flags": list(self.flags),
        }

    def to_robustbench_json(self, eps: float | None = None, **info: Any) -> dict[str, Any]:
        """A RobustBench ``model_info`` entry (Linf): accuracies as percent strings with two decimals.

        ``info`` fills the fields only a person knows (``name``, ``link``, ``authors``, ``venue``,
        ``architecture``, ``dataset`` ...). ``autoattack_acc`` is the ``aa`` attack at ``eps`` (default: 8/255
        if evaluated), or None when AutoAttack did not run. Flags mark the entry ``unreliable``.
        """
        r = self.primary if eps is None else self.result(eps)
        entry: dict[str, Any] = {
            "link": "",
            "name": "",
            "authors": "",
            "additional_data": False,
            "number_forward_passes": 1,
            "dataset": "",
            "venue": "",
            "architecture": "",
            "eps": format_eps(r.eps),
            "clean_acc": f"{100 * r.clean_acc:.2f}",
            "reported": "",
            "autoattack_acc": f"{100 * r.acc['aa']:.2f}" if "aa" in r.acc else None,
            "footnote": "",
            "unreliable": bool(self.flags),
        }
        entry.update(info)
        notes = [] if "aa" in r.acc else [f"AutoAttack was not run (suite {self.suite}); worst case shown"]
        if "aa" not in r.acc:
            entry["worst_case_acc"] = f"{100 * r.worst_acc:.2f}"
        if self.flags:
            notes.append(f"{len(self.flags)} evaluation flag(s) raised")
        if notes and not entry["footnote"]:
            entry["footnote"] = "; ".join(notes)
        return entry

    def to_markdown(self) -> str:
        """A model-card section: a table of accuracies (%) per radius, AutoAttack stages, attacks, flags."""
        present = {n for r in self.results for n in r.acc}
        names = [n for n in self.attacks if n in present] + sorted(present - set(self.attacks))
        header = ["eps", "clean", *names, "worst"]
        lines = [
            f"### Robust accuracy (L-inf, {self.n_examples} examples"
            + (f", suite `{self.suite}`" if self.suite else "")
            + ")",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for r in sorted(self.results, key=lambda r: r.eps):
            cells = [format_eps(r.eps), f"{100 * r.clean_acc:.2f}"]
            cells += [f"{100 * r.acc[n]:.2f}" if n in r.acc else "–" for n in names]
            cells.append(f"{100 * r.worst_acc:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "`worst`: an example counts only if it is correct clean and after every attack at that eps.",
        ]
        for r in sorted(self.results, key=lambda r: r.eps):
            for name, stages in r.stages.items():
                chain = " → ".join(f"{s} {100 * a:.2f}" for s, a in stages.items())
                lines.append(f"- `{name}` stages at {format_eps(r.eps)} (cumulative %): {chain}")
        lines += ["", "Attacks:", *[f"- `{n}`: {d}" for n, d in self.attacks.items()], ""]
        if self.flags:
            lines += [f"**{len(self.flags)} flag(s): these numbers may overestimate robustness.**", ""]
            lines += [f"- {f}" for f in self.flags]
        else:
            lines.append("No evaluation flags raised.")
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- evaluation


@contextlib.contextmanager
def _evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration; each module's mode and flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in params:
        # Attacks need input gradients only; frozen weights keep autograd from saving for weight grads.
        p.requires_grad_(False)
    try:
        yield
    finally:
        for module, was_training in modes:
            module.training = was_training
        for p in params:
            p.requires_grad_(True)


def _split(batch: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    # Loaders yield (x, y) or (x, y, index) like components.data.DeviceLoader.
    return batch[0], batch[1]


def _mean(device: torch.device) -> MeanMetric:
    # NaN checks would cost a host sync per update; the values are 0/1 flags.
    return MeanMetric(nan_strategy="disable").to(device)


def _group_flags(messages: Iterable[str]) -> list[str]:
    """Merge flags repeated per batch (equal up to the numbers in them) into one line with a count."""
    groups: dict[str, list[str]] = {}
    for m in messages:
        groups.setdefault(re.sub(r"\d+(\.\d+)?", "#", m), []).append(m)
    return [ms[0] + (f" (raised {len(ms)} times)" if len(ms) > 1 else "") for ms in groups.values()]


def _at_eps(attack: EvalAttack, eps: float, scale_step: bool = False) -> EvalAttack:
    """``attack`` at radius ``eps``; a plain callable without ``with_eps`` must already have that radius."""
    if hasattr(attack, "with_eps"):
        return attack.with_eps(eps, scale_step=scale_step)
    if math.isclose(getattr(attack, "eps", float("nan")), eps, rel_tol=0, abs_tol=1e-9):
        return attack
    raise TypeError(f"{attack!r} has no with_eps() and its eps is not {eps!r}: it cannot run at that radius")


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
    * ``checks``: run ``components.eval_checks`` (model checks on the first batch, the adversarial examples
      of every attack, steps monotonicity, black-box vs white-box, clean accuracy near chance);
      ``large_eps=None`` skips the extra PGD at eps 0.5.
    * ``seed``: every attack at a given batch and radius starts from the same RNG state, so PGD-10/20/50
      share their random start (PGD-50 then fools a superset of PGD-10's examples, and the numbers are
      reproducible); the caller's RNG state is restored afterwards.

    The model is put in eval mode with frozen parameters during the call and restored afterwards. Batches
    go to the model's device. Accuracies are torchmetrics ``MeanMetric``s of per-example 0/1 correctness,
    i.e. micro-averaged accuracy. Single process: under DDP give every rank the whole loader.
    """
    if not attacks:
        raise ValueError("evaluate_robustness: no attacks given")
    unknown = sorted(set(curve_attacks) - set(attacks))
    if unknown:
        raise ValueError(f"evaluate_robustness: curve_attacks {unknown} are not in attacks {sorted(attacks)}")
    device = model_device(model)
    plan: list[tuple[float, dict[str, EvalAttack]]] = []

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

    clean = _mean(device)
    acc = {(e, n): _mean(device) for e, atk in plan for n in atk}
    worst = {e: _mean(device) for e, _ in plan}
    stage_acc: dict[tuple[float, str, str], MeanMetric] = {}
    extra_fooled: dict[tuple[float, str], SumMetric] = {}
    violations: dict[tuple[float, str], dict[str, int]] = {}
    model_flags: list[str] = []
    attack_flags: list[str] = []
    num_classes = 0
    n_seen = 0

    total = getattr(batches, "num_samples", None)
    if total is None and isinstance(batches, Sequence):
        total = sum(int(b[0].shape[0]) for b in batches)
    if max_examples is not None:
        total = max_examples if total is None else min(total, max_examples)
    bar = tqdm(
        total=total,
        unit="img",
        desc=f"eval {suite or ''}".strip(),
        file=sys.stderr,
        disable=None if progress else True,  # None: off when stderr is not a terminal
    )
    fork = [device.index or 0] if device.type == "cuda" else []
    start = time.perf_counter()
    with (
        _evaluation_mode(model),
        torch.random.fork_rng(devices=fork),
        torch.autocast(device.type, enabled=False),
    ):
        for b, batch in enumerate(batches):
            if max_examples is not None and n_seen >= max_examples:
                break
            x, y = _split(batch)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if max_examples is not None and n_seen + x.shape[0] > max_examples:
                x, y = x[: max_examples - n_seen], y[: max_examples - n_seen]
            n_seen += x.shape[0]
            with torch.no_grad():
                logits = model(x)
            num_classes = logits.shape[1]
            clean_ok = logits.argmax(1) == y
            clean.update(clean_ok)
            if checks and b == 0:
                model_flags += eval_checks.run_model_checks(model, x, y, large_eps=large_eps)

            for i, (eps, eps_attacks) in enumerate(plan):
                robust = clean_ok.clone()
                white_ok = clean_ok.clone()
                black_fooled: dict[str, Tensor] = {}
                for name, attack in eps_attacks.items():
                    bar.set_postfix_str(f"eps={format_eps(eps)} {name}", refresh=False)
                    torch.manual_seed(seed + 7919 * b + 104729 * i)
                    with torch.enable_grad(), _attack_autocast(amp, device, attack):
                        x_adv = attack(model, x, y)
                    if checks:
                        counts = eval_checks.count_violations(x, x_adv, eps)
                        total_counts = violations.setdefault((eps, name), dict.fromkeys(counts, 0))
                        for k, v in counts.items():
                            total_counts[k] += v
                    with torch.no_grad():
                        ok = model(x_adv.to(x.dtype)).argmax(1) == y
                    acc[(eps, name)].update(ok)
                    robust &= ok
                    stages = getattr(attack, "last_stages", None) or {}
                    black_stages = getattr(attack, "black_box_stages", ())
                    before_black = None
                    prev = clean_ok
                    for stage, still in stages.items():
                        key = (eps, name, stage)
                        if key not in stage_acc:
                            stage_acc[key] = _mean(device)
                        stage_acc[key].update(still)
                        if stage in black_stages:
                            black_fooled[f"{name}/{stage}"] = prev & ~still
                            if before_black is None:  # robust after the white-box stages
                                before_black = prev
                        prev = still
                    if not getattr(attack, "white_box", True):
                        black_fooled[name] = ~ok
                    elif stages:
                        white_ok &= before_black if before_black is not None else ok
                    else:
                        white_ok &= ok
                    attack_flags += getattr(attack, "flags", None) or []
                worst[eps].update(robust)
                for name, fooled in black_fooled.items():
                    key = (eps, name)
                    if key not in extra_fooled:
                        extra_fooled[key] = SumMetric(nan_strategy="disable").to(device)
                    extra_fooled[key].update((white_ok & fooled).sum())
            bar.update(x.shape[0])
    bar.close()
    if n_seen == 0:
        raise ValueError("evaluate_robustness: the loader yielded no examples")

    clean_acc = clean.compute().item()
    results = []
    for eps, eps_attacks in plan:
        stages_out: dict[str, dict[str, float]] = {}
        for (e, name, stage), metric in stage_acc.items():
            if e == eps:
                stages_out.setdefault(name, {})[stage] = metric.compute().item()
        results.append(
            EpsResult(
                eps=eps,
                n=n_seen,
                clean_acc=clean_acc,
                acc={n: acc[(eps, n)].compute().item() for n in eps_attacks},
                worst_acc=worst[eps].compute().item(),
                stages=stages_out,
            )
        )
    results.sort(key=lambda r: r.eps)

    flags = list(model_flags)
    if checks:
        flags += eval_checks.check_clean_accuracy(clean_acc, num_classes)
        for (eps, name), counts in violations.items():
            flags += eval_checks.violation_flags(f"{name} at eps={format_eps(eps)}", eps, counts, n_seen)
        for r in results:
            flags += _steps_flags(r, dict(plan)[r.eps])
            extra = {
                f"{name} at eps={format_eps(r.eps)}": int(m.compute().item())
                for (e, name), m in extra_fooled.items()
                if e == r.eps
            }
            flags += eval_checks.check_black_box_vs_white_box(extra, n_seen)
    flags += _group_flags(attack_flags)
    return EvalReport(
        results=results,
        attacks={n: repr(a) for n, a in attacks.items()},
        flags=list(dict.fromkeys(flags)),
        n_examples=n_seen,
        seconds=time.perf_counter() - start,
        suite=suite,
    )


def _attack_autocast(
    amp: bool, device: torch.device, attack: EvalAttack
) -> contextlib.AbstractContextManager:
    # Only the PGD-family iterations may run in bf16 (see the module docstring); AutoAttack stays fp32.
    if amp and device.type == "cuda" and isinstance(attack, PGD):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


# ------------------------------------------------------------------------------------- named suites


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
