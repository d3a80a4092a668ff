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
from torch import Tensor, nn

from fgvc.analysis.common import eval_mode
from fgvc.analysis.person_fill import fill_person_hole, person_box
from fgvc.analysis.stats import bootstrap_mean, bootstrap_paired_difference, bootstrap_ratio
from fgvc.devices import model_device

VARIANT_NAMES = ("original", "only_fg", "no_fg", "mixed_same", "mixed_rand")


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
