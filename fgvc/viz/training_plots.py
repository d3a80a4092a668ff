"""Training curves, confusion matrix and per-class accuracy (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fgvc.viz._figure import new_figure, save


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
    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(names)
    size = min(4 + 0.25 * n, 16)
    fig = new_figure((size, size * 0.85))
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    ticks = np.arange(n)
    labels_shown = n <= 60
    ax.set_xticks(ticks if labels_shown else [])
    ax.set_yticks(ticks if labels_shown else [])
    if labels_shown:
        ax.set_xticklabels(names, rotation=90, fontsize=max(4, 9 - n // 10))
        ax.set_yticklabels(names, fontsize=max(4, 9 - n // 10))
    if n <= 15:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return save(fig, path, tight=True)


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
