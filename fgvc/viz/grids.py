"""Image grids: nearest-neighbour rows and background-swap variants."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from matplotlib.patches import Patch

from fgvc.viz._figure import PathLike, hide_ticks, new_figure, panel_figsize, save, to_hwc

SAME_COLOUR = "#1a9850"
DIFFERENT_COLOUR = "#d73027"
QUERY_COLOUR = "#2166ac"
VARIANT_ORDER = ("original", "only_fg", "no_fg", "mixed_same", "mixed_rand")
CAPTIONS = {"original": "Original", "only_fg": "Only-FG", "no_fg": "No-FG", "mixed_same": "Mixed-Same",
            "mixed_rand": "Mixed-Rand"}


def _name(label_names: Sequence[str] | Mapping[int, str], label: int) -> str:
    try:
        return str(label_names[label])
    except (IndexError, KeyError):
        return str(label)


def _frame(ax, colour: str, width: float = 3.0) -> None:
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)


def save_neighbor_grid(
    path: PathLike,
    query_images,
    ref_images,
    indices,
    query_labels,
    ref_labels,
    label_names: Sequence[str] | Mapping[int, str],
    scores=None,
) -> Path:
    """One row per query: ``[query | k neighbours]`` (``indices`` ``[Q, k]`` into
    ``ref_images``; ``-1`` leaves a blank panel), each titled with its designer name and,
    with ``scores`` ``[Q, k]``, its cosine similarity; neighbours framed green when they share
    the query's designer, red otherwise (a legend says so). Size: ``(k + 1) * 150`` x
    ``Q * 150 + 60`` px."""
    rows, k = len(indices), len(indices[0])
    width, height = panel_figsize(rows, k + 1)
    fig = new_figure((width, height + 0.6))
    axes = fig.subplots(rows, k + 1, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, top=1 - 0.55 / (height + 0.6), bottom=0.02, wspace=0.08, hspace=0.4)
    for row in range(rows):
        query_label = int(query_labels[row])
        ax = axes[row][0]
        ax.imshow(to_hwc(query_images[row]))
        ax.set_title(f"query\n{_name(label_names, query_label)}", fontsize=6)
        _frame(ax, QUERY_COLOUR)
        hide_ticks(ax)
        for col in range(k):
            ax = axes[row][col + 1]
            hide_ticks(ax)
            index = int(indices[row][col])
            if index < 0:
                ax.axis("off")
                continue
            label = int(ref_labels[index])
            ax.imshow(to_hwc(ref_images[index]))
            similarity = f"\ncos {float(scores[row][col]):.3f}" if scores is not None else ""
            ax.set_title(f"{_name(label_names, label)}{similarity}", fontsize=6)
            _frame(ax, SAME_COLOUR if label == query_label else DIFFERENT_COLOUR)
    handles = [Patch(facecolor="white", edgecolor=c, linewidth=2, label=t) for c, t in (
        (QUERY_COLOUR, "query"), (SAME_COLOUR, "same designer"), (DIFFERENT_COLOUR, "other designer"))]
    fig.legend(handles=handles, loc="upper center", ncol=3, fontsize=7, frameon=False)
    return save(fig, path)


def save_variant_grid(path: PathLike, variants: Mapping[str, torch.Tensor], n: int) -> Path:
    """The first ``n`` images of each background-swap variant, one row per image, one
    column per variant present (order: original, only_fg, no_fg, mixed_same, mixed_rand;
    other keys are ignored). Size: ``V * 150`` x ``n * 150`` px."""
    names = [name for name in VARIANT_ORDER if name in variants]
    if not names:
        raise ValueError(f"variants hold none of {VARIANT_ORDER}")
    n = min(n, len(variants[names[0]]))
    fig = new_figure(panel_figsize(n, len(names)))
    axes = fig.subplots(n, len(names), squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.9, bottom=0.02, wspace=0.05, hspace=0.1)
    for col, name in enumerate(names):
        axes[0][col].set_title(CAPTIONS.get(name, name), fontsize=8)
        for row in range(n):
            axes[row][col].imshow(to_hwc(variants[name][row]))
            hide_ticks(axes[row][col])
    return save(fig, path)
