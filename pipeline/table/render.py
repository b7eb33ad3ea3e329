"""A table's outcome as markdown: robustflow's numbers beside the paper's, and the differences.

Each column of the paper (Clean, PGD-50, C&W, AA) becomes three: robustflow's number, the paper's, and
``Δ = robustflow - paper`` in percentage points. ``-`` stands for a number that does not exist (the paper
has none, or the row FAILED); a FAILED row keeps its paper numbers and gives its reason in a footnote.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.table.spec import MISSING, Table

TRAINED, REUSED, FAILED = "trained", "reused", "FAILED"


@dataclass
class RowResult:
    """What became of one row: its status, its runs and robustflow's numbers (fractions, by metric)."""

    label: str
    spec: str
    paper: tuple[float | None, ...]
    source: str = ""
    note: str = ""
    status: str = TRAINED
    train_run_id: str | None = None
    eval_run_id: str | None = None
    ours: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    flags: list[str] = field(default_factory=list)
    reused_eval: bool = False


def percent(value: float | None) -> str:
    """``0.5169`` -> ``'51.69'``; ``None`` or a non-finite number -> ``'-'``."""
    if value is None or not math.isfinite(value):
        return MISSING
    return f"{100 * value:.2f}"


def difference(ours: float | None, paper: float | None) -> str:
    """``ours`` (a fraction) minus ``paper`` (percent), in points, signed; ``'-'`` if either is missing."""
    if ours is None or paper is None or not math.isfinite(ours):
        return MISSING
    delta = round(100 * ours - paper, 2)
    return f"{delta:+.2f}" if delta != 0 else "0.00"


def _paper_cell(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}"


def render_markdown(
    table: Table, results: Sequence[RowResult], *, notes: Sequence[str] = (), run_id: str | None = None
) -> str:
    """The table in markdown: a title line, ``notes`` (e.g. the smoke warning) first, the rows, footnotes."""
    lines = [f"### {table.title}", ""]
    where = f"table `{table.name}`" + (f", MLflow run `{run_id}`" if run_id else "")
    lines += [f"robustflow against the paper ({where}); accuracies in %, Δ = robustflow - paper.", ""]
    for note in notes:
        lines += [f"**{note}**", ""]
    head = ["Method"]
    for header, _ in table.columns:
        head += [header, f"{header} (paper)", "Δ"]
    head += ["Status", "Source", "Run"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    footnotes: list[str] = []
    for r in results:
        marks = []
        for text in (r.note, f"FAILED: {r.reason}" if r.status == FAILED else "", _flags_note(r)):
            if text:
                footnotes.append(text)
                marks.append(f"[{len(footnotes)}]")
        cells = [r.label + (" " + "".join(marks) if marks else "")]
        for (_, metric), paper in zip(table.columns, r.paper):
            ours = r.ours.get(metric) if r.status != FAILED else None
            cells += [percent(ours), _paper_cell(paper), difference(ours, paper)]
        cells += [r.status, r.source or MISSING, f"`{r.train_run_id[:8]}`" if r.train_run_id else MISSING]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if footnotes:
        lines.append("")
        lines += [f"[{i}] {text}  " for i, text in enumerate(footnotes, 1)]
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines) + "\n"


def _flags_note(r: RowResult) -> str:
    if not r.flags:
        return ""
    return f"evaluation flags ({len(r.flags)}): " + "; ".join(r.flags)[:500]
