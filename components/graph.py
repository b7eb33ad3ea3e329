"""The training graph: named models, an attack generator and weighted loss terms over named views.

Every method in METHODS.md is this one step with different parts:

1. the generator turns (models, x, y) into x_adv (and, for RegMix, x_init with its view);
2. each view a loss term names is computed once, in train mode, in the order the terms first name it;
3. the weighted loss is backpropagated into every trained model through one optimizer.

A learned attacker (``attacker``, e.g. LAS-AT's strategy network; ``components.learned_attack``) is one
more part: its models are not among ``models`` (the target's optimizer never sees them), the generator
reads them through ``all_models``, and ``update_attacker`` lets it learn before the target's step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import torch
from torch import Tensor, nn

from components.attacks import PGDGenerator
from components.learned_attack import Autocast, LearnedAttacker
from components.losses import WeightedLoss
from components.modes import model_mode
from components.views import parse_view


@gin.configurable
class TrainingGraph(nn.Module):
    """Models + generator + loss; ``step(x, y)`` returns the loss and what the metrics need, on device."""

    def __init__(
        self,
        models: Mapping[str, nn.Module] = gin.REQUIRED,
        generator: PGDGenerator = gin.REQUIRED,
        loss: WeightedLoss = gin.REQUIRED,
        eval_model: str = "target",
        perturbation: Any = None,
        bn_forwards: Sequence[str] = (),
        post_step_forwards: Sequence[str] = (),
        attacker: LearnedAttacker | None = None,
    ) -> None:
        super().__init__()
        self.models = nn.ModuleDict(dict(models))
        self.generator = generator
        self.loss = loss
        self.eval_model = eval_model
        # A weight perturbation (components.weight_perturbation.AWP): perturb(models, inputs, y) after the
        # attack, restore() after the optimizer step (finish_step). Not a submodule: never checkpointed.
        self.perturbation = perturbation
        # Forwards the authors' code runs only for their effect on BatchNorm running statistics: in train
        # mode, without gradient; bn_forwards after the loss views (RAT's six repeated forwards, TRADES-AWP's
        # third), post_step_forwards after the step and the restore (AT-AWP's logging forward).
        self.bn_forwards = tuple(str(parse_view(v)) for v in bn_forwards)
        self.post_step_forwards = tuple(str(parse_view(v)) for v in post_step_forwards)
        self._pending_inputs: dict[str, Tensor] | None = None
        self.attacker = attacker
        # Data-parallel wrappers used for the loss views (set by the trainer under torchrun); attacks and
        # metrics use the plain modules. A plain dict, so the wrappers are not registered submodules.
        self.parallel: dict[str, nn.Module] = {}
        self._validate()

    def _validate(self) -> None:
        known = set(self.models)
        if self.eval_model not in known:
            raise ValueError(f"eval_model {self.eval_model!r} is not one of the models {sorted(known)}")
        owned = set(self.attacker.models) if self.attacker is not None else set()
        if owned & known:
            raise ValueError(f"the attacker's models {sorted(owned & known)} are also TrainingGraph.models")
        known |= owned
        for name in self.generator.models_used:
            if name not in known:
                raise ValueError(
                    f"the attack generator uses model {name!r}, but the models are {sorted(known)}"
                )
        available = {"x", "x_adv"} | ({"x_init"} if self.generator.init_view else set())
        for name in [*self.loss.views, *self.bn_forwards, *self.post_step_forwards]:
            view = parse_view(name)
            if view.model not in known:
                raise ValueError(
                    f"loss view {name!r} names model {view.model!r}; the models are {sorted(known)}"
                )
            if view.input not in available:
                raise ValueError(
                    f"loss view {name!r} reads {view.input!r}, which this generator does not produce "
                    f"(available: {sorted(available)}; x_init needs PGDGenerator.init_view = True)"
                )
        reported = tuple(getattr(self.generator, "reports", ()))
        for name in self.loss.reports:
            if name not in reported:
                raise ValueError(
                    f"a loss term reads the report {name!r}, which {type(self.generator).__name__} does not "
                    f"produce (it reports: {list(reported)})"
                )
        # Parts that read the models themselves (RAT's classifier gradient; AWP's proxy) get them here.
        for _, term in self.loss.terms.values():
            if callable(getattr(term, "bind_models", None)):
                term.bind_models(self.models)
        if self.perturbation is not None:
            self.perturbation.bind(self.models, self.loss)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Tell the parts that follow a schedule over training which epoch starts (1-based, of ``epochs``).

        Called by the trainer before each epoch (also after a resume, so schedules need no saved state).
        Any part may define ``set_epoch(epoch, epochs)``: the generator, its objective and init, and each
        loss term (FAT's tau, GAIRAT's burn-in and lambda, AWP's warm-up are epoch schedules in their code).
        """
        parts = [self.generator, self.generator.objective, self.generator.init, self.attacker]
        parts += [term for _, term in self.loss.terms.values()]
        parts.append(self.perturbation)
        for part in parts:
            hook = getattr(part, "set_epoch", None)
            if callable(hook):
                hook(epoch, epochs)

    @property
    def target(self) -> nn.Module:
        """The model that is evaluated, checkpointed as 'best' and registered."""
        return self.models[self.eval_model]

    @property
    def all_models(self) -> dict[str, nn.Module]:
        """Every named model: ``models`` (trained by the target's optimizer) and the attacker's."""
        return {**self.models, **(self.attacker.models if self.attacker is not None else {})}

    def update_attacker(
        self, x: Tensor, y: Tensor, lr: float, autocast: Autocast = contextlib.nullcontext
    ) -> dict[str, Tensor] | None:
        """Let the learned attacker (if any) take its own step on this batch, before the target's step.

        ``lr`` is the target's current learning rate (LAS-AT's look-ahead copy steps with it). Returns the
        attacker's metrics when it learned, else None.
        """
        if self.attacker is None:
            return None
        return self.attacker.update(self.all_models, self.generator, x, y, lr, autocast)

    def step(self, x: Tensor, y: Tensor) -> dict[str, Tensor | dict[str, Tensor]]:
        """One forward of the method (attack + views + loss); the caller runs backward and the optimizer.

        Returns ``loss`` (weighted total), ``parts`` (unweighted terms) and the target's logits on the clean
        and adversarial inputs for accuracy (computed without gradient in eval mode only when no loss term
        already reads them, so metrics never add a train-mode forward that would move BN statistics).
        With a weight perturbation the models hold perturbed weights from here until ``finish_step()``
        (``Trainer.train_step`` calls it after the optimizer step); metrics logits are then perturbed ones.
        """
        attack = self.generator(self.all_models, x, y)
        inputs = {"x": x, **attack.inputs}
        views: dict[str, Tensor] = dict(attack.views)
        if self.perturbation is not None:
            self.perturbation.perturb(self.models, inputs, y)
        try:
            return self._views_and_loss(views, inputs, y, attack.reports)
        except BaseException:
            self.restore()  # a perturbation never outlives a failed step
            raise

    def _views_and_loss(
        self, views: dict[str, Tensor], inputs: dict[str, Tensor], y: Tensor, reports: dict[str, Tensor]
    ) -> dict[str, Tensor | dict[str, Tensor]]:
        for name in self.loss.views:
            if name not in views:
                views[name] = self._forward(name, inputs)
        # Per-example reports (e.g. kappa) sit beside the views under their own names; terms that
        # registered them read them (docs/architecture.md, "Generators that report").
        total, parts = self.loss({**views, **reports}, y)
        self._bn_forwards(self.bn_forwards, inputs)
        self._pending_inputs = inputs if self.post_step_forwards else None
        out: dict[str, Tensor | dict[str, Tensor]] = {"loss": total, "parts": parts}
        missing = {}
        for key, inp in (("clean_logits", "x"), ("adv_logits", "x_adv")):
            name = f"{self.eval_model}({inp})"
            if name in views:
                out[key] = views[name].detach()
            else:
                missing[key] = inp
        if missing:
            with model_mode(self.target, train=False), torch.no_grad():
                for key, inp in missing.items():
                    out[key] = self.target(inputs[inp])
        return out

    def _forward(self, name: str, inputs: Mapping[str, Tensor]) -> Tensor:
        view = parse_view(name)
        return self.parallel.get(view.model, self.models[view.model])(inputs[view.input])

    def _bn_forwards(self, names: Sequence[str], inputs: Mapping[str, Tensor]) -> None:
        if not names:
            return
        with model_mode(self.models.values(), train=True), torch.no_grad():
            for name in names:
                self._forward(name, inputs)

    def restore(self) -> None:
        """Take a weight perturbation off the models (a no-op without one, or when none is applied)."""
        if self.perturbation is not None:
            self.perturbation.restore()

    def finish_step(self) -> None:
        """After the optimizer step: restore the perturbed weights, then run ``post_step_forwards``.

        ``Trainer.train_step`` calls it right after ``optimizer.step()``, so the divergence guard, gradient
        clipping's successor steps, validation and checkpoints only ever see restored weights.
        """
        self.restore()
        inputs, self._pending_inputs = self._pending_inputs, None
        if inputs is not None:
            self._bn_forwards(self.post_step_forwards, inputs)
