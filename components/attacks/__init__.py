"""Training-time attack generators: PGD iteration with pluggable objective, init and BN mode."""

from components.attacks.early_stop import EarlyStopPGD, Misclassified, ProbabilityGap, StopCriterion
from components.attacks.inits import GaussianInit, Init, RandomSignInit, UniformInit, ZeroInit
from components.attacks.noisy_copy import NoisyCopyGenerator
from components.attacks.objectives import CEObjective, Objective, SoftLabelKLObjective
from components.attacks.pgd import AttackResult, PGDGenerator, check_eps, project
from components.attacks.strategy import Strategy, StrategyPGDGenerator, StrategySpace, sample_strategy

__all__ = [
    "AttackResult",
    "CEObjective",
    "EarlyStopPGD",
    "GaussianInit",
    "Init",
    "Misclassified",
    "NoisyCopyGenerator",
    "Objective",
    "PGDGenerator",
    "ProbabilityGap",
    "RandomSignInit",
    "SoftLabelKLObjective",
    "StopCriterion",
    "Strategy",
    "StrategyPGDGenerator",
    "StrategySpace",
    "UniformInit",
    "ZeroInit",
    "check_eps",
    "project",
    "sample_strategy",
]
