"""Occlusion sensitivity (Zeiler & Fergus, ECCV 2014, arXiv:1311.2901), batched.

A square window slides over the image; the pixels under it are replaced by a baseline and
the drop of the target logit (unoccluded minus occluded) is recorded. A pixel's attribution
is the mean drop over all windows covering it, 0 where no window covers it.

Window placement follows Captum's ``Occlusion``: windows start at ``0, stride, 2*stride, ...``
along each axis, ``ceil((size - window) / stride) + 1`` positions, and the last one is cut
at the image border when it would overflow. With the same window, stride and baseline the
maps equal ``captum.attr.Occlusion(model).attribute(x, sliding_window_shapes=(3, w, w),
strides=(3, s, s), baselines=b, target=t)[:, 0]``.

Occluded copies of all images and all windows are built with tensor ops and evaluated in
chunks of ``batch_size`` under ``torch.inference_mode``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from fgvc.analysis.common import (
    AttributionResult,
    TargetsLike,
    default_blur_sigma,
    eval_mode,
    gaussian_blur,
    normalize_per_image,
    resolve_targets,
)

Fill = Literal["zero", "mean", "blur"]


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


class Occlusion:
    """Occlusion sensitivity with a sliding square window.

    Args:
        model: ``forward(x [B, 3, H, W] in [0, 1]) -> logits [B, C]``.
        window: window side in pixels (clipped to the image size).
        stride: step between window positions in pixels.
        fill: baseline written under the window: ``"zero"`` (black), ``"mean"`` (the
            image's own per-channel mean) or ``"blur"`` (a Gaussian-blurred copy of the
            image, sigma = :func:`~fgvc.analysis.common.default_blur_sigma`).
        batch_size: occluded copies per forward pass (copies of several images and windows
            share one pass).
    """

    def __init__(
        self,
        model: nn.Module,
        window: int = 32,
        stride: int = 16,
        fill: Fill = "zero",
        batch_size: int = 256,
    ) -> None:
        if window < 1 or stride < 1 or batch_size < 1:
            raise ValueError("window, stride and batch_size must be positive")
        if fill not in ("zero", "mean", "blur"):
            raise ValueError(f"fill must be 'zero', 'mean' or 'blur', got {fill!r}")
        self.model = model
        self.window = window
        self.stride = stride
        self.fill = fill
        self.batch_size = batch_size

    def baseline(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` values written under the window."""
        if self.fill == "zero":
            return torch.zeros_like(images)
        if self.fill == "mean":
            return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
        return gaussian_blur(images, default_blur_sigma(*images.shape[-2:]))

    def attribute(self, images: Tensor, targets: TargetsLike = None) -> AttributionResult:
        """Explain ``images`` ``[B, 3, H, W]`` for ``targets`` (``None``: predicted class).

        ``raw`` is the mean logit drop per pixel (logit units)."""
        batch, _, height, width = images.shape
        masks = window_masks(height, width, self.window, self.stride).to(images.device)
        positions = masks.shape[0]
        with eval_mode(self.model), torch.inference_mode():
            logits = self.model(images)
            resolved = resolve_targets(targets, logits)
            reference = logits.gather(1, resolved[:, None])[:, 0]
            baseline = self.baseline(images)
            drops = torch.empty(batch * positions, dtype=logits.dtype, device=images.device)
            # Copy n is image n // P occluded by window n % P.
            for start in range(0, batch * positions, self.batch_size):
                copy = torch.arange(
                    start, min(start + self.batch_size, batch * positions), device=images.device
                )
                image_idx, window_idx = copy // positions, copy % positions
                occluded = torch.where(
                    masks[window_idx, None], baseline[image_idx], images[image_idx]
                )
                scores = self.model(occluded).gather(1, resolved[image_idx, None])[:, 0]
                drops[copy] = reference[image_idx] - scores
            cover = masks.flatten(1).to(drops.dtype)
            summed = drops.reshape(batch, positions) @ cover
            counts = cover.sum(dim=0)
            raw = torch.where(counts > 0, summed / counts.clamp(min=1), torch.zeros_like(summed))
            raw = raw.reshape(batch, height, width)
        raw, logits = raw.clone(), logits.clone()
        return AttributionResult(
            raw=raw,
            maps=normalize_per_image(raw),
            targets=resolved.clone(),
            logits=logits,
            probs=logits.softmax(dim=1),
        )
