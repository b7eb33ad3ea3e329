"""Optimizers over the models that train: one optimizer, one parameter group per model."""

from __future__ import annotations

from collections.abc import Mapping

import gin
import torch
from torch import nn


@gin.configurable
def sgd(
    models: Mapping[str, nn.Module],
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 2e-4,
    nesterov: bool = False,
    fused: bool | None = None,
) -> torch.optim.SGD:
    """SGD as in LBGAT/D2R: one optimizer for target and guide, same hyper-parameters, a group per model.

    ``fused=None`` uses the fused CUDA kernel when every parameter lives on a CUDA device.
    """
    groups = [
        {"params": [p for p in m.parameters() if p.requires_grad], "name": n} for n, m in models.items()
    ]
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.SGD(
        groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, fused=fused or None
    )
