"""The parts of the ``tune`` entry point (``python -m pipeline.tune``), one module each.

``space`` (what a study searches, the ``SearchSpace`` gin configurable), ``storage`` (where a study lives and
the liveness of its trials), ``pruning`` (when a trial stops early), ``plan`` (what a worker checked before
any work and the names it records under), ``study`` (the study and its parent MLflow run), ``worker`` (the
trial loop) and ``report`` (best parameters, plots and summary). Nothing is imported here: the config loader
imports ``space`` alone, and loading a config stays cheap.
"""
