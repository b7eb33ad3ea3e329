"""What the MLflow pages of a trained and evaluated model tell a researcher (issue 17): the card leads with
the method, params hold every operative binding, no machine path is logged anywhere, an evaluation pins the
version it evaluated, datasets are logged as inputs, and the quick suite stays quick."""

import json
import os
import re
import tempfile
from pathlib import Path

import gin
import mlflow
import pytest
import torch
import torch.nn.functional as F

from components.eval.attacks import cw_margin_loss, pgd_eval_attack
from components.eval.report import EpsResult, EvalReport
from components.method import declared_method
from pipeline.config import GIN_DIR, available_configs, is_experiment, load_config
from pipeline.evaluate import main as evaluate
from pipeline.model_results import curve_points, decimals, eval_metrics, rounded
from pipeline.tracking import CONFIG_ARTIFACT, scrub, shorten
from pipeline.train import main as train
from tests.support import SMOKE, TINY, conv_bn_net

REPO = Path(__file__).resolve().parents[1]
ONE_EPOCH = "EPOCHS = 1; " + TINY
CARD_ORDER = [
    "## Method",
    "## Loss",
    "## Attacks",
    "## Selected checkpoint",
    "## Evaluation",
    "## Provenance",
    "## Operative config",
]


def _machine_paths(data: Path) -> list[str]:
    paths = {str(REPO), str(data), str(data.resolve()), os.getcwd(), tempfile.gettempdir(), str(Path.home())}
    return sorted(p for p in paths if len(p) > 1)


def _assert_no_path(where: str, text: str, paths: list[str]) -> None:
    for path in paths:
        assert not re.search(re.escape(path) + r"(?![\w.-])", text), f"{where} shows the machine path {path}"


def _logged_strings(client: mlflow.MlflowClient, name: str) -> dict[str, str]:
    """Every string robustflow or MLflow shows on the pages of ``name``: params, tags, descriptions, cards."""
    out = {}
    for run in mlflow.search_runs(search_all_experiments=True, output_format="list"):
        rid = run.info.run_id
        out.update({f"run {rid} param {k}": v for k, v in run.data.params.items()})
        out.update({f"run {rid} tag {k}": v for k, v in run.data.tags.items()})
        out[f"run {rid} name"] = run.info.run_name
        for d in run.inputs.dataset_inputs:
            out[f"run {rid} dataset {d.dataset.name}"] = d.dataset.source + d.dataset.profile
        if any(a.path == "model_card.md" for a in client.list_artifacts(rid)):
            out[f"run {rid} model_card.md"] = mlflow.artifacts.load_text(f"runs:/{rid}/model_card.md")
    model = client.get_registered_model(name)
    out["registered model description"] = model.description or ""
    for v in client.search_model_versions(f"name = '{name}'"):
        out[f"v{v.version} description"] = v.description or ""
        out.update({f"v{v.version} tag {k}": val for k, val in v.tags.items()})
        logged = client.get_logged_model(v.source.removeprefix("models:/"))
        out.update({f"logged model param {k}": val for k, val in logged.params.items()})
        out.update({f"logged model tag {k}": val for k, val in logged.tags.items()})
    return out


# ------------------------------------------------------------------------------------- the training run


def test_training_run_card_params_datasets_and_no_machine_path(shared_data, mlflow_store, monkeypatch):
    # MLflow samples system metrics every 10 s by default; this one-epoch run may end sooner (it did on CI).
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    assert train(["--gin", SMOKE, "--overrides", ONE_EPOCH, "--device", "cpu"]) == 0
    client = mlflow.MlflowClient()
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    version = client.get_model_version("d2r_cag_cifar10", "1")
    card = version.description

    # The card: one summary line first (the registered model's table shows it), then the sections in order.
    first = card.split("\n", 1)[0]
    assert first.startswith("D2R-CAG on cifar10 (target small_cnn, guide small_cnn): val PGD-20 "), first
    positions = [card.index(h) for h in CARD_ORDER]
    assert positions == sorted(positions), positions
    method = card[card.index("## Method") : card.index("## Loss")]
    assert "arXiv 2506.07056" in method and "dual regularization" in method
    loss = card[card.index("## Loss") : card.index("## Attacks")]
    # Every term with its weight (the smoke config keeps the code's weights) and the views it reads.
    for row in (
        "| `ce_guide` | 1 | CrossEntropy() | `guide(x)` |",
        "| `mse` | 1 | MSE(detach_target=False) | `target(x_adv)`, `guide(x)` |",
        "| `kl_gap` | 20 | KLGap(reduction='mean', target_eps=1e-05) | `guide(x)`, `target(x)` |",
        "| `kl_adv` | 30 | KL(detach_target=False, reduction='mean', target_eps=1e-05) | `guide(x)`, "
        "`target(x_adv)` |",
    ):
        assert row in loss, (row, loss)
    attacks = card[card.index("## Attacks") : card.index("## Selected")]
    assert "3 steps of 0.007 in the L-inf 0.031 ball" in attacks
    assert "soft_label_model='guide'" in attacks and "GaussianInit(clip=False, std=0.001)" in attacks
    assert "PGD-20, eps 8/255, step 2/255" in attacks
    assert "Epoch **1** of 1" in card and "Not evaluated yet" in card
    assert card == mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/model_card.md")
    assert len(card) <= 5000

    # One config artifact, previewable, that re-creates the run (MODEL_NAME and method_info included).
    assert {a.path for a in client.list_artifacts(run.info.run_id, "config")} == {CONFIG_ARTIFACT}
    config = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/{CONFIG_ARTIFACT}")
    assert "WeightedLoss.terms" in config and "MODEL_NAME = 'd2r_cag_cifar10'" in config
    assert "method_info.name = 'D2R-CAG'" in config

    # Params: every operative binding (defaults included), macros resolved.
    params = run.data.params
    for (scope, selector), bound in gin.config._OPERATIVE_CONFIG.items():
        if selector == "gin.macro":
            continue
        short = f"{scope + '/' if scope else ''}{selector.rsplit('.', 1)[-1]}"
        for param in bound:
            assert f"{short}.{param}" in params, f"{short}.{param}"
    for key, value in {
        "kl_adv/KL.detach_target": "False",
        "mse/MSE.detach_target": "False",
        "Trainer.grad_clip_norm": "None",
        "Trainer.lr_ramp_epochs": "0.0",
        "Trainer.amp": "auto",
        "pgd_eval_attack.early_stop": "True",
        "Trainer.epochs": "1",
        "PGDGenerator.steps": "3",
        "data.data_dir": "$ROBUSTFLOW_DATA",
    }.items():
        assert params[key] == value, (key, params[key])
    assert all(len(v) <= 250 or v.endswith(f"whole in {CONFIG_ARTIFACT}]") for v in params.values())

    # Datasets: one input per split, named with its size, digest of the exact examples, context = split.
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    assert {k: v.name for k, v in inputs.items()} == {
        "train": "cifar10 train (256 images)",
        "validation": "cifar10 validation (64 images)",
        "test": "cifar10 test (64 images)",
    }
    assert len({d.digest for d in inputs.values()}) == 3
    assert json.loads(inputs["test"].profile)["num_examples"] == 64
    assert json.loads(inputs["train"].source) == {
        "dataset": "cifar10",
        "location": "$ROBUSTFLOW_DATA/cifar10",
    }

    # The logged model carries no training or system metric: its metrics are evaluate's alone.
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert not logged.metrics
    assert any(k.startswith("system/") for k in run.data.metrics)  # they stay on the run

    for where, text in _logged_strings(client, "d2r_cag_cifar10").items():
        _assert_no_path(where, text, _machine_paths(shared_data))


# ------------------------------------------------------------------------------------- the evaluation run


def test_evaluation_pins_the_version_fills_the_card_and_scopes_only_results(
    shared_data, mlflow_store, capsys
):
    assert train(["--gin", SMOKE, "--overrides", ONE_EPOCH, "--device", "cpu"]) == 0
    capsys.readouterr()
    argv = ["--model-uri", "models:/d2r_cag_cifar10@champion", "--suite", "quick", "--n", "32"]
    assert evaluate([*argv, "--eps", "8/255,0.031", "--device", "cpu"]) == 0
    # load_model downloads without MLflow's progress bars when stderr is not a terminal (here: captured).
    assert "Downloading artifacts" not in capsys.readouterr().err
    client = mlflow.MlflowClient()
    (run,) = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.`robustflow.suite` = 'quick'", output_format="list"
    )
    assert run.info.run_name == "eval d2r_cag_cifar10/v1 quick"
    assert run.data.tags["robustflow.model_uri"] == "models:/d2r_cag_cifar10/1"
    assert run.data.tags["robustflow.model_uri_given"] == "models:/d2r_cag_cifar10@champion"
    assert run.data.params["eval.model_version"] == "1" == run.data.tags["robustflow.model_version"]
    assert run.data.params["eval.attack.pgd20"].startswith("PGD(eps=0.0313725, steps=20")

    # One name per quantity and sample size; clean accuracy once; k/32 rounded to 2 decimals.
    m = run.data.metrics
    assert set(m) == {
        "eval/flags",
        "eval/n32/clean_acc",
        "eval/n32/pgd20_acc",
        "eval/n32/cw20_acc",
        "eval/n32/worst_acc",
        "eval/n32/pgd20_acc_eps0.031",
        "eval/n32/cw20_acc_eps0.031",
        "eval/n32/worst_acc_eps0.031",
    }
    assert all(v == round(v, 2) for k, v in m.items())
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["cifar10 test (32 images)"]

    # On the model: the robustness results only, from this run.
    version = client.get_model_version("d2r_cag_cifar10", "1")
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    scoped = {metric.key: metric for metric in logged.metrics}
    assert set(scoped) == set(m) - {"eval/flags"}
    assert all(s.value == m[k] and s.run_id == run.info.run_id for k, s in scoped.items())
    # ... each linked to the split it measured (the logged model page's "Datasets used").
    (test_input,) = run.inputs.dataset_inputs
    assert {(s.dataset_name, s.dataset_digest) for s in scoped.values()} == {
        (test_input.dataset.name, test_input.dataset.digest)
    }
    assert version.tags["eval.pgd20_acc"] == f"{m['eval/n32/pgd20_acc']:g}"

    # The card: the summary line gains the evaluation, the table a row linking the run, sections in order.
    card = version.description
    assert card.split("\n", 1)[0].endswith(
        f"evaluated quick on 32 images: clean {100 * m['eval/n32/clean_acc']:.1f}%, "
        f"pgd20 {100 * m['eval/n32/pgd20_acc']:.1f}%, worst {100 * m['eval/n32/worst_acc']:.1f}%"
        + (
            ", 1 flag(s)"
            if m["eval/flags"] == 1
            else f", {m['eval/flags']:.0f} flag(s)"
            if m["eval/flags"]
            else ""
        )
    )
    evaluation = card[card.index("## Evaluation") : card.index("## Provenance")]
    assert "| `quick`, 32 images | 8/255 | clean **" in evaluation and run.info.run_id in evaluation
    assert "Not evaluated yet" not in card
    positions = [card.index(h) for h in CARD_ORDER]
    assert positions == sorted(positions)

    bench = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/evaluation/robustbench.json"))
    assert bench["name"] == "d2r_cag_cifar10/v1" and bench["method"] == "D2R-CAG"
    assert bench["architecture"] == "small_cnn" and bench["dataset"] == "cifar10" and bench["eps"] == "8/255"
    assert set(bench["attacks"]) == {"pgd20", "cw20"}

    # The quick suite draws no curve (the curve is a PGD-20 per radius: `paper` and `full` only).
    assert not any(a.path.endswith(".png") for a in client.list_artifacts(run.info.run_id, "evaluation"))

    for where, text in _logged_strings(client, "d2r_cag_cifar10").items():
        _assert_no_path(where, text, _machine_paths(shared_data))


# ------------------------------------------------------------------------------------- units


def test_every_method_fragment_declares_its_name_paper_and_summary():
    experiments = [n for n in available_configs() if is_experiment(GIN_DIR / f"{n}.gin")]
    seen = {}
    for name in experiments:
        load_config(name)
        method = declared_method()
        assert method is not None, f"{name}: its method fragment binds no method_info (components/method.py)"
        assert method.name and method.paper and method.summary
        seen[name] = method.name
    assert seen["d2r_cag_cifar10"] == "D2R-CAG" and seen["d2r_cifar10"] == "D2R (without CAG)"
    assert seen["mart_cifar10"] == "MART" and seen["trades_cifar10"] == "TRADES"


def test_method_info_rejects_an_empty_field():
    from components.method import method_info

    with pytest.raises(ValueError, match="method_info.summary"):
        method_info(name="X", paper="Y", summary=" ")


def test_scrub_replaces_whole_paths_only(monkeypatch, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("ROBUSTFLOW_DATA", str(data))
    assert scrub(f"{data}/cifar10") == "$ROBUSTFLOW_DATA/cifar10"
    assert scrub(f"file://{REPO}") == "<repo>"
    assert scrub(f"{REPO}/pipeline/train.py") == "<repo>/pipeline/train.py"
    monkeypatch.chdir(tmp_path)
    assert scrub(f"{Path.home()}/.cache/x") == "~/.cache/x"
    assert scrub(f"{tmp_path}/outputs") == "<cwd>/outputs"
    assert scrub("d2r_cag_cifar10,smoke") == "d2r_cag_cifar10,smoke"
    assert scrub(f"{tempfile.gettempdir()}foo") == f"{tempfile.gettempdir()}foo"  # not a path under it


def test_long_params_are_shortened_visibly():
    assert shorten("x" * 10) == "x" * 10
    long = shorten("y" * 1000)
    assert long.startswith("y" * 250) and long.endswith(f"[1000 chars; whole in {CONFIG_ARTIFACT}]")


def test_values_are_rounded_to_what_the_sample_size_resolves():
    assert [decimals(n) for n in (1, 10, 32, 256, 1000, 1001, 10000)] == [0, 1, 2, 3, 3, 4, 4]
    assert rounded(0.23199999332427979, 1000) == 0.232
    assert rounded(7 / 32, 32) == 0.22


def _report(results: list[EpsResult]) -> EvalReport:
    return EvalReport(results=results, attacks={"pgd20": "PGD", "cw20": "CW"}, flags=[], n_examples=1000)


def test_clean_accuracy_is_one_metric_not_one_per_radius():
    report = _report(
        [
            EpsResult(8 / 255, 1000, 0.5, {"pgd20": 0.2, "cw20": 0.19}, 0.18),
            EpsResult(0.031, 1000, 0.5, {"pgd20": 0.21, "cw20": 0.2}, 0.19),
        ]
    )
    metrics = eval_metrics(report, 8 / 255)
    assert [k for k in metrics if "clean" in k] == ["eval/n1000/clean_acc"]
    assert metrics["eval/n1000/worst_acc_eps0.031"] == 0.19


def test_the_curve_holds_only_series_measured_at_every_radius():
    # C&W ran at 8/255 only: no C&W curve, and no worst-case curve (it would mix attack sets).
    mixed = _report(
        [
            EpsResult(4 / 255, 1000, 0.5, {"pgd20": 0.35}, 0.35),
            EpsResult(8 / 255, 1000, 0.5, {"pgd20": 0.2, "cw20": 0.19}, 0.18),
            EpsResult(10 / 255, 1000, 0.5, {"pgd20": 0.15}, 0.15),
        ]
    )
    radii = (4 / 255, 8 / 255, 10 / 255)
    assert curve_points(mixed, radii) == {"eval/n1000/pgd20_acc_vs_eps": [(4, 0.35), (8, 0.2), (10, 0.15)]}
    same = _report([EpsResult(e, 1000, 0.5, {"pgd20": 0.3 - e}, 0.3 - e) for e in radii])
    assert set(curve_points(same, radii)) == {"eval/n1000/pgd20_acc_vs_eps", "eval/n1000/worst_acc_vs_eps"}
    assert curve_points(same, (8 / 255,)) == {}  # one radius is a point, not a curve


def _full_batch_pgd(model, x, y, eps, step_size, steps, loss):
    # The authors' loop (METHODS.md 1.5): every step on the whole batch, moving the examples still correct.
    loss_fn = {"ce": lambda z, t: F.cross_entropy(z.float(), t), "cw": cw_margin_loss}[loss]
    delta = torch.empty_like(x).uniform_(-eps, eps)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        logits = model(x + delta)
        active = logits.argmax(1) == y
        (grad,) = torch.autograd.grad(loss_fn(logits, y), delta)
        stepped = ((delta.detach() + step_size * grad.sign()).clamp(-eps, eps) + x).clamp(0, 1) - x
        delta = torch.where(active[:, None, None, None], stepped, delta.detach())
        if not active.any():
            break
    return (x + delta).detach()


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_pgd_runs_only_the_examples_still_correct_and_finds_the_same_examples(loss):
    # The quick suite is quick because each step runs the examples not yet fooled; the adversarial
    # examples are those of the full-batch loop.
    model = conv_bn_net(seed=3).eval()
    torch.manual_seed(0)
    for _ in range(3):  # BatchNorm statistics that are not the identity
        model.train()(torch.rand(64, 3, 8, 8))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = torch.rand(128, 3, 8, 8), torch.randint(0, 10, (128,))
    sizes: list[int] = []
    model.register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
    torch.manual_seed(1)
    fast = pgd_eval_attack(model, x, y, eps=8 / 255, step_size=2 / 255, steps=20, loss=loss)
    torch.manual_seed(1)
    reference = _full_batch_pgd(model, x, y, 8 / 255, 2 / 255, 20, loss)
    assert torch.equal(model(fast).argmax(1), model(reference).argmax(1))
    assert torch.allclose(fast, reference, atol=1e-6)
    assert sizes[0] == 128 and sizes[1] < 128  # fooled examples drop out after the first step
