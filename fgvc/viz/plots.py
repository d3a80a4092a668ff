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
        rows = [f"{name} (n={int(total)})" for name, total in zip(names, cm.sum(1), strict=True)] if row_counts \
            else names
        ax.set_xticklabels(names, rotation=90, fontsize=max(4, 9 - n // 10))
        ax.set_yticklabels(rows, fontsize=max(4, 9 - n // 10))
    if n <= 15:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel(column_label)
    ax.set_ylabel(row_label)
    ax.set_title(title)
    return save(fig, path, tight=True)


def _designer_order(rows: Sequence[dict], top: int) -> list[dict]:
    """The ``top`` designers whose backdrops the model reads most: by backdrop-follow, then by
    No-FG accuracy (a NaN share counts as lowest)."""
    def key(row: dict) -> tuple[float, float]:
        follow, no_fg = float(row.get("backdrop_follow", np.nan)), float(row.get("acc_no_fg", np.nan))
        return (-follow if np.isfinite(follow) else np.inf, -no_fg if np.isfinite(no_fg) else np.inf)

    return sorted(rows, key=key)[:top]


def _labelled_bars(ax, positions, values: Sequence[float], height: float, colour: str, label: str) -> None:
    """Horizontal bars with each value written at the bar's end (– for NaN: no images), so a
    share of 0 reads as 0, not as a missing bar."""
    ax.barh(positions, np.nan_to_num(values), height, color=colour, label=label)
    for y, value in zip(positions, values, strict=True):
        ax.text(min(value, 0.86) + 0.01 if np.isfinite(value) else 0.01, y, f"{value:.2f}" if np.isfinite(value)
                else "–", va="center", fontsize=5.5, color="black")


def save_designer_bars(
    path: PathLike,
    rows: Sequence[dict],
    twin_rows: Sequence[dict],
    chance: float,
    *,
    title: str,
    twin_title: str = "",
    top: int = 10,
) -> Path:
    """The swap test per designer for one model beside its reference (e.g. its masked twin):
    two panels of horizontal bars, No-FG accuracy (``acc_no_fg``: the designer's backdrop alone)
    and backdrop-follow (``backdrop_follow``: the designer's backdrop under another designer's
    person, predicted as the designer), for the ``top`` designers by the model's backdrop-follow
    then No-FG accuracy; the reference's bars beside the model's; a dotted line at ``chance``.
    ``rows``/``twin_rows``: per designer ``designer``, ``images``, ``backdrop_swaps`` and the two
    shares (NaN: none). Labels say ``n = images / swaps``. Size: 900 x (120 + 30 per designer) px."""
    shown = _designer_order(rows, top)
    twin = {r["designer"]: r for r in twin_rows}
    fig = new_figure((9.0, 1.2 + 0.3 * max(len(shown), 1)))
    axes = fig.subplots(1, 2, sharey=True)
    positions = np.arange(len(shown))[::-1]
    height = 0.38 if twin_rows else 0.7
    for ax, (key, label) in zip(axes, (("acc_no_fg", "No-FG accuracy (its backdrop alone)"),
                                      ("backdrop_follow", "backdrop-follow (its backdrop, another's person)")),
                                strict=True):
        values = [float(r.get(key, np.nan)) for r in shown]
        _labelled_bars(ax, positions + (height / 2 if twin_rows else 0), values, height, "#d73027", title)
        if twin_rows:
            reference = [float(twin.get(r["designer"], {}).get(key, np.nan)) for r in shown]
            _labelled_bars(ax, positions - height / 2, reference, height, "#4575b4", twin_title or "reference")
        ax.axvline(chance, color="grey", linestyle=":", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(positions, [f"{r['designer']} (n={r.get('images', 0)}/{r.get('backdrop_swaps', 0)})"
                                   for r in shown])
    axes[0].legend(fontsize=6, loc="lower right")
    fig.subplots_adjust(left=0.2, right=0.98, top=1 - 0.45 / fig.get_figheight(), bottom=0.35 / fig.get_figheight(),
                        wspace=0.08)
    return save(fig, path)
