"""The learning check: does each method actually learn on real data? Speed alone cannot say.

    python -m pipeline.learn                                   # CPU: small_cnn, 1,024 images, a few minutes
    python -m pipeline.bench --learn ...                       # the same command through the bench
    python -m pipeline.learn --target preact_resnet18 --guide resnet18_lbgat --epochs 5 --train-size 19000 \\
        --val-size 1000 --batch-size 128 --attack-steps config --out learn_gpu   # GPU: 5 epochs each
    python -m pipeline.learn --profile stable ...              # the same with gin/stable.gin appended

Per method, the experiment is built from its gin config (then each ``--profile`` file, then the command's
sizes, then ``--overrides``) and trained for ``--epochs`` epochs on real CIFAR-10 through ``Trainer.fit``,
exactly as ``pipeline.train`` trains it, with the config's own schedule shortened to those epochs. Every
epoch prints the training loss, validation clean and PGD-20 accuracy and the wall time so far; at the end
``learn.md`` (a summary table and the per-epoch table), ``learn.json`` and ``learn.png`` (validation PGD-20
accuracy against wall time, one line per method) go to ``--out``.

A method whose training raises (``TrainingDivergedError`` from the trainer's divergence guard, or anything
else) is recorded as DIVERGED (or FAILED) with the message and the epochs it finished, and the next method
runs. The exit code is 0 when every method finished, 1 when one did not, 2 for bad input (before any
training). MLflow and Optuna are not needed: this runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.bench.methods import method_spec
from pipeline.bench.run import DEFAULT_METHODS, describe_machine
from pipeline.config import (
    ConfigError,
    load_config,
    macro,
    parse_overrides,
    resolve_device,
    resolve_gin_files,
)

STATUS_OK = "ok"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The check's options; the defaults are a CPU run of a few minutes for all five methods."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.learn", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated gin configs")
    parser.add_argument("--target", default="small_cnn", help="TARGET_BACKBONE of every method")
    parser.add_argument("--guide", default="small_cnn", help="GUIDE_BACKBONE (two-model methods only)")
    parser.add_argument(
        "--epochs", type=int, default=4, help="EPOCHS: the config's schedule is shortened to it"
    )
    parser.add_argument(
        "--train-size", type=int, default=1024, help="DataModule.train_size (CIFAR-10 images)"
    )
    parser.add_argument("--val-size", type=int, default=256, help="DataModule.val_size (held-out images)")
    parser.add_argument("--batch-size", type=int, default=64, help="BATCH_SIZE")
    parser.add_argument(
        "--attack-steps",
        default="3",
        help="ATTACK_STEPS of the training attack: a number (default 3, as gin/smoke.gin) or 'config' for "
        "each config's own (10 for PGD-AT/TRADES/LBGAT/D2R; RegMix's PGD-2 is fixed)",
    )
    parser.add_argument("--val-steps", type=int, default=20, help="Trainer.val_steps: PGD-k of validation")
    parser.add_argument(
        "--profile",
        action="append",
        default=[],
        help="a gin file (name in gin/ or path) applied after each method's config, e.g. 'stable' or "
        "'smoke'; repeat for several; the command's sizes still apply after them",
    )
    parser.add_argument("--overrides", default="", help="extra ';'-separated gin bindings, applied last")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--data-dir", default=None, help="data root (default: $ROBUSTFLOW_DATA, ./data)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared CPU)")
    parser.add_argument("--out", default=None, help="folder for learn.md, learn.json and learn.png")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods:
        parser.error("--methods is empty")
    for name in ("epochs", "train_size", "batch_size", "val_size", "val_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.attack_steps == "config":
        args.attack_steps = None
    elif not args.attack_steps.isdigit() or int(args.attack_steps) < 1:
        parser.error(f"--attack-steps must be a number >= 1 or 'config', got {args.attack_steps!r}")
    else:
        args.attack_steps = int(args.attack_steps)
    return args


def method_bindings(name: str, args: argparse.Namespace, device: torch.device) -> tuple[list[str], list[str]]:
    """The command's gin bindings for ``name`` and the macro bindings left out because its configs do not
    define the macro (a guide for a single-model method, attack steps for a fixed-step attack)."""
    wanted = [
        f"TARGET_BACKBONE = '{args.target}'",
        f"GUIDE_BACKBONE = '{args.guide}'",
        f"BATCH_SIZE = {args.batch_size}",
        f"EPOCHS = {args.epochs}",
        f"DataModule.train_size = {args.train_size}",
        f"DataModule.val_size = {args.val_size}",
        f"DataModule.device = '{device}'",
        f"Trainer.val_steps = {args.val_steps}",
        "Trainer.progress = False",
    ]
    if args.attack_steps is not None:
        wanted.append(f"ATTACK_STEPS = {args.attack_steps}")
    if args.data_dir is not None:
        wanted.append(f"DATA_DIR = {args.data_dir!r}")
    wanted += parse_overrides(args.overrides)
    loaded = load_config(method_spec(name, args), wanted, skip_undefined_macros=True)
    return loaded.overrides, loaded.skipped


def check_inputs(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, list[str]], int]:
    """Load every method's config with its bindings, build it and check that its data is there: every
    problem is found here, before the first minute of training. Returns each method's bindings and the
    number of classes (for the chance level).

    A macro override that one method's configs do not define is left out for that method (a guide for a
    single-model method); one that no method defines is a typo and an error.
    """
    from components.experiment import experiment

    bindings, skipped_by = {}, {}
    for name in args.methods:
        resolve_gin_files(method_spec(name, args))
        bindings[name], skipped_by[name] = method_bindings(name, args, device)
    for binding in parse_overrides(args.overrides):
        if all(binding in skipped for skipped in skipped_by.values()):
            lhs = binding.split("=", 1)[0].strip()
            raise ConfigError(f"override {binding!r} sets macro {lhs!r}, which no applied config defines")
    classes = 10
    for name in args.methods:
        load_config(method_spec(name, args), bindings[name])
        data = experiment().data
        data.check()
        classes = data.num_classes
    return bindings, classes


def _failure(err: BaseException) -> tuple[str, str]:
    """(status, message) of a method whose training raised: DIVERGED for the divergence guard's error
    (any exception type named ``*Diverged*``), else FAILED with the exception type."""
    kind = type(err).__name__
    message = str(err).strip().splitlines()[0] if str(err).strip() else kind
    return ("DIVERGED", message) if "diverged" in kind.lower() else (f"FAILED ({kind})", message)


def _val_pgd(row: dict[str, Any]) -> float:
    key = next((k for k in row if k.startswith("val/pgd") and k.endswith("_acc")), None)
    return math.nan if key is None else float(row[key])


def _val_steps(row: dict[str, Any]) -> str:
    key = next((k for k in row if k.startswith("val/pgd") and k.endswith("_acc")), "val/pgd?_acc")
    return key[len("val/pgd") : -len("_acc")]


def chance_bar(chance: float, val_images: int) -> float:
    """Accuracy that a guessing model exceeds with ~2.5% probability: chance + 2 standard errors of an
    accuracy measured on ``val_images`` images. On 256 images at 10 classes: 0.1375, not 0.100."""
    return chance + 2 * math.sqrt(chance * (1 - chance) / max(val_images, 1))


def summarize(record: dict[str, Any], chance: float, val_images: int) -> dict[str, Any]:
    """One summary row: status, epochs run, last loss, best/last val accuracies, whether the last epoch's
    accuracies clear :func:`chance_bar`, wall time."""
    epochs = record["epochs"]
    bar = chance_bar(chance, val_images)
    best = max(epochs, key=lambda e: _val_pgd(e) if math.isfinite(_val_pgd(e)) else -1.0) if epochs else None
    last = epochs[-1] if epochs else None
    return {
        "method": record["method"],
        "status": record["status"],
        "epochs_run": len(epochs),
        "epochs_planned": record.get("epochs_planned"),
        "last_loss": last["train/loss"] if last else None,
        "last_val_clean": last["val/clean_acc"] if last else None,
        "last_val_pgd": _val_pgd(last) if last else None,
        "best_val_pgd": _val_pgd(best) if best else None,
        "best_epoch": best["epoch"] if best else None,
        # The last epoch, not the best: a max over noisy epochs is biased upwards.
        "clean_above_chance": bool(last and last["val/clean_acc"] > bar),
        "pgd_above_chance": bool(last and _val_pgd(last) > bar),
        "wall_s": record["wall_s"],
        "s_per_epoch": (epochs[-1]["wall_s"] / len(epochs)) if epochs else None,
        "message": record["message"],
    }


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _cell(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "non-finite" if not math.isfinite(value) else format(value, spec)
    return str(value)


def render_markdown(report: dict[str, Any]) -> str:
    """learn.md: the setup, one summary row per method, then every epoch of every method."""
    meta = report["meta"]
    pgd = f"PGD-{meta['val_steps']}"
    lines = [
        f"# robustflow learning check ({meta['date']})",
        "",
        f"- machine: {meta['machine']}; torch {meta['torch']}, threads {meta['threads']}",
        f"- backbones: target {meta['target']}, guide {meta['guide']}; batch {meta['batch_size']}; "
        f"{meta['epochs']} epochs of {meta['train_size']} CIFAR-10 training images; validation on "
        f"{meta['val_size']} held-out images ({pgd}, eps 8/255); attack steps: {meta['attack_steps']}",
        f"- profiles: {', '.join(meta['profiles']) or 'none'}; overrides: `{meta['overrides'] or 'none'}`",
        f"- command: `{meta['command']}`",
        f"- chance: {meta['chance']:.3f}; 'learned': the last epoch's val accuracy above chance + 2 "
        f"standard errors on {meta['val_size']} images = {meta['chance_bar']:.3f} (clean / {pgd})",
        "- wall time counts data loading, training, validation and checkpoints",
        "",
        f"| method | status | epochs | last train loss | last val clean | last val {pgd} | best val {pgd} "
        "(epoch) | learned (clean / PGD) | wall s | s/epoch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["summary"]:
        best = f"{_cell(s['best_val_pgd'])} ({s['best_epoch']})" if s["best_epoch"] else "–"
        lines.append(
            f"| {s['method']} | {s['status']} | {s['epochs_run']}/{s['epochs_planned'] or '?'} | "
            f"{_cell(s['last_loss'], '.4g')} | {_cell(s['last_val_clean'])} | {_cell(s['last_val_pgd'])} | "
            f"{best} | {_yes(s['clean_above_chance'])} / {_yes(s['pgd_above_chance'])} | "
            f"{_cell(s['wall_s'], '.0f')} | "
            f"{_cell(s['s_per_epoch'], '.1f')} |"
        )
    failed = [s for s in report["summary"] if s["status"] != STATUS_OK]
    if failed:
        lines += ["", "What stopped a method:", ""]
        lines += [f"- {s['method']}: {s['status']}: {s['message']}" for s in failed]
    lines += [
        "",
        "## Every epoch",
        "",
        f"| method | epoch | lr | train loss | train adv acc | val clean | val {pgd} | train img/s | "
        "wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for record in report["methods"]:
        for e in record["epochs"]:
            lines.append(
                f"| {record['method']} | {e['epoch']} | {e['lr']:.3g} | {_cell(e['train/loss'], '.4g')} | "
                f"{_cell(e['train/adv_acc'])} | {_cell(e['val/clean_acc'])} | {_cell(_val_pgd(e))} | "
                f"{_cell(e['train/images_per_s'], '.0f')} | {_cell(e['wall_s'], '.1f')} |"
            )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """learn.png: validation PGD accuracy against wall time, one line per method, chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = report["meta"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for record in report["methods"]:
        xs = [e["wall_s"] for e in record["epochs"]]  # measured points only: no assumed start at chance
        ys = [_val_pgd(e) for e in record["epochs"]]
        label = record["method"] + ("" if record["status"] == STATUS_OK else f" ({record['status']})")
        ax.plot(xs, ys, marker="o", label=label)
    ax.axhline(meta["chance"], color="grey", linestyle="--", linewidth=1, label="chance")
    ax.axhline(meta["chance_bar"], color="grey", linestyle=":", linewidth=1, label="chance + 2 SE")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel(f"val PGD-{meta['val_steps']} accuracy")
    ax.set_title(f"target {meta['target']}, {meta['epochs']} epochs, {meta['train_size']} images")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_learn(
    args: argparse.Namespace, argv: Sequence[str] | None = None, log: Any = print
) -> dict[str, Any]:
    """Check the inputs, then train every method in turn; the learn.json document."""
    import datetime

    device = resolve_device(args.device)
    bindings, classes = check_inputs(args, device)
    records = []
    with tempfile.TemporaryDirectory(prefix="robustflow-learn-") as workdir:
        for name in args.methods:
            load_config(method_spec(name, args), bindings[name])
            records.append(learn_method(name, device, Path(workdir), log))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    machine = describe_machine(device)
    chance = 1 / classes
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": machine,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "target": args.target,
        "guide": args.guide,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "train_size": args.train_size,
        "val_size": args.val_size,
        "val_steps": args.val_steps,
        "attack_steps": args.attack_steps or "each config's own",
        "profiles": list(args.profile),
        "overrides": args.overrides,
        "chance": chance,
        "chance_bar": chance_bar(chance, args.val_size),
        "command": "python -m pipeline.learn " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    return {
        "meta": meta,
        "summary": [summarize(r, chance, args.val_size) for r in records],
        "methods": records,
    }


def learn_method(name: str, device: torch.device, workdir: Path, log: Any) -> dict[str, Any]:
    """Build the experiment of the config loaded now (``name``, its profiles and the command's bindings) and
    train it through ``Trainer.fit``; its per-epoch records and status.

    ``wall_s`` of an epoch is the time since the build started (data loading, training, validation and
    checkpoints included), so the curves compare what a user waits for.
    """
    import gin

    from components.experiment import experiment

    t0 = time.perf_counter()
    record: dict[str, Any] = {"method": name, "status": STATUS_OK, "message": "", "epochs": []}
    epochs: list[dict[str, Any]] = record["epochs"]

    def on_epoch_end(epoch: int, metrics: dict[str, float], _paths: dict[str, Path]) -> None:
        row = {"epoch": epoch, "wall_s": time.perf_counter() - t0, **metrics}
        epochs.append(row)
        log(
            f"{name} epoch {epoch}/{record.get('epochs_planned', '?')}: loss {row['train/loss']:.4g} "
            f"(lr {row['lr']:.3g}), val clean {row['val/clean_acc']:.3f}, "
            f"val PGD-{_val_steps(row)} {_val_pgd(row):.3f}, wall {row['wall_s']:.1f}s"
        )

    try:
        exp = experiment()
        record["target"] = macro("TARGET_BACKBONE")
        record["guide"] = macro("GUIDE_BACKBONE") if "guide" in exp.graph.models else None
        record["epochs_planned"] = exp.trainer.epochs
        record["schedule"] = type(exp.trainer.schedule).__name__
        record["config"] = gin.config_str()
        exp.trainer.fit(exp.graph, exp.data, device, workdir / name, on_epoch_end=on_epoch_end)
    except Exception as err:  # one method's failure is reported; the next method runs
        record["status"], record["message"] = _failure(err)
        record["traceback"] = traceback.format_exc(limit=8)
        log(f"{name}: {record['status']}: {record['message']}")
    record["wall_s"] = time.perf_counter() - t0
    return record


def write_report(report: dict[str, Any], folder: Path) -> None:
    """Write learn.md, learn.json and learn.png into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "learn.md").write_text(render_markdown(report))
    (folder / "learn.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot(report, folder / "learn.png")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check, print the tables, write them to ``--out``. Exit code 0: every method finished; 1: one
    did not (diverged or failed); 2: bad input, found before any training."""
    from components.data import DataNotFoundError

    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = run_learn(args, argv, log=lambda line: print(line, flush=True))
    except (ConfigError, DataNotFoundError, ValueError) as err:
        print(f"robustflow learn: error: {err}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    print(render_markdown(report))
    if args.out:
        write_report(report, Path(args.out))
        print(f"robustflow learn: wrote learn.md, learn.json and learn.png to {args.out}", file=sys.stderr)
    return 0 if all(s["status"] == STATUS_OK for s in report["summary"]) else 1


if __name__ == "__main__":
    sys.exit(main())
