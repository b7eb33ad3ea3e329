"""The root configurable: what one gin experiment builds (graph, data, trainer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gin

from components.graph import TrainingGraph
from components.training import Trainer


@dataclass
class Experiment:
    """A fully built experiment, ready for ``trainer.fit(graph, data, ...)``."""

    graph: TrainingGraph
    data: Any
    trainer: Trainer


@gin.configurable
def experiment(
    graph: TrainingGraph = gin.REQUIRED, data: Any = gin.REQUIRED, trainer: Trainer = gin.REQUIRED
) -> Experiment:
    """Build the three parts; every constructor validates its own arguments, so errors come before work."""
    return Experiment(graph=graph, data=data, trainer=trainer)
