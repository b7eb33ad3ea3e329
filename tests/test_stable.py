"""The `stable` profile departs from the papers by exactly its stated switches, and only when appended.

The faithful configs must compute what they computed before the stabilizers existed: the stabilizers are
off by default, and with them off the trainer's step is the plain zero_grad / backward / SGD step.
"""

import copy

import gin
import mlflow
import pytest
import torch
from support import TINY, conv_bn_net, cpu_args
from torch.optim.optimizer import register_optimizer_step_pre_hook

from components.experiment import experiment
from components.losses import CrossEntropy, WeightedLoss
from components.schedules import PaperStepSchedule, make_lr_scheduler
from components.training import Trainer
from pipeline.config import GIN_DIR, available_configs, flat_parameters, is_experiment, load_config
from pipeline.train import main

EXPERIMENTS = [name for name in available_configs() if is_experiment(GIN_DIR / f"{name}.gin")]
# What stable.gin binds, and nothing else.
STABLE = {
    "Trainer.grad_clip_norm": "2.0",
    "Trainer.lr_ramp_epochs": "5.0",
    "PaperStepSchedule.warmup_epochs": "0",
    "MisclassificationAwareKL.log_target": "True",  # bound for every experiment, read by MART's term only
}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_stable_composes_with_every_experiment_and_changes_only_its_switches(name):
    load_config(name)
    faithful = flat_parameters()
    load_config(f"{name},stable")
    stable = flat_parameters()
    changed = {k: v for k, v in stable.items() if faithful.get(k) != v}
    # The schedule line is unchanged where the config already had no warm-up epoch (TRADES).
    assert changed.items() <= STABLE.items() and {"Trainer.grad_clip_norm", "Trainer.lr_ramp_epochs"} <= set(
        changed
    )
    with gin.unlock_config():
        exp = experiment()
    assert exp.trainer.grad_clip_norm == 2.0 and exp.trainer.lr_ramp_epochs == 5.0
    load_config(f"{name},smoke,stable")  # after smoke too (profiles go last, in any order)
    with gin.unlock_config():
        assert experiment().trainer.grad_clip_norm == 2.0


# Clipping that is the authors' own, not a stabilizer: LAS-AT's Tiny ImageNet script clips the target's
# gradient norm to 10 before each step (LAS_AT_train_TinyImageNet.py; gin/las_at_tinyimagenet.gin).
AUTHORS_CLIP = {"las_at_tinyimagenet": 10.0}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_faithful_configs_have_no_stabilizer_on(name):
    load_config(name)
    with gin.unlock_config():
        trainer = experiment().trainer
    assert trainer.grad_clip_norm == AUTHORS_CLIP.get(name)
    assert trainer.lr_ramp_epochs == 0.0 and trainer.max_loss is None
    stabilizers = ("Trainer.lr_ramp", "MisclassificationAwareKL.log_target")
    stabilizers += () if name in AUTHORS_CLIP else ("Trainer.grad_clip",)
    assert not any(k.startswith(stabilizers) for k in flat_parameters())


def _graph():
    from components.attacks import PGDGenerator
    from components.attacks.objectives import CEObjective
    from components.graph import TrainingGraph

    ce = CrossEntropy(view="target(x_adv)")
    gen = PGDGenerator(objective=CEObjective(), eps=8 / 255, step_size=2 / 255, steps=2)
    return TrainingGraph(
        models={"target": conv_bn_net()}, generator=gen, loss=WeightedLoss({"ce": (1.0, ce)})
    )


def test_with_stabilizers_off_train_step_is_the_plain_sgd_step():
    torch.manual_seed(0)
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))
    graph = _graph()
    plain = copy.deepcopy(graph)
    opt_a = torch.optim.SGD(graph.models.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    opt_b = torch.optim.SGD(plain.models.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    trainer = Trainer(epochs=1)
    for _ in range(3):
        torch.manual_seed(1)
        out = trainer.train_step(graph, opt_a, x, y, torch.device("cpu"))
        torch.manual_seed(1)
        ref = plain.step(x, y)
        opt_b.zero_grad(set_to_none=True)
        ref["loss"].backward()
        opt_b.step()
        assert "grad_norm" not in out
        assert torch.equal(out["loss"], ref["loss"])
    for a, b in zip(graph.parameters(), plain.parameters()):
        assert torch.equal(a, b)


def test_gradient_clipping_bounds_the_global_norm_and_reports_the_pre_clip_norm():
    torch.manual_seed(0)
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))
    graph = _graph()
    opt = torch.optim.SGD(graph.models.parameters(), lr=0.0)  # lr 0: the gradients stay to be read
    out = Trainer(epochs=1, grad_clip_norm=1e-3).train_step(graph, opt, x, y, torch.device("cpu"))
    after = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in graph.parameters() if p.grad is not None])
    )
    assert float(out["grad_norm"]) > 1e-3  # the pre-clip norm
    assert float(after) == pytest.approx(1e-3, rel=1e-4)


def test_the_lr_ramp_is_linear_and_multiplies_the_schedule():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # 10 steps per epoch, 20 epochs, ramp over 2 epochs, over the papers' warm-up epoch at 0.2: inside the
    # ramp the schedule's factor is not 1, so "ramp times schedule" and "ramp instead of schedule" differ.
    sched = make_lr_scheduler(opt, PaperStepSchedule(warmup_epochs=1), 10, 20, ramp_epochs=2)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:10] == pytest.approx([0.1 * 0.2 * (i + 1) / 20 for i in range(10)])
    assert lrs[10:20] == pytest.approx([0.1 * (i + 1) / 20 for i in range(10, 20)])
    assert lrs[20:] == pytest.approx([0.1] * 20)


@pytest.mark.slow
def test_the_stabilizers_act_through_the_train_entry_point(shared_data, mlflow_store, monkeypatch):
    """Trainer.fit, not only train_step: the logged perf/lr is the ramp times the schedule, train/grad_norm is
    logged every epoch, and every optimizer step sees gradients clipped to the bound."""
    clip = 0.05
    # 4 steps an epoch; a 3-epoch ramp (12 steps) over a schedule that is not 1 inside it: the papers'
    # warm-up epoch at 0.2, then x0.1 from epoch 3 (epoch > 0.5 * 4).
    overrides = (
        f"EPOCHS = 4; {TINY}; ATTACK_STEPS = 1; build_backbone.width = 8; Trainer.grad_clip_norm = {clip}; "
        "Trainer.lr_ramp_epochs = 3; PaperStepSchedule.warmup_epochs = 1; "
        "PaperStepSchedule.milestones = (0.5,)"
    )
    seen = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    handle = register_optimizer_step_pre_hook(record)
    try:
        assert main(cpu_args(overrides)) == 0
    finally:
        handle.remove()
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    client = mlflow.MlflowClient()
    lr = [m.value for m in client.get_metric_history(run.info.run_id, "perf/lr")]
    # The lr of each epoch's first step (global step s = 0, 4, 8, 12): 0.1 x schedule x (s + 1) / 12.
    assert lr == pytest.approx([0.1 * 0.2 * 1 / 12, 0.1 * 5 / 12, 0.01 * 9 / 12, 0.01])
    norms = client.get_metric_history(run.info.run_id, "train/grad_norm")
    assert [m.step for m in norms] == [1, 2, 3, 4]
    assert all(m.value > clip for m in norms)  # the pre-clip norm: clipping had work to do
    assert len(seen) == 16 and max(seen) <= clip * (1 + 1e-4), seen
