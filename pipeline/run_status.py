"""Runs keep the status robustflow gives them under ``mlflow run``, and training never outlives the wrapper.

``mlflow run`` waits for the entry point and then marks the run FINISHED (exit 0) or FAILED (any other
exit). It means to leave alone a run the entry point already ended (``_maybe_set_run_terminated``), but it
compares the run's status *string* with ``RunStatus`` integers (MLflow 3.17), so it always overwrites: a
run stopped by SIGTERM or Ctrl-C and marked KILLED becomes FAILED, and a FINISHED run whose resume was
refused becomes FAILED with a new end time. So when this process was started by ``mlflow run`` and ends a
run with a status of its own, it leaves behind a small detached process (``python -m pipeline.run_status``)
that waits for the wrapper to exit and then puts the status and end time back.

And if the wrapper itself is stopped (SIGTERM to the PID a user or scheduler holds), the training process
must not go on alone as an orphan: :func:`stop_with_wrapper` asks Linux to send it SIGTERM when its parent
dies, which stops training at the next step like any other SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

# How long the restorer waits for the wrapper to exit (it exits right after our process does).
WRAPPER_WAIT_S = 600.0


def wrapper_pid(run_id: str | None = None) -> int | None:
    """The PID of the ``mlflow run`` process that started this one (for ``run_id``), else ``None``.

    ``mlflow run`` hands the child its run in ``MLFLOW_RUN_ID``; the MLproject command ``exec``s python, so
    the parent is the wrapper itself (a ``bash -c`` that did not exec is looked through).
    """
    # Found once, at start-up: mlflow.end_run unsets MLFLOW_RUN_ID, and the wrapper may be dead by the end.
    if not _WRAPPER:
        env_run = os.environ.get("MLFLOW_RUN_ID")
        _WRAPPER.update(run=env_run, pid=_find_wrapper() if env_run else None)
    if _WRAPPER["pid"] is None or (run_id is not None and run_id != _WRAPPER["run"]):
        return None
    return _WRAPPER["pid"]


_WRAPPER: dict[str, Any] = {}


def _find_wrapper() -> int | None:
    pid = os.getppid()
    for _ in range(2):
        cmdline = _cmdline(pid)
        if _is_mlflow_run(cmdline):
            return pid
        if not cmdline or Path(cmdline[0]).name not in ("bash", "sh"):
            return None
        pid = _parent_of(pid)
    return None


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _parent_of(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def _is_mlflow_run(cmdline: list[str]) -> bool:
    names = [Path(part).name for part in cmdline[:4]]
    return "run" in cmdline[:5] and any(n == "mlflow" or n.startswith("mlflow") for n in names)


def stop_with_wrapper() -> None:
    """Under ``mlflow run``: get SIGTERM when the wrapper dies, so training stops instead of going on."""
    pid = wrapper_pid()
    if pid is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        failed = ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM)) != 0
        why = os.strerror(ctypes.get_errno()) if failed else ""
    except (OSError, AttributeError) as err:
        failed, why = True, f"{type(err).__name__}: {err}"
    if failed:
        print(
            f"robustflow: warning: cannot have Linux stop this process when `mlflow run` (pid {pid}) dies "
            f"(prctl PR_SET_PDEATHSIG: {why}); if that process is killed, stop pid {os.getpid()} yourself",
            file=sys.stderr,
        )
    if not _alive(pid):  # the wrapper died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def keep_status(run_id: str, status: str, end_time: int | None = None) -> None:
    """Under ``mlflow run``: restore ``status`` (and ``end_time``) once the wrapper has overwritten them."""
    pid = wrapper_pid(run_id)
    if pid is None:
        return
    args = [sys.executable, "-m", "pipeline.run_status", run_id, str(pid), status, str(end_time or "")]
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow.get_tracking_uri())
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    subprocess.Popen(
        args,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        # Its stderr is ours (the terminal or log the user reads): a status it cannot restore is said there.
        start_new_session=True,  # a Ctrl-C to the terminal's process group must not stop it
    )


def keep_current_status(run_id: str | None) -> None:
    """Under ``mlflow run``: keep the status and end time ``run_id`` has now, if it has ended."""
    if run_id is None or wrapper_pid(run_id) is None:
        return
    try:
        info = mlflow.MlflowClient().get_run(run_id).info
    except MlflowException:
        return
    if info.status in ("FINISHED", "FAILED", "KILLED"):
        keep_status(run_id, info.status, info.end_time)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; its parent just has not reaped it yet


def _restore(run_id: str, wrapper: int, status: str, end_time: int | None) -> None:
    deadline = time.monotonic() + WRAPPER_WAIT_S
    while _alive(wrapper) and time.monotonic() < deadline:
        time.sleep(0.2)
    client = mlflow.MlflowClient()
    info = client.get_run(run_id).info
    if info.status != status or (end_time is not None and info.end_time != end_time):
        client.set_terminated(run_id, status, end_time=end_time)


if __name__ == "__main__":
    _run_id, _pid, _status, _end = sys.argv[1:5]
    try:
        _restore(_run_id, int(_pid), _status, int(_end) if _end else None)
    except Exception as _err:  # whatever it is, the user must hear that the status is wrong
        print(
            f"robustflow: warning: could not put run {_run_id}'s status back to {_status} after `mlflow run` "
            f"overwrote it ({type(_err).__name__}: {_err}); set it in the UI or with "
            f"MlflowClient().set_terminated('{_run_id}', '{_status}')",
            file=sys.stderr,
        )
        sys.exit(1)
