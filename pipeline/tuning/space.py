"""What an Optuna study searches: the ``SearchSpace`` gin configurable and the tuple grammar it is bound with.

A fragment in gin/search/ declares the searched macros next to each experiment::

    SearchSpace.params = {'ALPHA': ('float', 3.0, 300.0, 'log'), 'BETA': ('float', 0.0, 12.0)}

Each declaration becomes an ``optuna.distributions`` object (``FloatDistribution``, ``IntDistribution``,
``CategoricalDistribution``), so the space is Optuna's own ``{name: distribution}`` and a trial draws from it
with the public ``suggest_*`` calls. The config loader imports this module (so the gin files bind
``SearchSpace`` without importing anything); Optuna is imported only where a declaration is read.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import gin

from pipeline.config import ConfigError, defined_macros

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution
    from optuna.trial import Trial

KINDS = ("float", "int", "categorical")
SCALES = ("linear", "log")


class SearchSpaceError(ConfigError):
    """A search-space declaration that cannot be searched; found before any trial runs."""


@gin.configurable
class SearchSpace:
    """The gin macros an Optuna study searches, declared next to each experiment (gin/search/*.gin).

    ``params`` maps a macro to ``(kind, low, high)`` or ``(kind, low, high, 'log')`` for kind ``'float'``
    or ``'int'``, or to ``('categorical', [choice, ...])``::

        SearchSpace.params = {'ALPHA': ('float', 3.0, 300.0, 'log'), 'BETA': ('float', 0.0, 12.0)}
    """

    def __init__(self, params: Mapping[str, Sequence[Any]] | None = None) -> None:
        self.params = params

    def distributions(self, defined_macros: set[str]) -> dict[str, BaseDistribution]:
        """The declared space as Optuna distributions, checked against the macros the applied config sets."""
        if self.params is None:
            raise SearchSpaceError(
                "no search space is declared for this config: include a gin/search/*.gin fragment or bind "
                "SearchSpace.params = {'ALPHA': ('float', 1.0, 100.0, 'log'), ...}"
            )
        if not isinstance(self.params, Mapping) or not self.params:
            raise SearchSpaceError(
                f"SearchSpace.params must be a non-empty dict of macro -> declaration, got {self.params!r}"
            )
        space = {}
        for name, declaration in self.params.items():
            if name not in defined_macros:
                close = difflib.get_close_matches(str(name), sorted(defined_macros), n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise SearchSpaceError(
                    f"SearchSpace.params[{name!r}]: no applied config defines the macro {name!r}, so a trial "
                    f"could not set it.{hint}"
                )
            space[name] = parse_dimension(name, declaration)
        return space


def parse_dimension(name: str, declaration: Any) -> BaseDistribution:
    """Check one ``SearchSpace.params`` entry and turn it into the Optuna distribution it declares.

    The checks are the grammar's (shape, kind, scale) and stricter than Optuna's own (``low < high``, not
    ``<=``: a one-point range is a typo), with messages that quote the declaration as written in gin.
    """
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    where = f"SearchSpace.params[{name!r}] = {declaration!r}"
    if not isinstance(declaration, (tuple, list)) or not declaration:
        raise SearchSpaceError(
            f"{where}: expected (kind, low, high), (kind, low, high, 'log') or ('categorical', [choices])"
        )
    kind = declaration[0]
    if kind not in KINDS:
        raise SearchSpaceError(f"{where}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "categorical":
        if len(declaration) != 2 or not isinstance(declaration[1], (tuple, list)) or len(declaration[1]) < 2:
            raise SearchSpaceError(f"{where}: expected ('categorical', [at least two choices])")
        return CategoricalDistribution(tuple(declaration[1]))
    if len(declaration) not in (3, 4):
        raise SearchSpaceError(f"{where}: expected ({kind!r}, low, high) or ({kind!r}, low, high, 'log')")
    low, high = declaration[1], declaration[2]
    scale = declaration[3] if len(declaration) == 4 else "linear"
    number = int if kind == "int" else (int, float)
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, number):
            what = "integers" if kind == "int" else "numbers"
            raise SearchSpaceError(f"{where}: the bounds of a {kind} range must be {what}, got {bound!r}")
    if scale not in SCALES:
        raise SearchSpaceError(f"{where}: unknown scale {scale!r}; use 'log' or leave it out (linear)")
    if not low < high:
        raise SearchSpaceError(f"{where}: low ({low}) must be below high ({high})")
    if scale == "log" and low <= 0:
        raise SearchSpaceError(f"{where}: a log scale needs low > 0, got low = {low}")
    if kind == "int":
        return IntDistribution(low, high, log=scale == "log")
    return FloatDistribution(float(low), float(high), log=scale == "log")


def suggest(trial: Trial, name: str, distribution: BaseDistribution) -> Any:
    """Draw (or, for a retried trial, read back) macro ``name`` from ``distribution`` in ``trial``.

    The public ``suggest_*`` call the distribution's kind names, with its fields (``Trial._suggest`` would
    take the distribution whole, but it is private).
    """
    from optuna.distributions import FloatDistribution, IntDistribution

    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log)
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, log=distribution.log)
    return trial.suggest_categorical(name, list(distribution.choices))


def describe(name: str, distribution: BaseDistribution) -> str:
    """``ALPHA: float in [3.0, 300.0], log scale`` or ``SEED in [0, 1, 2]``: a searched macro, for people."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        return f"{name} in {list(distribution.choices)}"
    kind = "int" if isinstance(distribution, IntDistribution) else "float"
    scale = ", log scale" if distribution.log else ""
    return f"{name}: {kind} in [{distribution.low}, {distribution.high}]{scale}"


def describe_space(space: Mapping[str, BaseDistribution]) -> str:
    """The whole space on one line, as tags, the summary and the worker's first line show it."""
    return "; ".join(describe(name, distribution) for name, distribution in space.items())


def load_search_space(
    pinned: set[str] | frozenset[str] = frozenset(),
) -> tuple[dict[str, BaseDistribution], list[str]]:
    """The searched space of the loaded gin config, less the macros pinned by the study's overrides."""
    space = SearchSpace().distributions(defined_macros())
    searched = {name: d for name, d in space.items() if name not in pinned}
    if not searched:
        raise SearchSpaceError(
            f"every searched macro ({', '.join(space)}) is pinned by --overrides: nothing to search"
        )
    return searched, sorted(name for name in space if name in pinned)
