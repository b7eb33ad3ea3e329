"""Named forward passes ("views") that loss terms read, written `model(input)`.

A view such as ``'target(x_adv)'`` is the output of the model named ``target`` on the input named
``x_adv``. Loss terms name the views they read; the training step computes each distinct view once per
step, in the order the terms first name them, however many terms use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_VIEW_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$")

# The inputs a training step can offer: the clean batch and what the attack generator returns.
KNOWN_INPUTS = ("x", "x_adv", "x_init")


@dataclass(frozen=True)
class View:
    """A parsed view name: which model runs on which input."""

    model: str
    input: str

    def __str__(self) -> str:
        return f"{self.model}({self.input})"


def parse_view(name: str) -> View:
    """Parse ``'model(input)'``; raise a ValueError that shows the expected form otherwise."""
    match = _VIEW_RE.match(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(
            f"bad view name {name!r}: expected 'model(input)', e.g. 'target(x_adv)' or 'guide(x)'"
        )
    view = View(match.group(1), match.group(2))
    if view.input not in KNOWN_INPUTS:
        raise ValueError(f"view {name!r} reads unknown input {view.input!r}; known inputs: {KNOWN_INPUTS}")
    return view
