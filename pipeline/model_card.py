"""The model card: the registered version's description, what a researcher reads on its page.

It leads with what decides the numbers and follows with what lets one trust and reproduce them:

1. one summary line (the registered model's table shows it): method, data, backbone, selection score and,
   once ``evaluate`` ran, its headline numbers;
2. the method (name, paper, what it trains; declared by ``method_info`` in ``gin/methods/*.gin``);
3. the loss: every weighted term with its weight, what it computes and the views it reads;
4. the attacks: the training generator, the selection attack, the evaluation (``evaluate``'s suite);
5. the selected checkpoint (epoch, validation score, the run's own test split);
6. the evaluation results (filled in by ``evaluate``: clean, each attack, worst case, flags);
7. provenance (run, code, data by name and digest, hardware, how to load and re-create);
8. the operative config, whole, or a link to the run's one config artifact when it does not fit.

No machine path appears on it (``pipeline.tracking.scrub``).
"""

from __future__ import annotations

import platform
import re
import subprocess
from collections.abc import Mapping
from typing import Any

import gin
import mlflow
import torch

from pipeline.tracking import CONFIG_ARTIFACT, REPO, scrub

# Model version descriptions are VARCHAR(5000) in MLflow's SQL stores (PostgreSQL enforces it).
CARD_LIMIT = 5000
EVAL_HEADING = "## Evaluation"
CONFIG_HEADING = "## Operative config"
EVAL_MARK = " · evaluated "


def code_commit(tags: Mapping[str, str]) -> str:
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


def pct(value: float) -> str:
    """``0.2305`` -> ``'23.1%'``."""
    return f"{100 * value:.1f}%"


# ------------------------------------------------------------------------------------- gin, read back


def _operative(ref: gin.config.ConfigurableReference) -> dict[str, Any]:
    """The parameters a called configurable got (bound and defaults), from gin's operative config."""
    scope = ref.scoped_selector.rsplit("/", 1)[0] if "/" in ref.scoped_selector else ""
    for (s, selector), params in gin.config._OPERATIVE_CONFIG.items():
        if s == scope and selector.rsplit(".", 1)[-1] == ref.configurable.name:
            return dict(params)
    return {}


def _value(value: Any, skip: tuple[str, ...] = ()) -> str:  # noqa: ANN401  (any gin value)
    """A gin value as a short call: a reference becomes ``Name(param=value, ...)``, its operative params."""
    if isinstance(value, gin.config.ConfigurableReference):
        if value.selector == "gin.macro":
            return repr(gin.query_parameter(f"%{value.scoped_selector.split('/')[0]}"))
        params = {k: v for k, v in _operative(value).items() if k not in skip}
        inner = ", ".join(f"{k}={_value(v)}" for k, v in sorted(params.items()))
        return f"{value.configurable.name}({inner})" if value.evaluate else value.configurable.name
    return repr(value)


def backbones() -> str:
    """``'target small_cnn, guide small_cnn'`` from the bound model references."""
    try:
        models = gin.query_parameter("TrainingGraph.models")
    except ValueError:
        return "?"
    out = []
    for name, ref in models.items():
        arch = _operative(ref).get("name", "?") if isinstance(ref, gin.config.ConfigurableReference) else "?"
        out.append(f"{name} {_value(arch).strip(chr(39))}")
    return ", ".join(out)


def loss_rows(loss: Any) -> list[str]:  # noqa: ANN401  (a components.losses.WeightedLoss)
    """One markdown table row per weighted term: name, weight, what it computes, the views it reads."""
    try:
        refs = gin.query_parameter("WeightedLoss.terms")
    except ValueError:
        refs = {}
    rows = []
    for name, (weight, term) in loss.terms.items():
        ref = refs.get(name, (None, None))[1]
        views = ", ".join(f"`{v}`" for v in term.views)
        computes = (
            _value(ref, skip=("view", "input", "target", "a", "b"))
            if isinstance(ref, gin.config.ConfigurableReference)
            else type(term).__name__
        )
        rows.append(f"| `{name}` | {weight:g} | {computes} | {views} |")
    return rows


def training_attack() -> str:
    """The generator of the training graph, its numbers first."""
    try:
        ref = gin.query_parameter("TrainingGraph.generator")
    except ValueError:
        return "?"
    params = _operative(ref)
    numbers = (
        f"{_value(params.get('steps', '?'))} steps of {_value(params.get('step_size'))} in the L-inf "
        f"{_value(params.get('eps'))} ball"
    )
    rest = ", ".join(
        f"{k} {_value(params[k])}" for k in ("objective", "init", "bn_mode", "init_view") if k in params
    )
    return f"{ref.configurable.name}: {numbers}; {rest}"


# ------------------------------------------------------------------------------------- the card


def summary_line(method: str, dataset: str, arch: str, score: float, epoch: Any, val_steps: int) -> str:  # noqa: ANN401
    """The version's first line, what the registered model's table shows."""
    return f"{method} on {dataset} ({arch}): val PGD-{val_steps} {pct(score)} at epoch {epoch}"


def model_card(
    run_id: str,
    name: str,
    score: float,
    exp: Any,  # noqa: ANN401  (a components.experiment.Experiment)
    config: str,
    *,
    datasets: Mapping[str, Mapping[str, Any]] | None = None,
    version: str | None = None,
) -> str:
    """The markdown card of the version registered from ``run_id``; gin must hold the run's config."""
    from components.method import declared_method

    run = mlflow.get_run(run_id)
    metrics, tags = run.data.metrics, run.data.tags
    data = exp.data.summary()
    val_steps = exp.trainer.val_steps
    epoch = tags.get("robustflow.best_epoch", "?")
    method = declared_method()
    method_name = method.name if method else "method not declared"
    arch = backbones()
    uri = f"models:/{name}/{version}" if version else f"models:/{name}/<version>"
    test_n = data.get("test_size", "?")
    test_numbers = ", ".join(
        f"{label} {pct(metrics[key])}"
        for label, key in (("clean", "test/clean_acc"), (f"PGD-{val_steps}", f"test/pgd{val_steps}_acc"))
        if key in metrics
    )
    digests = ", ".join(
        f"{split} {info['num_examples']} images (digest `{info['digest']}`)"
        for split, info in (datasets or {}).items()
    )
    lines = [
        summary_line(method_name, data.get("dataset", "?"), arch, score, epoch, val_steps),
        "",
        "## Method",
        f"**{method.name}**: {method.summary}  \nPaper: {method.paper}."
        if method
        else "No `method_info` bound: add `method_info.name/paper/summary` to the method's gin fragment.",
        f"Config `{tags.get('robustflow.gin', '?')}`, "
        f"overrides `{tags.get('robustflow.overrides', '') or 'none'}`; "
        f"backbones: {arch}.",
        "",
        "## Loss: the weighted sum of these terms",
        "| term | weight | computes | views |",
        "|---|---|---|---|",
        *loss_rows(exp.graph.loss),
        "",
        "## Attacks",
        f"- **Training**: {training_attack()}",
        f"- **Selection** (`val/`) and the run's test split (`test/`): PGD-{val_steps}, eps 8/255, "
        "step 2/255, "
        "cross-entropy, uniform random start, per-example early stop",
        "- **Evaluation**: `evaluate` (the next sections); every eps is L-inf in pixel space [0, 1]",
        "",
        "## Selected checkpoint",
        f"Epoch **{epoch}** of {exp.trainer.epochs}, by validation PGD-{val_steps} accuracy "
        f"**{pct(score)}** on "
        f"{data.get('val_size', '?')} images held out of the training set (never the test set). "
        f"The run's own test split ({test_n} images): {test_numbers or 'not measured'}. "
        f"Stabilizers: gradient clipping {exp.trainer.grad_clip_norm or 'off'}, "
        f"lr ramp {exp.trainer.lr_ramp_epochs:g} epochs.",
        "",
        EVAL_HEADING,
        f"Not evaluated yet: `mlflow run . -e evaluate -P model_uri={uri} -P suite=paper "
        f"--experiment-name {name} --env-manager local`.",
        "",
        "## Provenance",
        f"- Run `{run_id}` (experiment `{name}`), code commit `{code_commit(tags)}`, "
        f"{hardware(exp.data.device)}",
        f"- Data: {data.get('dataset', '?')}, {digests or 'splits ' + str(data)}; split seed "
        f"{data.get('split_seed', '?')}; inputs in [0, 1], normalization (if any) inside the model",
        f"- Load: `pipeline.registry.load_model('{uri}')` gives the real `nn.Module` in eval mode; "
        "`mlflow.pytorch.load_model` gives a torch.export GraphModule that computes eval mode (its "
        "`.eval()`/`.train()` raise NotImplementedError)",
        f"- Re-create: download `{CONFIG_ARTIFACT}` from the run, then `mlflow run . -e train "
        f"-P gin=operative_config.txt --experiment-name {name} --env-manager local`",
        "",
    ]
    return fit(scrub("\n".join(lines)), run.info.experiment_id, run_id, scrub(config))


def config_link(experiment_id: str, run_id: str) -> str:
    """A link, in the MLflow UI, to the run's config artifact (the UI previews ``.txt`` files)."""
    return f"[`{CONFIG_ARTIFACT}`](#/experiments/{experiment_id}/runs/{run_id}/artifacts/{CONFIG_ARTIFACT})"


def fit(head: str, experiment_id: str, run_id: str, config: str) -> str:
    """``head`` then the config section: the whole config if it fits ``CARD_LIMIT``, else a link to it."""
    whole = f"{CONFIG_HEADING}\n```\n{config.strip()}\n```\n"
    if config.strip() and len(head.rstrip()) + 2 + len(whole) <= CARD_LIMIT:
        return head.rstrip() + "\n\n" + whole
    link = (
        f"{CONFIG_HEADING}\nThe whole operative config (every binding, defaults included) is the run's "
        f"artifact {config_link(experiment_id, run_id)}; every binding is also a parameter of the run.\n"
    )
    text = head.rstrip() + "\n\n" + link
    if len(text) > CARD_LIMIT:  # never cut the config in the middle: cut the card before its last lines
        text = text[: CARD_LIMIT - 40].rsplit("\n", 1)[0] + "\n\n(cut to fit the model page)\n"
    return text


def _sections(card: str) -> tuple[str, dict[str, str]]:
    """The card's first line and its ``## `` sections by heading, in order."""
    first, _, rest = card.partition("\n")
    parts = re.split(r"(?m)^(?=## )", rest)
    sections = {p.split("\n", 1)[0]: p for p in parts if p.startswith("## ")}
    return first, sections


def with_evaluation(
    card: str, key: str, row: str, header: str, headline: str, experiment_id: str, run_id: str
) -> str:
    """``card`` with its evaluation table gaining (or replacing) the row ``key`` and the summary line's
    evaluation part set to ``headline``. The config section is re-fitted: the config the card showed
    stays while it fits, else it becomes a link to the run's config artifact.

    ``header`` is the table's header and separator lines; rows of earlier evaluations of other suites or
    sample sizes stay.
    """
    first, sections = _sections(card)
    old = sections.get(EVAL_HEADING, "")
    rows = [line for line in old.splitlines()[1:] if line.startswith("| ")]
    rows = [r for r in rows if r not in header.splitlines() and not r.startswith(f"| {key} |")]
    sections[EVAL_HEADING] = "\n".join([EVAL_HEADING, header, *rows, row]) + "\n"
    shown = re.search(r"```\n(.*)\n```", sections.pop(CONFIG_HEADING, ""), re.DOTALL)
    first = first.split(EVAL_MARK)[0] + EVAL_MARK + headline
    head = first + "\n\n" + "\n".join(s.rstrip() + "\n" for s in sections.values())
    return fit(head, experiment_id, run_id, shown.group(1) if shown else "")
