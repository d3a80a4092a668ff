"""Summary plots: histograms of per-image scores, bar charts of per-variant results and
confusion matrices."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fgvc.viz._figure import PathLike, new_figure, save, to_numpy

HISTOGRAM_INCHES = (4.0, 3.0)  # 400 x 300 px


def bar_chart_figsize(count: int) -> tuple[float, float]:
    """Width grows with the number of bars: ``max(4, 0.5 * count + 1.5)`` x 3 inches."""
    return max(4.0, 0.5 * count + 1.5), 3.0


def save_histogram(
    path: PathLike, values, title: str, xlabel: str, bins: int = 30,
    reference: tuple[float, str] | None = None,
) -> Path:
    """Histogram of ``values`` (e.g. per-image background preferences), with the mean marked
    and an optional reference value (``(1.0, "no preference")``). Non-finite values are
    dropped. Size: 400 x 300 px."""
    data = to_numpy(values).reshape(-1)
    data = data[np.isfinite(data)]
    fig = new_figure(HISTOGRAM_INCHES)
    ax = fig.add_subplot()
    ax.hist(data, bins=bins, color="#4575b4", edgecolor="white")
    if data.size:
        ax.axvline(float(data.mean()), color="black", linestyle="--", linewidth=1,
                   label=f"mean {data.mean():.3f}")
    if reference is not None:
        ax.axvline(reference[0], color="#d73027", linestyle=":", linewidth=1.2, label=reference[1])
    if data.size or reference is not None:
        ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("images", fontsize=8)
    ax.tick_params(labelsize=7)
    fig.subplots_adjust(left=0.15, right=0.97, top=0.88, bottom=0.16)
    return save(fig, path)


def save_bar_chart(
    path: PathLike,
    names: Sequence[str],
    values,
    title: str,
    chance: float | None = None,
    low: Sequence[float] | None = None,
    high: Sequence[float] | None = None,
) -> Path:
    """One bar per name (e.g. accuracy per background-swap variant), value printed on each
    bar, an interval per bar when ``low``/``high`` are given, and a dashed line at ``chance``.
    Size: :func:`bar_chart_figsize` x DPI."""
    heights = to_numpy(values).reshape(-1)
    if len(names) != heights.size:
        raise ValueError(f"{len(names)} names for {heights.size} values")
    fig = new_figure(bar_chart_figsize(len(names)))
    ax = fig.add_subplot()
    positions = np.arange(len(names))
    errors = None
    if low is not None and high is not None:
        errors = np.array([np.clip(heights - to_numpy(low).reshape(-1), 0, None),
                           np.clip(to_numpy(high).reshape(-1) - heights, 0, None)])
    bars = ax.bar(positions, heights, color="#74add1", edgecolor="#313695", yerr=errors, capsize=3)
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in heights], fontsize=7)
    if chance is not None:
        ax.axhline(
            chance, color="#d73027", linestyle="--", linewidth=1, label=f"chance {chance:.3f}"
        )
        ax.legend(fontsize=7)
    ax.set_xticks(positions, [str(n) for n in names], rotation=30, ha="right", fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(title, fontsize=9)
    top = max(float(heights.max()) if heights.size else 0.0, chance or 0.0,
              float(to_numpy(high).max()) if high is not None and len(high) else 0.0)
    ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
    fig.subplots_adjust(left=0.14, right=0.97, top=0.88, bottom=0.28)
    return save(fig, path)


def save_sanity_curve(path: PathLike, steps: dict[str, Sequence[str]],
                      curves: dict[str, Sequence[tuple[float, float, float]]], threshold: float) -> Path:
    """The randomisation test's classic curve: x = blocks randomised from the head down
    (``steps[method]``, step 0 = none), y = mean rank correlation with the trained network's
    maps, a band for the 95% interval per method and a dashed line at the flag ``threshold``.
    Written as PNG and, beside it, SVG. Size: 500 x 350 px."""
    fig = new_figure((5.0, 3.5))
    ax = fig.add_subplot()
    colours = ("#d73027", "#4575b4", "#1a9850", "#984ea3", "#a65628")
    labels: Sequence[str] = ()
    for i, (method, points) in enumerate(curves.items()):
        x = np.arange(len(points))
        estimate, low, high = (np.array([p[k] for p in points], dtype=float) for k in range(3))
        ax.plot(x, estimate, marker="o", color=colours[i % len(colours)], label=method, linewidth=1.4)
        ax.fill_between(x, low, high, color=colours[i % len(colours)], alpha=0.15, linewidth=0)
        labels = steps[method]
    ax.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"flag threshold {threshold:g}")
    ax.axhline(0.0, color="grey", linewidth=0.6)
    ax.set_xticks(np.arange(len(labels)), list(labels), rotation=25, ha="right", fontsize=7)
    ax.set_xlabel("blocks randomised (cumulative, head first)", fontsize=8)
    ax.set_ylabel("Spearman correlation with trained maps", fontsize=8)
    ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1.05)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.13, right=0.97, top=0.95, bottom=0.32)
    return save_with_svg(fig, path)


def save_with_svg(fig, path: PathLike) -> Path:
    """Write ``fig`` as SVG (vector, for print) beside the PNG that :func:`save` writes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path.with_suffix(".svg"), format="svg")
    return save(fig, path)


def save_confusion_matrix(
    path: PathLike,
    confusion,
    names: Sequence[str],
    title: str,
    *,
    row_label: str = "true",
    column_label: str = "predicted",
    share_label: str = "share of true class",
    row_counts: bool = False,
) -> Path:
    """Row-normalised confusion matrix of counts ``confusion`` ``[C, C]`` (rows: ``row_label``,
    e.g. the true designer; columns: ``column_label``, the predicted one), colour = share of
    the row. The counts are written in the cells up to 15 classes; with ``row_counts`` each
    row's name also states its count (``Dior (n=12)``). Names are shown up to 60 classes.
    Size: ``min(4 + 0.25 C, 16)`` x 0.85 of that, in inches."""
    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(names)
    size = min(4 + 0.25 * n, 16)
    fig = new_figure((size, size * 0.85))
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label=share_label)
    ticks = np.arange(n)
    labels_shown = n <= 60
    ax.set_xticks(ticks if labels_shown else [])
    ax.set_yticks(ticks if labels_shown else [])
    if labels_shown:
        rows = [f"{name} (n={int(total)})" for name, total in zip(names, cm.sum(1))] if row_counts else names
        ax.set_xticklabels(names, rotation=90, fontsize=max(4, 9 - n // 10))
        ax.set_yticklabels(rows, fontsize=max(4, 9 - n // 10))
    if n <= 15:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel(column_label)
    ax.set_ylabel(row_label)
    ax.set_title(title)
    return save(fig, path, tight=True)
