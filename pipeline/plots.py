"""Figures logged with runs: what a person would rather look at than read."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def training_curves(history: list[dict[str, float]], selection_metric: str) -> Figure:
    """Loss and accuracies per epoch (train clean/adv, validation clean/robust)."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train/loss"] for h in history], marker="o", label="train/loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    for key in ("train/clean_acc", "train/adv_acc", "val/clean_acc", selection_metric):
        ax_acc.plot(epochs, [h[key] for h in history], marker="o", label=key)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend()
    fig.tight_layout()
    return fig
