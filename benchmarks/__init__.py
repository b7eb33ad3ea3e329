"""Baselines that robustflow's speed is measured against (run by ``python -m pipeline.bench``).

Nothing here is used for training: these are deliberately plain re-statements of the authors' scripts, so
the benchmark can report how much faster the same method runs through robustflow on the same machine.
"""
