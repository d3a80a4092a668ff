"""The heavy augmentation recipe's batch path for a GPU (`HeavyAugment.batch`): every
parameter drawn for the whole batch at once, every step one batched op (a few hundred kernel
launches per batch and none per sample).
"""

from __future__ import annotations

import math

import torch

# ITU-R 601 luma weights, as torchvision's grayscale conversion uses them.
LUMA = (0.2989, 0.587, 0.114)


def batch_boxes(g: torch.Generator, n: int, height: int, width: int, scale, ratio, attempts: int = 10):
    """`augment._box` for n samples at once: (top, left, h, w) int64 [n] each and `found` bool [n]
    (the first of `attempts` draws that fits; where none fits, found is False)."""
    area = height * width
    shares = torch.empty(n, attempts).uniform_(scale[0], scale[1], generator=g)
    aspects = torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g).exp_()
    w = torch.round(torch.sqrt(area * shares * aspects))
    h = torch.round(torch.sqrt(area * shares / aspects))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.int8).argmax(1, keepdim=True)  # the first attempt that fits
    w, h = w.gather(1, first)[:, 0].long(), h.gather(1, first)[:, 0].long()
    corner = torch.rand(n, 2, generator=g)
    top = (corner[:, 0] * (height - h + 1)).long().clamp_(min=0)
    left = (corner[:, 1] * (width - w + 1)).long().clamp_(min=0)
    return top, left, h, w, fits.any(1)


def hue_batch(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Hue rotation through HSV (torchvision's adjust_hue formulas) with the selections made by
    comparisons and `where`: few kernels, and no tensor made on the host (a host-to-device copy
    would wait for the GPU)."""
    red, green, _ = images.unbind(dim=-3)
    low, high = torch.aminmax(images, dim=-3)
    grey = high == low
    spread = high - low
    saturation = spread / torch.where(grey, 1.0, high)
    distance = (high.unsqueeze(-3) - images) / torch.where(grey, 1.0, spread).unsqueeze(-3)
    dr, dg, db = distance.unbind(dim=-3)
    hue = torch.where(high == red, db - dg, torch.where(high == green, 2.0 + dr - db, 4.0 + dg - dr))
    hue = torch.remainder(hue / 6.0 + 1.0 + shifts[:, 0], 1.0)
    sextant_pos = hue * 6
    sextant = torch.floor(sextant_pos)
    fraction = sextant_pos - sextant
    sextant = torch.remainder(sextant, 6)
    v = high
    p = (v * (1.0 - saturation)).clamp_(0, 1)
    q = (v * (1.0 - saturation * fraction)).clamp_(0, 1)
    t = (v * (1.0 - saturation * (1.0 - fraction))).clamp_(0, 1)
    at = [sextant == k for k in range(6)]
    # (r, g, b) per sextant 0..5: (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q)
    red = torch.where(at[0] | at[5], v, torch.where(at[1], q, torch.where(at[4], t, p)))
    green = torch.where(at[1] | at[2], v, torch.where(at[0], t, torch.where(at[3], q, p)))
    blue = torch.where(at[3] | at[4], v, torch.where(at[2], t, torch.where(at[5], q, p)))
    return torch.stack((red, green, blue), dim=-3)


def luma_batch(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(dim=-3)
    return (r * LUMA[0] + g * LUMA[1] + b * LUMA[2]).unsqueeze(-3)


def blend_batch(images: torch.Tensor, others: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    return (images * ratios + others * (1.0 - ratios)).clamp_(0, 1)


DEVICE_JITTERS = (
    lambda x, f: (x * f).clamp_(0, 1),
    lambda x, f: blend_batch(x, luma_batch(x).mean(dim=(-3, -2, -1), keepdim=True), f),
    lambda x, f: blend_batch(x, luma_batch(x), f),
    hue_batch,
)
