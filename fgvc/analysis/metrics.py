"""Scores for attribution maps: where their mass lies relative to the person, and whether
they rank pixels the way the model actually uses them.

- :func:`bg_energy_fraction` is ``1 -`` the energy-based pointing game of Score-CAM
  (Wang et al., CVPR-W 2020, arXiv:1910.01279) with the person mask as the "object box".
- :func:`deletion_insertion_auc` implements the deletion / insertion curves of RISE
  (Petsiuk et al., BMVC 2018, arXiv:1806.07421).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from fgvc.analysis.common import (
    TargetsLike,
    default_blur_sigma,
    eval_mode,
    gaussian_blur,
    resolve_targets,
)


def _background_area_share(person_mask: Tensor) -> Tensor:
    return 1.0 - person_mask.float().flatten(1).mean(dim=1)


def bg_energy_fraction(maps: Tensor, person_mask: Tensor) -> Tensor:
    """Share of each map's positive mass outside the person, ``[B]`` in ``[0, 1]``.

    Args:
        maps: ``[B, H, W]`` attribution (negative values are clipped to 0).
        person_mask: ``[B, H, W]`` 0/1, person = 1.

    Edge cases (never NaN): an empty person mask gives 1.0 for any map with mass; a map
    without positive mass carries no preference and gets the background's area share
    (the value a uniform map would get).
    """
    energy = maps.float().clamp(min=0).flatten(1)
    background = 1.0 - person_mask.float().flatten(1)
    total = energy.sum(dim=1)
    outside = (energy * background).sum(dim=1)
    uniform = _background_area_share(person_mask)
    return torch.where(total > 0, outside / total.clamp(min=1e-12), uniform)


def bg_preference(maps: Tensor, person_mask: Tensor) -> Tensor:
    """:func:`bg_energy_fraction` divided by the background's share of the image area,
    ``[B]``: 1.0 means no preference, > 1 attribution concentrated on the background.
    Where there is no background (mask covers the image) the value is defined as 1.0."""
    area = _background_area_share(person_mask)
    fraction = bg_energy_fraction(maps, person_mask)
    return torch.where(area > 0, fraction / area.clamp(min=1e-12), torch.ones_like(area))


def _pixel_ranks(maps: Tensor) -> Tensor:
    """``[B, H*W]`` rank of each pixel by decreasing attribution (0 = most important);
    ties keep raster order."""
    flat = maps.flatten(1)
    order = flat.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=maps.device).expand_as(order))
    return ranks


def _target_prob(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    return model(images).softmax(dim=1).gather(1, targets[:, None])[:, 0].float()


def _inner_curve(
    model: nn.Module,
    start: Tensor,
    end: Tensor,
    ranks: Tensor,
    targets: Tensor,
    steps: int,
    batch_size: int,
) -> Tensor:
    """Target probability ``[B, steps - 1]`` at steps ``1 .. steps - 1`` of the path where,
    at step ``i``, the ``round(i / steps * H * W)`` top-ranked pixels come from ``end`` and
    the rest from ``start`` (the end points are ``start`` and ``end`` themselves)."""
    batch, _, height, width = start.shape
    inner = steps - 1
    counts = torch.round(
        torch.arange(steps + 1, dtype=torch.float64) / steps * height * width
    ).long().to(start.device)
    probs = torch.empty(batch * inner, device=start.device)
    for first in range(0, batch * inner, batch_size):
        item = torch.arange(first, min(first + batch_size, batch * inner), device=start.device)
        image_idx, step_idx = item // inner, item % inner + 1
        swapped = (ranks[image_idx] < counts[step_idx, None]).reshape(-1, 1, height, width)
        mixed = torch.where(swapped, end[image_idx], start[image_idx])
        probs[item] = _target_prob(model, mixed, targets[image_idx])
    return probs.reshape(batch, inner)


def deletion_insertion_auc(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: TargetsLike = None,
    steps: int = 16,
    baseline: Literal["zero", "blur"] = "zero",
    batch_size: int = 128,
) -> tuple[Tensor, Tensor]:
    """Deletion and insertion AUCs (Petsiuk et al. 2018), each ``[B]`` in ``[0, 1]``.

    Pixels are ordered by ``maps`` ``[B, H, W]`` (descending). Deletion replaces the top
    ``i/steps`` of them with the baseline (black, or a Gaussian-blurred copy of the image);
    insertion starts from the baseline canvas and reveals them. The curve is the softmax
    probability of the target class (``None``: the class predicted on ``images``) at
    fractions ``0, 1/steps, ..., 1``, integrated with the trapezoid rule. A faithful map
    gives low deletion and high insertion AUC. The ``2 * B * (steps - 1)`` intermediate
    images are evaluated in batches of ``batch_size``; the end points (the image and the
    canvas) once each.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if baseline not in ("zero", "blur"):
        raise ValueError(f"baseline must be 'zero' or 'blur', got {baseline!r}")
    if maps.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"maps {tuple(maps.shape)} do not match images {tuple(images.shape)}")
    with eval_mode(model), torch.inference_mode():
        logits = model(images)
        resolved = resolve_targets(targets, logits)
        if baseline == "zero":
            canvas = torch.zeros_like(images)
        else:
            canvas = gaussian_blur(images, default_blur_sigma(*images.shape[-2:]))
        ranks = _pixel_ranks(maps.to(images.device))
        p_image = logits.softmax(dim=1).gather(1, resolved[:, None]).float()
        p_canvas = _target_prob(model, canvas, resolved)[:, None]
        deletion = _inner_curve(model, images, canvas, ranks, resolved, steps, batch_size)
        insertion = _inner_curve(model, canvas, images, ranks, resolved, steps, batch_size)
        deletion = torch.cat([p_image, deletion, p_canvas], dim=1)
        insertion = torch.cat([p_canvas, insertion, p_image], dim=1)
    # cloned outside inference mode so callers get ordinary tensors
    dx = 1.0 / steps
    return (
        torch.trapezoid(deletion.clone(), dx=dx, dim=1),
        torch.trapezoid(insertion.clone(), dx=dx, dim=1),
    )
