"""The learning check (``python -m pipeline.learn``, also ``pipeline.bench --learn``) on the real CIFAR-10
shards: it trains through ``Trainer.fit``, writes its table, JSON and plot, keeps going past a method that
fails or diverges, rejects bad input before training, and needs neither MLflow nor Optuna."""

import json

import pytest
from support import bench_without_mlflow

from components.training import Trainer
from pipeline import learn

TINY = [
    "--epochs", "2", "--train-size", "128", "--val-size", "32", "--batch-size", "32",
    "--attack-steps", "1", "--val-steps", "2", "--threads", "1",
]  # fmt: skip


def test_learn_trains_each_method_and_writes_table_json_and_plot(shared_data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [*TINY, "--methods", "pgd_at_cifar10,d2r_cag_cifar10", "--out", str(out)]
    assert learn.main(argv) == 0
    printed = capsys.readouterr().out
    for name in ("pgd_at_cifar10", "d2r_cag_cifar10"):
        assert f"{name} epoch 1/2: loss" in printed and f"{name} epoch 2/2: loss" in printed
    report = json.loads((out / "learn.json").read_text())
    assert [s["status"] for s in report["summary"]] == ["ok", "ok"]
    pgd, d2r = report["methods"]
    assert [e["epoch"] for e in pgd["epochs"]] == [1, 2]
    first, second = pgd["epochs"]
    assert 0 < first["wall_s"] < second["wall_s"] <= pgd["wall_s"]
    assert 0 <= first["val/pgd2_acc"] <= first["val/clean_acc"] <= 1
    # The config's schedule shortened to 2 epochs: the warm-up lr first, then the decayed lr.
    assert first["lr"] == pytest.approx(0.02) and second["lr"] == pytest.approx(0.001)
    assert d2r["guide"] == "small_cnn" and pgd["guide"] is None
    assert "ATTACK_STEPS = 1" in d2r["config"] or "PGDGenerator.steps = 1" in d2r["config"]
    md = (out / "learn.md").read_text()
    assert "| pgd_at_cifar10 | ok | 2/2 |" in md and "| d2r_cag_cifar10 | 2 |" in md
    # 32 validation images: chance (0.1) + 2 standard errors = 0.206 is the bar for "learned".
    assert report["meta"]["chance_bar"] == pytest.approx(0.1 + 2 * (0.09 / 32) ** 0.5)
    assert pgd["epochs"] and report["summary"][0]["pgd_above_chance"] == (second["val/pgd2_acc"] > 0.2061)
    assert (out / "learn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class TrainingDivergedError(RuntimeError):
    """Stands in for the trainer guard's error: the check must recognise it by name."""


def test_a_diverged_or_failing_method_is_recorded_and_the_next_one_runs(
    shared_data, tmp_path, monkeypatch, capsys
):
    real_fit = Trainer.fit
    calls = []

    def fit_that_diverges_once(self, graph, data, device, checkpoint_dir, on_epoch_end=None, **kw):
        calls.append(1)
        if len(calls) > 1:
            return real_fit(self, graph, data, device, checkpoint_dir, on_epoch_end=on_epoch_end, **kw)

        def stop_after_first(epoch, metrics, paths):
            on_epoch_end(epoch, metrics, paths)
            raise TrainingDivergedError("loss term 'ce_adv' is nan at epoch 2, step 5\nmore detail")

        return real_fit(self, graph, data, device, checkpoint_dir, on_epoch_end=stop_after_first, **kw)

    monkeypatch.setattr(Trainer, "fit", fit_that_diverges_once)
    out = tmp_path / "out"
    argv = [*TINY, "--methods", "pgd_at_cifar10,regmix_cifar10", "--out", str(out)]
    assert learn.main(argv) == 1  # not every method finished
    report = json.loads((out / "learn.json").read_text())
    diverged, fine = report["summary"]
    assert diverged["status"] == "DIVERGED" and diverged["epochs_run"] == 1
    assert diverged["message"] == "loss term 'ce_adv' is nan at epoch 2, step 5"
    assert fine["status"] == "ok" and fine["epochs_run"] == 2
    md = (out / "learn.md").read_text()
    assert "| pgd_at_cifar10 | DIVERGED | 1/2 |" in md
    assert "- pgd_at_cifar10: DIVERGED: loss term 'ce_adv' is nan" in md
    assert learn._failure(ValueError("bad size")) == ("FAILED (ValueError)", "bad size")


def test_a_failure_inside_fit_is_failed_not_a_crash(shared_data, tmp_path, monkeypatch):
    # The build and the data pre-flight pass; the failure comes inside fit, when it asks for the loader.
    from components.data.datamodule import DataModule

    def broken(self, *args, **kwargs):
        raise ValueError("loader exceeds what the disk holds")

    monkeypatch.setattr(DataModule, "train_loader", broken)
    argv = [*TINY, "--methods", "pgd_at_cifar10", "--out", str(tmp_path)]
    assert learn.main(argv) == 1
    (summary,) = json.loads((tmp_path / "learn.json").read_text())["summary"]
    assert summary["status"] == "FAILED (ValueError)" and "exceeds" in summary["message"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "pgd_at_cifar1O"], "unknown gin config"),
        (["--profile", "no_such_profile"], "unknown gin config"),
        (["--overrides", "ALPAH = 3"], "no applied config defines"),
        (["--data-dir", "/nonexistent/robustflow-data"], "/nonexistent/robustflow-data"),
    ],
)
def test_bad_input_exits_2_before_training(argv, message, shared_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("training started"))
    assert learn.main([*TINY, *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "learn.json").exists()


@pytest.mark.slow
def test_learn_runs_through_the_bench_flag_without_mlflow_or_optuna(shared_data, tmp_path):
    argv = ["--learn", *TINY, "--epochs", "1", "--methods", "regmix_cifar10", "--out", str(tmp_path)]
    proc = bench_without_mlflow(argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "regmix_cifar10 epoch 1/1" in proc.stdout
    assert json.loads((tmp_path / "learn.json").read_text())["summary"][0]["status"] == "ok"


def test_learned_means_above_chance_by_two_standard_errors():
    assert learn.chance_bar(0.1, 256) == pytest.approx(0.1375)
    record = {"method": "m", "status": "ok", "message": "", "wall_s": 2.0}
    epochs = [{"epoch": 1, "wall_s": 1.0, "train/loss": 2.0, "val/clean_acc": 0.30, "val/pgd20_acc": 0.14}]
    record["epochs"] = [*epochs, {**epochs[0], "epoch": 2, "val/clean_acc": 0.2, "val/pgd20_acc": 0.13}]
    summary = learn.summarize(record, 0.1, 256)
    # The last epoch decides (0.13 < 0.1375), not the best one (0.14): a max over noisy epochs flatters.
    assert (summary["clean_above_chance"], summary["pgd_above_chance"]) == (True, False)
    assert (summary["best_val_pgd"], summary["best_epoch"]) == (0.14, 1)


def test_the_trainers_divergence_guard_shows_as_diverged(shared_data, tmp_path):
    # An absurd lr: the real guard in Trainer.fit stops the run at step 2; the check records it.
    argv = [*TINY, "--methods", "pgd_at_cifar10", "--overrides", "sgd.lr = 1e30", "--out", str(tmp_path)]
    assert learn.main(argv) == 1
    (summary,) = json.loads((tmp_path / "learn.json").read_text())["summary"]
    assert summary["status"] == "DIVERGED" and summary["epochs_run"] == 0
    assert "diverged in epoch 1 at step 2" in summary["message"] and "ce_adv" in summary["message"]
