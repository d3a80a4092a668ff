"""Figure plumbing shared by the plotting functions: Agg backend, sizes, saving, image
conversion. Every figure has an exact pixel size (``inches * DPI``; no tight bbox)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
# Every label is text, never markup: a designer named "Cost $5%$" must not be parsed as maths.
matplotlib.rcParams["text.parse_math"] = False
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)
import numpy as np  # noqa: E402
import torch  # noqa: E402

DPI = 100
PANEL_INCHES = 1.5  # side of one image panel: 150 px at DPI 100
PathLike = str | Path


def panel_figsize(rows: int, cols: int, extra_width: float = 0.0) -> tuple[float, float]:
    """Figure size in inches for a ``rows x cols`` grid of image panels."""
    return cols * PANEL_INCHES + extra_width, rows * PANEL_INCHES


def new_figure(figsize: tuple[float, float]) -> plt.Figure:
    return plt.figure(figsize=figsize, dpi=DPI)


def save(fig: plt.Figure, path: PathLike, tight: bool = False) -> Path:
    """Write ``fig`` as PNG at :data:`DPI` (after ``tight_layout`` when asked, so no label is
    clipped), close it, return the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if tight:
            fig.tight_layout()
        fig.savefig(path, dpi=DPI, format="png")
    finally:
        plt.close(fig)
    return path


def to_hwc(image) -> np.ndarray:
    """``[3, H, W]`` tensor/array (float in [0, 1] or uint8) -> float ``H x W x 3`` in [0, 1]."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        array = image.float().numpy() / (255.0 if image.dtype == torch.uint8 else 1.0)
    else:
        array = np.asarray(image)
        array = array.astype(np.float32) / (255.0 if array.dtype == np.uint8 else 1.0)
    if array.ndim != 3 or array.shape[0] not in (1, 3):
        raise ValueError(f"expected an image [3, H, W], got shape {array.shape}")
    if array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    return np.clip(array.transpose(1, 2, 0), 0.0, 1.0)


def to_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().float().numpy()
    return np.asarray(values, dtype=np.float32)


def hide_ticks(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
