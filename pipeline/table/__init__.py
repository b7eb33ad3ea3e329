"""``python -m pipeline.table``: a paper's results table as one command (``mlflow run . -e table``).

The modules, in the order a run goes through them:

* ``spec``: what a table is (``Table`` and ``Row``, gin configurables bound in ``gin/tables/*.gin``);
* ``plan``: every row's config, fingerprint and data checked before any work, and the evaluation plan;
* ``run``: each row trained (or reused) and evaluated (or reused), FAILED with its reason when it fails;
* ``render``: the markdown table, robustflow's numbers beside the paper's and the differences;
* ``cli``: the options, the parent MLflow run, and ``main``.
"""
