"""What a table run will do, checked before any work: each row's config, fingerprint and data, and the
evaluation every row gets.

Every row is loaded with the project's own config loader (its spec, then the command's profiles and
overrides), so a row naming an experiment that does not exist, a typo in an override
or missing data fails here, for all rows at once, before a run is opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gin

from pipeline.config import (
    ConfigError,
    available_configs,
    flat_parameters,
    is_experiment,
    load_config,
    macro,
    parse_overrides,
    resolve_gin_files,
)
from pipeline.resume import config_fingerprint
from pipeline.table.spec import Row, Table

#: Under ``smoke`` each row is evaluated on the first SMOKE_IMAGES test images, with only the attacks the
#: table shows and AutoAttack's first stage alone (APGD-CE), so that the eleven-row CIFAR-10 table fits 20
#: minutes on a 2-core CPU: on a smoke-trained small_cnn, 256 images cost ~70 CPU-seconds this way
#: (PGD-50 17, C&W-20 7, APGD-CE 43, the model checks 4; measured under load), and APGD-T's nine targets
#: would cost nine times APGD-CE.
SMOKE_IMAGES = 128
SMOKE_AUTOATTACK = "apgd-ce"


@dataclass
class PlannedRow:
    """A row as it will train: the full spec and overrides, the experiment it files under, its fingerprint."""

    row: Row
    spec: str
    overrides: list[str]
    model_name: str
    fingerprint: str
    dataset: str


@dataclass
class EvalPlan:
    """The evaluation every row gets: the suite, how many test images, and AutoAttack's version."""

    suite: str
    n: int | None = None
    autoattack: str | None = None  # None: the suite's own (standard in ``paper``)
    smoke: bool = False
    only: tuple[str, ...] = ()  # under smoke: the attacks the table shows (the others are left out)

    @property
    def key(self) -> str:
        """What an evaluation run is found by on a later table run (the ``robustflow.eval_plan`` tag)."""
        aa = self.autoattack or "suite"
        only = f";only={','.join(self.only)}" if self.only else ""
        return f"suite={self.suite};n={self.n or 'all'};autoattack={aa}{only};eps=8/255;seed=0"

    @property
    def name(self) -> str:
        """The evaluation run's suite name: ``paper``, or ``paper-smoke`` when shrunk."""
        return f"{self.suite}-smoke" if self.smoke else self.suite

    def build(self):  # noqa: ANN201  (a components.eval.suite.Suite)
        """The suite to run: the named one at 8/255, with AutoAttack swapped for ``autoattack`` if set."""
        from components.eval.autoattack import AutoAttack
        from components.eval.suite import get_suite

        suite = get_suite(self.suite)
        if self.only:
            suite.attacks = {k: v for k, v in suite.attacks.items() if k in self.only}
        if self.autoattack and "aa" in suite.attacks:
            old = suite.attacks["aa"]
            suite.attacks["aa"] = AutoAttack(old.eps, version=self.autoattack, batch_size=old.batch_size)
        suite.name = self.name
        return suite

    def describe(self) -> str:
        """One line for the rendered table."""
        from components.eval.autoattack import STAGES

        images = "every test image" if self.n is None else f"the first {self.n} test images"
        aa = "its AutoAttack"
        if self.autoattack:
            stages = " + ".join(s.upper() for s in STAGES[self.autoattack])
            aa = f"AA column: AutoAttack {self.autoattack} = {stages}"
        only = f" (only the attacks shown: {', '.join(self.only)})" if self.only else ""
        return f"evaluated with suite `{self.suite}`{only} at eps 8/255 on {images} ({aa})"


def split_profiles(gin_profiles: str) -> list[str]:
    """``'smoke,stable'`` -> ``['smoke', 'stable']``, each checked to be a profile, not an experiment."""
    names = [s.strip() for s in str(gin_profiles).split(",") if s.strip()]
    for name, path in zip(names, resolve_gin_files(",".join(names)) if names else []):
        if is_experiment(path):
            raise ConfigError(
                f"--gin {gin_profiles}: {name} is an experiment; --gin takes profiles applied to every row "
                "(e.g. smoke, stable)"
            )
    return names


def eval_plan(table: Table, profiles: list[str], n: int | None | str = "auto") -> EvalPlan:
    """The table's suite on ``n`` test images (``None``: all); ``'auto'`` is all, or under ``smoke``
    SMOKE_IMAGES. Under ``smoke`` only the shown attacks run, AutoAttack as SMOKE_AUTOATTACK."""
    if isinstance(n, int) and n < 1:
        raise ConfigError(f"--n must be >= 1, 'all' or 'auto', got {n}")
    smoke = "smoke" in profiles
    if n == "auto":
        n = SMOKE_IMAGES if smoke else None
    if not smoke:
        return EvalPlan(table.suite, n)
    shown = tuple(m.removesuffix("_acc") for _, m in table.columns if m != "clean_acc")
    return EvalPlan(table.suite, n, SMOKE_AUTOATTACK, smoke=True, only=shown)


def plan_rows(table: Table, profiles: list[str], overrides: str = "") -> list[PlannedRow]:
    """Load every row's config (and check its data); raise one :class:`ConfigError` listing every problem."""
    known = set(available_configs())
    missing = []
    for row in table.rows:
        names = [s.strip() for s in row.spec.split(",") if s.strip()]
        absent = [n for n in names if n not in known and not (n.endswith(".gin") and Path(n).is_file())]
        if absent:
            missing.append(f"  - {row.label}: {', '.join(absent)}")
    if missing:
        raise ConfigError(
            f"table {table.name}: rows name configs that do not exist in gin/:\n" + "\n".join(missing)
        )
    command_overrides = parse_overrides(overrides)
    planned, errors = [], []
    for row in table.rows:
        spec = ",".join([row.spec, *profiles])
        try:
            planned.append(_plan_row(row, spec, command_overrides))
        except (ConfigError, ValueError, TypeError, OSError) as err:
            errors.append(f"  - {row.label} ({spec}): {err}")
        finally:
            gin.clear_config()
    if errors:
        raise ConfigError(f"table {table.name}: rows that cannot run:\n" + "\n".join(errors))
    return planned


def _plan_row(row: Row, spec: str, bindings: list[str]) -> PlannedRow:
    from components.data import DataModule, DataNotFoundError

    loaded = load_config(spec, bindings)
    model_name = macro("MODEL_NAME", loaded.experiment)
    fingerprint = config_fingerprint(flat_parameters())
    data = DataModule()  # as the row's config binds it (sizes, data_dir): checked as training will check it
    try:
        data.check()
    except DataNotFoundError as err:
        raise ConfigError(str(err)) from err
    return PlannedRow(row, spec, loaded.overrides, model_name, fingerprint, data.dataset)
