"""Figures of a run and of a schedule. matplotlib is a dependency; it is imported only
when a figure is drawn (it is slow to import)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def pyplot():
    """matplotlib's pyplot, drawing to files (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Training loss, test top-1, learning rate and alpha_sgd against epochs (and the
    gradient noise scale, when the run measured it)."""
    plt = pyplot()
    epochs = [m["epoch"] for m in history]
    noise = [m for m in history if "noise_scale" in m]
    fig, axes = plt.subplots(1, 4 if noise else 3, figsize=(17 if noise else 13, 3.8))
    axes[0].plot(epochs, [m["train_loss"] for m in history], marker=".")
    axes[0].set(xlabel="epoch", ylabel="training loss", yscale="log")
    tested = [m for m in history if "test_top1" in m]
    axes[1].plot([m["epoch"] for m in tested], [m["test_top1"] for m in tested], marker=".")
    axes[1].set(xlabel="epoch", ylabel="test top-1 (%)")
    axes[2].plot(epochs, [m["lr"] for m in history], marker=".", label="lr (end of epoch)")
    axes[2].set(xlabel="epoch", ylabel="learning rate")
    twin = axes[2].twinx()
    twin.plot(epochs, [m["alpha_sgd"] for m in history], color="tab:orange", marker=".")
    twin.set(ylabel="alpha_sgd", ylim=(0, 1.05))
    if noise:
        axes[3].plot([m["epoch"] for m in noise], [m["noise_scale"] for m in noise], marker=".")
        axes[3].set(xlabel="epoch", ylabel="gradient noise scale B_simple (images)", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_schedule(rows: Sequence[tuple[float, float, float]], path: Path, title: str = "") -> Path:
    """Learning rate (left axis) and alpha_sgd (right axis) against the epoch."""
    plt = pyplot()
    epochs, lrs, alphas = zip(*rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epochs, lrs, label="lr")
    ax.set(xlabel="epoch", ylabel="learning rate", title=title)
    twin = ax.twinx()
    twin.plot(epochs, alphas, color="tab:orange", label="alpha_sgd")
    twin.set(ylabel="alpha_sgd", ylim=(0, 1.05))
    fig.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
