"""What a results table is: its rows (a label, an experiment spec, the paper's numbers and their source) and
the evaluation suite, read from a gin file in ``gin/tables/``.

A table file binds :class:`Table` and one scoped :class:`Row` per line of the paper's table::

    Table:
        title = 'D2R Table 1: CIFAR-10, WRN-34-10'
        rows = [@pgd_at/Row(), @d2r_cag/Row()]
    pgd_at/Row:
        label = 'PGD-AT'
        spec = 'pgd_at_cifar10'
        paper = (85.17, 54.88, 53.91, 51.69)      # clean / PGD-50 / C&W / AA, '-' where the paper has none

:func:`load_table` parses the file on its own (the experiments' gin is loaded later, one row at a time) and
returns plain objects, so a bad table fails before any run is opened.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

import gin

from pipeline.config import GIN_DIR, ConfigError

TABLE_DIR = GIN_DIR / "tables"
#: The paper's columns: (header, the evaluation metric behind it). Table 1 of D2R prints these four.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("Clean", "clean_acc"),
    ("PGD-50", "pgd50_acc"),
    ("C&W", "cw20_acc"),
    ("AA", "aa_acc"),
)
MISSING = "-"


@gin.configurable
class Row:
    """One line of a table: what to train (``spec``, ``overrides``) and what the paper printed for it.

    * ``label``: the row's name as the paper prints it (``'RAT(TRADES)'``).
    * ``spec``: a gin spec as ``-P gin=`` takes it: an experiment, then profiles (``'lbgat_cifar100,awp'``).
    * ``paper``: the paper's numbers in percent, one per column, ``'-'`` where the paper has none.
    * ``source``: where the numbers come from (``'D2R Table 1'``); ``note``: a footnote (e.g. that the paper
      copied a published number rather than re-running the method).

    A row has no overrides of its own: the command's profiles (``smoke``) must win over anything the row
    sets, so a row that differs from an experiment is an experiment file of its own.
    """

    def __init__(
        self,
        label: str = gin.REQUIRED,
        spec: str = gin.REQUIRED,
        paper: Sequence[float | str] = gin.REQUIRED,
        source: str = "",
        note: str = "",
    ) -> None:
        if not str(label).strip():
            raise ValueError("Row.label is empty")
        if not str(spec).strip():
            raise ValueError(f"Row {label!r}: spec is empty")
        self.label, self.spec = str(label).strip(), str(spec).strip()
        self.paper = tuple(_paper_value(label, v) for v in paper)
        self.source, self.note = str(source), str(note)

    def __repr__(self) -> str:
        return f"Row({self.label!r}, {self.spec!r}, paper={self.paper})"


def _paper_value(label: str, value: float | str) -> float | None:
    """A paper number in percent, or ``None`` for ``'-'`` (the paper has none)."""
    if value == MISSING or value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 100.0:
        raise ValueError(f"Row {label!r}: paper values are percentages in [0, 100] or '-', got {value!r}")
    return float(value)


@gin.configurable
class Table:
    """A paper's table as rows to train and evaluate.

    ``suite`` is the evaluation suite every row is evaluated with (``components.eval.suite``: ``paper`` is
    METHODS.md 1.5's PGD-10/20/50, C&W-20 and AutoAttack standard, at 8/255 on the whole test set).
    """

    def __init__(
        self,
        title: str = gin.REQUIRED,
        rows: Sequence[Row] = gin.REQUIRED,
        suite: str = "paper",
        columns: Sequence[tuple[str, str]] = COLUMNS,
        note: str = "",
    ) -> None:
        from components.eval.suite import SUITE_NAMES

        if suite not in SUITE_NAMES:
            raise ValueError(f"Table.suite {suite!r} is not a suite; expected one of {SUITE_NAMES}")
        self.title, self.suite, self.note = str(title), suite, str(note)
        self.columns = tuple((str(h), str(m)) for h, m in columns)
        self.rows = list(rows)
        if not self.rows:
            raise ValueError("Table.rows is empty")
        labels = [r.label for r in self.rows]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ValueError(f"Table.rows: labels appear twice: {', '.join(twice)}")
        for row in self.rows:
            if len(row.paper) != len(self.columns):
                heads = " / ".join(h for h, _ in self.columns)
                raise ValueError(
                    f"Row {row.label!r}: {len(row.paper)} paper values for {len(self.columns)} "
                    f"columns ({heads})"
                )
        self.name = ""  # the file's stem, set by load_table


def available_tables() -> list[str]:
    """Names usable with ``--table``: the files in gin/tables/."""
    return sorted(p.stem for p in TABLE_DIR.glob("*.gin"))


def table_file(name: str) -> Path:
    """``'d2r_table1_cifar10'`` (a name in gin/tables/) or a path to a ``.gin`` file -> the file."""
    as_path = Path(name)
    if as_path.suffix == ".gin" and as_path.is_file():
        return as_path.resolve()
    candidate = TABLE_DIR / f"{as_path.stem if as_path.suffix == '.gin' else name}.gin"
    if candidate.is_file():
        return candidate
    close = difflib.get_close_matches(name, available_tables(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown table {name!r}.{hint}\nAvailable tables: {', '.join(available_tables())}")


def load_table(name: str) -> Table:
    """Parse a table file alone (gin is cleared before and after) into a :class:`Table`."""
    path = table_file(name)
    gin.clear_config()
    try:
        gin.parse_config_file(str(path))
        table = Table()
    except (ValueError, SyntaxError, TypeError, KeyError, OSError) as err:
        raise ConfigError(f"table {path}: {type(err).__name__}: {err}") from err
    finally:
        gin.clear_config()
    table.name = path.stem
    return table
