"""The evaluation suite: per-eps clean, per-attack and worst-case accuracy; named suites; report formats.

The worst case is per example: an example is robust at an eps only if it is correct clean and after every
attack run at that eps, so the worst-case accuracy is never above any single attack's.
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from support import SHAPE, synthetic, train_mlp
from torch import nn

from components.eval.attacks import CW, EPS_8_255, PGD, STEP_2_255
from components.eval.autoattack import AutoAttack
from components.eval.report import EpsResult, EvalReport, format_eps, metric_suffix
from components.eval.robustness import evaluate_robustness
from components.eval.suite import CURVE_EPS, EPS_0031, SUITE_NAMES, get_suite

# MLflow accepts only these characters in metric names (no '@').
MLFLOW_NAME = re.compile(r"^[\w\-. :/]+$")


# Tiny tensors: intra-op threads only add contention when other jobs share the CPU.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mlp():
    return train_mlp()


def loader(n: int = 48, batch: int = 16, seed: int = 2):
    """Batches like components.data.DeviceLoader's: (x, y, index)."""
    x, y = synthetic(n, seed)
    return [(x[i : i + batch], y[i : i + batch], torch.arange(i, i + batch)) for i in range(0, n, batch)]


@pytest.fixture(scope="module")
def full_report(mlp):
    """The ``full`` suite (paper attacks + AutoAttack dev + the PGD-20 curve) at 8/255 and 0.031."""
    return get_suite("full", with_0031=True).run(mlp, loader(n=16, batch=16), progress=False)


# ------------------------------------------------------------------------------------- worst case


def test_worst_case_is_never_above_any_single_attack_at_any_eps(mlp):
    attacks = {
        "pgd10": PGD(EPS_8_255, steps=10),
        "pgd50": PGD(EPS_8_255, steps=50),
        "cw20": CW(EPS_8_255),
        "aa_dev": AutoAttack(EPS_8_255, version="dev"),
    }
    report = evaluate_robustness(
        mlp, loader(n=32), attacks, eps_list=(4 / 255, EPS_8_255, 12 / 255), progress=False
    )
    assert [r.eps for r in report.results] == [4 / 255, EPS_8_255, 12 / 255]
    for r in report.results:
        assert set(r.acc) == set(attacks) and r.n == 32
        assert r.worst_acc <= min(r.acc.values()) and r.worst_acc <= r.clean_acc
        # PGD-10 and PGD-50 share their random start, so PGD-50 fools a superset of PGD-10's examples.
        assert r.acc["pgd50"] <= r.acc["pgd10"]
    accs = [r.worst_acc for r in report.results]
    assert accs[0] > accs[1] > accs[2], "a larger eps leaves fewer robust examples on this model"
    assert report.flags == []


class ThresholdModel(nn.Module):
    """Class 1 iff the first pixel is above 0.5: each example's fate depends on that one pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = 100 * (x[:, 0, 0, 0] - 0.5)
        return torch.stack([torch.zeros_like(z), z], dim=1)


class FoolOn:
    """An oracle attack that fools exactly the examples selected by ``mask`` (first pixel 0.51 -> 0.49)."""

    white_box = True

    def __init__(self, mask: list[int], eps: float = EPS_8_255) -> None:
        self.mask, self.eps = torch.tensor(mask, dtype=torch.bool), eps

    def with_eps(self, eps: float, scale_step: bool = False) -> FoolOn:
        return FoolOn(self.mask.int().tolist(), eps)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = x.clone()
        x_adv[self.mask, 0, 0, 0] = 0.49
        return x_adv


def test_worst_case_is_per_example_not_the_minimum_over_attacks():
    x = torch.full((8, *SHAPE), 0.5)
    x[:, 0, 0, 0] = 0.51
    y = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0])  # the last example is wrong from the start
    attacks = {"a": FoolOn([1, 1, 0, 0, 0, 0, 0, 0]), "b": FoolOn([0, 1, 1, 0, 0, 0, 0, 0])}
    report = evaluate_robustness(ThresholdModel(), [(x, y)], attacks, progress=False, checks=False)
    r = report.result(EPS_8_255)
    assert r.clean_acc == 7 / 8
    assert r.acc == {"a": 5 / 8, "b": 5 / 8}
    # Robust = correct clean and after a and after b: examples 3, 4, 5, 6 only.
    assert r.worst_acc == 4 / 8 < min(r.acc.values())


# ------------------------------------------------------------------------------------- named suites


def test_suite_contents():
    quick = get_suite("quick")
    assert list(quick.attacks) == ["pgd20", "cw20"] and quick.eps_list == (EPS_8_255,)
    assert quick.max_examples == 1000 and quick.curve_eps == ()
    assert isinstance(quick.attacks["cw20"], CW) and quick.attacks["pgd20"].steps == 20

    paper = get_suite("paper")
    assert list(paper.attacks) == ["pgd10", "pgd20", "pgd50", "cw20", "aa"] and paper.max_examples is None
    for name, steps in [("pgd10", 10), ("pgd20", 20), ("pgd50", 50), ("cw20", 20)]:
        attack = paper.attacks[name]
        assert (attack.eps, attack.steps, attack.step_size, attack.restarts) == (
            EPS_8_255,
            steps,
            STEP_2_255,
            1,
        )
        assert attack.loss == ("cw" if name == "cw20" else "ce")
    aa = paper.attacks["aa"]
    assert (aa.version, aa.batch_size, aa.stages) == (
        "standard",
        256,
        ("apgd-ce", "apgd-t", "fab-t", "square"),
    )
    assert paper.eps_list == (EPS_8_255,) and get_suite("paper", with_0031=True).eps_list == (
        EPS_8_255,
        0.031,
    )

    full = get_suite("full")
    assert list(full.attacks) == [*paper.attacks, "aa_dev"] and full.attacks["aa_dev"].version == "dev"
    assert full.curve_attacks == ("pgd20",)
    assert [round(e * 255) for e in full.curve_eps] == [
        2,
        4,
        6,
        8,
        10,
        12,
        14,
        16,
    ] and full.curve_eps == CURVE_EPS

    assert SUITE_NAMES == ("quick", "paper", "full")
    with pytest.raises(ValueError, match="unknown evaluation suite 'fast'"):
        get_suite("fast")


def test_quick_suite_on_a_subset(mlp):
    report = get_suite("quick", max_examples=20).run(mlp, loader(), progress=False)
    assert report.n_examples == 20 and report.suite == "quick" and report.flags == []
    assert set(report.to_metrics()) == {
        "test/clean_acc",
        "test/pgd20_acc",
        "test/cw20_acc",
        "test/worst_acc",
        "test/eval_flags",
    }


def test_full_suite_reports_every_attack_and_the_curve(full_report):
    primary = full_report.result(EPS_8_255)
    assert list(primary.acc) == ["pgd10", "pgd20", "pgd50", "cw20", "aa", "aa_dev"]
    assert list(primary.stages["aa"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert list(primary.stages["aa_dev"]) == ["apgd-ce", "apgd-t"]
    assert primary.worst_acc <= min(primary.acc.values())
    assert primary.acc["aa"] == primary.stages["aa"]["square"]
    assert set(full_report.result(EPS_0031).acc) == set(primary.acc)
    # The curve: PGD-20 at 2/255 ... 16/255 (8/255 from the headline run), clean at every radius.
    curve = full_report.accuracy_vs_eps()
    eps_pgd20 = [e for e, _ in curve["pgd20"]]
    assert eps_pgd20 == sorted({*CURVE_EPS, EPS_0031}) and len(curve["clean"]) == len(eps_pgd20)
    assert curve["pgd20"][0][1] == 1.0 and curve["pgd20"][-1][1] == 0.0
    assert [e for e, _ in curve["aa"]] == [EPS_0031, EPS_8_255]
    assert full_report.flags == []


# ------------------------------------------------------------------------------------- report formats


def test_metrics_names_and_values(full_report):
    metrics = full_report.to_metrics()
    primary = full_report.result(EPS_8_255)
    for name in ["clean", "pgd10", "pgd20", "pgd50", "cw20", "aa", "aa_dev", "worst"]:
        assert f"test/{name}_acc" in metrics and f"test/{name}_acc_eps0.031" in metrics
    assert metrics["test/aa_acc"] == primary.acc["aa"] and metrics["test/worst_acc"] == primary.worst_acc
    assert metrics["test/aa_apgd-t_acc"] == primary.stages["aa"]["apgd-t"]
    assert metrics["test/pgd20_acc_eps0.06275"] == full_report.result(16 / 255).acc["pgd20"]
    assert "test/pgd10_acc_eps0.06275" not in metrics, "the curve runs PGD-20 only"
    assert metrics["test/eval_flags"] == 0.0
    assert all(MLFLOW_NAME.match(k) for k in metrics), [k for k in metrics if not MLFLOW_NAME.match(k)]
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert set(full_report.to_metrics(prefix="")) == {k.removeprefix("test/") for k in metrics}


def test_eps_labels_and_suffixes():
    assert format_eps(8 / 255) == "8/255" and format_eps(0.031) == "0.031" and format_eps(0.5) == "0.5"
    assert metric_suffix(8 / 255) == "" and metric_suffix(0.031) == "_eps0.031"
    assert metric_suffix(2 / 255) == "_eps0.007843" and metric_suffix(0.3, primary_eps=0.3) == ""


def test_markdown_contains_the_metrics(full_report):
    md = full_report.to_markdown()
    primary = full_report.result(EPS_8_255)
    assert "| eps | clean | pgd10 | pgd20 | pgd50 | cw20 | aa | aa_dev | worst |" in md
    row = next(line for line in md.splitlines() if line.startswith("| 8/255 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"{100 * primary.clean_acc:.2f}" and cells[6] == f"{100 * primary.acc['aa']:.2f}"
    assert cells[-1] == f"{100 * primary.worst_acc:.2f}"
    assert "| 0.031 |" in md and "| 16/255 |" in md and "apgd-ce" in md and "square" in md
    assert "AutoAttack(eps=0.0313725, version='standard'" in md and "No evaluation flags raised." in md


def test_markdown_and_json_show_flags():
    result = EpsResult(eps=EPS_8_255, n=10, clean_acc=0.9, acc={"pgd20": 0.5}, worst_acc=0.5)
    report = EvalReport([result], {"pgd20": "PGD(...)"}, ["[randomized] two forwards differ"], n_examples=10)
    md = report.to_markdown()
    assert "1 flag(s)" in md and "- [randomized] two forwards differ" in md
    assert "| 8/255 | 90.00 | 50.00 | 50.00 |" in md
    assert report.to_robustbench_json()["unreliable"] is True
    assert report.to_dict()["flags"] == ["[randomized] two forwards differ"]
    assert report.to_metrics()["test/eval_flags"] == 1.0


def test_robustbench_json(full_report):
    primary = full_report.result(EPS_8_255)
    entry = full_report.to_robustbench_json(name="D2R-CAG", architecture="SmallMLP", dataset="synthetic")
    assert entry["eps"] == "8/255" and entry["name"] == "D2R-CAG" and entry["dataset"] == "synthetic"
    assert entry["clean_acc"] == f"{100 * primary.clean_acc:.2f}"
    assert entry["autoattack_acc"] == f"{100 * primary.acc['aa']:.2f}" and entry["unreliable"] is False
    assert {"link", "authors", "additional_data", "number_forward_passes", "venue", "reported"} <= set(entry)
    assert full_report.to_robustbench_json(eps=EPS_0031)["eps"] == "0.031"
    json.dumps(entry)
    full = json.loads(json.dumps(full_report.to_dict()))
    assert full["results"][0]["eps_label"] == "2/255" and full["attacks"]["aa"].startswith("AutoAttack(")


def test_robustbench_json_without_autoattack(mlp):
    report = get_suite("quick", max_examples=8).run(mlp, loader(), progress=False)
    entry = report.to_robustbench_json()
    assert entry["autoattack_acc"] is None and "AutoAttack was not run" in entry["footnote"]
    assert entry["worst_case_acc"] == f"{100 * report.primary.worst_acc:.2f}"


# ------------------------------------------------------------------------------------- behaviour


def conv_bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10)
    )


def test_the_model_rng_and_modes_are_left_as_they_were():
    model = conv_bn_net().train()
    modes: list[bool] = []
    model[1].register_forward_hook(lambda m, i, o: modes.append(m.training))
    stats = model[1].running_mean.clone()
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    evaluate_robustness(model, loader(n=16), {"pgd10": PGD(EPS_8_255, steps=10)}, progress=False)
    assert modes and set(modes) == {False}, "evaluated in eval mode"
    assert all(m.training for m in model.modules()), "and put back in train mode"
    assert torch.equal(model[1].running_mean, stats)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_fp32_even_under_an_outer_autocast_and_reproducible(mlp):
    attacks = {"pgd20": PGD(EPS_8_255), "cw20": CW(EPS_8_255)}
    plain = evaluate_robustness(mlp, loader(), attacks, progress=False).to_metrics()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = evaluate_robustness(mlp, loader(), attacks, progress=False).to_metrics()
    assert under_amp == plain
    other_seed = evaluate_robustness(mlp, loader(), attacks, progress=False, seed=1).to_metrics()
    assert other_seed["test/clean_acc"] == plain["test/clean_acc"]


def test_progress_bar_goes_to_stderr_only_on_a_terminal(mlp, capsys, monkeypatch):
    evaluate_robustness(mlp, loader(n=16), {"pgd10": PGD(EPS_8_255, steps=10)}, progress=True)
    assert capsys.readouterr() == ("", "")  # stderr is not a terminal here: the bar turns itself off
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    evaluate_robustness(mlp, loader(n=16), {"pgd10": PGD(EPS_8_255, steps=10)}, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "16/16" in err
    evaluate_robustness(mlp, loader(n=16), {"pgd10": PGD(EPS_8_255, steps=10)}, progress=False)
    assert capsys.readouterr() == ("", "")


def test_bad_inputs_raise(mlp):
    with pytest.raises(ValueError, match="yielded no examples"):
        evaluate_robustness(mlp, [], {"pgd10": PGD(EPS_8_255, steps=10)}, progress=False)
    with pytest.raises(ValueError, match="no attacks"):
        evaluate_robustness(mlp, loader(), {}, progress=False)
    with pytest.raises(ValueError, match=r"curve_attacks \['pgd50'\]"):
        evaluate_robustness(mlp, loader(), {"pgd20": PGD()}, curve_eps=(4 / 255,), curve_attacks=("pgd50",))


def test_a_plain_callable_attack_runs_at_its_own_eps_only(mlp):
    def identity(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x.clone()

    identity.eps = EPS_8_255
    report = evaluate_robustness(mlp, loader(n=16), {"none": identity}, progress=False, checks=False)
    assert report.result(EPS_8_255).acc["none"] == report.result(EPS_8_255).clean_acc
    with pytest.raises(TypeError, match="no with_eps"):
        evaluate_robustness(mlp, loader(n=16), {"none": identity}, eps_list=(4 / 255,), progress=False)
