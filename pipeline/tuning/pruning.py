"""When a trial stops early: the ``--pruner`` rule, for one objective through Optuna's pruners and for the
Pareto objective through the explicit rule below."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.config import ConfigError

if TYPE_CHECKING:
    import optuna

PRUNERS = ("median", "hyperband", "none", "threshold:LOWER")


@dataclass(frozen=True)
class Pruning:
    """When a trial stops early: the ``--pruner`` rule, its warm-up and how many completed trials it needs."""

    rule: str  # median | hyperband | none | threshold
    warmup_epochs: int
    startup_trials: int
    epochs: int
    lower: float | None = None

    @classmethod
    def parse(
        cls, spec: str, objective: str, epochs: int, warmup_epochs: int, startup_trials: int
    ) -> Pruning:
        rule, _, argument = spec.strip().partition(":")
        lower = None
        if rule == "threshold":
            try:
                lower = float(argument)
            except ValueError:
                raise ConfigError(
                    f"--pruner {spec!r}: expected threshold:LOWER, e.g. threshold:0.2"
                ) from None
        elif rule not in ("median", "hyperband", "none") or argument:
            raise ConfigError(f"unknown --pruner {spec!r}; use one of {', '.join(PRUNERS)}")
        if rule == "hyperband" and objective == "pareto":
            raise ConfigError(
                "--pruner hyperband needs a single objective; with --objective pareto use median (the "
                "Pareto rule: stop a trial dominated by at least half of the completed trials), "
                "threshold:LOWER or none"
            )
        if warmup_epochs < 0 or startup_trials < 0:
            raise ConfigError("--warmup-epochs and --startup-trials must be >= 0")
        return cls(rule, warmup_epochs, startup_trials, epochs, lower)

    def optuna_pruner(self) -> optuna.pruners.BasePruner:
        """The pruner of a single-objective study (Optuna's pruners do not handle several objectives)."""
        import optuna

        # Optuna prunes from step n_warmup_steps on; epochs are steps: the first prunable one is warmup + 1.
        first = self.warmup_epochs + 1
        if self.rule == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=self.startup_trials, n_warmup_steps=first)
        if self.rule == "hyperband":
            return optuna.pruners.HyperbandPruner(
                min_resource=first, max_resource=self.epochs, reduction_factor=3
            )
        if self.rule == "threshold":
            return optuna.pruners.ThresholdPruner(lower=self.lower, n_warmup_steps=first)
        return optuna.pruners.NopPruner()

    def pareto_should_stop(
        self, epoch: int, point: tuple[float, float], peers: list[Sequence[float]]
    ) -> bool:
        """The Pareto rule: ``point`` (clean, robust) at ``epoch`` against completed trials' points there.

        Kept by hand on purpose: Optuna's pruners (``Trial.report`` / ``should_prune``) refuse multi-objective
        studies, so the (clean, robust) study needs its own rule; for one objective it is median pruning.
        """
        if epoch <= self.warmup_epochs or epoch >= self.epochs or self.rule == "none":
            return False
        if self.rule == "threshold":
            return point[1] < self.lower
        if len(peers) < max(self.startup_trials, 1):
            return False
        return 2 * sum(dominates(peer, point) for peer in peers) >= len(peers)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether ``a`` is at least as good as ``b`` in every objective and better in one (maximizing)."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))
