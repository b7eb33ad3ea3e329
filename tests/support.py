"""Helpers shared by the tests: tiny models, seeded batches, an easy synthetic task, and the tiny real run
that the entry-point tests train."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

SHAPE = (3, 8, 8)
DIM = 3 * 8 * 8


# The smoke profile shrunk further, still a real run on the offline shards: 256 training images in batches
# of 64 (4 steps an epoch), 64 validation and 64 test images. Entry-point tests prepend ``EPOCHS = n``.
SMOKE = "d2r_cag_cifar10,smoke"
TINY = (
    "DataModule.train_size = 256; DataModule.val_size = 64; DataModule.test_size = 64; BATCH_SIZE = 64; "
    "Trainer.progress = False"
)


def cpu_args(overrides: str, gin: str = SMOKE) -> list[str]:
    """The train and tune entry points' arguments for a CPU run of ``gin`` with ``overrides``."""
    return ["--gin", gin, "--overrides", overrides, "--device", "cpu"]


def synthetic(n: int, seed: int):
    """Ten classes, each a fixed random image (pixels in [0.415, 0.585]) plus N(0, 0.05) noise, in [0, 1]."""
    protos = 0.415 + 0.17 * torch.rand(10, *SHAPE, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return (protos[y] + 0.05 * torch.randn(n, *SHAPE, generator=g)).clamp(0, 1), y


def train_mlp() -> nn.Module:
    """A small MLP trained for about a second: ~100% clean, partly robust at 8/255 (PGD-20 ~40%), not at
    all at 16/255; in eval mode."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, 10))
    x, y = synthetic(2000, seed=1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        idx = torch.randint(0, 2000, (128,))
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.zero_grad(set_to_none=True)
    return net.eval()


def binary_linear(w: torch.Tensor, b: float = 0.0) -> nn.Module:
    """Logits ``[0, w.x + b]``: class 1 wins iff ``w.x + b > 0``."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(DIM, 2))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].weight[1] = w
        net[1].bias.copy_(torch.tensor([0.0, b]))
    return net


def batch(n: int = 8, seed: int = 0, low: float = 0.0, high: float = 1.0, classes: int = 10):
    """A seeded batch of ``n`` 3x8x8 images uniform in [low, high] and labels in [0, classes)."""
    g = torch.Generator().manual_seed(seed)
    x = low + (high - low) * torch.rand(n, *SHAPE, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def count_forwards(module: nn.Module) -> list[bool]:
    """Record ``module.training`` at every forward call (the list length is the number of calls)."""
    calls: list[bool] = []
    module.register_forward_hook(lambda m, inp, out: calls.append(m.training))
    return calls


def conv_bn_net(seed: int = 0, num_classes: int = 10) -> nn.Module:
    """Two conv + BatchNorm + ReLU blocks and a linear head, for 3x8x8 inputs."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, num_classes),
    )


def run_python_without(code: str, blocked: tuple[str, ...] = ("mlflow", "optuna"), timeout: float = 600):
    """Run ``code`` in a fresh interpreter (repo root on the path) where importing any of ``blocked`` fails,
    as on a GPU machine that has torch but not MLflow or Optuna. Returns the CompletedProcess."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    # None in sys.modules makes `import name` (and `import name.sub`) raise ImportError.
    shim = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", shim + code],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def bench_without_mlflow(argv: list[str]):
    """``pipeline.bench.main(argv)`` where MLflow and Optuna cannot be imported; asserts it never loaded
    them. Returns the CompletedProcess."""
    code = (
        "from pipeline.bench import main\n"
        f"rc = main({argv!r})\n"
        "loaded = [m for m in ('mlflow', 'optuna') if sys.modules.get(m) is not None]\n"
        "assert not loaded, loaded\n"
        "sys.exit(rc)\n"
    )
    return run_python_without(code)


def on_ci() -> bool:
    """Whether the suite runs under CI (``CI=true``, as GitHub Actions, GitLab and `.ci/run` set it)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Skip a test whose data, server or tool is missing here; under CI, fail it with ``reason``.

    A green CI run must mean the end-to-end tests ran: locally a missing ../shared/data or PostgreSQL is a
    listed skip (``-ra``), on CI it is an error of the CI set-up.
    """
    if on_ci():
        pytest.fail(f"CI=true and {reason}: CI must provide it (see .ci/run)", pytrace=False)
    pytest.skip(reason)


class Recorder:
    """Calls ``fn`` and keeps its last result (other attributes pass through): lets a test read the attack a
    training step ran, or a transcription's inner call, without running it a second time."""

    def __init__(self, fn):
        self.fn, self.last = fn, None

    def __getattr__(self, name):
        return getattr(self.fn, name)

    def __call__(self, *args, **kwargs):
        self.last = self.fn(*args, **kwargs)
        return self.last


def half_self_labelled(model: nn.Module, n: int = 8, seed: int = 1):
    """A seeded 3x32x32 batch whose first half carries ``model``'s own clean predictions as labels: an
    attack on it has examples that start right and flip at different steps, and examples wrong from the
    start (early stopping and kappa see all cases)."""
    torch.manual_seed(seed)
    x, y = torch.rand(n, 3, 32, 32), torch.randint(0, 10, (n,))
    with torch.no_grad():
        y[: n // 2] = model.eval()(x[: n // 2]).argmax(1)
    return x, y


def step_both(graph, ref_model: nn.Module, x, y, authors_step, seed: int = 2, **kwargs):
    """One training step of ``graph`` and of a transcription of the authors' step on ``ref_model`` (a copy
    of the target), each from the same RNG state, each backpropagated. Returns the two losses."""
    torch.manual_seed(seed)
    ours = graph.step(x, y)["loss"]
    ours.backward()
    torch.manual_seed(seed)
    return ours, authors_step(ref_model, x, y, **kwargs)


def assert_same_step(model: nn.Module, ref_model: nn.Module) -> None:
    """Parameter gradients equal up to float rounding (the batch may be summed in another order) and
    BatchNorm running statistics equal."""
    for (name, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=5e-6, msg=name)
    for (name, a), b in zip(model.named_buffers(), ref_model.buffers()):
        torch.testing.assert_close(a, b, msg=name)


def mlflow_run_env(tracking_uri: str, data) -> dict[str, str]:
    """The environment of an ``mlflow run`` subprocess: this store and data, the venv's python first on PATH,
    and no run or experiment id leaking in from the test process."""
    import os
    import sys
    from pathlib import Path

    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, ROBUSTFLOW_DATA=str(data))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(key, None)
    return env


def fit_tiny(spec: str, overrides: str, checkpoint_dir, stop_after_steps=None, resume_from=None):
    """``Trainer.fit`` of the config ``spec`` + ``overrides`` in-process on the CPU, optionally stopped (as
    SIGTERM would) once ``stop_after_steps`` steps ran. Returns ``(TrainResult or None if stopped, exp)``."""
    from components.experiment import experiment
    from components.training import TrainingInterruptedError
    from pipeline.config import load_config

    load_config(spec, overrides)
    exp = experiment()
    steps = {"n": 0}

    def should_stop():
        steps["n"] += 1
        return stop_after_steps is not None and steps["n"] > stop_after_steps

    try:
        result = exp.trainer.fit(
            exp.graph, exp.data, "cpu", checkpoint_dir, resume_from=resume_from, should_stop=should_stop
        )
    except TrainingInterruptedError:
        return None, exp
    return result, exp
