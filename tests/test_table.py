"""The table command: a paper's table as gin, each row an ordinary run, reused on a second run, FAILED rows
shown with their reason, and the markdown rendered beside the paper's numbers."""

import math

import gin
import mlflow
import pytest
import support

from components.losses import Term
from pipeline.config import GIN_DIR, ConfigError, available_configs, is_experiment, load_config
from pipeline.evaluate import EVALUATES_TAG
from pipeline.table.cli import EXIT_USAGE, main, slug
from pipeline.table.plan import plan_rows
from pipeline.table.render import FAILED, REUSED, TRAINED, RowResult, difference, render_markdown
from pipeline.table.run import TABLE_RUN_TAG, prior_training
from pipeline.table.spec import Row, Table, available_tables, load_table
from pipeline.tracking import STARTED_TAG


@gin.configurable
class NaNLoss(Term):
    """NaN from the first step on, with a gradient into the model: a row that is sure to diverge."""

    def __init__(self, view: str = "target(x_adv)") -> None:
        (self.view,) = self._register(view)

    def __call__(self, views, y):
        return views[self.view].float().mean() * math.nan


# The tests' tiny real run, one epoch of 4 steps with a 1-step attack; evaluated on 32 test images.
TINY = f"EPOCHS = 1; {support.TINY}; ATTACK_STEPS = 1"


def write_table(tmp_path, rows: dict[str, tuple[str, str]], name: str = "test_table"):
    """A table file with ``label -> (spec, paper)`` rows; returns its path."""
    scopes = [f"r{i}" for i in range(len(rows))]
    lines = [
        "Table:",
        "    title = 'a test table'",
        f"    rows = [{', '.join(f'@{s}/Row()' for s in scopes)}]",
    ]
    lines.append("Row.source = 'hand-written'")
    for scope, (label, (spec, paper)) in zip(scopes, rows.items()):
        lines += [f"{scope}/Row:", f"    label = '{label}'", f"    spec = '{spec}'", f"    paper = {paper}"]
    path = tmp_path / f"{name}.gin"
    path.write_text("\n".join(lines) + "\n")
    return path


def table_args(path, *extra: str) -> list[str]:
    return [
        "--table",
        str(path),
        "--gin",
        "smoke",
        "--overrides",
        TINY,
        "--device",
        "cpu",
        "--n",
        "32",
        *extra,
    ]


def runs_of(experiment: str) -> list:
    exp = mlflow.MlflowClient().get_experiment_by_name(experiment)
    return [] if exp is None else mlflow.MlflowClient().search_runs([exp.experiment_id])


def training_runs(experiment: str) -> list:
    return [r for r in runs_of(experiment) if STARTED_TAG in r.data.tags]


def eval_runs(experiment: str) -> list:
    return [r for r in runs_of(experiment) if EVALUATES_TAG in r.data.tags]


def row_line(markdown: str, label: str) -> list[str]:
    (line,) = [x for x in markdown.splitlines() if x.startswith(f"| {label} ") or x.startswith(f"| {label}|")]
    return [c.strip() for c in line.strip("|").split("|")]


# -- rendering --------------------------------------------------------------------------------------------


def test_rendering_puts_our_numbers_beside_the_papers_with_the_differences():
    table = Table(
        title="T",
        rows=[Row("A", "pgd_at_cifar10", (60.0, "-", 20.0, 12.0)), Row("B", "trades_cifar10", (1, 2, 3, 4))],
    )
    table.name = "t"
    results = [
        RowResult(
            "A", "pgd_at_cifar10", (60.0, None, 20.0, 12.0), source="paper", status=TRAINED,
            train_run_id="0123456789abcdef",
            ours={"clean_acc": 0.5, "pgd50_acc": 0.25, "cw20_acc": 0.2, "aa_acc": 0.1234},
        ),
        RowResult(
            "B", "trades_cifar10", (1.0, 2.0, 3.0, 4.0), status=FAILED, reason="training diverged at step 3",
            ours={"clean_acc": 0.9},
        ),
    ]  # fmt: skip
    md = render_markdown(table, results, notes=["smoke: numbers are not comparable to the paper"])
    header = [c.strip() for c in md.splitlines()[6].strip("|").split("|")]
    assert header[:7] == ["Method", "Clean", "Clean (paper)", "Δ", "PGD-50", "PGD-50 (paper)", "Δ"]
    # 50.00 - 60.00 = -10.00; no paper PGD-50: '-'; 20.00 - 20.00 = 0.00; 12.34 - 12.00 = +0.34.
    assert row_line(md, "A") == [
        "A", "50.00", "60.00", "-10.00", "25.00", "-", "-", "20.00", "20.00", "0.00",
        "12.34", "12.00", "+0.34", "trained", "paper", "`01234567`",
    ]  # fmt: skip
    # A FAILED row keeps the paper's numbers, shows none of its own, and gives the reason in a footnote.
    assert row_line(md, "B [1]")[1:4] == ["-", "1.00", "-"]
    assert row_line(md, "B [1]")[13] == FAILED
    assert "[1] FAILED: training diverged at step 3" in md
    assert "**smoke: numbers are not comparable to the paper**" in md
    assert difference(0.0, 0.0) == "0.00" and difference(float("nan"), 1.0) == "-"


def test_a_row_needs_one_paper_value_per_column_and_labels_are_unique():
    with pytest.raises(ValueError, match="3 paper values for 4 columns"):
        Table(title="T", rows=[Row("A", "x", (1, 2, 3))])
    with pytest.raises(ValueError, match="labels appear twice: A"):
        Table(title="T", rows=[Row("A", "x", (1, 2, 3, 4)), Row("A", "y", (1, 2, 3, 4))])
    with pytest.raises(ValueError, match="percentages in"):
        Row("A", "x", (1, 2, 3, 400))


# -- the table files --------------------------------------------------------------------------------------


def test_every_table_parses_and_names_only_configs_that_exist():
    """Lists every missing experiment or profile at once (other branches add some of them)."""
    known = set(available_configs())
    assert {"d2r_table1_cifar10", "d2r_table1_cifar100", "d2r_table1_tinyimagenet"} <= set(available_tables())
    missing, broken = [], []
    for name in available_tables():
        table = load_table(name)
        assert table.rows and table.suite == "paper"
        for row in table.rows:
            names = [s.strip() for s in row.spec.split(",")]
            absent = [n for n in names if n not in known]
            missing += [f"{name}: {row.label}: {n}" for n in absent]
            if absent:
                continue
            if not is_experiment(GIN_DIR / f"{names[0]}.gin"):
                broken.append(f"{name}: {row.label}: {names[0]} is not an experiment")
                continue
            try:
                load_config(f"{row.spec},smoke")
            except ConfigError as err:
                broken.append(f"{name}: {row.label}: {err}")
    assert not missing, "configs named by tables but not in gin/:\n" + "\n".join(missing)
    assert not broken, "\n".join(broken)


def test_the_cifar10_table_has_all_ten_comparison_methods_and_d2r_cag():
    table = load_table("d2r_table1_cifar10")
    assert [r.label for r in table.rows] == [
        "PGD-AT", "TRADES", "MART", "LBGAT", "FAT", "GAIRAT", "AWP", "LAS-AT", "RAT(TRADES)", "SAT",
        "D2R-CAG",
    ]  # fmt: skip
    by_label = {r.label: r for r in table.rows}
    assert by_label["D2R-CAG"].paper == (85.68, 56.73, 56.66, 54.65)
    assert by_label["RAT(TRADES)"].paper[1] is None
    assert by_label["SAT"].paper == (None, None, None, None) and "CIFAR-100 only" in by_label["SAT"].note


def test_the_config_fingerprint_is_what_the_run_trains_not_how_the_command_spelled_it():
    from pipeline.config import flat_parameters
    from pipeline.resume import config_fingerprint

    def fingerprint(spec: str, overrides: str = "", device: str | None = None) -> str:
        load_config(spec, overrides)
        if device is not None:
            gin.bind_parameter("DataModule.device", device)
        return config_fingerprint(flat_parameters())

    base = fingerprint("pgd_at_cifar10,smoke")
    assert fingerprint("pgd_at_cifar10,smoke", "EPOCHS = 4") == base  # smoke's own value, spelled again
    assert fingerprint("pgd_at_cifar10,smoke", device="cuda") == base  # where it trains is not what
    assert fingerprint("pgd_at_cifar10,smoke", "EPOCHS = 3") != base
    assert fingerprint("pgd_at_cifar10,smoke,stable") != base
    assert fingerprint("pgd_at_cifar10") != base


# -- bad input --------------------------------------------------------------------------------------------


def test_bad_input_fails_before_any_run(tmp_path, mlflow_store, shared_data, capsys):
    assert main(["--table", "d2r_table1_cifar1O"]) == EXIT_USAGE
    assert "unknown table 'd2r_table1_cifar1O'. Did you mean d2r_table1_cifar10" in capsys.readouterr().err

    missing = write_table(
        tmp_path,
        {"A": ("pgd_at_cifar10", (1, 2, 3, 4)), "B": ("no_such_method", (1, 2, 3, 4)),
         "C": ("trades_cifar10,no_such_profile", (1, 2, 3, 4))},
    )  # fmt: skip
    assert main(table_args(missing)) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "rows name configs that do not exist" in err
    assert "- B: no_such_method" in err and "- C: no_such_profile" in err

    fine = write_table(tmp_path, {"A": ("pgd_at_cifar10", (1, 2, 3, 4))}, name="fine")
    assert main(["--table", str(fine), "--overrides", "EPOCS = 2"]) == EXIT_USAGE
    assert "A (pgd_at_cifar10): override 'EPOCS = 2'" in capsys.readouterr().err
    assert main(["--table", str(fine), "--gin", "trades_cifar10"]) == EXIT_USAGE
    assert "trades_cifar10 is an experiment" in capsys.readouterr().err
    no_data = write_table(tmp_path, {"A": ("pgd_at_cifar100", (1, 2, 3, 4))}, name="no_data")
    assert main(table_args(no_data)) == EXIT_USAGE  # the offline data has no CIFAR-100
    assert "A (pgd_at_cifar100,smoke): " in capsys.readouterr().err
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


# -- end to end, through a real MLflow store --------------------------------------------------------------


@pytest.mark.slow
def test_a_table_trains_each_row_as_a_normal_run_and_renders_it(tmp_path, mlflow_store, shared_data, capsys):
    path = write_table(
        tmp_path,
        {
            "PGD-AT": ("pgd_at_cifar10", (85.17, 54.88, 53.91, 51.69)),
            "TRADES": ("trades_cifar10", (1, "-", 3, 4)),
        },
    )
    assert main(table_args(path)) == 0
    out = capsys.readouterr().out
    (parent,) = runs_of("test_table")
    assert parent.info.status == "FINISHED"
    for label, experiment in (("PGD-AT", "pgd_at_cifar10"), ("TRADES", "trades_cifar10")):
        # An ordinary training run in its own experiment, registered, linked to the table's run by a tag.
        (train,) = training_runs(experiment)
        assert train.info.status == "FINISHED" and train.data.tags[TABLE_RUN_TAG] == parent.info.run_id
        assert train.info.run_name.startswith(f"{experiment},smoke [")
        assert (
            mlflow.MlflowClient().get_model_version_by_alias(experiment, "champion").run_id
            == train.info.run_id
        )
        (ev,) = eval_runs(experiment)
        assert ev.data.tags[EVALUATES_TAG] == train.info.run_id and ev.data.params["eval.n_examples"] == "32"
        cells = row_line(out, label)
        m = ev.data.metrics
        assert cells[1] == f"{100 * m['eval/n32/clean_acc']:.2f}"
        assert cells[10] == f"{100 * m['eval/n32/aa_acc']:.2f}"
        assert cells[13] == TRAINED and cells[15] == f"`{train.info.run_id[:8]}`"
        assert parent.data.tags[f"robustflow.row.{slug(label)}"] == (
            f"trained train={train.info.run_id} eval={ev.info.run_id}"
        )
    assert row_line(out, "TRADES")[5:7] == ["-", "-"]  # the paper has no PGD-50: no difference either
    assert "smoke: numbers are not comparable to the paper" in out
    assert "AA column: AutoAttack apgd-ce = APGD-CE" in out
    md = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/table.md")
    assert md.strip() == out.strip() and parent.data.tags["mlflow.note.content"] == md


@pytest.mark.slow
def test_a_second_run_reuses_finished_rows_even_one_trained_by_the_train_entry_point(
    tmp_path, mlflow_store, shared_data, capsys
):
    from pipeline.train import main as train

    # A run trained outside the table, with the same config as the table's row: the table finds it.
    assert train(["--gin", "pgd_at_cifar10,smoke", "--overrides", TINY, "--device", "cpu"]) == 0
    path = write_table(tmp_path, {"PGD-AT": ("pgd_at_cifar10", (85.17, 54.88, 53.91, 51.69))})
    assert main(table_args(path)) == 0
    first = capsys.readouterr().out
    assert row_line(first, "PGD-AT")[13] == REUSED
    assert len(training_runs("pgd_at_cifar10")) == 1 and len(eval_runs("pgd_at_cifar10")) == 1

    # Again: the evaluation is reused too; nothing new but the table's own run, and the same numbers.
    assert main(table_args(path)) == 0
    again = capsys.readouterr().out
    assert len(training_runs("pgd_at_cifar10")) == 1 and len(eval_runs("pgd_at_cifar10")) == 1
    assert len(runs_of("test_table")) == 2
    assert row_line(again, "PGD-AT") == row_line(first, "PGD-AT")

    # Another config is another row: nothing reused.
    table = load_table(str(path))
    (other,) = plan_rows(table, ["smoke"], f"{TINY}; SEED = 1")
    assert prior_training(other) is None
    (same,) = plan_rows(table, ["smoke"], TINY)
    assert prior_training(same) is not None


@pytest.mark.slow
def test_a_row_that_diverges_shows_as_failed_and_the_table_completes(
    tmp_path, mlflow_store, shared_data, capsys
):
    diverging = tmp_path / "diverging_pgd_at.gin"
    diverging.write_text(
        "include 'pgd_at_cifar10.gin'\n"
        "MODEL_NAME = 'diverging_pgd_at'\n"
        "WeightedLoss.terms = {'ce_adv': (1.0, @ce_adv/CrossEntropy()), 'nan': (1.0, @NaNLoss())}\n"
    )
    path = write_table(
        tmp_path,
        {
            "Diverges": (str(diverging), (1, 2, 3, 4)),
            "PGD-AT": ("pgd_at_cifar10", (85.17, 54.88, 53.91, 51.69)),
        },
    )
    assert main(table_args(path)) == 0
    out = capsys.readouterr().out
    cells = row_line(out, "Diverges [1]")
    assert cells[1] == "-" and cells[13] == FAILED
    assert "[1] FAILED: training diverged in epoch 1" in out and "'nan'" in out
    assert row_line(out, "PGD-AT")[13] == TRAINED
    (failed,) = training_runs("diverging_pgd_at")
    assert failed.info.status == "FAILED"
    (parent,) = runs_of("test_table")
    assert parent.info.status == "FINISHED" and parent.data.tags["robustflow.failed_rows"] == "1"

    # A second run does not train the diverged row again (the same config diverges again) unless asked.
    assert main(table_args(path)) == 0
    out = capsys.readouterr().out
    assert "an earlier run; --retry-failed trains again" in out
    assert len(training_runs("diverging_pgd_at")) == 1 and len(training_runs("pgd_at_cifar10")) == 1


@pytest.mark.slow
def test_mlflow_run_table_entry_point_files_each_row_in_its_own_experiment(
    tmp_path, mlflow_store, shared_data
):
    """Under `mlflow run` the table's run is the one the wrapper made (its experiment exported to us): the
    rows' runs must still go to their own experiments, and the wrapper's run must end FINISHED."""
    import subprocess
    import sys
    from pathlib import Path

    path = write_table(
        tmp_path, {"TRADES": ("trades_cifar10", (1, 2, 3, 4)), "MART": ("mart_cifar10", (1, 2, 3, 4))}
    )
    env = support.mlflow_run_env(mlflow_store, shared_data)
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(repo), "-e", "table", "--env-manager", "local",
         "--experiment-name", "tables", "-P", f"table={path}", "-P", "gin=smoke", "-P", f"overrides={TINY}",
         "-P", "device=cpu", "-P", "n=16"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (parent,) = runs_of("tables")
    assert parent.info.status == "FINISHED" and parent.data.params["table.name"] == "test_table"
    for experiment in ("trades_cifar10", "mart_cifar10"):
        (train,) = training_runs(experiment)
        assert train.data.tags[TABLE_RUN_TAG] == parent.info.run_id and len(eval_runs(experiment)) == 1
    assert "| TRADES" in parent.data.tags["mlflow.note.content"]
