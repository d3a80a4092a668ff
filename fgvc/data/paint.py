"""The demo's paint: colours from hue/saturation/value and the garment patterns (where a
garment's secondary colour shows), as tensors."""

from __future__ import annotations

import colorsys

import torch

PATTERNS = ("solid", "hstripes", "vstripes", "checks", "dots", "diagonal")


def hsv(h: float, s: float, v: float) -> torch.Tensor:
    return torch.tensor(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=torch.float32)


def shift_hue(rgb: torch.Tensor, shift: float) -> torch.Tensor:
    h, s_, v = colorsys.rgb_to_hsv(*rgb.tolist())
    return hsv(h + shift, s_, v)


def _stripes(coord: torch.Tensor, period: torch.Tensor) -> torch.Tensor:
    return (coord.div(period, rounding_mode="floor") % 2) == 0


def garment_pattern(kind: str, ys: torch.Tensor, xs: torch.Tensor, period: torch.Tensor) -> torch.Tensor:
    """Boolean, broadcast of ys [B, H, 1] and xs [B, 1, W] (integer pixel coordinates relative
    to the garment): where the secondary colour shows."""
    if kind == "solid":
        return torch.zeros(torch.broadcast_shapes(ys.shape, xs.shape), dtype=torch.bool)
    if kind == "hstripes":
        return _stripes(ys, period).expand(-1, -1, xs.shape[2])
    if kind == "vstripes":
        return _stripes(xs, period).expand(-1, ys.shape[1], -1)
    if kind == "checks":
        return _stripes(ys, period) == _stripes(xs, period)
    if kind == "dots":
        return ((ys % (2 * period)) < period / 1.5) & ((xs % (2 * period)) < period / 1.5)
    return _stripes(ys + xs, period)  # diagonal
