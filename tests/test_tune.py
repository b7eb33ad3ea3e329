"""Optuna studies over the loss weights, end to end: real Optuna and MLflow stores, tiny real training."""

import math
import os
import subprocess
import sys
from pathlib import Path

import gin
import mlflow
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from pipeline.config import ConfigError, load_config, macro
from pipeline.registry import CHAMPION
from pipeline.tracking import CONFIG_ARTIFACT, full_config_text, run_params
from pipeline.train import build
from pipeline.tune import main
from pipeline.tuning.plan import CONFIG_ATTR, EXIT_USAGE, NOTE_TAG, RUN_ATTR, VERSION_ATTR
from pipeline.tuning.pruning import Pruning, dominates
from pipeline.tuning.space import describe_space, parse_dimension, suggest
from pipeline.tuning.storage import parse_storage

REPO = Path(__file__).resolve().parents[1]
GIN = "d2r_cag_cifar10,smoke"
STUDY = "d2r_cag_cifar10-smoke-robust"  # the default name: configs and objective
# Tiny, still real trials: 128 training images, 2 epochs, 1-step CAG, PGD-20 validation on 64 images.
TINY = (
    "EPOCHS = 2; DataModule.train_size = 128; DataModule.val_size = 64; DataModule.test_size = 64; "
    "BATCH_SIZE = 64; Trainer.progress = False; ATTACK_STEPS = 1; build_backbone.width = 8"
)
SEARCHED = {"ALPHA", "BETA", "LAMBDA"}
# Pruning forced deterministically: no accuracy reaches 1.01, and epoch 1 is already prunable.
PRUNE_ALL = ["--pruner", "threshold:1.01", "--warmup-epochs", "0"]


def tune(*args):
    return main(["--gin", GIN, "--overrides", TINY, "--device", "cpu", "--seed", "0", *args])


def tune_command(*args):
    return [
        sys.executable,
        "-m",
        "pipeline.tune",
        "--gin",
        GIN,
        "--overrides",
        TINY,
        "--device",
        "cpu",
        *args,
    ]


def worker_env():
    # The MLflow store and data come from the fixtures; one thread each, so two workers share 2 cores.
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    return env


def journal(path):
    return JournalStorage(JournalFileBackend(str(path)))


def all_runs():
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def parent_runs(study=STUDY):
    return [
        r
        for r in all_runs()
        if r.data.tags.get("robustflow.tune.role") == "parent"
        and r.data.tags.get("optuna.study_name") == study
    ]


def nested_runs(parent_id):
    return [r for r in all_runs() if r.data.tags.get("mlflow.parentRunId") == parent_id]


def artifacts(run_id, path=""):
    out = []
    for item in mlflow.MlflowClient().list_artifacts(run_id, path):
        out += artifacts(run_id, item.path) if item.is_dir else [item.path]
    return out


@pytest.mark.slow
def test_a_study_runs_nested_trials_resumes_and_writes_a_reproducible_best_gin(
    shared_data, mlflow_store, tmp_path
):
    assert tune("--n-trials", "1") == 0
    # The default storage: optuna.db beside the MLflow store, not inside it.
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.load_study(study_name=STUDY, storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
    (parent,) = parent_runs()
    assert parent.info.run_name == STUDY and parent.data.tags["optuna.storage"] == storage
    assert "needs >= 2 completed" in parent.data.tags[f"{NOTE_TAG}.param_importances"]

    assert tune("--n-trials", "2") == 0  # resumes: one more trial, under the same parent run
    study = optuna.load_study(study_name=STUDY, storage=storage)
    assert [(t.number, t.state) for t in study.trials] == [(0, TrialState.COMPLETE), (1, TrialState.COMPLETE)]
    (parent,) = parent_runs()
    children = {r.data.tags["optuna.trial_number"]: r for r in nested_runs(parent.info.run_id)}
    assert set(children) == {"0", "1"}
    client = mlflow.MlflowClient()
    for trial in study.trials:
        run = children[str(trial.number)]
        assert run.info.run_id == trial.user_attrs[RUN_ATTR]
        assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "COMPLETE"
        assert set(trial.params) == SEARCHED
        for name, value in trial.params.items():  # the trial set the same macros an override sets
            assert run.data.params[name] == repr(value)
        curve = client.get_metric_history(run.info.run_id, "val/pgd20_acc")
        assert [m.step for m in curve] == [1, 2] and trial.value == max(m.value for m in curve)
        assert trial.intermediate_values == {m.step: m.value for m in curve}

    # The best trial (ties: the older model version, as the champion rule) is tagged on the parent run,
    # and the registry's champion is its model.
    best = max(study.trials, key=lambda t: (t.value, -int(t.user_attrs[VERSION_ATTR])))
    tags = client.get_run(parent.info.run_id).data.tags
    assert tags["robustflow.tune.best_trial"] == str(best.number)
    assert tags["robustflow.tune.best_run_id"] == best.user_attrs[RUN_ATTR]
    assert tags["robustflow.tune.best_model_version"] == best.user_attrs[VERSION_ATTR]
    champion = client.get_model_version_by_alias("d2r_cag_cifar10", CHAMPION)
    assert str(champion.version) == best.user_attrs[VERSION_ATTR] == tags["robustflow.tune.champion_version"]
    logged = set(artifacts(parent.info.run_id))
    assert {
        "tuning/best_params.gin",
        "tuning/summary.md",
        "tuning/trials.csv",
        "plots/optimization_history.png",
        "plots/intermediate_values.png",
        "plots/param_importances.png",  # two completed trials now: the first run's note is gone
    } <= logged
    assert f"{NOTE_TAG}.param_importances" not in tags

    # best_params.gin, given to --gin, re-creates the best trial's configuration exactly.
    best_gin = tmp_path / "outputs" / STUDY / "best_params.gin"
    assert best_gin.read_text() == mlflow.artifacts.load_text(
        f"runs:/{parent.info.run_id}/tuning/best_params.gin"
    )
    best_run = client.get_run(best.user_attrs[RUN_ATTR])
    build(str(best_gin), "", "cpu")
    for name, value in best.params.items():
        assert macro(name) == value
    # The trial's config file and params hold every binding the rebuilt config has (and, logged at the end
    # of training, those of the configurables first called then: the optimizer, the validation attack).
    logged = mlflow.artifacts.load_text(f"runs:/{best_run.info.run_id}/{CONFIG_ARTIFACT}").splitlines()
    assert set(full_config_text().splitlines()) <= set(logged)
    assert run_params().items() <= best_run.data.params.items()


@pytest.mark.slow
def test_two_workers_share_a_study_and_stop_at_its_total(shared_data, mlflow_store, tmp_path):
    """Two commands started together on a fresh store, asked for 2 trials each, finish 2 between them: none
    lost, none run twice.

    Neither store exists yet: the sqlite MLflow store and Optuna storage are what the two race to set up.
    The first to finish its trial must wait for the other's rather than start a third (as Optuna's
    MaxTrialsCallback would)."""
    cmd = tune_command(
        "--n-trials", "2", "--study", "shared", "--objective", "pareto",
        "--pruner", "none", "--heartbeat-interval", "2", "--grace-period", "60",
    )  # fmt: skip
    workers, logs = [], []
    for i in range(2):
        out, err = tmp_path / f"worker{i}.out", tmp_path / f"worker{i}.err"
        with out.open("wb") as o, err.open("wb") as e:
            workers.append(subprocess.Popen(cmd, cwd=tmp_path, env=worker_env(), stdout=o, stderr=e))
        logs.append((out, err))
    for worker, (out, err) in zip(workers, logs):
        assert worker.wait(timeout=900) == 0, err.read_text()[-3000:]
        assert "Pareto front" in out.read_text()  # each worker ends with the study's summary

    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    said = "\n".join(err.read_text()[-4000:] for _, err in logs)
    assert [t.number for t in complete] == [0, 1], said
    # A trial handed back unrun when both workers asked at once stays queued; nothing else is left over.
    assert all(t.state == TrialState.WAITING and not t.params for t in study.trials if t not in complete)
    assert all(len(t.values) == 2 for t in complete)  # (val/clean_acc, val/pgd20_acc)

    (parent,) = parent_runs("shared")
    children = nested_runs(parent.info.run_id)
    assert sorted(r.data.tags["optuna.trial_number"] for r in children) == ["0", "1"]
    for trial in complete:
        (run,) = [r for r in children if r.data.tags["optuna.trial_number"] == str(trial.number)]
        assert run.info.status == "FINISHED" and run.info.run_id == trial.user_attrs[RUN_ATTR]
    logged = set(artifacts(parent.info.run_id))
    assert "plots/pareto_front.png" in logged
    assert {f"tuning/pareto/trial_{t.number}.gin" for t in study.best_trials} <= logged


def test_a_pruned_trial_shows_as_pruned_in_optuna_and_mlflow(shared_data, mlflow_store, tmp_path):
    assert tune("--n-trials", "1", *PRUNE_ALL) == 0
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    (trial,) = study.trials
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [1]
    run = mlflow.get_run(trial.user_attrs[RUN_ATTR])
    assert run.info.status == "KILLED"
    assert run.data.tags["optuna.state"] == "PRUNED" and "pruned after epoch 1" in run.data.tags[NOTE_TAG]
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/pgd20_acc")] == [1]
    assert client.search_model_versions("name = 'd2r_cag_cifar10'") == []  # a pruned trial registers nothing
    (parent,) = parent_runs()
    assert "no completed trial" in parent.data.tags[f"{NOTE_TAG}.best_params"]


@pytest.mark.slow
def test_a_killed_workers_trial_is_failed_by_heartbeat_and_retried(shared_data, mlflow_store, tmp_path):
    log = tmp_path / "study.log"
    liveness = ["--heartbeat-interval", "1", "--grace-period", "3", "--storage", f"journal:{log}"]
    worker = subprocess.Popen(
        [*tune_command("--n-trials", "1", *liveness), "--pruner", "none"],
        cwd=tmp_path,
        env=worker_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in worker.stderr:
        if line.startswith("epoch 1/2"):
            worker.kill()  # SIGKILL mid-trial: no chance to clean up
            break
    assert worker.wait(timeout=60) == -9
    (stuck,) = optuna.load_study(study_name=STUDY, storage=journal(log)).trials
    assert stuck.state == TrialState.RUNNING

    # The next run waits out the grace period, fails the trial and runs its retry (pruned, to be quick).
    assert tune("--n-trials", "1", *liveness, *PRUNE_ALL) == 0
    failed, retry = optuna.load_study(study_name=STUDY, storage=journal(log)).trials
    assert failed.state == TrialState.FAIL and retry.state == TrialState.PRUNED
    assert retry.system_attrs["failed_trial"] == 0 and retry.params == failed.params
    dead = mlflow.get_run(failed.user_attrs[RUN_ATTR])
    assert dead.info.status == "FAILED" and dead.data.tags["optuna.state"] == "FAIL"
    assert "no heartbeat" in dead.data.tags[NOTE_TAG]
    assert retry.user_attrs[RUN_ATTR] != dead.info.run_id


def test_a_study_is_resumed_only_with_the_arguments_it_was_created_with(
    shared_data, mlflow_store, tmp_path, capsys
):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name=STUDY, storage=storage, direction="maximize")
    study.set_user_attr(CONFIG_ATTR, {"gin": GIN, "overrides": "EPOCHS = 2", "objective": "robust"})
    assert tune("--n-trials", "1") == EXIT_USAGE
    assert "was created with overrides='EPOCHS = 2'" in capsys.readouterr().err
    assert not study.trials and not all_runs()


@pytest.mark.parametrize(
    "gin_spec, overrides, message",
    [
        (GIN, "SearchSpace.params = {'ALPAH': ('float', 1.0, 10.0, 'log')}", "Did you mean ALPHA"),
        (GIN, "SearchSpace.params = {'ALPHA': ('float', 10.0, 1.0)}", "low (10.0) must be below high (1.0)"),
        (GIN, "SearchSpace.params = {'ALPHA': ('float', 0.0, 10.0, 'log')}", "a log scale needs low > 0"),
        (GIN, "SearchSpace.params = {'ALPHA': ('flaot', 1.0, 10.0)}", "unknown kind 'flaot'"),
        (GIN, "SearchSpace.params = {'ALPHA': ('int', 1.5, 10)}", "bounds of a int range must be integers"),
        ("pgd_at_cifar10,smoke", "", "no search space is declared"),
        (GIN, "ALPHA = 3.0; BETA = 2.0; LAMBDA = 1.0", "nothing to search"),
    ],
)
def test_bad_search_spaces_fail_before_any_trial(
    gin_spec, overrides, message, shared_data, mlflow_store, capsys
):
    assert main(["--gin", gin_spec, "--overrides", overrides, "--device", "cpu"]) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not Path("optuna.db").exists() and not Path("mlflow.db").exists(), "work started anyway"


def test_search_space_declarations_parse_to_optuna_distributions():
    alpha = parse_dimension("ALPHA", ("float", 3, 300, "log"))
    assert alpha == FloatDistribution(3.0, 300.0, log=True)
    assert (alpha.low, alpha.high, alpha.log) == (3.0, 300.0, True)
    assert parse_dimension("BETA", ("float", 0.0, 12.0)).log is False
    assert parse_dimension("STEPS", ("int", 1, 10)) == IntDistribution(1, 10)
    assert parse_dimension("SEED", ("categorical", [0, 1, 2])).choices == (0, 1, 2)
    assert isinstance(parse_dimension("SEED", ("categorical", [0, 1, 2])), CategoricalDistribution)
    with pytest.raises(ConfigError, match="at least two choices"):
        parse_dimension("SEED", ("categorical", [0]))

    # How the space reads on the parent run's tags, the study and the first line of every worker (as before).
    assert describe_space({n: parse_dimension(n, d) for n, d in SAMPLED_SPACE.items()}) == (
        "ALPHA: float in [3.0, 300.0], log scale; BETA: float in [0.0, 12.0]; STEPS: int in [1, 10]; "
        "WIDTH: int in [4, 64], log scale; INIT in ['uniform', 'normal', 'sign']"
    )


# Drawn by the code before the search space became optuna.distributions (Dimension.suggest, at 5a50a17),
# with the samplers below under Optuna 5.1: the same declarations must keep drawing the same values for the
# same seed. Samplers' streams change between Optuna releases, so elsewhere the test asserts properties:
# every value inside its declared range, and the same draws for the same seed.
SAMPLED_ON = "5.1."
SAMPLED_SPACE = {
    "ALPHA": ("float", 3.0, 300.0, "log"),
    "BETA": ("float", 0.0, 12.0),
    "STEPS": ("int", 1, 10),
    "WIDTH": ("int", 4, 64, "log"),
    "INIT": ("categorical", ["uniform", "normal", "sign"]),
}
SAMPLED_BEFORE = {
    "tpe": [  # three random start-up trials, then two drawn by TPE from the scores told
        (37.561961444998396, 8.582272396469033, 7, 17, "normal"),
        (182.24988220277075, 11.56395312601235, 4, 35, "sign"),
        (4.160958373607196, 1.0455515964184885, 1, 40, "sign"),
        (22.865790247653752, 0.5062481221676194, 1, 23, "sign"),
        (10.44216979692703, 5.580368752854371, 2, 6, "uniform"),
    ],
    "random": [
        (20.47223528129649, 8.643893921305898, 1, 8, "sign"),
        (14.731355455397903, 4.761209690768039, 6, 12, "sign"),
        (3.4032702797505707, 8.045610122140827, 5, 18, "sign"),
    ],
}


def _draw(sampler, n: int) -> list[tuple]:
    space = {macro_name: parse_dimension(macro_name, d) for macro_name, d in SAMPLED_SPACE.items()}
    study = optuna.create_study(direction="maximize", sampler=sampler)
    drawn = []
    for _ in range(n):
        trial = study.ask()
        v = {macro_name: suggest(trial, macro_name, d) for macro_name, d in space.items()}
        study.tell(trial, math.log(v["ALPHA"]) - v["BETA"] + v["STEPS"] / v["WIDTH"] + len(v["INIT"]))
        drawn.append(tuple(v.values()))
    return drawn


@pytest.mark.parametrize(
    "name, sampler",
    [
        ("tpe", lambda: optuna.samplers.TPESampler(seed=0, n_startup_trials=3, constant_liar=True)),
        ("random", lambda: optuna.samplers.RandomSampler(seed=1)),
    ],
)
def test_a_seeded_study_draws_in_the_space_reproducibly_and_as_before(name, sampler):
    drawn = _draw(sampler(), len(SAMPLED_BEFORE[name]))
    assert drawn == _draw(sampler(), len(drawn))  # the same seed draws the same values
    for values in drawn:
        alpha, beta, steps, width, init = values
        assert 3.0 <= alpha <= 300.0 and 0.0 <= beta <= 12.0 and init in ("uniform", "normal", "sign")
        assert isinstance(steps, int) and 1 <= steps <= 10 and isinstance(width, int) and 4 <= width <= 64
    if optuna.__version__.startswith(SAMPLED_ON):
        assert drawn == SAMPLED_BEFORE[name]


def test_search_fragments_bind_the_search_space_without_importing_an_entry_point():
    for fragment in sorted((REPO / "gin" / "search").glob("*.gin")):
        lines = fragment.read_text().splitlines()
        assert not [line for line in lines if line.startswith("import ")], fragment.name
    load_config(GIN)  # the config loader registers SearchSpace itself
    assert set(gin.query_parameter("SearchSpace.params")) == SEARCHED


def test_storage_defaults_beside_the_mlflow_store_and_never_inside_it(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert parse_storage("", store).target == f"sqlite:///{tmp_path / 'optuna.db'}"
    journal_file = parse_storage(f"journal:{tmp_path / 'study.log'}", store)
    assert (journal_file.kind, journal_file.target) == ("journal", str(tmp_path / "study.log"))
    assert parse_storage(str(tmp_path / "other.log"), store).kind == "journal"
    assert parse_storage("postgresql://me:secret@db/optuna", store).label == "postgresql://me:***@db/optuna"
    with pytest.raises(ConfigError, match="MLflow store's own sqlite file"):
        parse_storage(store, store)
    with pytest.raises(ConfigError, match="unsupported --storage"):
        parse_storage("optuna", store)


def test_pareto_rule_stops_a_trial_dominated_by_half_the_completed_trials():
    rule = Pruning("median", warmup_epochs=1, startup_trials=2, epochs=10)
    peers = [(0.8, 0.4), (0.7, 0.5), (0.5, 0.2)]
    assert dominates((0.8, 0.4), (0.6, 0.3)) and not dominates((0.8, 0.4), (0.9, 0.1))
    assert rule.pareto_should_stop(3, (0.6, 0.3), peers)  # dominated by 2 of 3
    assert not rule.pareto_should_stop(3, (0.9, 0.1), peers)  # on the front at epoch 3
    assert not rule.pareto_should_stop(1, (0.1, 0.0), peers)  # warm-up epoch
    assert not rule.pareto_should_stop(10, (0.1, 0.0), peers)  # the last epoch: the work is done
    assert not rule.pareto_should_stop(3, (0.1, 0.0), peers[:1])  # fewer completed trials than startup
    assert Pruning("threshold", 0, 0, 10, lower=0.3).pareto_should_stop(2, (0.9, 0.2), [])
    assert not Pruning("none", 0, 0, 10).pareto_should_stop(2, (0.0, 0.0), peers)
