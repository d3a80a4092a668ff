"""Occlusion sensitivity (Zeiler & Fergus, ECCV 2014, arXiv:1311.2901), batched.

A square window slides over the image; the pixels under it are replaced by a baseline and
the drop of the target logit (unoccluded minus occluded) is recorded. A pixel's attribution
is the mean drop over all windows covering it, 0 where no window covers it.

Window placement follows Captum's ``Occlusion``: windows start at ``0, stride, 2*stride, ...``
along each axis, ``ceil((size - window) / stride) + 1`` positions, and the last one is cut
at the image border when it would overflow. With the same window, stride and baseline the
maps equal ``captum.attr.Occlusion(model).attribute(x, sliding_window_shapes=(3, w, w),
strides=(3, s, s), baselines=b, target=t)[:, 0]``.

Occluded copies of all images and all windows, and the unoccluded images themselves, are
built with tensor ops and evaluated in equal chunks of at most ``batch_size`` under
``torch.inference_mode``; each image needs ``P + 1`` model evaluations for ``P`` windows.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from fgvc.analysis.common import (
    AttributionResult,
    TargetsLike,
    check_target_count,
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
        check_target_count(targets, batch)  # before the expensive passes
        masks = window_masks(height, width, self.window, self.stride).to(images.device)
        positions = masks.shape[0]
        # Copy n is image n // (P + 1) under window n % (P + 1); window P is the unoccluded
        # image, so the reference pass shares batches with the occluded copies.
        masks = torch.cat([masks, masks.new_zeros(1, height, width)])
        total = batch * (positions + 1)
        chunks = -(-total // self.batch_size)
        chunk = -(-total // chunks)  # equal chunks: no small, slow tail batch
        with eval_mode(self.model), torch.inference_mode():
            baseline = self.baseline(images)
            outputs = []
            for start in range(0, total, chunk):
                copy = torch.arange(start, min(start + chunk, total), device=images.device)
                image_idx, window_idx = copy // (positions + 1), copy % (positions + 1)
                occluded = torch.where(
                    masks[window_idx, None], baseline[image_idx], images[image_idx]
                )
                outputs.append(self.model(occluded))
            all_logits = torch.cat(outputs).reshape(batch, positions + 1, -1)
            logits = all_logits[:, positions]
            resolved = resolve_targets(targets, logits)
            scores = all_logits.gather(2, resolved[:, None, None].expand(-1, positions + 1, 1))
            drops = scores[:, positions] - scores[:, :positions, 0]
            cover = masks[:positions].flatten(1).to(drops.dtype)
            summed = drops @ cover
            counts = cover.sum(dim=0)
            raw = torch.where(counts > 0, summed / counts.clamp(min=1), torch.zeros_like(summed))
            raw = raw.reshape(batch, height, width)
        # cloned outside inference mode so callers get ordinary tensors
        raw, logits = raw.clone(), logits.clone()
        return AttributionResult(
            raw=raw,
            maps=normalize_per_image(raw),
            targets=resolved.clone(),
            logits=logits,
            probs=logits.softmax(dim=1),
        )
