"""The evaluate entry point end to end on a model trained by the smoke job, through a real MLflow store."""

import json

import mlflow
import pytest

from pipeline.evaluate import EVALUATES_TAG, parse_eps
from pipeline.evaluate import main as evaluate
from pipeline.train import EXIT_USAGE


def test_evaluate_the_smoke_champion(trained_store):
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
        "eval/n32/clean_acc",
        "eval/n32/pgd20_acc",
        "eval/n32/cw20_acc",
        "eval/n32/worst_acc",
        "eval/n32/pgd20_acc_eps0.031",
    ):
        assert 0.0 <= m[key] <= 1.0, key
    assert (
        m["eval/n32/worst_acc"]
        <= min(m["eval/n32/pgd20_acc"], m["eval/n32/cw20_acc"])
        <= m["eval/n32/clean_acc"]
    )
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    # `quick` draws no accuracy-vs-eps curve (a PGD-20 per radius is what made it slow).
    assert files >= {"evaluation/flags.txt", "evaluation/robustbench.json", "evaluation/results.md"}
    bench = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/evaluation/robustbench.json"))
    assert bench  # RobustBench-style model info

    # On the model: metrics scoped to the registered version's logged model, headline tags on the version.
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("d2r_cag_cifar10", "champion")
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    scoped = {metric.key: metric for metric in logged.metrics}
    for key in (
        "eval/n32/clean_acc",
        "eval/n32/pgd20_acc",
        "eval/n32/worst_acc",
        "eval/n32/pgd20_acc_eps0.031",
    ):
        assert scoped[key].value == m[key] and scoped[key].run_id == run.info.run_id, key
    for key in ("clean_acc", "pgd20_acc", "cw20_acc", "worst_acc"):
        assert version.tags[f"eval.{key}"] == f"{m[f'eval/n32/{key}']:g}", key
    flags = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/evaluation/flags.txt").strip()
    assert version.tags["eval.flags"] == ("none" if flags == "no flags" else "; ".join(flags.splitlines()))
    assert version.tags["eval.eps"] == "8/255,0.031" and version.tags["eval.run_id"] == run.info.run_id
    assert not any(k.startswith("eval/n32/") and k.endswith("_vs_eps") for k in m)


def test_evaluate_rejects_bad_input_before_work(mlflow_store, capsys):
    assert evaluate(["--model-uri", "models:/nothing@champion"]) == EXIT_USAGE
    assert "error" in capsys.readouterr().err
    with pytest.raises(Exception, match="out of range"):
        parse_eps("8")
    assert parse_eps("8/255, 0.031") == pytest.approx([8 / 255, 0.031])


@pytest.mark.slow
def test_mlflow_run_evaluate_entry_point(trained_store, shared_data, tmp_path):
    """Through `mlflow run`, whose own run already holds the entry point's parameters (n, suite, ...)."""
    import subprocess
    import sys
    from pathlib import Path

    from support import mlflow_run_env

    env = mlflow_run_env(trained_store.uri, shared_data)
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
    assert len(runs) == 1 and "eval/n16/pgd20_acc" in runs[0].data.metrics
    assert runs[0].info.run_name == "eval d2r_cag_cifar10/v1 quick"  # renamed from mlflow run's made-up name
    assert runs[0].data.params["eval.n_examples"] == "16"
