"""The No-FG backdrop of the background-swap test (fgvc.analysis.shortcut): the person's whole
bounding box (:func:`person_box`) refilled from the image's own background beside it, so no
silhouette remains (:func:`fill_person_hole`), and the older row-wise fill it replaced
(:func:`fill_person_rows`, the negative control of fgvc.analysis.silhouette)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

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
