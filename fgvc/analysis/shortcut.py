"""Background-swap tests after Xiao et al., "Noise or Signal: The Role of Image Backgrounds
in Object Recognition", ICLR 2021 (arXiv:2006.09994, the ImageNet-9 backgrounds challenge).

Variants of each image, built from its person mask:

- ``original``: unchanged.
- ``only_fg``: the person on black (background set to 0).
- ``no_fg``: the person's whole bounding box refilled from the image's own background
  beside it, so no silhouette remains, only a rectangle (see :func:`fill_person_hole`;
  :mod:`fgvc.analysis.silhouette` measures what is left).
- ``mixed_same``: the person pasted, at the same place, on the ``no_fg`` background of
  another image of the same designer.
- ``mixed_rand``: the person pasted on the ``no_fg`` background of an image of a different
  designer.

A model that reads the garment scores ``mixed_same ~ mixed_rand``; one that leans on the
runway scores ``mixed_same > mixed_rand`` (``bg_gap > 0``) and ``no_fg`` above chance.

The most direct reading of Mixed-Rand is the **backdrop-follow rate**: how often the model
names the designer whose backdrop the person was pasted on (:func:`backdrop_follow_scores`).
A model that ignores the image names one given designer 1 time in ``C`` (chance); a garment
reader names the person's designer, so it follows the backdrop less often than chance.
:func:`per_designer` and :func:`no_fg_confusion` break the test down by designer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fgvc.analysis.common import eval_mode
from fgvc.analysis.stats import bootstrap_mean, bootstrap_paired_difference, bootstrap_ratio
from fgvc.devices import model_device

VARIANT_NAMES = ("original", "only_fg", "no_fg", "mixed_same", "mixed_rand")


# A side strip narrower than this (px) is used only when no side is wider: reflecting a
# strip of a few columns back and forth across a wide box repeats its content every few px.
MIN_STRIP = 4
# Box-mean window (px) that splits the backdrop into a low-pass part and its texture.
LOW_PASS = 5
# Columns (px) at the box's far side over which the other side's strip fades in; equal to
# the default margin, so the fade lies beside the person rather than on it.
BLEND = 2


def person_box(person_mask: Tensor, margin: int = 2) -> Tensor:
    """bool ``[B, H, W]``: each image's person bounding box grown by ``margin`` px on every
    side and clipped to the frame; all False for an empty mask."""
    person = person_mask.bool()
    y0, y1 = _span(person.any(dim=2), margin)
    x0, x1 = _span(person.any(dim=1), margin)
    rows = torch.arange(person.shape[1], device=person.device)[None, :, None]
    cols = torch.arange(person.shape[2], device=person.device)[None, None, :]
    inside_rows = (rows >= y0[:, None, None]) & (rows <= y1[:, None, None])
    return inside_rows & (cols >= x0[:, None, None]) & (cols <= x1[:, None, None])


def _span(occupied: Tensor, margin: int) -> tuple[Tensor, Tensor]:
    """First and last occupied index of each row of ``occupied`` ``[B, L]``, grown by
    ``margin`` and clipped to ``[0, L)``; ``first > last`` where nothing is occupied."""
    length = occupied.shape[1]
    index = torch.arange(length, device=occupied.device).expand_as(occupied)
    first = torch.where(occupied, index, length).amin(dim=1)
    last = torch.where(occupied, index, -1).amax(dim=1)
    empty = ~occupied.any(dim=1)
    first = torch.where(empty, length, (first - margin).clamp(min=0))
    last = torch.where(empty, -1, (last + margin).clamp(max=length - 1))
    return first, last


def fill_person_hole(images: Tensor, person_mask: Tensor, *, margin: int = 2) -> Tensor:
    """Remove the person by refilling its whole bounding box from the background beside it.

    The filled region is :func:`person_box` (the mask's bounding box grown by ``margin``
    px), so the only shape left is an axis-aligned rectangle, not the person's outline: the
    "Only-BG-T" construction of Xiao et al. (ICLR 2021), where the box is tiled from the
    image's own background. The box spans columns ``x0..x1``; every row of it is filled from
    the same row's background strips, left (columns ``0..x0-1``) and right (``x1+1..W-1``):

    - the wider strip (left on a tie) fills the whole row of the box, reflected about its
      column next to the box without repeating it (column ``x0 + k`` takes ``x0 - 2 - k``)
      and bounced back and forth when the box is wider than the strip
      (``numpy.pad(mode="reflect")`` tiling), so the first filled pixel continues its
      neighbour and the texture is the backdrop's own, pixel for pixel;
    - over the box's last ``BLEND`` columns on the other side, that side's strip, reflected
      the same way, fades in: with the left strip wider, column ``x1 - BLEND + k``
      (``k = 1..BLEND``) gives the right strip the weight ``w = k / (BLEND + 1)`` (mirrored
      when the right strip is wider), so the far side continues its neighbour too and no
      seam is left. For the blend the image is
      split into a low-pass part (the ``LOW_PASS`` x ``LOW_PASS`` mean of pixels outside the
      box) and texture (the rest): the low-pass parts mix with ``(1 - w, w)``, the textures
      with ``(1 - w, w) / hypot(1 - w, w)``, which keeps the variance of two independent
      textures, so the blend is not smoother than the backdrop.

    The other strip does not fade in when it is narrower than ``MIN_STRIP`` px and the
    wider one is not. A box that leaves no ``MIN_STRIP`` px strip left or right but one
    above or below is filled the same way along columns; with neither, along the axis with
    the wider strip. A box covering the whole frame takes the per-channel mean of the
    image's non-person pixels (0 when there are none). An empty mask leaves the image
    unchanged. There is no randomness: equal inputs give equal outputs.

    Args:
        images: float ``[B, C, H, W]``.
        person_mask: ``[B, H, W]`` 0/1, person = 1.
        margin: px added to every side of the bounding box (covers a mask that is a little
            too tight, e.g. from a segmenter).

    Returns:
        float ``[B, C, H, W]``, equal to ``images`` outside ``person_box(person_mask, margin)``.
    """
    box = person_box(person_mask, margin)
    height, width = box.shape[1:]
    x0, x1 = _span(box.any(dim=1), 0)
    y0, y1 = _span(box.any(dim=2), 0)
    row_strip = torch.maximum(x0, width - 1 - x1)  # widest strip left or right of the box
    col_strip = torch.maximum(y0, height - 1 - y1)  # widest strip above or below it
    wider_of_narrow = (col_strip < MIN_STRIP) & (row_strip >= col_strip) & (row_strip > 0)
    along_rows = (row_strip >= MIN_STRIP) | wider_of_narrow
    along_cols = ~along_rows & (col_strip > 0)

    by_rows = _fill_box_from_sides(images, box, x0, x1)
    by_cols = _fill_box_from_sides(images.transpose(2, 3), box.transpose(1, 2), y0, y1)
    fill = torch.where(along_rows[:, None, None, None], by_rows, by_cols.transpose(2, 3))
    keep = (~person_mask.bool())[:, None].to(images.dtype)
    kept_mean = (images * keep).sum(dim=(2, 3)) / keep.sum(dim=(2, 3)).clamp(min=1)
    use_mean = ~(along_rows | along_cols)[:, None, None, None]
    fill = torch.where(use_mean, kept_mean[:, :, None, None].expand_as(images), fill)
    return torch.where(box[:, None], fill, images)


def _fill_box_from_sides(images: Tensor, box: Tensor, x0: Tensor, x1: Tensor) -> Tensor:
    """The row-wise fill of :func:`fill_person_hole` for boxes spanning columns ``x0..x1``
    (``[B]``); valid inside the box only."""
    batch, channels, height, width = images.shape
    cols = torch.arange(width, device=images.device)[None, :]
    x0, x1 = x0[:, None], x1[:, None]
    left_width, right_width = x0, width - 1 - x1
    left_source = x0 - 1 - _bounce(cols - x0 + 1, left_width - 1)
    right_source = x1 + 1 + _bounce(x1 + 1 - cols, right_width - 1)

    # The wider strip fills the box; the other fades in over the box's last BLEND columns.
    ramp_to_right = ((cols - (x1 - BLEND)).to(images.dtype) / (BLEND + 1)).clamp(0, 1)
    ramp_to_left = (((x0 + BLEND) - cols).to(images.dtype) / (BLEND + 1)).clamp(0, 1)
    weight_right = torch.where(left_width >= right_width, ramp_to_right, 1 - ramp_to_left)
    usable = torch.maximum(left_width, right_width).clamp(max=MIN_STRIP)
    weight_right = torch.where(left_width < usable, 1.0, weight_right)
    weight_right = torch.where(right_width < usable, 0.0, weight_right)
    weight_right = weight_right.to(images.dtype)[:, None, None, :]  # [B, 1, 1, W]
    weight_left = 1 - weight_right

    low = _mean_outside(images, box, LOW_PASS)
    texture = images - low

    def at(values: Tensor, source: Tensor) -> Tensor:
        index = source.clamp(0, width - 1)[:, None, None, :].expand(batch, channels, height, width)
        return values.gather(3, index)

    smooth = weight_left * at(low, left_source) + weight_right * at(low, right_source)
    grain = weight_left * at(texture, left_source) + weight_right * at(texture, right_source)
    blended = smooth + grain / torch.hypot(weight_left, weight_right)
    copied = torch.where(weight_right > 0.5, at(images, right_source), at(images, left_source))
    one_side = (weight_right == 0) | (weight_right == 1)
    return torch.where(one_side, copied, blended)


def _bounce(distance: Tensor, period: Tensor) -> Tensor:
    """Triangle wave ``0, 1, .., period, period - 1, .., 0, 1, ..`` of ``distance``: the
    offset of a reflected-and-tiled source from the strip's edge (``period >= 1``)."""
    period = period.clamp(min=1)
    phase = distance.clamp(min=0) % (2 * period)
    return torch.where(phase <= period, phase, 2 * period - phase)


def _mean_outside(images: Tensor, box: Tensor, window: int) -> Tensor:
    """Mean of each pixel's ``window`` x ``window`` neighbourhood over pixels outside ``box``
    (``[B, C, H, W]``; 0 where the whole neighbourhood is inside)."""
    outside = (~box)[:, None].to(images.dtype)
    pad = window // 2
    total = F.avg_pool2d(images * outside, window, stride=1, padding=pad)
    count = F.avg_pool2d(outside, window, stride=1, padding=pad)
    return total / count.clamp(min=1e-6)


def fill_person_rows(images: Tensor, person_mask: Tensor) -> Tensor:
    """The earlier No-FG fill: each row's person run is refilled from the same row.

    Kept as the negative control of :mod:`fgvc.analysis.silhouette` and to reproduce
    numbers computed with it: it leaves the person's outline (the backdrop mirrored in the
    garment's shape, each boundary pixel a copy of its outside neighbour), which the
    silhouette score detects.

    Row by row, each run of person pixels is filled by mirroring the background next to it:
    a pixel at distance ``d`` inside the run takes the background pixel at distance ``d``
    outside the nearer end of the run (reflection about the run's edge). Where that mirror
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
    person = person_mask.bool()
    background = ~person
    cols = torch.arange(images.shape[3], device=images.device).expand_as(person)
    left, right = _nearest_background(background, cols)
    fill = _interpolate_in_row(images, cols, left, right)
    fill = _mirror_about_run_ends(images, background, cols, left, right, fill)
    has_background = (left >= 0) | (right < images.shape[3])
    fill = torch.where(has_background[:, None], fill, _background_mean(images, background).expand_as(images))
    return torch.where(person[:, None], fill, images)


def _nearest_background(background: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """Per pixel ``[B, H, W]``: the column of the nearest background pixel at or left of it
    (``-1`` where none) and at or right of it (``W`` where none), in its row."""
    width = background.shape[2]
    left = torch.where(background, cols, torch.full_like(cols, -1)).cummax(dim=2).values
    right_src = torch.where(background, cols, torch.full_like(cols, width)).flip(2)
    right = right_src.cummin(dim=2).values.flip(2)
    return left, right


def _row_gather(images: Tensor, index: Tensor) -> Tensor:
    """``images`` ``[B, C, H, W]`` at column ``index`` ``[B, H, W]`` of the same row (clamped
    to the frame)."""
    batch, channels, height, width = images.shape
    index = index.clamp(0, width - 1)[:, None].expand(batch, channels, height, width)
    return images.gather(3, index)


def _interpolate_in_row(images: Tensor, cols: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """Linear interpolation between the nearest background pixels left and right in the row;
    the one available side at the image border."""
    has_left, has_right = left >= 0, right < images.shape[3]
    span = (right - left).clamp(min=1).to(images.dtype)
    weight_right = ((cols - left).to(images.dtype) / span)[:, None]
    both = _row_gather(images, left) * (1 - weight_right) + _row_gather(images, right) * weight_right
    one_side = torch.where(has_left[:, None], _row_gather(images, left), _row_gather(images, right))
    return torch.where((has_left & has_right)[:, None], both, one_side)


def _mirror_about_run_ends(images: Tensor, background: Tensor, cols: Tensor, left: Tensor, right: Tensor,
                           fill: Tensor) -> Tensor:
    """``fill`` where the background mirrored about the nearer end of the person run (left
    end at ``left + 1``, right end at ``right - 1``) is usable, else the other end's mirror."""
    width = images.shape[3]

    def usable(source: Tensor) -> Tensor:
        inside = (source >= 0) & (source < width)
        return inside & background.gather(2, source.clamp(0, width - 1))

    mirror_left, mirror_right = 2 * left + 1 - cols, 2 * right - 1 - cols
    ok_left = (left >= 0) & usable(mirror_left)
    ok_right = (right < width) & usable(mirror_right)
    nearer_left = (cols - left) <= (right - cols)
    use_left = ok_left & (nearer_left | ~ok_right)
    use_right = ok_right & ~use_left
    fill = torch.where(use_right[:, None], _row_gather(images, mirror_right), fill)
    return torch.where(use_left[:, None], _row_gather(images, mirror_left), fill)


def _background_mean(images: Tensor, background: Tensor) -> Tensor:
    """Per-channel mean of each image's background pixels ``[B, C, 1, 1]`` (0 without any)."""
    bg = background[:, None].to(images.dtype)
    bg_pixels = bg.sum(dim=(2, 3)).clamp(min=1)
    return ((images * bg).sum(dim=(2, 3)) / bg_pixels)[:, :, None, None]


def pick_partners(labels: Tensor, seed: int) -> dict[str, Any]:
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
    images: Tensor, masks: Tensor, labels: Tensor, seed: int = 0, *, margin: int = 2
) -> dict[str, Any]:
    """Background-swap variants of ``images`` ``[B, 3, H, W]`` (uint8 or float).

    Args:
        masks: ``[B, H, W]`` 0/1 person masks.
        labels: ``[B]`` designer indices (used to choose partners).
        seed: partner choice seed; equal inputs and seed give identical output.
        margin: px the No-FG box extends beyond the mask (see :func:`fill_person_hole`).

    Returns:
        dict with one ``[B, 3, H, W]`` tensor per name in :data:`VARIANT_NAMES`, in the
        input dtype (uint8 fills are rounded), plus ``partner_same`` / ``partner_rand``
        (``[B]`` indices of the image whose background was used), ``same_fallbacks`` /
        ``rand_fallbacks`` (counts from :func:`pick_partners`) and ``no_fg_filled_share``
        (the mean share of each image that the No-FG box replaced: what is left of the
        backdrop to judge by).
    """
    if masks.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")
    dtype = images.dtype
    work = images.float()
    person = masks.bool()[:, None]
    no_fg = fill_person_hole(work, masks, margin=margin)
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
        "no_fg_filled_share": float(person_box(masks, margin).float().mean()) if masks.numel() else 0.0,
    }


def variant_predictions(model: nn.Module, variants: Mapping[str, Tensor], batch_size: int = 64) -> dict[str, Tensor]:
    """Per-image top-1 prediction of ``model`` (the ``argmax`` class index, int64 ``[N]``) for
    each name of :data:`VARIANT_NAMES` present in ``variants``, on the model's device (no host
    sync per batch: bring them back once, e.g. stacked). uint8 images are scaled to [0, 1];
    images move to the model's device batch by batch when they are elsewhere."""
    device = model_device(model)
    predicted: dict[str, Tensor] = {}
    with eval_mode(model), torch.inference_mode():
        for name in VARIANT_NAMES:
            if name not in variants:
                continue
            images = variants[name]
            batches = []
            for start in range(0, images.shape[0], batch_size):
                batch = images[start : start + batch_size].to(device)
                if batch.dtype == torch.uint8:
                    batch = batch.float() / 255.0
                batches.append(model(batch).argmax(dim=1))
            predicted[name] = torch.cat(batches) if batches else torch.zeros(0, dtype=torch.long, device=device)
    return predicted


def variant_correctness(
    model: nn.Module, variants: Mapping[str, Tensor], labels: Tensor, batch_size: int = 64
) -> dict[str, Tensor]:
    """Per-image top-1 correctness of ``model``: bool ``[N]`` for each name of
    :data:`VARIANT_NAMES` present in ``variants`` (image ``i`` of every variant is the same
    shot, so the vectors pair up), on the model's device (no host sync per batch). uint8
    images are scaled to [0, 1]; images and labels move to the model's device when they are
    elsewhere (:func:`variant_predictions`)."""
    predicted = variant_predictions(model, variants, batch_size=batch_size)
    labels = torch.as_tensor(labels).long().to(model_device(model))
    return {name: p == labels for name, p in predicted.items()}


def variant_scores(correct: Mapping[str, Tensor], num_classes: int) -> dict[str, float]:
    """The scores of :func:`evaluate_variants` from per-image correctness
    (:func:`variant_correctness`)."""
    chance = 1.0 / num_classes
    out = {f"acc_{name}": _accuracy(correct[name]) for name in VARIANT_NAMES if name in correct}
    out["chance"] = chance
    if "acc_mixed_same" in out and "acc_mixed_rand" in out:
        out["bg_gap"] = out["acc_mixed_same"] - out["acc_mixed_rand"]
    if "acc_no_fg" in out:
        out["no_fg_vs_chance"] = out["acc_no_fg"] / chance
    return out


def _accuracy(correct: Tensor) -> float:
    return int(correct.sum()) / max(correct.numel(), 1)


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
    are present. uint8 images are scaled to [0, 1]. The per-image correctness behind these
    is :func:`variant_correctness`; its intervals, :func:`variant_intervals`.
    """
    correct = variant_correctness(model, variants, labels, batch_size=batch_size)
    return variant_scores(correct, num_classes)


def variant_intervals(
    correct: Mapping[str, Tensor],
    chance: float,
    *,
    seed: int = 0,
    resamples: int = 2000,
    level: float = 0.95,
) -> dict[str, float]:
    """Percentile-bootstrap intervals over images (:mod:`fgvc.analysis.stats`) of the scores
    of :func:`variant_scores`, from per-image correctness ``correct`` (:func:`variant_correctness`).

    Returns ``<key>_low`` and ``<key>_high`` for ``acc_<variant>`` of each variant present,
    for ``bg_gap`` (images resampled jointly on Mixed-Same and Mixed-Rand) and for
    ``no_fg_vs_chance`` (the No-FG interval divided by ``chance``), the last two when their
    variants are present. One seed gives every key the same resampled image sets.
    """
    draw: dict[str, Any] = dict(seed=seed, resamples=resamples, level=level)
    intervals = {f"acc_{name}": bootstrap_mean(correct[name].float(), **draw)
                 for name in VARIANT_NAMES if name in correct}
    if "mixed_same" in correct and "mixed_rand" in correct:
        intervals["bg_gap"] = bootstrap_paired_difference(
            correct["mixed_same"].float(), correct["mixed_rand"].float(), **draw)
    if "no_fg" in correct:
        intervals["no_fg_vs_chance"] = bootstrap_ratio(correct["no_fg"].float(), chance, **draw)
    out: dict[str, float] = {}
    for key, interval in intervals.items():
        out[f"{key}_low"], out[f"{key}_high"] = interval.low, interval.high
    return out


def backdrop_follow_scores(
    predicted: Tensor,
    labels: Tensor,
    partner: Tensor,
    chance: float,
    *,
    seed: int = 0,
    resamples: int = 2000,
    level: float = 0.95,
) -> dict[str, float]:
    """How often the model names the backdrop's designer on Mixed-Rand.

    Args:
        predicted: ``[N]`` class predicted for each Mixed-Rand image (:func:`variant_predictions`).
        labels: ``[N]`` each image's designer.
        partner: ``[N]`` the image whose No-FG backdrop each Mixed-Rand image uses
            (``partner_rand`` of :func:`make_variants`).
        chance: ``1 / C``, how often a model that ignores the image names a given designer.

    Returns:
        ``backdrop_follow`` (share of swaps predicted as the backdrop's designer) and
        ``backdrop_follow_vs_chance`` (that share / ``chance``), each with ``_low`` / ``_high``
        (percentile bootstrap over images, :func:`fgvc.analysis.stats.bootstrap_mean`; the same
        ``seed`` and ``N`` draw the same image sets as :func:`variant_intervals`). Only swaps
        whose backdrop is of another designer count (a partner fallback, when the images hold
        a single designer, has the image's own); with none, every value is NaN.
    """
    predicted, labels = torch.as_tensor(predicted).long(), torch.as_tensor(labels).long()
    backdrop = labels[torch.as_tensor(partner).long()]
    follows = (predicted == backdrop)[backdrop != labels].float()
    keys = ("backdrop_follow", "backdrop_follow_vs_chance")
    if follows.numel() == 0:
        return {f"{key}{end}": math.nan for key in keys for end in ("", "_low", "_high")}
    draw: dict[str, Any] = dict(seed=seed, resamples=resamples, level=level)
    out: dict[str, float] = {}
    for key, interval in zip(keys, (bootstrap_mean(follows, **draw), bootstrap_ratio(follows, chance, **draw)),
                             strict=True):
        out[key], out[f"{key}_low"], out[f"{key}_high"] = interval.estimate, interval.low, interval.high
    return out


def per_designer(
    labels: Tensor, predicted: Mapping[str, Tensor], partner: Tensor, num_classes: int
) -> list[dict[str, float]]:
    """The swap test per designer: one record per class index ``0 .. num_classes - 1``.

    Args:
        labels: ``[N]`` each image's designer.
        predicted: ``[N]`` predicted class per variant (:func:`variant_predictions`); uses
            ``original``, ``no_fg`` and ``mixed_rand``.
        partner: ``[N]`` the image whose backdrop each Mixed-Rand image uses (``partner_rand``).
        num_classes: ``C``.

    Returns:
        per designer ``c``: ``label`` (``c``), ``images`` (images of ``c``), ``acc_original``
        and ``acc_no_fg`` (accuracy of ``c``'s images, the latter on ``c``'s own backdrop
        alone), ``backdrop_follow`` (of the Mixed-Rand swaps whose backdrop came from an image
        of ``c`` and whose person is of another designer, the share predicted as ``c``) and
        ``backdrop_swaps`` (the number of those swaps). A share over no images is NaN.
    """
    labels = torch.as_tensor(labels).long()
    backdrop = labels[torch.as_tensor(partner).long()]
    swapped = backdrop != labels

    def count(classes: Tensor, where: Tensor) -> Tensor:
        return torch.bincount(classes[where], minlength=num_classes)

    every = torch.ones_like(labels, dtype=torch.bool)
    counts = torch.stack([
        count(labels, every),
        count(labels, predicted["original"] == labels),
        count(labels, predicted["no_fg"] == labels),
        count(backdrop, swapped),
        count(backdrop, swapped & (predicted["mixed_rand"] == backdrop)),
    ]).tolist()  # one host sync
    images, right, right_no_fg, swaps, follows = counts
    def share(hits: int, total: int) -> float:
        return hits / total if total else math.nan

    return [{"label": c, "images": images[c], "acc_original": share(right[c], images[c]),
             "acc_no_fg": share(right_no_fg[c], images[c]), "backdrop_follow": share(follows[c], swaps[c]),
             "backdrop_swaps": swaps[c]} for c in range(num_classes)]


def no_fg_confusion(labels: Tensor, predicted_no_fg: Tensor, num_classes: int) -> Tensor:
    """int64 ``[C, C]`` counts: row = the designer whose backdrop a No-FG image shows (the
    image's own designer), column = the designer predicted from it; the diagonal is No-FG
    accuracy per designer, the rest says whose backdrops look alike. On the inputs' device."""
    labels, predicted = torch.as_tensor(labels).long(), torch.as_tensor(predicted_no_fg).long()
    flat = torch.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)
