"""AutoAttack (Croce & Hein, ICML 2020) as an evaluation attack, through the ``pyautoattack`` package.

The headline robustness number of METHODS 1.5: L-inf AutoAttack, standard version = APGD-CE, APGD-T (9
target classes), FAB-T (9 target classes) and Square (5000 queries), each run on the examples that the
previous ones did not fool. ``version='dev'`` runs only the first two (APGD-CE + APGD-T): much cheaper, and
usually within a few tenths of a percent of the standard number on models without gradient masking.

The stages are run one at a time through pyautoattack's own ``run_standard_evaluation`` (configured by its
``standard`` version), so that the per-example result of every stage is known: the evaluation suite uses it to
report per-stage accuracies and to flag Square (a black-box attack) finding what the gradient attacks missed.
pyautoattack's own warnings (randomized model, probabilities as outputs, zero gradients, Square wins) are
captured into :attr:`AutoAttack.flags` instead of only being printed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator

import gin
import pyautoattack
import torch
from torch import Tensor, nn

from components.attacks.pgd import check_eps
from components.eval.attacks import EPS_8_255
from components.modes import model_mode

#: The stages each version runs, in order (pyautoattack's attack names).
STAGES: dict[str, tuple[str, ...]] = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "dev": ("apgd-ce", "apgd-t"),
    # The first stage alone, a tenth of dev's cost: for smoke runs (the table command under `smoke`), whose
    # numbers only show that the pipeline works.
    "apgd-ce": ("apgd-ce",),
}


def model_device(model: nn.Module, default: torch.device | None = None) -> torch.device:
    """The device of the model's first parameter or buffer (pyautoattack defaults to CPU otherwise)."""
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return default if default is not None else torch.device("cpu")


class _Capture(logging.Handler):
    """Collects pyautoattack's warnings, which it only logs, so that none of them is lost."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _capture_warnings(logger: logging.Logger) -> Iterator[_Capture]:
    handler = _Capture()
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@gin.configurable
class AutoAttack:
    """L-inf AutoAttack at radius ``eps`` (pixel space): ``attack(model, x, y) -> x_adv``.

    * ``version``: ``'standard'`` (APGD-CE, APGD-T x9, FAB-T x9, Square 5000), ``'dev'`` (APGD-CE, APGD-T) or
      ``'apgd-ce'`` (its first stage alone, for smoke runs).
    * ``batch_size``: the chunk size pyautoattack attacks at once (256 in the D2R evaluation).
    * ``seed``: pyautoattack's seed for every stage, for reproducible numbers.

    After a call, :attr:`last_stages` maps each stage to a bool tensor: still correctly classified after that
    stage and all earlier ones (cumulative, as AutoAttack reports them); :attr:`flags` holds pyautoattack's
    warnings from that call. The model runs in eval mode with frozen parameters during the call (each
    module's mode and flag restored afterwards), and the global RNG state is restored afterwards
    (pyautoattack reseeds it).
    """

    white_box = True
    #: Stages that use only queries; the suite compares what they fool with the gradient attacks.
    black_box_stages = ("square",)

    def __init__(
        self, eps: float = EPS_8_255, version: str = "standard", batch_size: int = 256, seed: int = 0
    ) -> None:
        check_eps(eps, None, "AutoAttack")
        if version not in STAGES:
            raise ValueError(f"AutoAttack: version={version!r}; expected one of {sorted(STAGES)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"AutoAttack: batch_size={batch_size!r} must be a positive int")
        self.eps, self.version, self.batch_size, self.seed = eps, version, batch_size, seed
        self.last_stages: dict[str, Tensor] = {}
        self.flags: list[str] = []

    @property
    def stages(self) -> tuple[str, ...]:
        """pyautoattack attack names run by this version, in order."""
        return STAGES[self.version]

    @property
    def name(self) -> str:
        """Human-readable name, e.g. ``AutoAttack (standard)``."""
        return f"AutoAttack ({self.version}: {', '.join(s.upper() for s in self.stages)})"

    def with_eps(self, eps: float, scale_step: bool = False) -> AutoAttack:
        """A copy at radius ``eps`` (AutoAttack has no step size to scale)."""
        check_eps(eps, None, "AutoAttack")
        other = copy.copy(self)
        other.eps, other.last_stages, other.flags = eps, {}, []
        return other

    def __repr__(self) -> str:
        return f"AutoAttack(eps={self.eps:.6g}, version={self.version!r}, batch_size={self.batch_size})"

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Adversarial examples for ``x``; examples no stage fools are returned unchanged."""
        device = model_device(model, x.device)
        x = x.detach().to(device, torch.float32)
        y = y.to(device)
        fork = [device.index or 0] if device.type == "cuda" else []
        # Frozen parameters: FAB calls .backward(), which would fill (and leave) their .grad, and every
        # attack would keep activations for weight gradients it never uses. Eval mode is the documented
        # precondition (every caller already sets it); here it is also guaranteed.
        with (
            torch.random.fork_rng(devices=fork),
            model_mode(model, train=False, freeze=True),
            torch.no_grad(),
        ):
            logits = model(x)
            robust = logits.argmax(1) == y
            x_adv = x.clone()
            adversary = pyautoattack.AutoAttack(
                model, device=device, eps=self.eps, norm="Linf", seed=self.seed, version="standard"
            )
            # With fewer than 10 classes there are fewer than 9 target classes to try.
            targets = min(9, logits.shape[1] - 1)
            adversary.apgd_targeted.n_target_classes = targets
            adversary.fab.n_target_classes = targets
            stages: dict[str, Tensor] = {}
            with _capture_warnings(adversary.logger) as captured:
                for stage in self.stages:
                    idx = robust.nonzero().squeeze(1)
                    if idx.numel():
                        # One stage at a time on the survivors: exactly what AutoAttack does internally,
                        # but it tells us which examples each stage fooled.
                        adversary.attacks_to_run = [stage]
                        adv, _ = adversary.run_standard_evaluation(x[idx], y[idx], batch_size=self.batch_size)
                        adv = adv.to(device)
                        fooled = model(adv).argmax(1) != y[idx]
                        x_adv[idx[fooled]] = adv[fooled]
                        robust[idx[fooled]] = False
                    stages[stage] = robust.clone()
        self.last_stages = stages
        self.flags = [f"[autoattack] {m}" for m in dict.fromkeys(captured.messages)]
        return x_adv
