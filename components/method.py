"""What a method is called, where it was published, and what it trains, declared beside its gin body.

Each method fragment (``gin/methods/*.gin``) binds the three fields once, so every page that shows a run
(the model card above all) can name the method without guessing it from the loss terms::

    method_info:
        name = 'MART'
        paper = 'Wang et al., ICLR 2020, "Improving adversarial robustness requires revisiting ..."'
        summary = 'Boosted CE on PGD-10 examples plus a KL term weighted by 1 - p_y(x), per example.'

A fragment that includes another (``methods/d2r_cag.gin`` includes ``methods/d2r.gin``) binds its own
after the include, which wins. Nothing calls :func:`method_info` while training: it is a record that
:func:`declared_method` reads back from gin.
"""

from __future__ import annotations

from dataclasses import dataclass

import gin


@dataclass(frozen=True)
class MethodInfo:
    """A method's display name, its paper (authors, venue, title or arXiv id) and a one-line summary."""

    name: str
    paper: str
    summary: str


@gin.configurable
def method_info(
    name: str = gin.REQUIRED, paper: str = gin.REQUIRED, summary: str = gin.REQUIRED
) -> MethodInfo:
    """The method a config trains; bound in ``gin/methods/<method>.gin``. Every field must be non-empty."""
    for field, value in (("name", name), ("paper", paper), ("summary", summary)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"method_info.{field} must be a non-empty string, got {value!r}")
    return MethodInfo(name=name.strip(), paper=paper.strip(), summary=summary.strip())


def declared_method() -> MethodInfo | None:
    """The method the loaded gin config declares; ``None`` if its method fragment binds no ``method_info``."""
    try:
        fields = {f: gin.query_parameter(f"method_info.{f}") for f in ("name", "paper", "summary")}
    except ValueError:
        return None
    return MethodInfo(**{k: str(v) for k, v in fields.items()})
