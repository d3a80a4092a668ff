"""Background removal from a person mask, with the original project's fallback rule."""

from __future__ import annotations

import torch
from torch import Tensor

from fgvc.masking.config import DEFAULT_MIN_PERSON_RATIO


def person_ratio(person_mask: Tensor) -> Tensor:
    """Fraction of each image covered by the person: uint8 [B, H, W] -> float64 [B]."""
    h, w = person_mask.shape[-2:]
    return person_mask.sum(dim=(-2, -1), dtype=torch.int64).to(torch.float64) / float(h * w)


def remove_background(images: Tensor, person_mask: Tensor, min_person_ratio: float = DEFAULT_MIN_PERSON_RATIO,
                      out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Set pixels outside the person to 0, unless the person is too small to trust.

    images       uint8 [B, 3, H, W]
    person_mask  uint8 [B, H, W], 0/1
    Returns (masked uint8 [B, 3, H, W], bg_removed bool [B], person ratio float64 [B]).
    An image whose person covers less than ``min_person_ratio`` of it is kept unchanged (a
    fallback, ``bg_removed`` False), as in the original project. ``out`` may be a slice of a
    preallocated shard tensor, so the result is written in place without another copy.
    """
    if images.shape[0] != person_mask.shape[0] or images.shape[2:] != person_mask.shape[1:]:
        raise ValueError(f"person_mask {list(person_mask.shape)} does not fit images {list(images.shape)}")
    ratios = person_ratio(person_mask)
    bg_removed = ratios >= min_person_ratio
    # 1 where a pixel survives: inside the person, or anywhere in a fallback image.
    keep = person_mask.to(torch.uint8) | (~bg_removed).to(torch.uint8).view(-1, 1, 1)
    masked = torch.mul(images, keep.unsqueeze(1), out=out)
    return masked, bg_removed, ratios
