"""The evaluate entry point end to end on a model trained by the smoke job, through a real MLflow store."""

import json

import mlflow
import pytest

from pipeline.evaluate import EVALUATES_TAG, parse_eps
from pipeline.evaluate import main as evaluate
from pipeline.train import EXIT_USAGE
from pipeline.train import main as train

TINY = (
    "EPOCHS = 1; DataModule.train_size = 256; DataModule.val_size = 64; DataModule.test_size = 64; "
    "BATCH_SIZE = 64; Trainer.progress = False"
)


def test_evaluate_the_smoke_champion(shared_data, mlflow_store):
    assert train(["--gin", "d2r_cag_cifar10,smoke", "--overrides", TINY]) == 0
    (train_run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    code = evaluate(
        [
            "--model-uri",
            "models:/d2r_cag_cifar10@champion",
            "--suite",
            "quick",
            "--n",
            "32",
            "--eps",
            "8/255,0.031",
        ]
    )
    assert code == 0
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`{EVALUATES_TAG}` = '{train_run.info.run_id}'",
        output_format="list",
    )
    assert len(runs) == 1
    run = runs[0]
    m = run.data.metrics
    for key in (
        "test/clean_acc",
        "test/pgd20_acc",
        "test/cw20_acc",
        "test/worst_acc",
        "test/pgd20_acc_eps0.031",
    ):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["test/worst_acc"] <= min(m["test/pgd20_acc"], m["test/cw20_acc"]) <= m["test/clean_acc"]
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert files >= {
        "evaluation/flags.txt",
        "evaluation/robustbench.json",
        "evaluation/results.md",
        "evaluation/accuracy_vs_eps.png",
    }
    bench = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/evaluation/robustbench.json"))
    assert bench  # RobustBench-style model info

    # On the model: metrics scoped to the registered version's logged model, headline tags on the version.
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("d2r_cag_cifar10", "champion")
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    scoped = {metric.key: metric for metric in logged.metrics}
    for key in ("test/clean_acc", "test/pgd20_acc", "test/worst_acc", "test/pgd20_acc_eps0.031"):
        assert scoped[key].value == m[key] and scoped[key].run_id == run.info.run_id, key
    for key in ("clean_acc", "pgd20_acc", "cw20_acc", "worst_acc"):
        assert version.tags[f"eval.{key}"] == f"{m[f'test/{key}']:.4f}", key
    flags = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/evaluation/flags.txt").strip()
    assert version.tags["eval.flags"] == ("none" if flags == "no flags" else "; ".join(flags.splitlines()))
    assert version.tags["eval.eps"] == "8/255,0.031" and version.tags["eval.run_id"] == run.info.run_id
    # Accuracy against eps as a curve the UI draws: step = eps x 255 (2/255 ... 16/255, and 8/255 itself).
    curve = client.get_metric_history(run.info.run_id, "curve/pgd20_acc")
    assert [point.step for point in curve] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert next(p.value for p in curve if p.step == 8) == m["test/pgd20_acc"]


def test_evaluate_rejects_bad_input_before_work(mlflow_store, capsys):
    assert evaluate(["--model-uri", "models:/nothing@champion"]) == EXIT_USAGE
    assert "error" in capsys.readouterr().err
    with pytest.raises(Exception, match="out of range"):
        parse_eps("8")
    assert parse_eps("8/255, 0.031") == pytest.approx([8 / 255, 0.031])


def test_mlflow_run_evaluate_entry_point(shared_data, mlflow_store, tmp_path):
    """Through `mlflow run`, whose own run already holds the entry point's parameters (n, suite, ...)."""
    import subprocess
    import sys
    from pathlib import Path

    from support import mlflow_run_env

    assert train(["--gin", "d2r_cag_cifar10,smoke", "--overrides", TINY]) == 0
    env = mlflow_run_env(mlflow_store, shared_data)
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(repo), "-e", "evaluate", "--env-manager", "local",
         "-P", "model_uri=models:/d2r_cag_cifar10@champion", "-P", "n=16", "-P", "device=cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    runs = mlflow.search_runs(
        search_all_experiments=True, filter_string="params.suite = 'quick'", output_format="list"
    )
    assert len(runs) == 1 and "test/pgd20_acc" in runs[0].data.metrics
    assert runs[0].data.params["eval.n_examples"] == "16"
