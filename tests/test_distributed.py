"""Data-parallel training: two gloo processes on CPU match one process with the same global batch."""

import os
import subprocess
import sys

import mlflow
import pytest
import torch

from components.checkpoint import load_checkpoint

# Per-example independence makes the comparison exact up to float summation order: no BN (its batch
# statistics are per rank, as under the authors' DataParallel), no random attack start, no augmentation
# (crops are drawn per rank), and BETA = 0 (|kl1 - kl2| of a batch mean is not a mean of per-rank terms).
COMMON = (
    "EPOCHS = 2; DataModule.train_size = 256; DataModule.val_size = 64; DataModule.test_size = 64; "
    "Trainer.progress = False; DataModule.augment = False; BETA = 0.0; PGDGenerator.init = @ZeroInit(); "
    "target/build_backbone.norm = False; guide/build_backbone.norm = False; target/build_backbone.width = 8; "
    "guide/build_backbone.width = 8"
)


def _train(tmp_path, name, batch, nproc, data):
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / name / 'mlflow.db'}",
        ROBUSTFLOW_DATA=str(data),
    )
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    env["OMP_NUM_THREADS"] = "1"
    (tmp_path / name).mkdir()
    cmd = [sys.executable, "-m", "pipeline.train", "--gin", "d2r_cag_cifar10,smoke", "--device", "cpu"]
    cmd += ["--overrides", f"{COMMON}; BATCH_SIZE = {batch}", "--nproc", str(nproc)]
    out = subprocess.run(cmd, cwd=tmp_path / name, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1, "rank 0 alone writes one MLflow run"
    run = runs[0]
    history = {
        key: [m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, key)]
        for key in ("train/loss", "train/loss/kl_adv", "train/clean_acc", "train/adv_acc", "val/pgd20_acc")
    }
    # A FINISHED run's local checkpoints are removed; the run's artifact is the same file.
    last = load_checkpoint(
        mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/checkpoints/last.pt")
    )
    return history, last


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(shared_data, tmp_path):
    single, single_ckpt = _train(tmp_path, "single", batch=64, nproc=1, data=shared_data)
    ddp, ddp_ckpt = _train(tmp_path, "ddp", batch=32, nproc=2, data=shared_data)
    for key, values in single.items():
        assert ddp[key] == pytest.approx(values, rel=1e-4, abs=1e-5), key
    assert len(ddp_ckpt["ranks"]) == 2 and ddp_ckpt["epoch"] == 2
    for name, state in single_ckpt["models"].items():
        for key, value in state.items():
            assert torch.allclose(ddp_ckpt["models"][name][key], value, rtol=1e-4, atol=1e-5), f"{name}.{key}"
