"""Attribution overlays: a heatmap blended over the image, and input | overlay grids."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from matplotlib import cm, colors, colormaps

from fgvc.viz._figure import (
    PathLike,
    hide_ticks,
    new_figure,
    panel_figsize,
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
    titles: Optional[Sequence[str]] = None,
    cmap: str = "jet",
) -> Path:
    """One row per image: the input, then the overlay of its map (``[N, H, W]`` in [0, 1]),
    with a colour bar for the map scale. ``titles`` (one per row) label the overlays.
    Size: ``2 * 150 + 60`` x ``N * 150`` px."""
    count = len(images)
    if len(maps) != count or (titles is not None and len(titles) != count):
        raise ValueError("images, maps and titles must have the same length")
    fig = new_figure(panel_figsize(count, 2, extra_width=COLORBAR_INCHES))
    width = fig.get_figwidth()
    grid = fig.add_gridspec(
        count, 2, left=0.02, right=1 - (COLORBAR_INCHES + 0.05) / width,
        top=0.92, bottom=0.02, wspace=0.05, hspace=0.25,
    )
    for row in range(count):
        left, right = fig.add_subplot(grid[row, 0]), fig.add_subplot(grid[row, 1])
        left.imshow(to_hwc(images[row]))
        right.imshow(to_hwc(images[row]))
        right.imshow(np.clip(to_numpy(maps[row]), 0, 1), cmap=cmap, alpha=0.5, vmin=0, vmax=1)
        hide_ticks(left)
        hide_ticks(right)
        if titles is not None:
            right.set_title(str(titles[row]), fontsize=7)
        elif row == 0:
            left.set_title("input", fontsize=7)
            right.set_title("attribution", fontsize=7)
    bar_axis = fig.add_axes([1 - (COLORBAR_INCHES - 0.1) / width, 0.1, 0.15 / width, 0.8])
    scale = cm.ScalarMappable(colors.Normalize(0, 1), cmap=cmap)
    fig.colorbar(scale, cax=bar_axis)
    bar_axis.tick_params(labelsize=6)
    return save(fig, path)
