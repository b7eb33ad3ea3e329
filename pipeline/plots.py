"""Figures logged with runs: what a person would rather look at than read."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def training_curves(
    history: list[dict[str, float]], selection_metric: str, title: str = "", best_epoch: int | None = None
) -> Figure:
    """Loss and accuracies per epoch (train clean/adv, validation clean/robust), the selected epoch marked."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train/loss"] for h in history], marker="o", label="train/loss")
    ax_loss.set_ylabel("loss")
    for key in ("train/clean_acc", "train/adv_acc", "val/clean_acc", selection_metric):
        ax_acc.plot(epochs, [h[key] for h in history], marker="o", label=key)
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle="--", label=f"selected (epoch {best_epoch})")
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
