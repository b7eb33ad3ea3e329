"""The model registry: a version per training run, the champion alias on the most robust one."""

import os
import subprocess
import sys
import textwrap

import mlflow
import pytest

from components.backbones import build_backbone
from pipeline.registry import CHAMPION, SCORE_TAG, log_model, register, run_of, settle_champion
from pipeline.train import main

TINY = (
    "EPOCHS = 1; DataModule.train_size = 128; DataModule.val_size = 64; DataModule.test_size = 64; "
    "BATCH_SIZE = 64; Trainer.progress = False"
)


def _register_dummy(name, score):
    with mlflow.start_run() as run:
        uri = log_model(build_backbone("small_cnn", num_classes=10, width=8), (3, 32, 32))
        return register(run.info.run_id, name, uri, score, card=f"score {score}")


def champion(name):
    return str(mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION).version)


def test_champion_moves_only_when_a_new_version_is_strictly_better(mlflow_store):
    assert _register_dummy("m", 0.30).champion and champion("m") == "1"
    assert not _register_dummy("m", 0.20).champion and champion("m") == "1"  # worse: stays
    assert _register_dummy("m", 0.50).champion and champion("m") == "3"  # better: moves
    assert not _register_dummy("m", 0.50).champion and champion("m") == "3"  # a tie keeps the older one
    versions = mlflow.MlflowClient().search_model_versions("name = 'm'")
    assert sorted(float(v.tags[SCORE_TAG]) for v in versions) == [0.2, 0.3, 0.5, 0.5]


def test_settle_repairs_an_alias_left_on_a_worse_version(mlflow_store):
    """Two workers registering at once may race; settling re-reads every version's score."""
    _register_dummy("race", 0.4)
    _register_dummy("race", 0.1)
    mlflow.MlflowClient().set_registered_model_alias("race", CHAMPION, "2")  # a lost race
    assert settle_champion("race") == "1" and champion("race") == "1"


def test_run_of_resolves_every_uri_form(mlflow_store):
    reg = _register_dummy("u", 0.1)
    run_id = mlflow.MlflowClient().get_model_version("u", reg.version).run_id
    assert run_of("models:/u@champion") == run_of("models:/u/1") == run_of(f"runs:/{run_id}/model") == run_id
    with pytest.raises(ValueError, match="unsupported model URI"):
        run_of("s3://bucket/model")


def test_trained_model_loads_in_a_fresh_process_from_another_directory(shared_data, mlflow_store, tmp_path):
    assert main(["--gin", "d2r_cag_cifar10,smoke", "--overrides", TINY]) == 0
    assert champion("d2r_cag_cifar10") == "1"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = textwrap.dedent(
        """
        import mlflow, torch
        from pipeline.registry import load_model

        exported = mlflow.pytorch.load_model("models:/d2r_cag_cifar10@champion")
        real = load_model("models:/d2r_cag_cifar10@champion")
        assert isinstance(real, torch.nn.Module) and not real.training
        real.eval()
        x = torch.rand(5, 3, 32, 32, requires_grad=True)
        loss = torch.nn.functional.cross_entropy(real(x), torch.zeros(5, dtype=torch.long))
        (grad,) = torch.autograd.grad(loss, x)   # attackable: input gradients flow
        assert grad.abs().sum() > 0
        assert torch.allclose(exported(x), real(x), atol=1e-5)
        card = mlflow.MlflowClient().get_model_version_by_alias("d2r_cag_cifar10", "champion").description
        assert "val" in card and "SoftLabelKLObjective" in card
        print("LOADED", type(real).__name__)
        """
    )
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_store)
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED SmallCNN" in out.stdout
