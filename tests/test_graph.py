"""The training step: each view computed once, modes per phase, gradients into both networks."""

from collections import Counter

import gin
import pytest
import torch
from torch import nn

from components.attacks import CEObjective, GaussianInit, PGDGenerator, RandomSignInit, SoftLabelKLObjective
from components.graph import TrainingGraph
from components.losses import KL, MSE, CrossEntropy, KLGap, WeightedLoss


def tiny_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    )


class Recorder:
    """Counts forward calls per model and records the train/eval mode of each call."""

    def __init__(self, models):
        self.calls = Counter()
        self.modes = {name: [] for name in models}
        for name, m in models.items():
            m.register_forward_hook(self._hook(name))

    def _hook(self, name):
        def hook(module, inputs, output):
            self.calls[name] += 1
            self.modes[name].append(module.training)

        return hook


def d2r_graph(steps=3):
    models = {"target": tiny_net(0), "guide": tiny_net(1)}
    gen = PGDGenerator(
        objective=SoftLabelKLObjective(model="target", soft_label_model="guide"),
        eps=0.031,
        step_size=0.007,
        steps=steps,
        init=GaussianInit(0.001),
        bn_mode="eval",
    )
    loss = WeightedLoss(
        terms={
            "ce_guide": (1.0, CrossEntropy(view="guide(x)")),
            "mse": (1.0, MSE(input="target(x_adv)", target="guide(x)")),
            "kl_gap": (20.0, KLGap(a="guide(x)", b="target(x)")),
            "kl_adv": (30.0, KL(input="guide(x)", target="target(x_adv)")),
        }
    )
    return TrainingGraph(models=models, generator=gen, loss=loss)


def batch(n=6):
    torch.manual_seed(5)
    return torch.rand(n, 3, 8, 8), torch.randint(0, 3, (n,))


def test_d2r_cag_step_computes_each_view_once_and_the_guide_soft_label_once():
    graph = d2r_graph(steps=3)
    graph.train()
    rec = Recorder(graph.models)
    x, y = batch()
    graph.step(x, y)
    # target: 3 attack steps (eval) + target(x_adv) + target(x) (train); guide: soft label (eval) + guide(x).
    assert rec.calls == {"target": 5, "guide": 2}
    assert rec.modes["target"] == [False, False, False, True, True]
    assert rec.modes["guide"] == [False, True]
    assert all(m.training for m in graph.models.values())


def test_every_d2r_term_backpropagates_into_both_networks():
    """Nothing is detached in the authors' loss: MSE and kl5 pull the guide AND the target."""
    x, y = batch()
    for term in ("mse", "kl_gap", "kl_adv"):
        graph = d2r_graph(steps=1)
        graph.train()
        out = graph.step(x, y)
        graph.zero_grad()
        out["parts"][term].backward()
        for name, model in graph.models.items():
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert grads and sum(g.abs().sum() for g in grads) > 0, f"{term} gives no gradient to {name}"


def test_regmix_step_reuses_the_init_forward_four_forwards_in_all():
    torch.manual_seed(0)
    models = {"target": tiny_net(0)}
    gen = PGDGenerator(
        objective=CEObjective(),
        eps=8 / 255,
        step_size=4 / 255,
        steps=2,
        init=RandomSignInit(),
        bn_mode="train",
        init_view=True,
    )
    loss = WeightedLoss(
        terms={
            "ce_adv": (1.0, CrossEntropy(view="target(x_adv)")),
            "amr_main": (50.0, KL(input="target(x_adv)", target="target(x_init)")),
            "amr_aux": (20.0, KL(input="target(x_init)", target="target(x_adv)")),
            "agr": (20.0, KL(input="target(x_adv)", target="target(x)")),
        }
    )
    graph = TrainingGraph(models=models, generator=gen, loss=loss)
    graph.train()
    rec = Recorder(graph.models)
    x, y = batch()
    out = graph.step(x, y)
    assert rec.calls["target"] == 4  # init (kept as a view) + attack step 2 + x_adv + x
    assert rec.modes["target"] == [True] * 4
    graph.zero_grad()
    out["parts"]["amr_main"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in graph.models["target"].parameters())


def pgd_at_graph(steps: int) -> TrainingGraph:
    """PGD-AT (train-mode PGD on CE, CE on the adversarial view only), in train mode."""
    models = {"target": tiny_net(0)}
    gen = PGDGenerator(objective=CEObjective(), eps=8 / 255, step_size=2 / 255, steps=steps, bn_mode="train")
    graph = TrainingGraph(
        models=models, generator=gen, loss=WeightedLoss(terms={"ce": (1.0, CrossEntropy("target(x_adv)"))})
    )
    return graph.train()


def test_metric_logits_never_add_a_train_mode_forward():
    """PGD-AT reads only target(x_adv); clean accuracy comes from an eval-mode no-grad forward."""
    graph = pgd_at_graph(steps=2)
    rec = Recorder(graph.models)
    out = graph.step(*batch())
    assert rec.modes["target"] == [True, True, True, False]
    assert out["clean_logits"].shape == (6, 3) and not out["clean_logits"].requires_grad


@pytest.mark.parametrize(
    "models, loss_view, message",
    [
        ({"target": 0}, "guide(x)", "names model 'guide'"),
        ({"target": 0, "guide": 1}, "target(x_init)", "x_init needs PGDGenerator.init_view"),
    ],
)
def test_graph_rejects_views_it_cannot_compute(models, loss_view, message):
    nets = {name: tiny_net(seed) for name, seed in models.items()}
    gen = PGDGenerator(objective=CEObjective(), eps=0.03, step_size=0.01, steps=1)
    loss = WeightedLoss(terms={"t": (1.0, CrossEntropy(view=loss_view))})
    with pytest.raises(ValueError, match=message):
        TrainingGraph(models=nets, generator=gen, loss=loss)


def test_generator_model_must_exist():
    gen = PGDGenerator(
        objective=SoftLabelKLObjective(soft_label_model="guide"), eps=0.03, step_size=0.01, steps=1
    )
    loss = WeightedLoss(terms={"t": (1.0, CrossEntropy(view="target(x)"))})
    with pytest.raises(ValueError, match="uses model 'guide'"):
        TrainingGraph(models={"target": tiny_net(0)}, generator=gen, loss=loss)


def test_metric_forward_restores_each_submodule_mode():
    """The eval-mode metric forward puts every submodule back in its own mode (a BN kept in eval stays)."""
    graph = pgd_at_graph(steps=1)
    graph.target[1].eval()
    graph.step(*batch())
    assert not graph.target[1].training
    assert all(m.training for i, m in enumerate(graph.target) if i != 1)


def test_fit_tells_epoch_scheduled_parts_each_epoch_including_after_a_resume(shared_data, tmp_path):
    """Parts with ``set_epoch`` (FAT's tau, GAIRAT's burn-in, AWP's warm-up) hear every epoch, 1-based,
    before its first step, and a resumed run tells them the epochs it still trains."""
    from components.experiment import experiment
    from pipeline.config import load_config

    overrides = [
        "TARGET_BACKBONE = 'small_cnn'", "ATTACK_STEPS = 1", "EPOCHS = 3",
        "BATCH_SIZE = 32", "DataModule.train_size = 64", "DataModule.val_size = 32", "Trainer.val_steps = 1",
        "Trainer.progress = False",
    ]  # fmt: skip
    heard: list[tuple[int, int, int]] = []

    def run(stop_after: int | None, resume: bool) -> None:
        load_config("pgd_at_cifar10", overrides)
        exp = experiment()
        term = next(iter(exp.graph.loss.terms.values()))[1]
        steps = {"n": 0}
        original = exp.graph.step

        def counting(x, y):
            steps["n"] += 1
            return original(x, y)

        exp.graph.step = counting  # an instance attribute: Trainer.train_step calls graph.step(x, y)
        type(term).set_epoch = lambda self, e, n: heard.append((e, n, steps["n"]))
        try:
            stop = (lambda: len(heard) >= stop_after) if stop_after is not None else None
            try:
                exp.trainer.fit(
                    exp.graph, exp.data, "cpu", tmp_path,
                    resume_from=tmp_path / "last.pt" if resume else None, should_stop=stop,
                )  # fmt: skip
            except Exception as err:  # the interrupted first run
                assert type(err).__name__ == "TrainingInterruptedError"
        finally:
            del type(term).set_epoch
        gin.clear_config()

    run(stop_after=2, resume=False)  # epochs 1 and 2 start; the stop comes at the first step of epoch 2
    assert [(e, n) for e, n, _ in heard] == [(1, 3), (2, 3)]
    assert heard[0][2] == 0 and heard[1][2] == 2  # before the epoch's first step (64 / 32 = 2 steps)
    heard.clear()
    run(stop_after=None, resume=True)  # last.pt holds epoch 1: epochs 2 and 3 remain
    assert [(e, n) for e, n, _ in heard] == [(2, 3), (3, 3)]
