"""Where a run's local checkpoints live, and when they go.

Local checkpoints go under the directory the user ran the command from (``./outputs/<run_id>/``), or under
``$ROBUSTFLOW_OUTPUT``. ``mlflow run`` starts the entry point inside the project folder, so there the
default is taken from the working directory of the ``mlflow run`` process itself, not the project's.

Each epoch's checkpoints are also logged to the run's artifacts (that is where resume and the registry find
them). While a run can still be resumed the local copies save a download; once it has FINISHED they only
take space, so they are removed (after checking the artifacts hold them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import mlflow

from pipeline.run_status import wrapper_pid
from pipeline.tracking import CHECKPOINT_ARTIFACT_DIR

OUTPUT_ENV = "ROBUSTFLOW_OUTPUT"


def default_output_dir() -> str:
    """``$ROBUSTFLOW_OUTPUT``, else ``outputs`` in the working directory of the command the user ran."""
    env = os.environ.get(OUTPUT_ENV)
    if env:
        return env
    pid = wrapper_pid()
    if pid is not None:
        with contextlib.suppress(OSError):
            return str(Path(os.readlink(f"/proc/{pid}/cwd")) / "outputs")
    return "outputs"


def remove_logged_checkpoints(run_id: str, ckpt_dir: Path) -> bool:
    """Delete ``ckpt_dir`` if the run's artifacts hold every checkpoint in it; returns whether it did."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return False
    local = {p.name for p in ckpt_dir.glob("*.pt")}
    logged = {
        Path(a.path).name for a in mlflow.MlflowClient().list_artifacts(run_id, CHECKPOINT_ARTIFACT_DIR)
    }
    if not local or not local <= logged:
        return False
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        ckpt_dir.parent.rmdir()  # only if no other run's checkpoints are left there
    return True
