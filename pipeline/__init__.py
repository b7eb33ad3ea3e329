"""Entry points and their plumbing: config loading, tracking, registry, tuning (MLflow, Optuna, CLI)."""
