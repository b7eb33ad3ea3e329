"""The model registry: a version per training run, the champion alias on the most robust one."""

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import mlflow
import pytest

from components.backbones import build_backbone
from components.checkpoint import save_checkpoint
from pipeline.registry import (
    CHAMPION,
    REFUSED_TAG,
    SCORE_TAG,
    log_model,
    register,
    run_of,
    settle_champion,
)


def _dummy_run(losses=(2.3, 1.9), weight_fill=None, status="FINISHED"):
    """A finished run shaped like a training run: loss history, a best checkpoint, a logged model."""
    model = build_backbone("small_cnn", num_classes=10, width=8)
    with mlflow.start_run() as run, tempfile.TemporaryDirectory() as tmp:
        for step, loss in enumerate(losses, 1):
            mlflow.log_metric("train/loss", loss, step=step)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if weight_fill is not None:
            next(v for v in state.values() if v.is_floating_point()).fill_(weight_fill)
        save_checkpoint({"model": state, "epoch": len(losses), "metrics": {}}, Path(tmp) / "best.pt")
        mlflow.log_artifact(str(Path(tmp) / "best.pt"), "checkpoints")
        uri = log_model(model, (3, 32, 32))
    if status != "FINISHED":
        mlflow.MlflowClient().set_terminated(run.info.run_id, status)
    return run.info.run_id, uri


def _register_dummy(name, score, **run):
    run_id, uri = _dummy_run(**run)
    return register(run_id, name, uri, score, card=f"score {score}")


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


@pytest.mark.parametrize(
    ("run", "why"),
    [
        ({"losses": (2.3, float("nan"))}, "non-finite training loss (train/loss@step 2 = nan)"),
        ({"losses": (2.3, float("inf"))}, "non-finite training loss (train/loss@step 2 = inf)"),
        ({"weight_fill": float("nan")}, "best checkpoint holds non-finite weights"),
        ({"status": "KILLED"}, "did not finish (status KILLED)"),
        ({"status": "FAILED"}, "did not finish (status FAILED)"),
    ],
)
def test_an_untrustworthy_run_is_never_registered_nor_champion(mlflow_store, capsys, run, why):
    assert _register_dummy("t", 0.30).champion  # a sound version 1 holds the alias
    run_id, uri = _dummy_run(**run)
    assert register(run_id, "t", uri, 0.99, card="better on paper") is None  # far better score, refused
    assert why in capsys.readouterr().err
    assert why in mlflow.get_run(run_id).data.tags[REFUSED_TAG]
    assert [str(v.version) for v in mlflow.MlflowClient().search_model_versions("name = 't'")] == ["1"]
    assert champion("t") == "1"


def test_a_non_finite_score_is_refused(mlflow_store, capsys):
    assert _register_dummy("s", float("nan")) is None
    assert "selection score is nan" in capsys.readouterr().err


def test_champion_never_moves_to_a_version_registered_around_the_checks(mlflow_store):
    _register_dummy("side", 0.30)
    run_id, uri = _dummy_run(losses=(float("nan"),))
    # Registered by hand (UI, client): no checks tag, so it may never hold the alias, whatever its score.
    mlflow.MlflowClient().create_model_version("side", uri, run_id=run_id, tags={SCORE_TAG: "0.99"})
    assert settle_champion("side") == "1" and champion("side") == "1"


def test_a_version_is_linked_to_its_logged_model(mlflow_store):
    run_id, uri = _dummy_run()
    reg = register(run_id, "linked", uri, 0.3, card="the card")
    client = mlflow.MlflowClient()
    version = client.get_model_version("linked", reg.version)
    model_id = uri.removeprefix("models:/")
    # The SQL store keeps the link as the version's source (it has no model_id column).
    assert version.source == uri and version.run_id == run_id and version.description == "the card"
    # The logged model's page lists the version ("Model versions"), which create_model_version never set.
    links = json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"])
    assert [(v["name"], str(v["version"])) for v in links] == [("linked", "1")]
    assert "pipeline.registry.load_model" in client.get_registered_model("linked").description


def test_run_of_resolves_every_uri_form(mlflow_store):
    reg = _register_dummy("u", 0.1)
    run_id = mlflow.MlflowClient().get_model_version("u", reg.version).run_id
    assert run_of("models:/u@champion") == run_of("models:/u/1") == run_of(f"runs:/{run_id}/model") == run_id
    with pytest.raises(ValueError, match="unsupported model URI"):
        run_of("s3://bucket/model")


@pytest.mark.slow
def test_trained_model_loads_in_a_fresh_process_from_another_directory(trained_store, tmp_path):
    assert champion("d2r_cag_cifar10") == "1"  # the session's trained model
    client = mlflow.MlflowClient()
    source = client.get_model_version("d2r_cag_cifar10", "1").source
    logged = client.get_logged_model(source.removeprefix("models:/"))
    assert logged.name == "d2r_cag_cifar10"  # named after MODEL_NAME, not "model"
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
        try:  # torch's own limit on exported programs, documented in the README and on the model page
            exported.eval()
        except NotImplementedError:
            print("EXPORTED_EVAL_RAISES")
        card = mlflow.MlflowClient().get_model_version_by_alias("d2r_cag_cifar10", "champion").description
        assert "val" in card and "SoftLabelKLObjective" in card
        print("LOADED", type(real).__name__)
        """
    )
    repo = str(Path(__file__).resolve().parents[1])  # the robustflow code the loader imports
    env = dict(os.environ, MLFLOW_TRACKING_URI=trained_store.uri, PYTHONPATH=repo)
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED SmallCNN" in out.stdout
    # If this fails, mlflow.pytorch.load_model now gives a module whose .eval() works: update the README.
    assert "EXPORTED_EVAL_RAISES" in out.stdout


def test_evaluate_finds_the_logged_model_and_version_behind_every_uri_form(mlflow_store):
    from pipeline.model_results import evaluated_model

    _register_dummy("e", 0.2)
    run_id, uri = _dummy_run()
    reg = register(run_id, "e", uri, 0.4, card="c")
    model_id = uri.removeprefix("models:/")
    for form in ("models:/e@champion", f"models:/e/{reg.version}", f"runs:/{run_id}/model"):
        found = evaluated_model(form, run_id)
        assert found.model_id == model_id and str(found.version.version) == reg.version == "2", form
        assert found.pinned_uri == "models:/e/2" and found.label == "e/v2", form
    lone, lone_uri = _dummy_run()  # logged but never registered: the model, no version
    found = evaluated_model(f"runs:/{lone}/model", lone)
    assert (found.model_id, found.version) == (lone_uri.removeprefix("models:/"), None)
    assert found.pinned_uri == f"runs:/{lone}/model"
