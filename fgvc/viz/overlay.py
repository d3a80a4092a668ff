"""Attribution overlays: a heatmap blended over the image, and input | overlay grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import cm, colormaps, colors

from fgvc.viz._figure import (
    PANEL_INCHES,
    PathLike,
    hide_ticks,
    new_figure,
    save,
    to_hwc,
    to_numpy,
)

COLORBAR_INCHES = 0.6


def overlay_heatmap(image, heatmap, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend ``heatmap`` ``[H, W]`` (values in [0, 1], clipped) coloured with ``cmap`` over
    ``image`` ``[3, H, W]`` (float in [0, 1] or uint8): ``(1 - alpha) * image + alpha *
    colour``. Returns uint8 ``H x W x 3``."""
    rgb = to_hwc(image)
    values = np.clip(to_numpy(heatmap), 0.0, 1.0)
    if values.shape != rgb.shape[:2]:
        raise ValueError(f"heatmap {values.shape} does not match image {rgb.shape[:2]}")
    colour = colormaps[cmap](values)[..., :3]
    blended = (1.0 - alpha) * rgb + alpha * colour
    return np.round(blended * 255.0).astype(np.uint8)


def save_attribution_grid(
    path: PathLike,
    images,
    maps,
    titles: Sequence[str] | None = None,
    cmap: str = "jet",
    colorbar_label: str = "attribution (scaled to [0, 1] per image)",
    wrong: Sequence[bool] | None = None,
) -> Path:
    """One row per image: the input, then the overlay of its map (``[N, H, W]`` in [0, 1]),
    with a labelled colour bar for the map scale. ``titles`` (one per row, may span two lines)
    label the rows; rows flagged in ``wrong`` (a wrong prediction) are titled in red and
    framed. Size: ``2 * 150 + 90`` x ``N * 150 + 40 per title line`` px; nothing is clipped."""
    count = len(images)
    if len(maps) != count or (titles is not None and len(titles) != count):
        raise ValueError("images, maps and titles must have the same length")
    lines = max((str(t).count("\n") + 1 for t in titles), default=1) if titles is not None else 1
    title_inches = 0.16 * lines + 0.1
    width = 2 * PANEL_INCHES + COLORBAR_INCHES + 0.3
    fig = new_figure((width, count * (PANEL_INCHES + title_inches) + 0.2))
    grid = fig.add_gridspec(count, 2, left=0.02, right=1 - (COLORBAR_INCHES + 0.3) / width, top=1 - 0.1 /
                            fig.get_figheight(), bottom=0.02, wspace=0.05,
                            hspace=title_inches / PANEL_INCHES + 0.05)
    for row in range(count):
        left, right = fig.add_subplot(grid[row, 0]), fig.add_subplot(grid[row, 1])
        left.imshow(to_hwc(images[row]))
        right.imshow(to_hwc(images[row]))
        right.imshow(np.clip(to_numpy(maps[row]), 0, 1), cmap=cmap, alpha=0.5, vmin=0, vmax=1)
        hide_ticks(left)
        hide_ticks(right)
        is_wrong = bool(wrong[row]) if wrong is not None else False
        if titles is not None:
            left.set_title(str(titles[row]), fontsize=6.5, loc="left", color="#c00000" if is_wrong else "black")
        if is_wrong:
            for spine in left.spines.values():
                spine.set_edgecolor("#c00000")
                spine.set_linewidth(2.5)
    bar_axis = fig.add_axes((1 - (COLORBAR_INCHES + 0.1) / width, 0.1, 0.12 / width, 0.8))
    scale = cm.ScalarMappable(colors.Normalize(0, 1), cmap=cmap)
    bar = fig.colorbar(scale, cax=bar_axis)
    bar.set_label(colorbar_label, fontsize=6)
    bar_axis.tick_params(labelsize=6)
    return save(fig, path)
