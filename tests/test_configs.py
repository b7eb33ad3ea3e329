"""Every experiment config parses, builds and trains a step; the paper configs carry METHODS.md's numbers."""

import re

import pytest
import torch

from components.attacks import GaussianInit, RandomSignInit, UniformInit
from components.experiment import experiment
from components.losses import KL, MSE, CrossEntropy, KLGap
from pipeline.config import GIN_DIR, ConfigError, available_configs, is_experiment, load_config

# Profiles (smoke, stable, ...) only adjust an experiment and cannot be loaded alone.
EXPERIMENTS = [name for name in available_configs() if is_experiment(GIN_DIR / f"{name}.gin")]


def test_the_listed_experiments_exist():
    assert set(EXPERIMENTS) >= {
        "d2r_cag_cifar10",
        "d2r_cag_cifar100",
        "d2r_cag_tinyimagenet",
        "d2r_cifar10",
        "lbgat_cifar10",
        "lbgat_cifar100",
        "trades_cifar10",
        "pgd_at_cifar10",
        "regmix_cifar10",
        "regmix_cifar100",
        "pgd2_mse_cifar10",
        "mart_cifar10",
        "pgd_at_awp_cifar10",
        "pgd_at_awp_cifar100",
        "trades_awp_cifar10",
        "rat_trades_cifar10",
        "rat_trades_cifar100",
        "pgd_at_cifar100",
        "trades_cifar100",
        "pgd_at_tinyimagenet",
        "trades_tinyimagenet",
        "lbgat_tinyimagenet",
        "d2r_cag_tinyimagenet_preact",
    }


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_takes_one_training_step_under_smoke(name):
    load_config(f"{name},smoke")
    exp = experiment()
    size = 64 if "tinyimagenet" in name else 32
    num_classes = exp.graph.target.state_dict()[
        [k for k in exp.graph.target.state_dict() if k.endswith("weight")][-1]
    ].shape[0]
    torch.manual_seed(0)
    x, y = torch.rand(4, 3, size, size), torch.randint(0, num_classes, (4,))
    exp.graph.train()
    before = {n: [p.detach().clone() for p in m.parameters()] for n, m in exp.graph.models.items()}
    optimizer = exp.trainer.optimizer_fn(exp.graph.models)
    # The trainer's step: graph.step, backward, optimizer step, then finish_step (restores AWP's weights).
    out = exp.trainer.train_step(exp.graph, optimizer, x, y, torch.device("cpu"))
    assert torch.isfinite(out["loss"])
    assert set(out["parts"]) == set(exp.graph.loss.terms)
    for n, m in exp.graph.models.items():
        changed = any(not torch.equal(a, b) for a, b in zip(before[n], m.parameters()))
        assert changed, f"{name}: model {n} did not train"


def test_smoke_changes_sizes_only_not_terms_or_attacks():
    load_config("d2r_cag_cifar10")
    full = experiment()
    load_config("d2r_cag_cifar10,smoke")
    smoke = experiment()
    assert list(full.graph.loss.terms) == list(smoke.graph.loss.terms)
    assert [w for w, _ in full.graph.loss.terms.values()] == [w for w, _ in smoke.graph.loss.terms.values()]
    for attr in ("eps", "step_size", "bn_mode", "init_view"):
        assert getattr(full.graph.generator, attr) == getattr(smoke.graph.generator, attr)
    assert type(full.graph.generator.objective) is type(smoke.graph.generator.objective)
    assert smoke.trainer.epochs < full.trainer.epochs


def _terms(exp):
    return {name: (w, term) for name, (w, term) in exp.graph.loss.terms.items()}


def test_d2r_cag_cifar10_is_the_authors_code():
    load_config("d2r_cag_cifar10")
    exp = experiment()
    g = exp.graph
    assert set(g.models) == {"target", "guide"}
    assert sum(p.numel() for p in g.models["target"].parameters()) == 48_262_586  # WRN-34-10 with sub_block1
    gen = g.generator
    assert (gen.eps, gen.step_size, gen.steps, gen.bn_mode) == (0.031, 0.007, 10, "eval")
    assert isinstance(gen.init, GaussianInit) and gen.init.std == 0.001
    assert (gen.objective.model, gen.objective.soft_label_model) == ("target", "guide")
    assert set(gen.models_used) == {"target", "guide"}  # both models in eval mode during CAG
    t = _terms(exp)
    assert (
        t["ce_guide"][0] == 1.0
        and isinstance(t["ce_guide"][1], CrossEntropy)
        and t["ce_guide"][1].view == "guide(x)"
    )
    w, mse = t["mse"]
    assert (
        w == 1.0
        and isinstance(mse, MSE)
        and (mse.input, mse.target, mse.detach_target) == ("target(x_adv)", "guide(x)", False)
    )
    w, gap = t["kl_gap"]
    assert (
        w == 20.0
        and isinstance(gap, KLGap)
        and (gap.a, gap.b, gap.reduction, gap.target_eps) == ("guide(x)", "target(x)", "mean", 1e-5)
    )
    w, kl = t["kl_adv"]
    assert w == 30.0 and isinstance(kl, KL)
    assert (kl.input, kl.target, kl.reduction, kl.detach_target) == (
        "guide(x)",
        "target(x_adv)",
        "mean",
        False,
    )
    opt = exp.trainer.optimizer_fn(g.models)
    assert len(opt.param_groups) == 2
    assert {k: opt.defaults[k] for k in ("lr", "momentum", "weight_decay", "nesterov")} == {
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 2e-4,
        "nesterov": False,
    }
    assert exp.trainer.epochs == 100 and exp.data.batch_size == 128
    assert exp.data.dataset == "cifar10"


def test_cifar100_and_tiny_use_the_papers_lambda():
    for name in ("d2r_cag_cifar100", "d2r_cag_tinyimagenet"):
        load_config(f"{name},smoke")
        assert _terms(experiment())["ce_guide"][0] == 0.1


def test_d2r_without_cag_uses_the_lbgat_attack():
    load_config("d2r_cifar10,smoke")
    gen = experiment().graph.generator
    assert (gen.objective.model, gen.objective.soft_label_model) == ("target", "target")


@pytest.mark.parametrize("name, beta", [("lbgat_cifar10", 0.0), ("lbgat_cifar100", 6.0)])
def test_lbgat(name, beta):
    load_config(f"{name},smoke")
    exp = experiment()
    t = _terms(exp)
    assert t["kl_trades"][0] == beta
    kl = t["kl_trades"][1]
    assert (kl.input, kl.target, kl.reduction) == ("target(x_adv)", "target(x)", "batchmean")
    assert (t["mse"][1].input, t["mse"][1].target) == ("target(x_adv)", "guide(x)")
    assert exp.graph.generator.objective.soft_label_model == "target"


def test_trades():
    load_config("trades_cifar10")
    exp = experiment()
    t = _terms(exp)
    assert t["kl_trades"][0] == 6.0 and t["kl_trades"][1].reduction == "batchmean"
    assert t["ce_clean"][1].view == "target(x)"
    assert exp.trainer.epochs == 76


def test_pgd_at():
    load_config("pgd_at_cifar10,smoke")
    gen = experiment().graph.generator
    assert (
        isinstance(gen.init, UniformInit)
        and gen.eps == pytest.approx(8 / 255)
        and gen.step_size == pytest.approx(2 / 255)
    )


@pytest.mark.parametrize(
    "name, weights", [("regmix_cifar10", (50.0, 20.0, 20.0)), ("regmix_cifar100", (1200.0, 700.0, 700.0))]
)
def test_regmix(name, weights):
    load_config(name)
    exp = experiment()
    t = _terms(exp)
    assert (t["amr_main"][0], t["amr_aux"][0], t["agr"][0]) == weights
    assert (t["amr_main"][1].input, t["amr_main"][1].target) == ("target(x_adv)", "target(x_init)")
    assert (t["amr_aux"][1].input, t["amr_aux"][1].target) == ("target(x_init)", "target(x_adv)")
    assert (t["agr"][1].input, t["agr"][1].target) == ("target(x_adv)", "target(x)")
    assert all(
        t[k][1].reduction == "mean" and not t[k][1].detach_target for k in ("amr_main", "amr_aux", "agr")
    )
    gen = exp.graph.generator
    assert (
        isinstance(gen.init, RandomSignInit) and gen.steps == 2 and gen.init_view and gen.bn_mode == "train"
    )
    assert gen.eps == pytest.approx(8 / 255) and gen.step_size == pytest.approx(4 / 255)
    assert exp.trainer.epochs == 110
    assert exp.trainer.optimizer_fn(exp.graph.models).defaults["weight_decay"] == 5e-4
    load_config(f"{name},smoke")
    assert experiment().graph.generator.steps == 2  # smoke keeps PGD-2


def test_overrides_apply_after_files_and_set_macros():
    load_config("d2r_cag_cifar10,smoke", "ALPHA = 10; EPOCHS = 3")
    exp = experiment()
    assert _terms(exp)["kl_adv"][0] == 10.0 and exp.trainer.epochs == 3


@pytest.mark.parametrize(
    "spec, overrides, message",
    [
        ("d2r_cag_cifar1O", None, "(?s)unknown gin config 'd2r_cag_cifar1O'.*Did you mean d2r_cag_cifar10"),
        ("d2r_cag_cifar10", "ALPAH = 10", "(?s)macro 'ALPAH'.*Did you mean ALPHA"),
        (
            "d2r_cag_cifar10",
            "Trainer.epoch = 2",
            "(?s)doesn't have a parameter named 'epoch'.*bindings string line 1",
        ),
        ("d2r_cag_cifar10", "Trianer.epochs = 2", "No configurable matching 'Trianer'"),
        ("d2r_cag_cifar10", "EPOCHS 2", "bad override 'EPOCHS 2'"),
        ("d2r_cag_cifar10", "kl_adv/KL.reduction = %REDUCTION", "(?s)undefined macro.*%REDUCTION"),
    ],
)
def test_bad_config_input_fails_with_a_clear_message(spec, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(spec, overrides)


def test_typo_in_a_gin_file_names_file_and_line(tmp_path):
    bad = tmp_path / "mine.gin"
    bad.write_text("include 'd2r_cag_cifar10.gin'\nPGDGenerator.stpes = 3\n")
    with pytest.raises(ConfigError, match=r"(?s)stpes.*mine.gin.*line 2"):
        load_config(str(bad))


@pytest.mark.parametrize(
    "override, message", [("EPS = 8", "eps=8 is out of range"), ("STEP_SIZE = -0.1", "step_size")]
)
def test_eps_out_of_range_fails_at_build(override, message):
    load_config("d2r_cag_cifar10,smoke", override)
    with pytest.raises(ValueError, match=message):
        experiment()


def _fragment_macros(path, seen=()):
    """The macros a gin fragment uses (``%NAME``) and those it defines, its includes' counted in."""
    text = path.read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    used = set(re.findall(r"%([A-Z_][A-Z0-9_]*)", code))
    defined = set(re.findall(r"^([A-Z_][A-Z0-9_]*)\s*=", code, re.MULTILINE))
    for name in re.findall(r"^include\s+'([^']+)'", code, re.MULTILINE):
        if name not in seen:
            more_used, more_defined = _fragment_macros(GIN_DIR / name, (*seen, name))
            used |= more_used
            defined |= more_defined
    return used, defined


FRAGMENTS = sorted(
    p.relative_to(GIN_DIR).as_posix()
    for p in GIN_DIR.glob("*/*.gin")
    if p.parent.name not in ("search", "tables")  # tables are read by the table command, not included
)


@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_fragment_header_names_the_macros_it_requires(fragment):
    # A fragment is included by an experiment, which must define what the fragment uses and does not
    # define: its "# Requires:" line says what (t5x's convention), and must stay true as fragments change.
    header = re.search(r"^# Requires: ([^(\n]*)", (GIN_DIR / fragment).read_text(), re.MULTILINE)
    assert header, f"gin/{fragment} has no '# Requires: ...' line"
    stated = {m.strip() for m in header.group(1).split(",")} - {"none", ""}
    used, defined = _fragment_macros(GIN_DIR / fragment)
    assert stated == used - defined, f"gin/{fragment}: '# Requires: {header.group(1).strip()}'"


def test_experiments_are_layered_one_dataset_model_and_method_each():
    for name in EXPERIMENTS:
        includes = re.findall(r"^include '([^/]+)/", (GIN_DIR / f"{name}.gin").read_text(), re.MULTILINE)
        assert sorted(i for i in includes if i != "search") == ["base", "methods", "models"], name
