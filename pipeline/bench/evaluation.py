"""Evaluation speed: PGD-20 through ``robust_accuracy`` (as validation runs it) and, optionally, AutoAttack
'standard' through robustflow's wrapper, on the trained (or ``--eval-checkpoint``) target."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.reference_d2r import sync_device
from components.modes import model_mode

EVAL_PGD_STEPS = 20
AA_EPS = 8 / 255


def load_eval_checkpoint(model: nn.Module, path: str | Path) -> bool:
    """Load a robustflow checkpoint's target weights into ``model``; False if the architecture differs."""
    from components.checkpoint import load_checkpoint, strip_module_prefix

    state = load_checkpoint(path)
    weights = state["model"] if "model" in state else state["models"]["target"]
    try:
        model.load_state_dict(strip_module_prefix(weights), strict=True)
    except RuntimeError:
        return False
    return True


def bench_pgd_eval(
    model: nn.Module, images: Tensor, labels: Tensor, batch_size: int, trainer: Any, warmup: bool
) -> dict[str, Any]:
    """PGD-20 evaluation throughput of ``robust_accuracy`` (clean forward, 20 steps, adversarial forward),
    under ``trainer``'s autocast as ``Trainer.fit``'s validation runs it."""
    from components.data import DeviceLoader
    from components.eval.attacks import robust_accuracy

    device = images.device
    loader = DeviceLoader(images, labels, batch_size)
    with trainer.autocast(device):
        if warmup:
            first = DeviceLoader(images[:batch_size], labels[:batch_size], batch_size)
            robust_accuracy(model, first, attack_steps=EVAL_PGD_STEPS)
        sync_device(device)
        t0 = time.perf_counter()
        acc = robust_accuracy(model, loader, attack_steps=EVAL_PGD_STEPS)
        sync_device(device)
    elapsed = time.perf_counter() - t0
    return {"pgd20_images_per_s": len(labels) / elapsed, "pgd20_eval": acc}


def bench_autoattack(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int) -> dict[str, Any]:
    """AutoAttack 'standard' (L-inf, 8/255, fp32) on a few images: images/s and the time scaled to 10k.

    Its cost scales with the images that stay robust (each attack runs only on those): read the clean
    and robust accuracy next to the speed, and use ``--eval-checkpoint`` for a trained model's cost.
    """
    # Imported here: pyautoattack is needed only when AutoAttack is asked for.
    from components.eval.autoattack import AutoAttack

    device = images.device
    x = images.float() / 255
    attack = AutoAttack(eps=AA_EPS, version="standard", batch_size=batch_size, seed=0)
    with model_mode(model, train=False):
        sync_device(device)
        t0 = time.perf_counter()
        x_adv = attack(model, x, labels)
        sync_device(device)
        elapsed = time.perf_counter() - t0
        with torch.no_grad():
            clean = (model(x).argmax(1) == labels).float().mean().item()
            robust = (model(x_adv).argmax(1) == labels).float().mean().item()
    return {
        "aa_images_per_s": len(labels) / elapsed,
        "aa_images": len(labels),
        "aa_s_per_10k": elapsed / len(labels) * 10_000,
        "aa_clean_acc": clean,
        "aa_robust_acc": robust,
        "aa_impl": f"{AutoAttack.__module__}.{AutoAttack.__qualname__}",
        "aa_flags": list(attack.flags),
    }
