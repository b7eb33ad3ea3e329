"""Training-time attack generators: PGD iteration with pluggable objective, init and BN mode."""

from components.attacks.inits import GaussianInit, Init, RandomSignInit, UniformInit, ZeroInit
from components.attacks.noisy_copy import NoisyCopyGenerator
from components.attacks.objectives import CEObjective, Objective, SoftLabelKLObjective
from components.attacks.pgd import AttackResult, PGDGenerator, check_eps, project

__all__ = [
    "AttackResult",
    "CEObjective",
    "GaussianInit",
    "Init",
    "NoisyCopyGenerator",
    "Objective",
    "PGDGenerator",
    "RandomSignInit",
    "SoftLabelKLObjective",
    "UniformInit",
    "ZeroInit",
    "check_eps",
    "project",
]
