"""``torch.compile`` of the models (``Trainer.compile``) compiles a bounded set of graphs, not one per step.

A training step runs each model in several modes: the attack in eval mode with gradients w.r.t. the input,
the soft-label model under ``no_grad``, the loss views in train mode with weight gradients; validation
adds ``no_grad`` and attack passes at the evaluation batch size. Each combination is one dynamo graph; a
guard that failed every step (a BN-mode flip, a Python value that changes) would recompile every step,
and past ``torch._dynamo.config.recompile_limit`` (8) dynamo silently falls back to eager.

The backend is ``eager`` here: which guards fail, hence what recompiles, is decided by dynamo before any
backend runs, and inductor would take minutes per graph on a shared 2-core CPU.
"""

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from components.experiment import experiment
from pipeline.bench import bench_training, method_overrides, parse_args
from pipeline.config import load_config

SMALL = [
    "TARGET_BACKBONE = 'small_cnn'", "GUIDE_BACKBONE = 'small_cnn'", "ATTACK_STEPS = 2", "BATCH_SIZE = 32",
    "Trainer.compile = True", "Trainer.progress = False",
]  # fmt: skip


@pytest.fixture
def eager_compile(monkeypatch, one_thread):
    """``Module.compile`` with the eager backend and fresh dynamo caches and counters."""
    original = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: original(self, backend="eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


# The exact graph counts below were measured with this torch release; dynamo's graph breaks and guards
# change between releases, so elsewhere only the properties (bounded, none after epoch 1) are asserted.
MEASURED_ON = "2.14."


def _exact(measured: object, expected: object) -> None:
    if torch.__version__.startswith(MEASURED_ON):
        assert measured == expected


def _graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def _fit_graph_counts(tmp_path, extra):
    """Graphs compiled by the end of each of 3 epochs of D2R-CAG (two models, both BN modes)."""
    load_config(
        "d2r_cag_cifar10",
        [
            *SMALL,
            "EPOCHS = 3",
            "DataModule.train_size = 128",
            "DataModule.val_size = 40",  # 16 + 16 + a ragged 8
            "DataModule.eval_batch_size = 16",
            "Trainer.val_steps = 2",
            *extra,
        ],
    )
    exp = experiment()
    seen = []
    exp.trainer.fit(exp.graph, exp.data, "cpu", tmp_path, on_epoch_end=lambda *_: seen.append(_graphs()))
    return seen


@pytest.mark.slow
def test_fit_compiles_a_bounded_set_of_graphs_and_nothing_after_the_first_epoch(
    shared_data, tmp_path, eager_compile
):
    ragged = _fit_graph_counts(tmp_path / "ragged", [])
    # Train: no_grad soft label, attack (input grad), loss views (weight grads); validation at batch 16
    # (no_grad and attack) and at the ragged 8 (no_grad and attack), and one dynamic-batch attack graph:
    # the validation attack runs only the examples still classified correctly (components/eval/attacks.py),
    # so its batch shrinks and dynamo marks that dimension dynamic. 8, all in epoch 1, then none.
    # A guard failing every step would keep compiling up to the limit (then go eager).
    assert ragged == [ragged[0]] * 3 and 0 < ragged[0] <= torch._dynamo.config.recompile_limit
    _exact(ragged, [8, 8, 8])
    torch._dynamo.reset()
    counters.clear()
    static = _fit_graph_counts(tmp_path / "static", ["DataModule.val_drop_last = True"])
    # Dropping the ragged validation batch removes the odd-size graphs (no_grad and attack); the shrinking
    # attack batch's dynamic graph stays.
    assert static == [static[0]] * 3 and 0 < static[0] < ragged[0]
    _exact(static, [6, 6, 6])


def test_bench_reports_no_recompiles_during_timed_steps(eager_compile):
    args = parse_args(["--target", "small_cnn", "--guide", "small_cnn", "--batch-size", "8", "--compile"])
    overrides, _ = method_overrides("d2r_cag_cifar10", args)
    load_config("d2r_cag_cifar10", [*overrides, "ATTACK_STEPS = 2"])
    exp = experiment()
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (48,))
    row = bench_training(exp, images, labels, steps=4, warmup=2, device=torch.device("cpu"), seed=0)
    assert row["compile"] is True
    assert 0 < row["compiled_graphs_warmup"] < torch._dynamo.config.recompile_limit
    _exact(row["compiled_graphs_warmup"], 3)  # no_grad soft label, attack, loss views
    assert row["compiled_graphs_timed"] == 0
    assert row["loss_finite"]


def test_val_drop_last_serves_full_batches_only(shared_data):
    load_config(
        "pgd_at_cifar10",
        ["DataModule.val_size = 40", "DataModule.eval_batch_size = 16", "DataModule.val_drop_last = True"],
    )
    data = experiment().data
    assert [len(y) for _, y, _ in data.val_loader()] == [16, 16]
    assert data.split_sizes()["val"] == 40  # the split itself is unchanged; only the loader drops
    with pytest.raises(ValueError, match="leaves no validation batch"):
        load_config("pgd_at_cifar10", ["DataModule.val_size = 8", "DataModule.val_drop_last = True"])
        experiment()


def test_cudnn_benchmark_is_an_experiment_switch_off_by_default():
    load_config("pgd_at_cifar10", ["TARGET_BACKBONE = 'small_cnn'"])
    torch.backends.cudnn.benchmark = True  # left on by something else in the process: the build turns it off
    experiment()
    assert torch.backends.cudnn.benchmark is False
    load_config("pgd_at_cifar10", ["TARGET_BACKBONE = 'small_cnn'", "experiment.cudnn_benchmark = True"])
    try:
        experiment()
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = False
