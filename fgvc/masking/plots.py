"""Pictures of a masking run: the person-ratio histogram and an example grid.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing here changes a
global backend or leaks figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fgvc.data.shards import load_shard, shards_of, splits_of


@dataclass
class MaskExamples:
    """Aligned example images from a source root and its masked copy."""

    original: torch.Tensor  # uint8 [K, 3, H, W]
    mask: torch.Tensor  # uint8 [K, H, W]
    masked: torch.Tensor  # uint8 [K, 3, H, W]
    bg_removed: torch.Tensor  # bool [K]
    where: list[str]  # "split/shard#row" per example


def pick_examples(src_root: str | Path, dst_root: str | Path, count: int = 8) -> MaskExamples:
    """Up to ``count`` examples: fallbacks first (up to half, when any exist), then images
    whose background was removed, scanning shards in order."""
    want_fallbacks = count // 2
    fallbacks, removed = [], []
    shards = [(split, path) for split in splits_of(dst_root) for path in shards_of(dst_root, split)]
    for split, path in shards:
        flags = load_shard(path)["bg_removed"].to(torch.bool)
        for row, flag in enumerate(flags.tolist()):
            (removed if flag else fallbacks).append((split, path.name, row))
        if len(fallbacks) >= want_fallbacks and len(removed) >= count:
            break
    picks = fallbacks[:want_fallbacks]
    picks += removed[: count - len(picks)]
    picks += fallbacks[want_fallbacks: want_fallbacks + count - len(picks)]
    originals, masks, masked, flags, where = [], [], [], [], []
    for split, name, row in picks:
        out = load_shard(Path(dst_root) / split / name)
        originals.append(load_shard(Path(src_root) / split / name)["images"][row])
        masks.append(out["masks"][row])
        masked.append(out["images"][row])
        flags.append(bool(out["bg_removed"][row]))
        where.append(f"{split}/{name}#{row}")
    if not picks:
        raise ValueError(f"{dst_root}: no images to show")
    return MaskExamples(torch.stack(originals), torch.stack(masks), torch.stack(masked),
                        torch.tensor(flags), where)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def plot_mask_examples(examples: MaskExamples, path: str | Path) -> Path:
    """A grid with rows original | mask | masked and one column per example; fallbacks (kept
    unmasked because the person was too small) are titled in red."""
    k = len(examples.bg_removed)
    h, w = examples.original.shape[2:]
    panel_h = 1.6  # inches
    panel_w = panel_h * w / h
    fig = Figure(figsize=(0.8 + k * panel_w, 0.8 + 3 * panel_h))
    axes = fig.subplots(3, k, squeeze=False)
    rows = (("original", examples.original), ("mask", examples.mask), ("masked", examples.masked))
    for r, (label, images) in enumerate(rows):
        for c in range(k):
            ax = axes[r][c]
            if images.dim() == 4:
                ax.imshow(images[c].permute(1, 2, 0).numpy())
            else:
                ax.imshow(images[c].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label)
    for c in range(k):
        fallback = not bool(examples.bg_removed[c])
        axes[0][c].set_title("fallback" if fallback else "removed", fontsize=8,
                             color="red" if fallback else "black")
    fig.suptitle("background removal examples")
    fig.tight_layout()
    return _save(fig, path)


def plot_person_ratio_hist(ratios: dict[str, list[float]], min_person_ratio: float,
                           path: str | Path, bins: int = 40) -> Path:
    """Histogram of the person ratio (share of pixels on the person) per split, with the
    fallback threshold marked."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for split, values in ratios.items():
        if values:
            ax.hist(values, bins=bins, range=(0.0, 1.0), alpha=0.6, label=f"{split} ({len(values)})")
    ax.axvline(min_person_ratio, color="red", linestyle="--",
               label=f"fallback below {min_person_ratio:g}")
    ax.set_xlabel("person ratio (fraction of image pixels)")
    ax.set_ylabel("images")
    ax.set_title("person coverage per image")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)
