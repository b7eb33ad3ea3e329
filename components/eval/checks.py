"""Checks that warn when a robustness evaluation cannot be trusted, in the spirit of AutoAttack's flags.

A robust-accuracy number is only as good as the attack behind it. Each check here looks for one known way an
evaluation goes wrong (Carlini et al. 2019, "On evaluating adversarial robustness"; Croce & Hein 2020, the
AutoAttack flags) and returns a list of human-readable flag strings, empty when all is well. Nothing is
raised and nothing is silently dropped: the caller prints the flags and logs them with the numbers.

Every flag starts with a bracketed tag (``[non-finite]``, ``[eval-mode]``, ``[randomized]`` ...) so that
logs can be grepped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.eval.attacks import pgd_eval_attack

#: AutoAttack's tolerance for "attack A found more than attack B" comparisons (0.2 % of the examples).
ALPHA = 0.002
#: Slack for floating-point error when checking that x_adv lies in the eps ball and the [0, 1] box.
ATOL = 1e-5


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


@contextlib.contextmanager
def _frozen_state(model: nn.Module) -> Iterator[None]:
    """Restore buffers (BN running stats) afterwards: a check must not change the model it looks at.

    Not :func:`components.modes.model_mode`, which restores modes and ``requires_grad`` but not buffer
    values: a check may run a model its caller left in train mode (that is what ``[eval-mode]`` reports),
    and a train-mode forward moves the BN running statistics, which only a copy can put back.
    """
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved[name])


# ------------------------------------------------------------------------------------- model checks


def check_finite(model: nn.Module, x: Tensor) -> list[str]:
    """Flag NaN/inf in the model's parameters or buffers, and NaN/inf logits on ``x``.

    A diverged training run leaves such weights behind. Their logits are not finite, so argmax predictions,
    every attack and every other logit-based check are meaningless: this flag says so by name, instead of
    the evaluation reporting a "randomized" model or chance-level accuracy as the only symptom.
    """
    tensors = [*model.named_parameters(), *model.named_buffers()]
    bad = [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    flags = []
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        flags.append(
            f"[non-finite] {len(bad)} parameter/buffer tensor(s) hold NaN or inf ({shown}): the weights are "
            "broken (diverged training?); no accuracy computed from this model means anything"
        )
    with torch.no_grad(), _frozen_state(model):
        out = model(x).float()
    rows = int((~torch.isfinite(out)).flatten(1).any(1).sum())
    if rows:
        flags.append(
            f"[non-finite] the logits of {rows}/{x.shape[0]} inputs contain NaN or inf: predictions (argmax) "
            "and attacks on them are meaningless, and so is every accuracy reported"
        )
    return flags


def check_eval_mode(model: nn.Module) -> list[str]:
    """Flag modules left in train mode: BatchNorm would use batch statistics and dropout would be live."""
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if not training:
        return []
    shown = ", ".join(training[:5]) + (f" and {len(training) - 5} more" if len(training) > 5 else "")
    return [
        f"[eval-mode] {len(training)} module(s) are in train mode ({shown}): call model.eval() before "
        "evaluating, or BatchNorm/dropout make the reported accuracy differ from the deployed model's"
    ]


def check_deterministic(model: nn.Module, x: Tensor, n: int = 3, rtol: float = 1e-4) -> list[str]:
    """Flag a randomized forward (dropout left on, input noise, stochastic layers).

    Gradient attacks against a randomized model need expectation over transformation (EOT); plain PGD and
    standard AutoAttack overestimate its robustness. ``n`` forwards of the same input must agree up to
    ``rtol`` relative to the logits' scale (AutoAttack's check uses 1e-4 on normalized logits).
    """
    with torch.no_grad(), _frozen_state(model):
        outs = [model(x).float() for _ in range(n)]
    scale = outs[0].abs().max().clamp_min(1e-12)
    diff = max(((o - outs[0]).abs().max() / scale).item() for o in outs[1:])
    flips = max(int((o.argmax(1) != outs[0].argmax(1)).sum()) for o in outs[1:])
    if diff <= rtol and flips == 0:
        return []
    return [
        f"[randomized] {n} forward passes of the same input differ (max relative logit difference "
        f"{diff:.2e}, {flips}/{x.shape[0]} predictions change): the model is randomized (dropout in train "
        "mode, added noise?). Gradient attacks then need EOT; these numbers likely overestimate robustness"
    ]


def check_logits(model: nn.Module, x: Tensor, atol: float = 1e-5) -> list[str]:
    """Flag outputs that look like probabilities (rows in [0, 1] summing to 1) instead of logits.

    CE on probabilities (a softmax inside the model) has vanishing gradients, so PGD-CE is weak against it.
    """
    with torch.no_grad(), _frozen_state(model):
        out = model(x).float()
    in_unit = bool((out.min() > -atol) & (out.max() < 1 + atol))
    sums_to_one = bool(((out.sum(1) - 1).abs() < atol).all())
    if not (in_unit and sums_to_one):
        return []
    return [
        "[probabilities] the model's outputs are in [0, 1] and every row sums to 1: it returns "
        "probabilities, not logits. Remove the final softmax; CE on probabilities masks the gradient"
    ]


def check_gradient_masking(model: nn.Module, x: Tensor, y: Tensor) -> list[str]:
    """Flag inputs whose CE-loss gradient with respect to the input is exactly zero.

    An exactly zero gradient means a gradient attack cannot move: a non-differentiable step in the forward
    (``torch.round``, ``sign``, quantization, thresholding) or a saturated softmax. Robust accuracy then
    measures the attack's blindness, not the model.
    """
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), _frozen_state(model):
        loss = F.cross_entropy(model(x).float(), y, reduction="sum")
        # allow_unused: an input that does not reach the loss at all is the extreme case of masking.
        (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    zero = x.shape[0] if grad is None else int((grad.flatten(1).abs().sum(1) == 0).sum())
    if zero == 0:
        return []
    return [
        f"[zero-gradient] {zero}/{x.shape[0]} inputs have an exactly zero gradient of the CE loss: a "
        "non-differentiable op in the forward (round/sign/quantization) or a saturated softmax masks the "
        "gradient, so gradient attacks cannot work there (use a black-box or adaptive attack, e.g. BPDA)"
    ]


def check_large_eps(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float = 0.5,
    steps: int = 20,
    max_acc: float = 0.1,
) -> list[str]:
    """Flag an attack that cannot break the model even with a huge budget (default eps = 0.5).

    At eps = 0.5 the mid-gray image is inside every example's ball, so at most the examples of one class can
    be truly robust; an attack that leaves more than ``max_acc`` accuracy is not finding what exists (masked
    or obfuscated gradients). The step (eps / 10) lets PGD cross the whole ball in ``steps`` steps.
    """
    with _frozen_state(model):
        with torch.enable_grad():
            x_adv = pgd_eval_attack(model, x, y, eps=eps, step_size=eps / 10, steps=steps, early_stop=True)
        with torch.no_grad():
            acc = (model(x_adv).argmax(1) == y).float().mean().item()
    if acc <= max_acc:
        return []
    return [
        f"[large-eps] PGD-{steps} at eps={eps:g} still leaves {_pct(acc)} accuracy (expected <= "
        f"{_pct(max_acc)}): at such a radius nearly every example can be flipped, so the attack is not "
        "working (gradient masking?)"
    ]


def check_inputs(x: Tensor) -> list[str]:
    """Flag inputs outside [0, 1]: eps is in pixel space, so normalization must live inside the model."""
    lo, hi = x.min().item(), x.max().item()
    if lo >= 0.0 and hi <= 1.0:
        return []
    return [
        f"[input-range] inputs span [{lo:.3g}, {hi:.3g}], not [0, 1]: eps is in pixel space, so normalize "
        "inside the model (components.backbones Normalize), not in the data"
    ]


def check_clean_accuracy(clean_acc: float, num_classes: int) -> list[str]:
    """Flag clean accuracy near chance: the weights were probably not loaded (METHODS 1.5 pitfall)."""
    if num_classes < 2 or clean_acc > 1.5 / num_classes:
        return []
    return [
        f"[chance-level] clean accuracy {_pct(clean_acc)} is near chance (1/{num_classes}): were the "
        "weights loaded? (a 'module.' prefix with strict=False silently loads nothing)"
    ]


def run_model_checks(model: nn.Module, x: Tensor, y: Tensor, large_eps: float | None = 0.5) -> list[str]:
    """All the checks that only need the model and one batch; ``large_eps=None`` skips the costly one.

    With non-finite weights or logits the checks that compare logits (randomized, probabilities, masked
    gradients, large eps) would only misname the problem, so they are skipped behind the ``[non-finite]``
    flag.
    """
    flags = check_inputs(x) + check_eval_mode(model)
    non_finite = check_finite(model, x)
    if non_finite:
        return flags + non_finite
    flags += check_deterministic(model, x) + check_logits(model, x) + check_gradient_masking(model, x, y)
    if large_eps is not None:
        flags += check_large_eps(model, x, y, eps=large_eps)
    return flags


# ------------------------------------------------------------------------------------- attack checks


def count_violations(x: Tensor, x_adv: Tensor, eps: float, atol: float = ATOL) -> dict[str, int]:
    """Per-example counts of returned points that are not valid adversarial examples for (x, eps)."""
    if x_adv.shape != x.shape:
        return {"shape": x.shape[0], "nan": 0, "ball": 0, "box": 0}
    nan = ~torch.isfinite(x_adv).flatten(1).all(1)
    ball = (x_adv - x).abs().flatten(1).amax(1) > eps + atol
    box = (x_adv.flatten(1).amin(1) < -atol) | (x_adv.flatten(1).amax(1) > 1 + atol)
    return {
        "shape": 0,
        "nan": int(nan.sum()),
        "ball": int((ball & ~nan).sum()),
        "box": int((box & ~nan).sum()),
    }


def violation_flags(attack: str, eps: float, counts: Mapping[str, int], n: int) -> list[str]:
    """Flag strings for the counts of :func:`count_violations` (summed over batches)."""
    what = {
        "shape": "have the wrong shape",
        "nan": "contain NaN or inf",
        "ball": f"lie outside the eps={eps:.6g} L-inf ball",
        "box": "lie outside the [0, 1] image box",
    }
    return [
        f"[invalid-adversarial] {attack}: {counts[k]}/{n} returned examples {what[k]}; its accuracy is "
        "not a valid robustness measure"
        for k in what
        if counts.get(k, 0)
    ]


def check_adversarial_examples(
    x: Tensor, x_adv: Tensor, eps: float, attack: str = "attack", atol: float = ATOL
) -> list[str]:
    """Flag returned examples outside the eps ball or [0, 1], or containing NaN (one batch)."""
    return violation_flags(attack, eps, count_violations(x, x_adv, eps, atol), x.shape[0])


def check_black_box_vs_white_box(extra_fooled: Mapping[str, int], n: int, alpha: float = ALPHA) -> list[str]:
    """Flag a black-box attack that fools examples every white-box attack missed.

    ``extra_fooled[name]`` counts the examples that black-box attack ``name`` (Square, alone or inside
    AutoAttack) fooled although they survived every white-box attack. Gradient attacks see strictly more
    than a query attack, so when the latter wins by more than ``alpha`` the gradients are misleading.
    """
    return [
        f"[black-box-wins] {name} fooled {k}/{n} examples ({_pct(k / n)}) that survived every white-box "
        "attack: the gradients are likely masked; robust accuracy from gradient attacks is unreliable"
        for name, k in extra_fooled.items()
        if n and k / n > alpha
    ]


def check_more_steps(
    acc_by_steps: Mapping[int, float], what: str = "PGD", where: str = "", alpha: float = ALPHA
) -> list[str]:
    """Flag an attack whose accuracy rises with more steps (e.g. PGD-50 above PGD-10).

    With early stop and a shared random start, more steps can only fool more examples; a rise beyond
    ``alpha`` means a randomized or otherwise inconsistent model, or a broken attack loop. ``where`` is
    appended to the message (e.g. ``at eps=8/255``).
    """
    where = f" {where}" if where else ""
    steps = sorted(acc_by_steps)
    flags = []
    for fewer, more in zip(steps, steps[1:]):
        if acc_by_steps[more] > acc_by_steps[fewer] + alpha:
            more_acc, fewer_acc = _pct(acc_by_steps[more]), _pct(acc_by_steps[fewer])
            flags.append(
                f"[more-steps-weaker] {what}-{more}{where} gives higher accuracy ({more_acc}) than "
                f"{what}-{fewer} ({fewer_acc}): more steps must not help the model; the evaluation is "
                "inconsistent (randomness or a masked gradient)"
            )
    return flags
