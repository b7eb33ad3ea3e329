"""Training-time attack generators: PGD iteration with pluggable objective, init and BN mode."""

from components.attacks.inits import GaussianInit, Init, RandomSignInit, UniformInit, ZeroInit
from components.attacks.objectives import CEObjective, Objective, SoftLabelKLObjective
from components.attacks.pgd import AttackResult, PGDGenerator, check_eps, project
from components.attacks.strategy import Strategy, StrategyPGDGenerator, StrategySpace, sample_strategy

__all__ = [
    "AttackResult",
    "CEObjective",
    "GaussianInit",
    "Init",
    "Objective",
    "PGDGenerator",
    "RandomSignInit",
    "SoftLabelKLObjective",
    "Strategy",
    "StrategyPGDGenerator",
    "StrategySpace",
    "UniformInit",
    "ZeroInit",
    "check_eps",
    "project",
    "sample_strategy",
]
