"""What a robustness evaluation reports: accuracies per radius, the attacks run, and the flags raised.

:class:`EvalReport` is the outcome of :func:`components.eval.robustness.evaluate_robustness`; it renders
itself as MLflow metrics (:meth:`EvalReport.to_metrics`), the accuracy-vs-eps series, a JSON artifact, a
RobustBench ``model_info`` entry and a model-card section in Markdown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from components.eval.attacks import EPS_8_255

#: The radius reported without a suffix in metric names.
PRIMARY_EPS = EPS_8_255


def format_eps(eps: float) -> str:
    """``8/255`` for multiples of 1/255, else a short decimal (``0.031``)."""
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 else f"{eps:g}"


def metric_suffix(eps: float, primary_eps: float = PRIMARY_EPS) -> str:
    """Metric-name suffix for radius ``eps``: empty for the primary radius, else e.g. ``_eps0.031``.

    MLflow metric names allow only alphanumerics and ``_ - . : / space`` (no ``@``), hence ``_eps``.
    """
    return "" if math.isclose(eps, primary_eps, rel_tol=0, abs_tol=1e-9) else f"_eps{eps:.4g}"


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
