"""An attack run on weight-noised copies of the models: RAT's randomized weights for the attack.

RAT (Jin, Yi, Huang, Zhang, Li, Huang, "Randomized Adversarial Training via Taylor Expansion", CVPR 2023;
code: github.com/Alexkael/Randomized-Adversarial-Training @010da0c, ``TRADES_first_second/
trades_first_second.py`` L29-52) attacks ``model2 = copy.deepcopy(model)`` after adding ``1e-4 * N(0, 1)``
to every parameter whose name contains ``'conv'``; the loss then trains the un-noised model on that x'.

A wrapper around any generator, so the noise composes with every attack: it refreshes a private copy of each
model the attack uses (``components.weight_perturbation.ModelShadow``, the part AWP's proxy also uses), adds
the noise to the copy only, and runs the wrapped generator on the copies. The real models' weights and
BatchNorm statistics never change (in a train-mode attack the copy's statistics move, as ``model2``'s do).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gin
import torch
from torch import Tensor, nn

from components.attacks.pgd import AttackResult, PGDGenerator
from components.weight_perturbation import ModelShadow


def noised_parameters(model: nn.Module, name_contains: str | None) -> list[nn.Parameter]:
    """The parameters that get noise, in ``named_parameters`` order (the order the code draws it in).

    ``name_contains=None``: every parameter of every ``nn.Conv2d``. On the authors' WRN-34-10 this is
    exactly the code's ``'conv' in name`` set (its convolutions are all named ``conv*``/``convShortcut`` and
    have no bias); on backbones that name a convolution otherwise (ResNet-18's ``shortcut.0``, small_cnn's
    ``features.*``) only this form still noises every convolution. A string: the code's name rule as is.
    """
    if name_contains is not None:
        return [p for n, p in model.named_parameters() if name_contains in n]
    conv = {id(p) for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters(recurse=False)}
    return [p for p in model.parameters() if id(p) in conv]


@gin.configurable
class NoisyCopyGenerator:
    """Run ``generator`` on copies of its models whose selected parameters get ``std * N(0, 1)`` added.

    * ``std``: absolute noise scale (RAT: 1e-4, trades_first_second.py L39).
    * ``name_contains``: which parameters; see :func:`noised_parameters` (None: every convolution).

    The noise is drawn before the wrapped generator's init, as in the code (L36-42). Not for generators with
    ``init_view`` (their view must come from the trained model, not a noised copy).
    """

    def __init__(
        self, generator: PGDGenerator = gin.REQUIRED, std: float = 1e-4, name_contains: str | None = None
    ) -> None:
        if isinstance(std, bool) or not (isinstance(std, (int, float)) and std > 0):
            raise ValueError(f"NoisyCopyGenerator.std must be a number > 0, got {std!r}")
        if getattr(generator, "init_view", False):
            raise ValueError("NoisyCopyGenerator cannot wrap a generator with init_view=True")
        self.generator, self.std, self.name_contains = generator, float(std), name_contains
        self._shadows: dict[str, ModelShadow] = {}

    # The graph reads these from its generator (validation, set_epoch).
    @property
    def models_used(self) -> tuple[str, ...]:
        return self.generator.models_used

    @property
    def init_view(self) -> bool:
        return False

    @property
    def objective(self) -> Any:
        return self.generator.objective

    @property
    def init(self) -> Any:
        return self.generator.init

    def __getattr__(self, name: str) -> Any:
        # Everything else a caller reads from a generator (steps, eps, bn_mode, ... for the bench and the
        # stability study) is the wrapped generator's. Guarded so copying/unpickling cannot recurse.
        if name == "generator" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.generator, name)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        hook = getattr(self.generator, "set_epoch", None)
        if callable(hook):
            hook(epoch, epochs)

    def noisy_copies(self, models: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
        """``models`` with each attacked model replaced by its refreshed, noised copy."""
        out = dict(models)
        for name in self.models_used:
            copy_ = self._shadows.setdefault(name, ModelShadow()).sync(models[name])
            with torch.no_grad():
                for p in noised_parameters(copy_, self.name_contains):
                    p.add_(self.std * torch.randn(p.shape, device=p.device, dtype=p.dtype))
            out[name] = copy_
        return out

    def __call__(self, models: Mapping[str, nn.Module], x: Tensor, y: Tensor) -> AttackResult:
        return self.generator(self.noisy_copies(models), x, y)
