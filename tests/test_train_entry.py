"""The train entry point end to end on the real CIFAR-10 shards through a real MLflow store."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from support import TINY, cpu_args, fit_tiny

from components.checkpoint import load_checkpoint
from pipeline.train import EXIT_TERMINATED, EXIT_USAGE, main

REPO = Path(__file__).resolve().parents[1]
EPOCH_METRICS = {
    "train/loss",
    "train/loss/ce_guide",
    "train/loss/mse",
    "train/loss/kl_gap",
    "train/loss/kl_adv",
    "train/clean_acc",
    "train/adv_acc",
    "val/clean_acc",
    "val/pgd20_acc",
    "perf/lr",
    "perf/epoch_time_s",
    "perf/images_per_s",
}


def only_run():
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1
    return runs[0]


def test_train_d2r_cag_smoke_end_to_end(trained_store):
    """The session's model: `python -m pipeline.train --gin d2r_cag_cifar10,smoke` on 128 images, 2 epochs."""
    run = only_run()
    assert run.info.run_id == trained_store.run_id
    assert run.info.status == "FINISHED"
    client = mlflow.MlflowClient()
    for key in EPOCH_METRICS:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
    for key in ("test/clean_acc", "test/pgd20_acc", "test/last_clean_acc", "test/last_pgd20_acc"):
        assert 0.0 <= run.data.metrics[key] <= 1.0
    assert run.data.metrics["test/pgd20_acc"] <= run.data.metrics["test/clean_acc"]
    # lr of the papers' schedule on 2 epochs: warm-up epoch at 0.02, then x0.1 twice (76% and 91% of 2 epochs)
    lr = [m.value for m in client.get_metric_history(run.info.run_id, "perf/lr")]
    assert lr == pytest.approx([0.02, 0.001])
    assert run.data.params["ALPHA"] == "30.0" and run.data.params["data.dataset"] == "cifar10"
    assert run.data.tags["robustflow.gin"] == "d2r_cag_cifar10,smoke"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert artifacts == {"checkpoints/last.pt", "checkpoints/best.pt"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "config")} == {
        "config/operative_config.txt"
    }
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/training_curves.png"}
    operative = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config/operative_config.txt")
    assert "SoftLabelKLObjective.soft_label_model = 'guide'" in operative
    last = load_checkpoint(
        mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/checkpoints/last.pt")
    )
    assert last["epoch"] == 2 and set(last["models"]) == {"target", "guide"}


def _fit(tmp_path, stop_after_steps=None, resume_from=None):
    """Train the tiny D2R-CAG smoke config for 2 epochs in-process, optionally stopping mid-way."""
    return fit_tiny("d2r_cag_cifar10,smoke", f"EPOCHS = 2; {TINY}", tmp_path, stop_after_steps, resume_from)


@pytest.mark.slow
def test_resume_after_a_kill_ends_with_the_same_metrics_and_weights(shared_data, tmp_path):
    full, full_exp = _fit(tmp_path / "full")
    # 4 steps per epoch: stop during epoch 2, then resume from the epoch-1 checkpoint.
    stopped, _ = _fit(tmp_path / "cut", stop_after_steps=6)
    assert stopped is None and load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 1
    resumed, resumed_exp = _fit(tmp_path / "cut", resume_from=tmp_path / "cut" / "last.pt")
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    for a, b in zip(full.history, resumed.history):
        for key in a:
            if key not in ("epoch_time_s", "train/images_per_s"):
                assert a[key] == b[key], key
    for name in full_exp.graph.models:
        for (k, v1), v2 in zip(
            full_exp.graph.models[name].state_dict().items(),
            resumed_exp.graph.models[name].state_dict().values(),
        ):
            assert torch.equal(v1, v2), f"{name}.{k}"


def _env(tmp_path, data):
    env = dict(
        os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", ROBUSTFLOW_DATA=str(data)
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    return env


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_mlflow_run_id_resumes(shared_data, tmp_path):
    """Kill a run with SIGTERM mid-epoch; `mlflow run ... --run-id` continues it to the end."""
    overrides = f"EPOCHS = 3; {TINY}"
    env = _env(tmp_path, shared_data)
    cmd = [sys.executable, "-m", "pipeline.train", *cpu_args(overrides)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("epoch 1/3"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=300) == EXIT_TERMINATED, "".join(lines) + rest
    assert "Resume with --run-id" in rest
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.info.status == "KILLED"
    resume = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "run",
            str(REPO),
            "-e",
            "train",
            "--env-manager",
            "local",
            "--run-id",
            run.info.run_id,
            "-P",
            "gin=d2r_cag_cifar10,smoke",
            "-P",
            f"overrides={overrides}",
            "-P",
            "device=cpu",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert "resuming run" in resume.stderr
    run = mlflow.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "val/pgd20_acc")]
    assert steps == [1, 2, 3]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gin", "d2r_cag_cifar1O"], "unknown gin config"),
        (["--gin", "d2r_cag_cifar10,smoke", "--overrides", "ALPAH = 3"], "Did you mean ALPHA"),
        (["--gin", "d2r_cag_cifar10,smoke", "--overrides", "EPS = 8"], "eps=8 is out of range"),
        (
            ["--gin", "d2r_cag_cifar10,smoke", "--overrides", "DATA_DIR = '/nonexistent/robustflow'"],
            "ROBUSTFLOW_DATA",
        ),
        (["--gin", "d2r_cag_cifar10,smoke", "--device", "cuda:7"], None),
    ],
)
def test_bad_input_fails_before_any_run_is_created(args, message, mlflow_store, capsys, monkeypatch):
    if message is None:
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        message = "no GPU"
    monkeypatch.setenv("ROBUSTFLOW_DATA", "/nonexistent/robustflow")
    assert main(args) == EXIT_USAGE
    assert message in capsys.readouterr().err
    assert not Path("mlflow.db").exists(), "a run was created before the input was checked"


def test_missing_data_message_says_where_to_put_it(tmp_path, monkeypatch, capsys, mlflow_store):
    monkeypatch.setenv("ROBUSTFLOW_DATA", str(tmp_path / "nowhere"))
    assert main(["--gin", "d2r_cag_cifar10,smoke"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert str(tmp_path / "nowhere") in err and "cifar10" in err
