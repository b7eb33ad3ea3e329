"""One context manager for "these models in this mode, with frozen parameters, restored afterwards".

Attacks, evaluation, checks and measurements all need a model briefly in a different state: eval (or
train) mode for BatchNorm and dropout, and parameters that do not require grad so that input-gradient
steps neither build nor keep anything for weight gradients. Doing that by hand in each place is how a
mode leaks (a model left in eval mode after an attack trains with frozen BN statistics), so every such
place uses :func:`model_mode`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from torch import nn

__all__ = ["model_mode"]


@contextlib.contextmanager
def model_mode(
    models: nn.Module | Iterable[nn.Module], *, train: bool | None, freeze: bool = False
) -> Iterator[None]:
    """Put ``models`` in train (``train=True``) or eval mode, optionally freezing their parameters.

    ``train=None`` leaves the modes as they are (only ``freeze`` applies), for a frozen stretch inside a
    block that has already set them.

    On exit, each submodule gets back its own ``training`` flag (a model may hold parts in their own
    mode, such as a BatchNorm kept in eval) and exactly the parameters frozen here require grad again;
    parameters that were already frozen stay frozen. Shared modules and parameters are handled once.
    """
    group = [models] if isinstance(models, nn.Module) else list(models)
    modes = {} if train is None else {id(m): (m, m.training) for model in group for m in model.modules()}
    params = {id(p): p for model in group for p in model.parameters() if p.requires_grad} if freeze else {}
    if train is not None:
        for model in group:
            model.train(train)
    for p in params.values():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for module, was_training in modes.values():
            module.training = was_training
        for p in params.values():
            p.requires_grad_(True)
