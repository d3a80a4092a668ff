"""Background-swap tests after Xiao et al., "Noise or Signal: The Role of Image Backgrounds
in Object Recognition", ICLR 2021 (arXiv:2006.09994, the ImageNet-9 backgrounds challenge).

Variants of each image, built from its person mask:

- ``original``: unchanged.
- ``only_fg``: the person on black (background set to 0).
- ``no_fg``: the person removed and the hole filled by mirroring the image's own
  background, so no silhouette remains (see :func:`fill_person_hole`).
- ``mixed_same``: the person pasted, at the same place, on the ``no_fg`` background of
  another image of the same designer.
- ``mixed_rand``: the person pasted on the ``no_fg`` background of an image of a different
  designer.

A model that reads the garment scores ``mixed_same ~ mixed_rand``; one that leans on the
runway scores ``mixed_same > mixed_rand`` (``bg_gap > 0``) and ``no_fg`` above chance.
"""

from __future__ import annotations

from typing import Mapping, Union

import torch
from torch import Tensor, nn

from fgvc.analysis.common import eval_mode

VARIANT_NAMES = ("original", "only_fg", "no_fg", "mixed_same", "mixed_rand")


def fill_person_hole(images: Tensor, person_mask: Tensor) -> Tensor:
    """Remove the person and fill the hole from the same image's background.

    Row by row, each run of person pixels is filled by mirroring the background next to it:
    a pixel at distance ``d`` inside the run takes the background pixel at distance ``d``
    outside the nearer end of the run (reflection about the run's edge), so the backdrop's
    texture continues across the hole and no smooth silhouette is left. Where that mirror
    source is off the image or on the person, the other end's mirror is used; failing both,
    the pixel is linearly interpolated between the nearest background pixels left and right
    in its row (copying the one available side at the image border). Rows with no
    background take the image's per-channel background mean; an image with no background at
    all becomes 0.

    Args:
        images: float ``[B, C, H, W]``.
        person_mask: ``[B, H, W]`` 0/1, person = 1.

    Returns:
        float ``[B, C, H, W]``, equal to ``images`` outside the mask.
    """
    batch, channels, height, width = images.shape
    person = person_mask.bool()
    background = ~person
    cols = torch.arange(width, device=images.device).expand(batch, height, width)
    left = torch.where(background, cols, torch.full_like(cols, -1)).cummax(dim=2).values
    right_src = torch.where(background, cols, torch.full_like(cols, width)).flip(2)
    right = right_src.cummin(dim=2).values.flip(2)
    has_left, has_right = left >= 0, right < width

    def at(index: Tensor) -> Tensor:
        index = index.clamp(0, width - 1)[:, None].expand(batch, channels, height, width)
        return images.gather(3, index)

    def usable(source: Tensor) -> Tensor:
        inside = (source >= 0) & (source < width)
        return inside & background.gather(2, source.clamp(0, width - 1))

    span = (right - left).clamp(min=1).to(images.dtype)
    weight_right = ((cols - left).to(images.dtype) / span)[:, None]
    both = at(left) * (1 - weight_right) + at(right) * weight_right
    one_side = torch.where(has_left[:, None], at(left), at(right))
    fill = torch.where((has_left & has_right)[:, None], both, one_side)

    # Reflection about the run's edges: left end at ``left + 1``, right end at ``right - 1``.
    mirror_left, mirror_right = 2 * left + 1 - cols, 2 * right - 1 - cols
    ok_left = has_left & usable(mirror_left)
    ok_right = has_right & usable(mirror_right)
    nearer_left = (cols - left) <= (right - cols)
    use_left = ok_left & (nearer_left | ~ok_right)
    use_right = ok_right & ~use_left
    fill = torch.where(use_right[:, None], at(mirror_right), fill)
    fill = torch.where(use_left[:, None], at(mirror_left), fill)

    bg = background[:, None].to(images.dtype)
    bg_pixels = bg.sum(dim=(2, 3)).clamp(min=1)
    bg_mean = ((images * bg).sum(dim=(2, 3)) / bg_pixels)[:, :, None, None]
    fill = torch.where((has_left | has_right)[:, None], fill, bg_mean.expand_as(images))
    return torch.where(person[:, None], fill, images)


def pick_partners(labels: Tensor, seed: int) -> dict[str, Union[Tensor, int]]:
    """Seeded partner choice for the mixed variants.

    Returns ``same`` ``[B]`` (another image with the same label, uniformly; the image itself
    when its class has one image), ``rand`` ``[B]`` (an image with a different label,
    uniformly; any other image when the batch holds a single label) and the fallback counts
    ``same_fallbacks`` / ``rand_fallbacks``.
    """
    labels = torch.as_tensor(labels).long().cpu()
    generator = torch.Generator().manual_seed(seed)
    batch = labels.numel()
    same = torch.arange(batch)
    rand = torch.arange(batch)
    same_fallbacks = rand_fallbacks = 0
    for label in torch.unique(labels).tolist():
        members = (labels == label).nonzero()[:, 0]
        n = members.numel()
        if n > 1:
            offset = torch.randint(1, n, (n,), generator=generator)
            same[members] = members[(torch.arange(n) + offset) % n]
        else:
            same_fallbacks += 1
        others = (labels != label).nonzero()[:, 0]
        if others.numel() == 0:
            rand_fallbacks += n
            if batch > 1:
                offset = torch.randint(1, batch, (n,), generator=generator)
                rand[members] = (members + offset) % batch
            continue
        rand[members] = others[torch.randint(others.numel(), (n,), generator=generator)]
    return {
        "same": same,
        "rand": rand,
        "same_fallbacks": same_fallbacks,
        "rand_fallbacks": rand_fallbacks,
    }


def make_variants(
    images: Tensor, masks: Tensor, labels: Tensor, seed: int = 0
) -> dict[str, Union[Tensor, int]]:
    """Background-swap variants of ``images`` ``[B, 3, H, W]`` (uint8 or float).

    Args:
        masks: ``[B, H, W]`` 0/1 person masks.
        labels: ``[B]`` designer indices (used to choose partners).
        seed: partner choice seed; equal inputs and seed give identical output.

    Returns:
        dict with one ``[B, 3, H, W]`` tensor per name in :data:`VARIANT_NAMES`, in the
        input dtype (uint8 fills are rounded), plus ``partner_same`` / ``partner_rand``
        (``[B]`` indices of the image whose background was used) and ``same_fallbacks`` /
        ``rand_fallbacks`` (counts from :func:`pick_partners`).
    """
    if masks.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")
    dtype = images.dtype
    work = images.float()
    person = masks.bool()[:, None]
    no_fg = fill_person_hole(work, masks)
    partners = pick_partners(labels, seed)
    same, rand = partners["same"].to(images.device), partners["rand"].to(images.device)
    variants = {
        "original": work,
        "only_fg": torch.where(person, work, torch.zeros_like(work)),
        "no_fg": no_fg,
        "mixed_same": torch.where(person, work, no_fg[same]),
        "mixed_rand": torch.where(person, work, no_fg[rand]),
    }
    if dtype == torch.uint8:
        variants = {k: v.round().clamp(0, 255).to(torch.uint8) for k, v in variants.items()}
    else:
        variants = {k: v.to(dtype) for k, v in variants.items()}
    variants["original"] = images.clone()
    return {
        **variants,
        "partner_same": same,
        "partner_rand": rand,
        "same_fallbacks": partners["same_fallbacks"],
        "rand_fallbacks": partners["rand_fallbacks"],
    }


def evaluate_variants(
    model: nn.Module,
    variants: Mapping[str, Tensor],
    labels: Tensor,
    num_classes: int,
    batch_size: int = 64,
) -> dict[str, float]:
    """Top-1 accuracy of ``model`` on each variant present in ``variants``.

    Returns ``acc_<variant>`` for each name of :data:`VARIANT_NAMES` present, ``chance``
    (``1 / num_classes``), ``bg_gap`` (``acc_mixed_same - acc_mixed_rand``; how much a
    matching background helps) and ``no_fg_vs_chance`` (``acc_no_fg / chance``; accuracy
    from the background alone, in multiples of chance), the last two when their variants
    are present. uint8 images are scaled to [0, 1].
    """
    labels = torch.as_tensor(labels).long()
    chance = 1.0 / num_classes
    out: dict[str, float] = {}
    with eval_mode(model), torch.inference_mode():
        for name in VARIANT_NAMES:
            if name not in variants:
                continue
            images = variants[name]
            correct = 0
            for start in range(0, images.shape[0], batch_size):
                batch = images[start : start + batch_size]
                if batch.dtype == torch.uint8:
                    batch = batch.float() / 255.0
                predicted = model(batch).argmax(dim=1).cpu()
                correct += int((predicted == labels[start : start + batch_size]).sum())
            out[f"acc_{name}"] = correct / max(images.shape[0], 1)
    out["chance"] = chance
    if "acc_mixed_same" in out and "acc_mixed_rand" in out:
        out["bg_gap"] = out["acc_mixed_same"] - out["acc_mixed_rand"]
    if "acc_no_fg" in out:
        out["no_fg_vs_chance"] = out["acc_no_fg"] / chance
    return out
