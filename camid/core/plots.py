"""Figures people would rather see than read: the confusion matrix and training curves."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def confusion_figure(matrix: np.ndarray, labels: list[str], title: str = "Confusion matrix"):
    matrix = np.asarray(matrix)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.55 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted camera")
    ax.set_ylabel("true camera")
    ax.set_title(title)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if matrix[i, j]:
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    return fig


def history_figure(history: pd.DataFrame, title: str = "Training", kept: dict | None = None):
    """The training curves; `kept` (run.json's "checkpoint") marks on the validation curve the epoch whose weights
    were kept and the band of the validation's noise below the best score that the rule kept within."""
    metrics = [c for c in ("loss", "camera_accuracy", "val_weighted_accuracy", "learning_rate") if c in history]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    for ax, name in zip(axes[0], metrics):
        ax.plot(history["epoch"], history[name], marker="o", ms=3)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        if name == "val_weighted_accuracy" and kept:
            ax.axhspan(kept["best_score"] - kept["noise"], kept["best_score"], color="tab:green", alpha=0.15,
                       label=f"best - 1 s.e. ({kept['val_photos']} photos)")
            ax.plot([kept["kept_epoch"]], [kept["kept_score"]], marker="*", ms=12, color="tab:red", ls="none",
                    label=f"kept: epoch {kept['kept_epoch']} ({kept['rule']})")
            ax.legend(fontsize=7, loc="lower right")
        if name == "learning_rate":
            ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
