"""Which images a masking run shows as examples (pictures: fgvc.viz.masking)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fgvc.data.shards import load_shard, shards_of, splits_of
from fgvc.masking.plan import MaskError


@dataclass
class MaskExamples:
    """Aligned example images from a source root and its masked copy."""

    original: torch.Tensor  # uint8 [K, 3, H, W]
    mask: torch.Tensor  # uint8 [K, H, W]
    masked: torch.Tensor  # uint8 [K, 3, H, W]
    bg_removed: torch.Tensor  # bool [K]
    where: list[str]  # "split/shard#row" per example


def pick_examples(src_root: str | Path, dst_root: str | Path, count: int = 8) -> MaskExamples:
    """Up to ``count`` examples: fallbacks first (up to half, when any exist), then images
    whose background was removed, scanning shards in order."""
    want_fallbacks = count // 2
    fallbacks: list[tuple[str, str, int]] = []
    removed: list[tuple[str, str, int]] = []
    shards = [(split, path) for split in splits_of(dst_root) for path in shards_of(dst_root, split)]
    for split, path in shards:
        flags = load_shard(path)["bg_removed"].to(torch.bool)
        for row, flag in enumerate(flags.tolist()):
            (removed if flag else fallbacks).append((split, path.name, row))
        if len(fallbacks) >= want_fallbacks and len(removed) >= count:
            break
    picks = fallbacks[:want_fallbacks]
    picks += removed[: count - len(picks)]
    picks += fallbacks[want_fallbacks: want_fallbacks + count - len(picks)]
    originals, masks, masked, flags, where = [], [], [], [], []
    for split, name, row in picks:
        out = load_shard(Path(dst_root) / split / name)
        originals.append(load_shard(Path(src_root) / split / name)["images"][row])
        masks.append(out["masks"][row])
        masked.append(out["images"][row])
        flags.append(bool(out["bg_removed"][row]))
        where.append(f"{split}/{name}#{row}")
    if not picks:
        raise MaskError(f"{dst_root}: no images to show")
    return MaskExamples(torch.stack(originals), torch.stack(masks), torch.stack(masked),
                        torch.tensor(flags), where)
