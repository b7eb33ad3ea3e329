"""robustflow's building blocks: plain PyTorch modules and functions, each a gin configurable.

Importing this package registers every configurable with gin. Nothing here imports ``pipeline`` or MLflow.
"""

from components import (  # noqa: F401  (imported for gin registration)
    attacks,
    backbones,
    data,
    eval,
    experiment,
    graph,
    learned_attack,
    losses,
    method,
    optim,
    rat,
    schedules,
    training,
    weight_perturbation,
    weighting,
)
