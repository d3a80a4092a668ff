"""Training curves, confusion matrix and per-class accuracy (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fgvc.viz._figure import new_figure, save
from fgvc.viz.plots import save_confusion_matrix


def save_curves(path: str | Path, history: list[dict], keys: dict[str, str], ylabel: str, title: str) -> Path:
    """One line per metric over epochs; `keys` maps metric name -> legend label."""
    fig = new_figure((6, 4))
    ax = fig.subplots()
    epochs = [h["epoch"] for h in history]
    for key, label in keys.items():
        ax.plot(epochs, [h[key] for h in history], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path, tight=True)


def save_confusion(path: str | Path, confusion, names: list[str], title: str = "Confusion matrix (val)") -> Path:
    """Row-normalised confusion matrix (rows: true designer, columns: predicted)."""
    return save_confusion_matrix(path, confusion, names, title)


def save_per_class(path: str | Path, per_class_acc: list[float], names: list[str], support: list[int],
                   title: str = "Per-class accuracy (val)") -> Path:
    """Horizontal bars, sorted worst first, with the support of each class."""
    acc = np.nan_to_num(np.asarray(per_class_acc, dtype=float), nan=0.0)
    order = np.argsort(acc)
    n = len(names)
    fig = new_figure((6, max(3, 0.22 * n + 1)))
    ax = fig.subplots()
    ax.barh(np.arange(n), acc[order], color="tab:blue")
    ax.set_yticks(np.arange(n))
    ax.set_yticklabels([f"{names[i]} (n={support[i]})" for i in order], fontsize=max(5, 9 - n // 15))
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.axvline(float(np.mean(acc)), color="k", ls="--", lw=1, label="balanced accuracy")
    ax.legend(loc="lower right")
    ax.set_title(title)
    return save(fig, path, tight=True)
