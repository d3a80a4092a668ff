"""Pieces shared by the attribution methods: the result record, target handling, map
normalisation, evaluation-mode handling and the Gaussian blur used as a "removed" baseline."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TargetsLike = None | int | Sequence[int] | Tensor


@dataclass
class AttributionResult:
    """Output of every attribution method (``Method(model).attribute(images, targets)``).

    Attributes:
        raw: ``[B, H, W]`` unnormalised attribution at input resolution (units depend on the
            method: Grad-CAM activation units, occlusion logit drop).
        maps: ``[B, H, W]`` ``raw`` min-max scaled to ``[0, 1]`` per image, for display and for
            the metrics in :mod:`fgvc.analysis.metrics`. A constant map scales to all zeros.
        targets: ``[B]`` int64 class explained for each image.
        logits: ``[B, C]`` logits of the unmodified images.
        probs: ``[B, C]`` softmax of ``logits``.
    """

    raw: Tensor
    maps: Tensor
    targets: Tensor
    logits: Tensor
    probs: Tensor


def resolve_targets(targets: TargetsLike, logits: Tensor) -> Tensor:
    """Targets as int64 ``[B]``: the predicted class when ``None``, an int broadcast to the
    batch, or a sequence/tensor whose length must equal the batch size."""
    batch = logits.shape[0]
    if targets is None:
        return logits.argmax(dim=1)
    if isinstance(targets, int):
        resolved = torch.full((batch,), targets, dtype=torch.long, device=logits.device)
    else:
        check_target_count(targets, batch)
        resolved = torch.as_tensor(targets, dtype=torch.long, device=logits.device).reshape(-1)
    num_classes = logits.shape[1]
    if resolved.numel() and (resolved.min() < 0 or resolved.max() >= num_classes):
        raise ValueError(f"targets must lie in [0, {num_classes}), got {resolved.tolist()}")
    return resolved


def check_target_count(targets: TargetsLike, batch: int) -> None:
    """Raise ValueError unless ``targets`` is None, an int, or holds ``batch`` entries."""
    if targets is None or isinstance(targets, int):
        return
    count = len(targets) if not isinstance(targets, Tensor) else targets.numel()
    if count != batch:
        raise ValueError(
            f"got {count} targets for a batch of {batch} images; "
            "give one target per image or None for the predicted class"
        )


def normalize_per_image(raw: Tensor, eps: float = 1e-7) -> Tensor:
    """Min-max scale each ``[H, W]`` map of ``[B, H, W]`` to ``[0, 1]``; same scaling as
    pytorch-grad-cam's ``scale_cam_image`` (``(x - min) / (max - min + eps)``)."""
    flat = raw.reshape(raw.shape[0], -1)
    low = flat.min(dim=1, keepdim=True).values
    shifted = flat - low
    high = shifted.max(dim=1, keepdim=True).values
    return (shifted / (high + eps)).reshape(raw.shape)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore each submodule's own train flag on exit,
    also when the body raises."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, was_training in flags:
            module.training = was_training


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` float images, replicate padding, kernel
    radius ``ceil(3 sigma)`` (clipped to the image size so any size works)."""
    if sigma <= 0:
        return images.clone()
    _, channels, height, width = images.shape
    radius = int(math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = images
    for dim, size in ((2, height), (3, width)):
        pad = [0, 0, 0, 0]
        r = min(radius, size - 1)
        k = kernel[radius - r : radius + r + 1]
        k = k / k.sum()
        if dim == 2:
            pad[2:] = [r, r]
            weight = k.reshape(1, 1, -1, 1)
        else:
            pad[:2] = [r, r]
            weight = k.reshape(1, 1, 1, -1)
        out = F.pad(out, pad, mode="replicate") if r > 0 else out
        out = F.conv2d(out, weight.expand(channels, 1, *weight.shape[2:]), groups=channels)
    return out


def default_blur_sigma(height: int, width: int) -> float:
    """Blur strength used for "blur" baselines: 1/20 of the shorter side, at least 1 px
    (224 px -> sigma 11.2, close to the RISE reference's heavy blur)."""
    return max(1.0, min(height, width) / 20.0)
