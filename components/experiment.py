"""The root configurable: what one gin experiment builds (graph, data, trainer)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gin
import torch

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
    graph: Callable[[], TrainingGraph] = gin.REQUIRED,
    data: Callable[[], Any] = gin.REQUIRED,
    trainer: Callable[[], Trainer] = gin.REQUIRED,
    seed: int = 0,
    cudnn_benchmark: bool = False,
) -> Experiment:
    """Build the three parts from their configurables (bound as ``@TrainingGraph``, without a call).

    The global RNG is seeded first, so the models' initial weights depend on ``seed`` alone and not on
    what ran before in the process. Every constructor validates its arguments: errors come before work.

    ``cudnn_benchmark`` sets ``torch.backends.cudnn.benchmark`` for the process (cuDNN times its
    convolution algorithms on the first batch of each shape and keeps the fastest; results can differ
    in the last bits between runs). Off by default, torch's own default; it only matters on CUDA.
    """
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    torch.manual_seed(seed)
    return Experiment(graph=graph(), data=data(), trainer=trainer())
