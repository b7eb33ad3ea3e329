"""The model card: the registered version's description, what a researcher reads on its page.

It answers, without opening the run: which method and config, which code (commit), which threat model
the numbers are under (norm, eps, attacks and their budgets), on which data (set and split sizes, never
a local path) and hardware, how robust, and how to load it.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import mlflow
import torch

REPO = Path(__file__).resolve().parents[1]
# Local facts about one machine: never on a card another person reads.
PRIVATE_DATA_KEYS = ("data_dir",)
CARD_LIMIT = 5000


def code_commit(tags: dict[str, str]) -> str:
    """The commit the run's code came from (MLflow's source tag, else this checkout), '+dirty' if edited."""
    commit = tags.get("mlflow.source.git.commit")
    if commit:
        return commit
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return commit + ("+dirty" if dirty else "")


def hardware(device: str | torch.device) -> str:
    """``'cuda: NVIDIA H200 (torch 2.5.1)'`` or ``'cpu: x86_64, 16 threads (torch ...)'``."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{platform.machine() or 'unknown'}, {torch.get_num_threads()} threads"
    return f"{device.type}: {what} (torch {torch.__version__})"


def threat_model(params: dict[str, str], val_steps: int) -> str:
    """The attack setting every number on the card is measured under."""
    train_attack = ""
    if "EPS" in params:
        steps = f", {params['ATTACK_STEPS']} steps" if "ATTACK_STEPS" in params else ""
        train_attack = f" Training attack: eps={params['EPS']}{steps}."
    return (
        f"L-inf, eps = 8/255 (0.0314) in pixel space [0, 1]. Selection (`val/`) and `test/` robust "
        f"accuracy: PGD-{val_steps} (step 2/255, cross-entropy, random start).{train_attack} "
        "AutoAttack and the per-example worst case are added by `evaluate` (tags on this version)."
    )


def model_card(
    run_id: str,
    name: str,
    score: float,
    data_summary: dict[str, Any],
    config: str,
    *,
    device: str | torch.device = "cpu",
    val_steps: int = 20,
) -> str:
    """A markdown card: method and config, code, threat model, data, hardware, results, how to load."""
    run = mlflow.get_run(run_id)
    metrics, tags, params = run.data.metrics, run.data.tags, run.data.params
    experiment = mlflow.MlflowClient().get_experiment(run.info.experiment_id).name
    data = {k: v for k, v in data_summary.items() if k not in PRIVATE_DATA_KEYS}
    splits = ", ".join(f"{k.removesuffix('_size')} {v}" for k, v in data.items() if k.endswith("_size"))
    other = ", ".join(f"{k}={v}" for k, v in data.items() if not k.endswith("_size"))
    lines = [
        f"# {name}",
        "",
        f"- **Run**: `{run_id}` (experiment `{experiment}`), gin `{tags.get('robustflow.gin', '?')}`, "
        f"overrides `{tags.get('robustflow.overrides', '') or 'none'}`",
        f"- **Code**: commit `{code_commit(tags)}`",
        f"- **Threat model**: {threat_model(params, val_steps)}",
        f"- **Data**: {data.get('dataset', '?')}; split sizes: {splits}; {other}",
        f"- **Hardware**: {hardware(device)}",
        f"- **Selected** by validation PGD-{val_steps} accuracy **{score:.4f}** (a split held out of the "
        f"training set) at epoch {tags.get('robustflow.best_epoch', '?')}",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()) if k.startswith(("test/", "val/best"))),
        "",
        "Inputs are images in [0, 1] (normalization, if any, is inside the model); eps is in pixel space.",
        "",
        f"Load as a real `nn.Module`: `pipeline.registry.load_model('models:/{name}@champion')`. "
        "`mlflow.pytorch.load_model` returns a torch.export GraphModule (already in eval mode; torch "
        "raises NotImplementedError on its `.eval()`/`.train()`).",
        "",
        "Re-create: `mlflow run . -e train -P gin=<config.gin downloaded from the run> "
        f"--experiment-name {name} --env-manager local`.",
        "",
    ]
    head = "\n".join(lines) + "\n"
    # Model version descriptions are VARCHAR(5000) in MLflow's SQL stores (PostgreSQL enforces it).
    note = "\n(cut to fit the model page; the whole file is the run's artifact `config/config.gin`)\n"
    room = CARD_LIMIT - len(head) - len("## Gin config\n```\n\n```\n") - len(note)
    text = config.strip()
    if len(text) > room:
        text = text[: max(room, 0)].rsplit("\n", 1)[0]
    else:
        note = ""
    return f"{head}## Gin config\n```\n{text}\n```\n{note}"
