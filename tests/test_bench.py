"""The benchmark command and the authors' reference loop it times robustflow against.

Speed is measured by ``python -m pipeline.bench``, never asserted here: these tests check that the bench
runs end to end and writes what it promises, that its FLOP accounting counts the forwards the training
step really runs, and that the reference loop computes the same D2R-CAG step as robustflow.
"""

import copy
import json
import math

import mlflow
import numpy as np
import pytest
import torch
from support import bench_without_mlflow, run_python_without

from benchmarks.reference_d2r import (
    cag_attack,
    d2r_loss_terms,
    reference_flop_counts,
    run_reference,
)
from components.backbones import build_backbone
from components.experiment import experiment
from pipeline.bench import (
    COLUMNS,
    DEFAULT_METHODS,
    bench_training,
    flops_per_image,
    graph_pass_counts,
    main,
    method_overrides,
    parse_args,
    train_steps,
)
from pipeline.bench_health import (
    SCHEDULE,
    epoch_steps,
    finite_mean,
    loss_status,
    lr_scheduler_for,
    parse_lr,
)
from pipeline.config import load_config

SMALL = ["TARGET_BACKBONE = 'small_cnn'", "GUIDE_BACKBONE = 'small_cnn'"]
TINY_ARGS = [
    "--target", "small_cnn", "--guide", "small_cnn", "--batch-size", "8", "--steps", "2", "--warmup", "1",
    "--eval-images", "8", "--eval-batch-size", "8", "--data", "synthetic", "--threads", "1",
]  # fmt: skip


def _build(name, extra=()):
    bindings = [b for b in SMALL if name.startswith(("d2r", "lbgat")) or "GUIDE" not in b]
    load_config(name, [*bindings, *extra])
    return experiment()


def _count_forwards(models):
    """Forward calls per top-level model, recorded by pre-hooks (removed by the returned function)."""
    calls = dict.fromkeys(models, 0)
    handles = []
    for name, model in models.items():

        def hook(_module, _inputs, name=name):
            calls[name] += 1

        handles.append(model.register_forward_pre_hook(hook))
    return calls, lambda: [h.remove() for h in handles]


@pytest.mark.slow
def test_bench_end_to_end_writes_json_markdown_and_mlflow_run(tmp_path, mlflow_store):
    out = tmp_path / "out"
    argv = [*TINY_ARGS, "--methods", "d2r_cag_cifar10,pgd_at_cifar10", "--overrides", "ATTACK_STEPS = 2"]
    argv += ["--steps", "1", "--repeats", "2"]
    assert main([*argv, "--out", str(out), "--mlflow"]) == 0

    report = json.loads((out / "bench.json").read_text())
    assert [r["method"] for r in report["methods"]] == ["d2r_cag_cifar10", "pgd_at_cifar10"]
    for row in [*report["methods"], report["reference"]]:
        assert {key for key, _ in COLUMNS} <= set(row)
        assert row["train_images_per_s"] > 0 and row["gflop_per_image"] > 0
        assert row["peak_fraction"] is None  # CPU: no peak rate unless --peak-tflops is given
        assert all(math.isfinite(v) for v in row["losses"].values())
    d2r, pgd = report["methods"]
    assert d2r["guide"] == "small_cnn" and pgd["guide"] is None
    assert "GUIDE_BACKBONE = 'small_cnn'" in pgd["skipped_overrides"]
    assert d2r["attack_steps"] == 2 and report["reference"]["attack_steps"] == 2
    # Two interleaved repeats: the median row is reported, every repeat kept, the speed-up paired per repeat.
    assert len(d2r["train_images_per_s_each"]) == len(report["reference"]["train_images_per_s_each"]) == 2
    assert d2r["train_images_per_s"] in d2r["train_images_per_s_each"]
    assert d2r["speedup_vs_reference"] == pytest.approx(np.median(d2r["speedup_vs_reference_each"]))
    assert d2r["pgd20_images_per_s"] > 0 and d2r["aa_images_per_s"] is None
    # Each config's schedule from step 1: D2R-CAG at its warm-up lr, and the authors' loop at the same lr.
    assert d2r["lr_each"] == pytest.approx([0.02] * 2) == pgd["lr_each"]  # both use schedules/lbgat.gin
    assert report["reference"]["lr_span"] == "0.02" and d2r["loss_status"] == "finite"
    assert report["meta"]["amp"] is False and report["meta"]["data"] == "synthetic"

    md = (out / "bench.md").read_text()
    header = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    assert header in md
    table = md.split(header, 1)[1].strip().splitlines()
    assert [line.split("|")[1].strip() for line in table[1:4]] == [
        "d2r_cag_cifar10",
        "pgd_at_cifar10",
        "d2r_cag_cifar10 (reference loop)",
    ]
    assert all(line.count("|") == len(COLUMNS) + 1 for line in table[1:4])

    (run,) = mlflow.search_runs(experiment_names=["bench"], output_format="list")
    assert run.data.metrics["d2r_cag_cifar10/train_images_per_s"] == pytest.approx(d2r["train_images_per_s"])
    assert "reference_d2r/train_images_per_s" in run.data.metrics
    assert {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)} == {
        "bench.md",
        "bench.json",
    }


def test_compare_fast_path_and_autoattack_run_on_cpu(tmp_path):
    # On CPU the Trainer's 'auto' leaves the fast path off, so force bf16 to exercise the comparison.
    out = tmp_path / "out"
    argv = [*TINY_ARGS, "--methods", "regmix_cifar10", "--steps", "1", "--warmup", "0", "--no-reference"]
    argv += ["--amp", "--compare-fast-path", "--autoattack", "--aa-images", "4"]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    (row,) = report["methods"]
    assert row["aa_images"] == 4 and row["aa_images_per_s"] > 0
    assert 0 <= row["aa_robust_acc"] <= row["aa_clean_acc"]
    assert row["aa_impl"] == "components.eval.autoattack.AutoAttack"  # robustflow's wrapper, the one path
    (cmp,) = report["compare_fast_path"]
    assert cmp["fast"]["amp"] is True and cmp["plain"]["amp"] is False
    rows = {r["quantity"]: r for r in cmp["rows"]}
    for term in ("ce_adv", "amr_main", "amr_aux", "agr"):
        assert f"train/loss/{term} (step 1)" in rows
    assert {"eval/clean_acc", "eval/pgd20_acc", "train/adv_acc"} <= set(rows)
    first = rows["train/loss (step 1)"]
    # Same weights and batch at step 1: only bf16 separates them.
    assert first["fast"] == pytest.approx(first["plain"], rel=0.05)
    assert "## Fast path vs plain: regmix_cifar10" in (out / "bench.md").read_text()


def test_switches_accept_bare_valued_and_negated_forms():
    args = parse_args(["--no-amp", "--compile", "--autoattack", "off", "--channels-last", "on"])
    assert (args.amp, args.compile, args.autoattack, args.channels_last) == ("off", "on", "off", "on")
    assert parse_args([]).methods == list(DEFAULT_METHODS)


def test_overrides_skip_macros_a_config_does_not_define():
    args = parse_args(["--target", "small_cnn", "--guide", "small_cnn", "--overrides", "ATTACK_STEPS = 3"])
    kept, skipped = method_overrides("regmix_cifar10", args)
    assert "TARGET_BACKBONE = 'small_cnn'" in kept and "Trainer.amp = 'auto'" in kept
    assert set(skipped) == {"GUIDE_BACKBONE = 'small_cnn'", "ATTACK_STEPS = 3"}
    kept, _ = method_overrides("d2r_cag_cifar10", args, fast_path=False)
    assert "Trainer.amp = False" in kept and "Trainer.channels_last = False" in kept


@pytest.mark.parametrize("name", DEFAULT_METHODS)
def test_flop_accounting_counts_the_forwards_the_step_runs(name):
    exp = _build(name)
    graph = exp.graph.train()
    counts = graph_pass_counts(graph)
    calls, remove = _count_forwards(graph.models)
    out = graph.step(torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    remove()
    assert calls == {m: c["fwd"] for m, c in counts.items()}
    # Every loss view gets one full backward, the attack one input-only backward per step.
    assert sum(c["bwd_full"] for c in counts.values()) == len(graph.loss.views)
    assert sum(c["bwd_input"] for c in counts.values()) == graph.generator.steps
    out["loss"].backward()


def test_d2r_flop_formula_and_the_reference_loops_extra_guide_forwards():
    exp = _build("d2r_cag_cifar10")
    s = exp.graph.generator.steps
    counts = graph_pass_counts(exp.graph)
    assert counts == {
        "target": {"fwd": s + 2, "bwd_input": s, "bwd_full": 2},
        "guide": {"fwd": 2, "bwd_input": 0, "bwd_full": 1},
    }
    assert flops_per_image(counts, {"target": 1, "guide": 1}) == (2 * s + 6) + 4
    ref = reference_flop_counts(s)
    assert flops_per_image(ref, {"target": 1, "guide": 1}) == (2 * s + 6) + (s + 3)

    target, guide = exp.graph.models["target"], exp.graph.models["guide"]
    calls, remove = _count_forwards({"target": target, "guide": guide})
    x = torch.rand(4, 3, 32, 32)
    x_adv = cag_attack(target, guide, x, perturb_steps=s)
    d2r_loss_terms(target(x_adv), target(x), guide(x), torch.randint(0, 10, (4,)))
    remove()
    assert calls == {"target": ref["target"]["fwd"], "guide": ref["guide"]["fwd"]}


def test_reference_loop_trains_and_logs_finite_losses():
    torch.manual_seed(0)
    target = build_backbone("small_cnn", num_classes=10)
    guide = build_backbone("small_cnn", num_classes=10)
    rng = np.random.RandomState(0)
    x = rng.randint(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
    y = rng.randint(0, 10, size=16)
    before = copy.deepcopy(target.state_dict())
    result = run_reference(target, guide, x, y, steps=1, batch_size=8, device="cpu", attack_steps=2, warmup=1)
    assert len(result["losses"]) == 2 and all(math.isfinite(v) for v in result["losses"])
    assert set(result["parts"]) == {"ce_guide", "mse", "kl_gap", "kl_adv"}
    assert result["images"] == 8 and result["images_per_s"] > 0
    assert not torch.equal(before["fc.weight"], target.state_dict()["fc.weight"])
    assert target.training and guide.training


def test_reference_d2r_loss_equals_robustflows_weighted_loss():
    loss = _build("d2r_cag_cifar10").graph.loss
    gen = torch.Generator().manual_seed(0)
    logits = {v: (3 * torch.randn(16, 10, generator=gen, dtype=torch.float64)) for v in loss.views}
    y = torch.randint(0, 10, (16,), generator=gen)
    for z in logits.values():
        z.requires_grad_(True)
    total, parts = loss(logits, y)
    ref = d2r_loss_terms(logits["target(x_adv)"], logits["target(x)"], logits["guide(x)"], y)
    assert total.item() == pytest.approx(ref["loss"].item(), rel=1e-12)
    for name, value in parts.items():
        assert value.item() == pytest.approx(ref[name].item(), rel=1e-12, abs=1e-15), name
    ours = torch.autograd.grad(total, list(logits.values()))
    theirs = torch.autograd.grad(ref["loss"], list(logits.values()))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_reference_step_equals_robustflows_training_step():
    # Same weights, batch and attack noise, in float64 so rounding does not flip a gradient's sign:
    # robustflow's CAG (guide computed once) finds the same x_adv as the authors' (guide recomputed every
    # step), and the same loss and weight gradients of both models follow.
    exp = _build("d2r_cag_cifar10", ["ATTACK_STEPS = 3"])
    graph = exp.graph.double().train()
    target, guide = (copy.deepcopy(graph.models[m]) for m in ("target", "guide"))
    x = torch.rand(8, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    gen = graph.generator
    torch.manual_seed(3)
    out = graph.step(x, y)
    torch.manual_seed(3)
    x_adv = cag_attack(target, guide, x, gen.step_size, gen.eps, gen.steps)
    ref = d2r_loss_terms(target(x_adv), target(x), guide(x), y)
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-10)
    out["loss"].backward()
    ref["loss"].backward()
    for ours, theirs in ((graph.models["target"], target), (graph.models["guide"], guide)):
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-12, msg=name)


@pytest.mark.slow
def test_bench_runs_where_mlflow_and_optuna_cannot_be_imported(tmp_path):
    # The GPU machines have torch but neither MLflow nor Optuna: the bench must not need them.
    argv = [*TINY_ARGS, "--methods", "pgd_at_cifar10", "--steps", "1", "--warmup", "0", "--no-reference"]
    argv += ["--overrides", "ATTACK_STEPS = 2", "--out", str(tmp_path)]
    proc = bench_without_mlflow(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "bench.json").read_text())["methods"][0]["method"] == "pgd_at_cifar10"
    # Asking for MLflow where it is missing is a usage error before any work, not a traceback at the end.
    proc = run_python_without(f"from pipeline.bench import main\nsys.exit(main({[*argv, '--mlflow']!r}))\n")
    assert proc.returncode == 2
    assert "MLflow is not installed" in proc.stderr and "| method |" not in proc.stdout


@pytest.mark.parametrize(
    ("name", "first_lr"),
    [("d2r_cag_cifar10", 0.02), ("lbgat_cifar10", 0.02), ("trades_cifar10", 0.1), ("regmix_cifar10", 0.1)],
)
def test_bench_steps_follow_each_configs_schedule_or_a_stated_fixed_lr(name, first_lr):
    # LBGAT/D2R start at their warm-up lr (0.1 x 0.2); TRADES has no warm-up; RegMix (MultiStep) at 0.1.
    exp = _build(name)
    optimizer = exp.trainer.optimizer_fn(exp.graph.models)
    scheduler, what = lr_scheduler_for(exp, optimizer, SCHEDULE, total_steps=5)
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([first_lr] * 5)
    assert type(exp.trainer.schedule).__name__ in what
    # A real epoch of the config's data: 49,000 CIFAR-10 training images (1,000 held out) at batch 128.
    assert epoch_steps(exp.data) == 49_000 // 128
    scheduler, what = lr_scheduler_for(exp, optimizer, 0.05, total_steps=5)
    assert scheduler is None and what == "fixed 0.05"
    assert {g["lr"] for g in optimizer.param_groups} == {0.05}


def test_bench_steps_are_the_trainers_steps_with_its_clipping_and_lr_ramp():
    # gin/stable.gin's kind of switches: the bench must time and report the step Trainer.fit runs.
    images, labels = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (24,))
    cpu = torch.device("cpu")
    exp = _build("pgd_at_cifar10", ["BATCH_SIZE = 8", "Trainer.lr_ramp_epochs = 1.0"])
    row = bench_training(exp, images, labels, 2, 1, cpu, 0)
    spe = epoch_steps(exp.data)  # the ramp runs over one real epoch: 1/spe, 2/spe, 3/spe of 0.02
    assert row["lr_each"] == pytest.approx([0.02 * k / spe for k in (1, 2, 3)])
    assert "lr ramp 1 epochs" in row["lr_schedule"]

    def moved(clip):
        exp = _build("pgd_at_cifar10", ["BATCH_SIZE = 8", f"Trainer.grad_clip_norm = {clip}"])
        before = [p.detach().clone() for p in exp.graph.target.parameters()]
        bench_training(exp, images, labels, 2, 1, cpu, 0, lr=1.0)
        return max((p - q).abs().max().item() for p, q in zip(exp.graph.target.parameters(), before))

    # At lr 1, a gradient clipped to norm 1e-9 leaves weight decay (2e-4 x w per step) to move the weights.
    assert moved(1e-9) < 1e-2 < moved(None)


def test_bench_marks_non_finite_losses_and_refuses_to_compare_nan_runs(tmp_path):
    # An absurd fixed lr blows the weights up after step 1: every later loss is NaN/inf.
    argv = [*TINY_ARGS, "--methods", "pgd_at_cifar10", "--steps", "3", "--warmup", "0", "--no-reference"]
    argv += ["--overrides", "ATTACK_STEPS = 2", "--lr", "1e30", "--amp", "--compare-fast-path"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    (row,) = report["methods"]
    assert row["loss_finite"] is False and row["first_nonfinite_step"] == 2
    assert row["first_nonfinite_term"] == "ce_adv"  # the term, not the total that follows it
    assert row["losses"] == {"loss": None, "ce_adv": None}  # no NaN average posing as a number
    assert row["lr_each"] == [1e30] * 3 and report["meta"]["lr"] == 1e30
    (cmp,) = report["compare_fast_path"]
    assert cmp["comparable"] is False and cmp["verdict"].startswith("NOT COMPARABLE")
    assert all(r["abs_diff"] is None for r in cmp["rows"])
    md = (tmp_path / "bench.md").read_text()
    assert "NON-FINITE from step 2 (ce_adv; 2/3 steps)" in md and "nan" not in md.lower().split("## fast")[1]


def test_loss_status_and_finite_mean():
    rows = torch.tensor([[1.0, 0.5, 0.9], [float("nan"), 0.5, 0.9], [float("inf"), float("nan"), 0.9]])
    status = loss_status(rows, ["loss", "a"])
    assert status["finite"] is False and status["nonfinite_steps"] == 2
    assert (status["first_nonfinite_step"], status["first_nonfinite_term"]) == (2, "loss")
    assert finite_mean(rows, ["loss", "a"]) == {"loss": None, "a": None}
    assert finite_mean(rows[:1], ["loss", "a"]) == {"loss": 1.0, "a": 0.5}
    assert loss_status(rows[:1], ["loss", "a"])["text"] == "finite"
    with pytest.raises(ValueError, match="--lr must be"):
        parse_lr("fast")


def test_profiles_apply_after_each_methods_config(tmp_path, capsys):
    # gin/smoke.gin sets EPOCHS = 4 and 2,048 training images: the schedule is bound to that run.
    argv = [*TINY_ARGS, "--methods", "pgd_at_cifar10", "--steps", "1", "--warmup", "0", "--no-reference"]
    argv += ["--overrides", "ATTACK_STEPS = 2", "--profile", "smoke", "--out", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    (row,) = report["methods"]
    assert row["lr_schedule"] == "PaperStepSchedule (4 epochs of 256 steps)"  # 2,048 images / batch 8
    assert row["batch"] == 8  # the command's bindings come after the profile
    assert "- profiles: smoke" in (tmp_path / "bench.md").read_text()
    assert main([*argv[:-2], "--profile", "no_such_profile"]) == 2
    assert "unknown gin config 'no_such_profile'" in capsys.readouterr().err


def test_bench_steps_go_through_trainer_train_step_and_record_its_losses(monkeypatch):
    # The bench has no step of its own: each row is Trainer.train_step's output, [loss, *parts, accs].
    exp = _build("pgd_at_cifar10", ["BATCH_SIZE = 4", "ATTACK_STEPS = 1"])
    graph, trainer = exp.graph.train(), exp.trainer
    optimizer = trainer.optimizer_fn(graph.models)
    outs = []
    step = type(trainer).train_step

    def recording_step(self, *args):
        outs.append(step(self, *args))
        return outs[-1]

    monkeypatch.setattr(type(trainer), "train_step", recording_step)
    batches = [(torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,)), None) for _ in range(2)]
    lrs = []
    rows = train_steps(trainer, graph, optimizer, batches, lrs=lrs)
    assert len(outs) == len(rows) == 2 and lrs == [optimizer.param_groups[0]["lr"]] * 2
    for row, out, (_, y, _) in zip(rows, outs, batches):
        expected = [out["loss"].item(), *(out["parts"][t].item() for t in graph.loss.terms)]
        expected += [(out[k].argmax(1) == y).float().mean().item() for k in ("clean_logits", "adv_logits")]
        assert row.tolist() == pytest.approx(expected, rel=0, abs=0)
