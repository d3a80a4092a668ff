"""Figures for analyses and training runs (matplotlib, Agg backend). Every function writes
a PNG of a fixed pixel size, closes its figure and returns the path."""

from fgvc.viz.grids import save_neighbor_grid, save_variant_grid
from fgvc.viz.overlay import overlay_heatmap, save_attribution_grid
from fgvc.viz.plots import save_bar_chart, save_confusion_matrix, save_designer_bars, save_histogram

__all__ = [
    "overlay_heatmap",
    "save_attribution_grid",
    "save_bar_chart",
    "save_confusion_matrix",
    "save_designer_bars",
    "save_histogram",
    "save_neighbor_grid",
    "save_variant_grid",
]
