"""What a researcher finds in the MLflow UI for a training run and its registered version."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from pipeline.run_page import name_and_file, run_name

REPO = Path(__file__).resolve().parents[1]
SIZES = "DataModule.train_size = 128; DataModule.val_size = 64; DataModule.test_size = 64; BATCH_SIZE = 64"


def test_run_name_is_the_spec_with_shortened_overrides():
    assert run_name("d2r_cag_cifar10,smoke", []) == "d2r_cag_cifar10,smoke"
    assert run_name("lbgat_cifar10", ["ALPHA = 10", "DataModule.train_size = 256"]) == (
        "lbgat_cifar10 [ALPHA=10, train_size=256]"
    )
    long = run_name("d2r_cag_cifar10,smoke", [f"M{i} = {i}" for i in range(40)])
    assert len(long) <= 90 and long.endswith("…]")


def test_a_run_filed_elsewhere_is_named_and_says_how_to_file_it(mlflow_store, capsys):
    """What `mlflow run` without --experiment-name hands us: a run with a made-up name in "Default"."""
    client = mlflow.MlflowClient()
    made_up = client.create_run("0").info.run_id  # MLflow names it like `skillful-fly-574`
    chosen = client.create_run("0", run_name="my ablation").info.run_id
    name_and_file(made_up, "d2r_cag_cifar10,smoke", "d2r_cag_cifar10")
    name_and_file(chosen, "d2r_cag_cifar10,smoke", "d2r_cag_cifar10")
    assert client.get_run(made_up).info.run_name == "d2r_cag_cifar10,smoke"
    assert client.get_run(chosen).info.run_name == "my ablation"  # a person's choice is kept
    assert "pass --experiment-name d2r_cag_cifar10" in capsys.readouterr().err


def test_run_and_model_pages_tell_what_was_trained_and_how(trained_store, shared_data):
    """The session's model (``conftest.TRAINED_OVERRIDES``: 2 epochs, system metrics sampled every 0.5 s)."""
    client = mlflow.MlflowClient()
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert client.get_experiment(run.info.experiment_id).name == "d2r_cag_cifar10"
    assert run.info.run_name.startswith("d2r_cag_cifar10,smoke [EPOCHS=2, train_size=128, val_size=64")
    # Params carry values, not macro names: runs compare in the UI.
    assert not [k for k, v in run.data.params.items() if v.startswith("%") or "%" in v.split("'")[0]]
    assert run.data.params["Trainer.epochs"] == "2" and run.data.params["PGDGenerator.steps"] == "3"
    # Metric sections: speed and schedule under perf/; the selected epoch is a tag, not a bar chart.
    assert {"perf/lr", "perf/epoch_time_s", "perf/images_per_s"} <= set(run.data.metrics)
    assert not [k for k in run.data.metrics if "/" not in k or k == "test/best_epoch"]
    best_epoch = run.data.tags["robustflow.best_epoch"]
    assert best_epoch in ("1", "2")
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)
    # The operative config: a previewable .txt artifact and the run's description.
    text = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config/operative_config.txt")
    assert "SoftLabelKLObjective.soft_label_model = 'guide'" in text
    assert "SoftLabelKLObjective.soft_label_model = 'guide'" in run.data.tags["mlflow.note.content"]
    # The model card on the registered version: threat model, code, data, hardware; no local path.
    card = client.get_model_version("d2r_cag_cifar10", "1").description
    for line in ("L-inf in pixel space", "PGD-20, eps 8/255", "code commit `", "cpu: "):
        assert line in card, line
    assert "train 128 images" in card and "validation 64 images" in card and "test 64 images" in card
    assert f"Epoch **{best_epoch}** of" in card
    assert str(shared_data) not in card, card
    # PostgreSQL stores a version description in VARCHAR(5000) (sqlite lets longer ones through).
    assert len(card) <= 5000 and "## Operative config" in card


@pytest.mark.slow
def test_mlflow_run_files_the_run_under_its_model_and_names_it(shared_data, tmp_path):
    """The README's command, for real: experiment MODEL_NAME, run named after the config, no tqdm redraws;
    `mlflow run` logs its own parameters before robustflow starts, which must not look like a resume."""
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        ROBUSTFLOW_DATA=str(shared_data),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(key, None)
    out = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "train", "--env-manager", "local",
         "--experiment-name", "d2r_cag_cifar10", "-P", "gin=d2r_cag_cifar10,smoke",
         "-P", f"overrides=EPOCHS = 1; {SIZES}", "-P", "device=cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert mlflow.MlflowClient().get_experiment(run.info.experiment_id).name == "d2r_cag_cifar10"
    assert run.info.run_name.startswith("d2r_cag_cifar10,smoke [EPOCHS=1, train_size=128")
    assert "--experiment-name" not in out.stderr  # filed where it belongs: no advice printed
    # Progress bars are on (Trainer.progress is not overridden) but stderr is a pipe: no redraws.
    assert "\r" not in out.stderr and "it/s" not in out.stderr
    assert "registered d2r_cag_cifar10 version 1" in out.stderr
    assert "resuming" not in out.stderr
    assert run.data.params["gin"] == "d2r_cag_cifar10,smoke"  # mlflow run's own parameter
    assert run.data.params["ALPHA"] == "30.0" and run.data.tags["robustflow.experiment"] == "d2r_cag_cifar10"
