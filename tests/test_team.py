"""The team set-up of docs/team.md, for real: PostgreSQL, an MLflow tracking server, three tune workers.

PostgreSQL comes from the distribution's packages (``.ci/run`` installs them); without its binaries the
test skips and says so, and under ``CI=true`` it fails instead (a green CI run has run it). Everything runs
on localhost in temporary folders and is torn down afterwards.
"""

import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from glob import glob
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState
from support import unavailable

from pipeline.registry import CHAMPION
from pipeline.tune import RUN_ATTR, VERSION_ATTR

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MODEL = "d2r_cag_cifar10"
TRIALS = 3
# Tiny, still real trials: 128 training images, 1 epoch, 1-step CAG, PGD-20 validation on 64 images.
TINY = (
    "EPOCHS = 1; DataModule.train_size = 128; DataModule.val_size = 64; DataModule.test_size = 64; "
    "BATCH_SIZE = 64; Trainer.progress = False; ATTACK_STEPS = 1; build_backbone.width = 8"
)


def postgres_bin() -> Path | None:
    """The folder holding initdb/pg_ctl: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    for candidate in sorted(glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").is_file() and Path(candidate, "pg_ctl").is_file():
            return Path(candidate)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """A throw-away PostgreSQL cluster on 127.0.0.1 (run as the ``postgres`` user when we are root)."""

    def __init__(self, bindir: Path) -> None:
        self.bindir, self.port = bindir, free_port()
        # Not under pytest's tmp_path: that is private to root, and the server may run as another user.
        self.root = Path(tempfile.mkdtemp(prefix="robustflow-pg-"))
        self.root.chmod(0o755)
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                unavailable("running as root and there is no 'postgres' user to run PostgreSQL as")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, *cmd: str) -> None:
        subprocess.run([*self.as_user, *cmd], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        b = self.bindir
        self._run(str(b / "initdb"), "-D", str(self.data), "-U", "robustflow", "--auth=trust", "--no-sync")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(str(b / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        for db in ("mlflow", "optuna"):
            self._run(str(b / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "robustflow", db)

    def url(self, db: str) -> str:
        return f"postgresql://robustflow@127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                [*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def postgres():
    bindir = postgres_bin()
    if bindir is None:
        unavailable("no PostgreSQL binaries (initdb, pg_ctl): `.ci/run` installs them (apt postgresql)")
    if importlib.util.find_spec("psycopg") is None:
        unavailable("psycopg (the team extra) is not installed: SQLAlchemy uses it for postgresql://")
    server = Postgres(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def tracking_server(postgres, tmp_path):
    """``mlflow server`` on localhost: PostgreSQL backend store, a local folder as artifact root."""
    port = free_port()
    log = (tmp_path / "mlflow-server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres.url("mlflow"),
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "2"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((tmp_path / "mlflow-server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield uri
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def test_three_workers_on_postgres_and_a_tracking_server(shared_data, postgres, tracking_server, tmp_path):
    mlflow.set_tracking_uri(tracking_server)
    storage = postgres.url("optuna")
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=tracking_server,
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        OMP_NUM_THREADS="1",
    )
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(key, None)
    cmd = [
        sys.executable, "-m", "pipeline.tune", "--gin", f"{MODEL},smoke", "--overrides", TINY,
        "--device", "cpu", "--n-trials", str(TRIALS), "--storage", storage, "--study", "team",
        "--pruner", "none", "--heartbeat-interval", "1", "--grace-period", "5",
    ]  # fmt: skip
    # A first worker creates the study and dies mid-trial (SIGKILL: no clean-up at all).
    doomed = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in doomed.stderr:
        seen.append(line)
        if line.startswith("epoch 1/1"):
            doomed.kill()
            break
    assert doomed.wait(timeout=60) == -9, "".join(seen[-40:])
    (stuck,) = optuna.load_study(study_name="team", storage=storage).trials
    assert stuck.state == TrialState.RUNNING

    workers = []
    for i in range(3):  # three at once
        err = (tmp_path / f"worker{i}.err").open("wb")
        workers.append((subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=err, stderr=err), err))
    said = []
    for proc, err in workers:
        code = proc.wait(timeout=900)
        err.close()
        said.append(Path(err.name).read_text()[-3000:])
        assert code == 0, said[-1]

    study = optuna.load_study(study_name="team", storage=storage)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(complete) == TRIALS, "\n".join(said)  # exactly the requested number, none run twice
    assert [t.number for t in failed] == [stuck.number]  # the dead worker's trial, failed by heartbeat...
    (retry,) = [t for t in complete if t.system_attrs.get("failed_trial") == stuck.number]
    assert retry.params == failed[0].params  # ...and run again with the same parameters
    leftover = [t for t in study.trials if t not in complete and t not in failed]
    assert all(t.state == TrialState.WAITING and not t.params for t in leftover)

    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(MODEL).experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("robustflow.tune.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trial_numbers = sorted(int(r.data.tags["optuna.trial_number"]) for r in children)
    assert trial_numbers == sorted(t.number for t in [*complete, *failed])  # every trial nested, once
    by_run = {r.info.run_id: r for r in children}
    assert {t.user_attrs[RUN_ATTR] for t in [*complete, *failed]} == set(by_run)  # one run per trial
    assert all(by_run[t.user_attrs[RUN_ATTR]].info.status == "FINISHED" for t in complete)
    assert by_run[failed[0].user_attrs[RUN_ATTR]].info.status == "FAILED"

    # Every completed trial registered a version, the dead one none; champion is the best trial's.
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert sorted(int(v.version) for v in versions) == list(range(1, TRIALS + 1))
    best = max(complete, key=lambda t: (t.value, -int(t.user_attrs[VERSION_ATTR])))
    assert str(client.get_model_version_by_alias(MODEL, CHAMPION).version) == best.user_attrs[VERSION_ATTR]
    # The artifacts went through the server to its artifact root, not into the workers' folders.
    assert (tmp_path / "artifacts").is_dir() and not (tmp_path / "mlruns").exists()
