"""Pictures of a masking run: an example grid and the person-ratio histogram."""

from __future__ import annotations

from pathlib import Path

from fgvc.viz._figure import hide_ticks, new_figure, save, to_hwc


def plot_mask_examples(examples, path: str | Path) -> Path:
    """A grid with rows original | mask | masked and one column per example; fallbacks (kept
    unmasked because the person was too small) are titled in red."""
    k = len(examples.bg_removed)
    h, w = examples.original.shape[2:]
    panel_h = 1.6  # inches
    panel_w = panel_h * w / h
    fig = new_figure((0.8 + k * panel_w, 0.8 + 3 * panel_h))
    axes = fig.subplots(3, k, squeeze=False)
    rows = (("original", examples.original), ("mask", examples.mask), ("masked", examples.masked))
    for r, (label, images) in enumerate(rows):
        for c in range(k):
            ax = axes[r][c]
            if images.dim() == 4:
                ax.imshow(to_hwc(images[c]))
            else:
                ax.imshow(images[c].numpy(), cmap="gray", vmin=0, vmax=1)
            hide_ticks(ax)
        axes[r][0].set_ylabel(label)
    for c in range(k):
        fallback = not bool(examples.bg_removed[c])
        axes[0][c].set_title("fallback" if fallback else "removed", fontsize=8,
                             color="red" if fallback else "black")
    fig.suptitle("background removal examples")
    return save(fig, path, tight=True)


def plot_person_ratio_hist(ratios: dict[str, list[float]], min_person_ratio: float,
                           path: str | Path, bins: int = 40) -> Path:
    """Histogram of the person ratio (share of pixels on the person) per split, with the
    fallback threshold marked."""
    fig = new_figure((6, 4))
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
    return save(fig, path, tight=True)
