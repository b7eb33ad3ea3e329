"""Whether a training run may be registered: it finished, its losses stayed finite, its weights are finite.

The registry's second line of defence, independent of the trainer's own divergence guard: whatever the
trainer did, a run whose training loss went NaN/inf, whose best checkpoint holds non-finite weights, or
that did not end FINISHED is never registered, so ``champion`` can never land on it.
"""

from __future__ import annotations

import math
import sys
import tempfile

import mlflow
import torch
from mlflow.exceptions import MlflowException

# MLflow's SQL stores keep +-inf as +-float max (they have no column for infinities; NaN has is_nan).
_STORED_INF = sys.float_info.max
LOSS_PREFIX = "train/loss"
BEST_CHECKPOINT = "checkpoints/best.pt"


def finite(value: float) -> bool:
    """A real number, counting the value an SQL store writes for an infinity as infinite."""
    return math.isfinite(value) and abs(value) < _STORED_INF


def nonfinite_losses(client: mlflow.MlflowClient, run_id: str) -> list[str]:
    """``'train/loss@step 3 = nan'`` for each logged training-loss value that is not a real number."""
    run = client.get_run(run_id)
    found = []
    for key in sorted(k for k in run.data.metrics if k.startswith(LOSS_PREFIX)):
        for m in client.get_metric_history(run_id, key):
            if not finite(m.value):
                value = m.value if math.isnan(m.value) else math.copysign(math.inf, m.value)
                found.append(f"{key}@step {m.step} = {value}")
    return found


def nonfinite_weights(run_id: str) -> list[str] | None:
    """Names of the best checkpoint's floating tensors holding NaN/inf; ``None`` if there is no checkpoint."""
    from components.checkpoint import load_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=BEST_CHECKPOINT, dst_path=tmp
            )
        except (MlflowException, OSError):
            return None
        state = load_checkpoint(path, map_location="cpu")
    weights = state.get("model", {})
    return [
        name
        for name, tensor in weights.items()
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def untrustworthy(run_id: str, score: float | None = None) -> list[str]:
    """Why run ``run_id`` must not be registered (empty when it may be), read from the tracking store."""
    client = mlflow.MlflowClient()
    reasons = []
    status = client.get_run(run_id).info.status
    if status != "FINISHED":
        reasons.append(f"the run did not finish (status {status})")
    if score is not None and not finite(score):
        reasons.append(f"its selection score is {score}")
    losses = nonfinite_losses(client, run_id)
    if losses:
        shown = ", ".join(losses[:3]) + (f" and {len(losses) - 3} more" if len(losses) > 3 else "")
        reasons.append(f"it logged a non-finite training loss ({shown})")
    weights = nonfinite_weights(run_id)
    if weights is None:
        reasons.append(f"it has no {BEST_CHECKPOINT} artifact to verify")
    elif weights:
        shown = ", ".join(weights[:3]) + (f" and {len(weights) - 3} more" if len(weights) > 3 else "")
        reasons.append(f"its best checkpoint holds non-finite weights ({shown})")
    return reasons
