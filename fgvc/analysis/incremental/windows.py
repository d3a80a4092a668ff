"""Occlusion windows: where the windows of an occlusion map lie on an image."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets (px) of the windows along one axis of length ``size``."""
    window = min(window, size)
    count = math.ceil((size - window) / stride) + 1
    return [i * stride for i in range(count)]


def window_masks(height: int, width: int, window: int, stride: int) -> Tensor:
    """``[P, H, W]`` bool, one mask per window position (row-major over positions)."""
    rows = window_starts(height, window, stride)
    cols = window_starts(width, window, stride)
    win_h, win_w = min(window, height), min(window, width)
    masks = torch.zeros(len(rows) * len(cols), height, width, dtype=torch.bool)
    for i, (top, left) in enumerate((r, c) for r in rows for c in cols):
        masks[i, top : top + win_h, left : left + win_w] = True
    return masks
