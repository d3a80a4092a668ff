"""How much of the person's outline survives in a No-FG image (the person removed, the hole
filled): a fill that leaves the silhouette lets "No-FG accuracy above chance" read the
garment's shape instead of the venue.

:func:`silhouette_score` compares the filled images with their untouched background, on
images scaled to [0, 1]. A neighbour pair is two 4-connected pixels and its energy the
squared difference summed over channels; a region's *pair energy* is the median energy of
its pairs (the median is the noise level: a few real edges, a light band's border or the
floor line, do not move it). The *reference* is every pixel more than ``ring`` px from the
person mask and, when the originals are given, from every pixel the fill changed.

- ``hole_texture``: per image, the pair energy of the pairs inside the person mask over the
  reference's; the median over images. 1 = the hole has the backdrop's texture; well below
  1 = a smooth blob; above 1 = busier than the backdrop.
- ``seam``: the same with the pairs that cross the mask boundary (one pixel in, one out).
  1 = the boundary cannot be seen; above 1 = a seam; well below 1 = pixels copied across
  the boundary (a mirror about it).
- ``mask_auc``: a class-balanced logistic regression on 28 per-pixel features of the filled
  image that carry neither colour nor position (:func:`local_features`: centre-surround
  contrasts and neighbour-difference energies over 3, 5 and 9 px windows) is fitted to the
  person mask on one seeded half of the images and scored by the ROC AUC of its pixel
  predictions on the other half, and the other way round; the mean of the two AUCs.
  0.5 = the outline cannot be recovered from local image structure. A perfect fill need
  not reach 0.5: where people stand correlates with the backdrop's own structure (on the
  demo the true backdrops score 0.54-0.60), so the true backdrop is the reference level.

When the true backdrops are known (the demo renders them:
:func:`fgvc.data.demo.render_split_with_backdrops`), ``backdrop_error`` is the RMS difference,
inside the mask, between the filled image and the true backdrop after a ``5 x 5`` box mean of
both (the pixel noise cannot be predicted; the colour and structure can), in 0..255 units.
The score of the true backdrops themselves is the level a perfect fill reaches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Half-widths of the box windows behind the mask-recovery features (px).
FEATURE_SCALES = (1, 2, 4)
NEWTON_STEPS = 12
L2_PENALTY = 1e-3


@dataclass(frozen=True)
class SilhouetteScore:
    """The three measures of the module docstring, for one set of filled images."""

    hole_texture: float
    seam: float
    mask_auc: float
    backdrop_error: float  # NaN when no true backdrops were given
    num_images: int


def silhouette_score(
    filled: Tensor,
    person_mask: Tensor,
    *,
    originals: Tensor | None = None,
    backdrops: Tensor | None = None,
    seed: int = 0,
    ring: int = 2,
) -> SilhouetteScore:
    """Silhouette score (see the module docstring) of ``filled`` ``[B, 3, H, W]``.

    Args:
        filled: uint8, or float in [0, 1]: the No-FG images.
        person_mask: ``[B, H, W]`` 0/1, person = 1: where the person was.
        originals: the images before filling; when given, the pixels the fill changed are
            left out of the reference background too, so a fill that reaches beyond the mask
            (a bounding box) is compared with untouched pixels only.
        backdrops: the true backdrops (same shape as ``filled``), for ``backdrop_error``.
        seed: the split of the images into halves for ``mask_auc``.
        ring: px around the person (and around the changed pixels) left out of the
            reference background.
    """
    images = _unit(filled)
    person = person_mask.bool()
    if person.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"person_mask {tuple(person.shape)} does not match images {tuple(images.shape)}")
    touched = person
    if originals is not None:
        touched = touched | ((images - _unit(originals)).abs().amax(dim=1) > 1e-6)
    reference = ~_dilate(touched, ring)
    background = pair_energy(images, reference, reference)
    return SilhouetteScore(
        hole_texture=_median_ratio(pair_energy(images, person, person), background),
        seam=_median_ratio(pair_energy(images, person, ~person), background),
        mask_auc=mask_recovery_auc(images, person, seed=seed),
        backdrop_error=math.nan if backdrops is None else backdrop_error(images, backdrops, person),
        num_images=int(images.shape[0]),
    )


def _unit(images: Tensor) -> Tensor:
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


def _dilate(region: Tensor, px: int) -> Tensor:
    if px <= 0:
        return region
    grown = F.max_pool2d(region[:, None].float(), 2 * px + 1, stride=1, padding=px)
    return grown[:, 0] > 0


def _median_ratio(values: Tensor, reference: Tensor) -> float:
    """Median over images of ``values / reference`` (``[B]`` each): every image against its
    own background, since backdrops differ in noise and structure. Images where either is
    undefined are skipped; NaN when none is left."""
    ratios = values / reference
    ratios = ratios[ratios.isfinite()]
    return float(ratios.median()) if ratios.numel() else math.nan


def pair_energy(images: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """Per image ``[B]``: the median squared difference (summed over channels) over the
    horizontal and vertical neighbour pairs with one pixel in ``first`` and the other in
    ``second`` (``[B, H, W]`` bool, either order); NaN where there are none. The median is
    a region's noise level: a few real edges (a light band's border, the floor line) do not
    move it."""
    energies = []
    for dim in (2, 3):
        length = images.shape[dim]
        a, b = images.narrow(dim, 0, length - 1), images.narrow(dim, 1, length - 1)
        fa, fb = first.narrow(dim - 1, 0, length - 1), first.narrow(dim - 1, 1, length - 1)
        sa, sb = second.narrow(dim - 1, 0, length - 1), second.narrow(dim - 1, 1, length - 1)
        pairs = (fa & sb) | (sa & fb)
        energy = ((a - b) ** 2).sum(dim=1)
        energies.append(torch.where(pairs, energy, math.nan).flatten(1))
    return torch.cat(energies, dim=1).nanmedian(dim=1).values


def backdrop_error(filled: Tensor, backdrops: Tensor, region: Tensor) -> float:
    """RMS difference (0..255 units) between the ``5 x 5`` box means of ``filled`` and of the
    true ``backdrops`` over the pixels of ``region`` ``[B, H, W]``."""
    def smooth(x: Tensor) -> Tensor:
        return F.avg_pool2d(F.pad(_unit(x), (2, 2, 2, 2), mode="replicate"), 5, stride=1)

    squared = ((smooth(filled) - smooth(backdrops)) ** 2).mean(dim=1)
    return 255.0 * float(squared[region.bool()].mean().sqrt())


def local_features(images: Tensor) -> Tensor:
    """Per-pixel structure features ``[B, H, W, F]`` of images in [0, 1], free of absolute
    colour and position: for each scale ``r`` of :data:`FEATURE_SCALES`, the pixel minus its
    ``(2r+1)``-box mean (per channel) and that contrast's energy; the four one-sided
    neighbour differences' energies and their ``(2r+1)``-box means; all energies as
    ``log(1e-4 + e)``. Reflect padding keeps the frame's edge from looking special."""
    def box(x: Tensor, r: int) -> Tensor:
        return F.avg_pool2d(F.pad(x, (r, r, r, r), mode="reflect"), 2 * r + 1, stride=1)

    def log_energy(x: Tensor) -> Tensor:
        return torch.log(1e-4 + x)

    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    centre = padded[:, :, 1:-1, 1:-1]
    one_sided = [
        ((centre - padded[:, :, 1:-1, :-2]) ** 2).sum(1, keepdim=True),
        ((centre - padded[:, :, 1:-1, 2:]) ** 2).sum(1, keepdim=True),
        ((centre - padded[:, :, :-2, 1:-1]) ** 2).sum(1, keepdim=True),
        ((centre - padded[:, :, 2:, 1:-1]) ** 2).sum(1, keepdim=True),
    ]
    steps = torch.cat(one_sided, dim=1)
    features = [log_energy(steps)]
    for r in FEATURE_SCALES:
        contrast = images - box(images, r)
        features += [contrast, log_energy((contrast ** 2).sum(1, keepdim=True)), log_energy(box(steps, r))]
    return torch.cat(features, dim=1).permute(0, 2, 3, 1)


def mask_recovery_auc(images: Tensor, person_mask: Tensor, *, seed: int = 0) -> float:
    """Held-out ROC AUC of a logistic regression that predicts ``person_mask`` from
    :func:`local_features` of ``images`` (``[B, 3, H, W]`` in [0, 1] or uint8): the images
    are split into two seeded halves, a model fitted on each half scores every pixel of the
    other, and the two halves' AUCs are averaged. 0.5 = no outline recoverable."""
    images = _unit(images)
    if images.shape[0] < 4:
        raise ValueError(f"mask recovery needs at least 4 images (two halves to fit and score), "
                         f"got {images.shape[0]}")
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    halves = (order[: images.shape[0] // 2], order[images.shape[0] // 2 :])
    features = local_features(images)
    target = person_mask.bool()
    aucs = []
    for fit, held_out in (halves, halves[::-1]):
        model = _fit_logistic(features[fit].flatten(0, 2), target[fit].flatten().float())
        predicted = _standardised(features[held_out].flatten(0, 2), model) @ model["w"] + model["b"]
        aucs.append(roc_auc(predicted, target[held_out]))
    return sum(aucs) / len(aucs)


def _standardised(x: Tensor, weights: dict) -> Tensor:
    return (x - weights["mean"]) / weights["std"]


def _fit_logistic(x: Tensor, y: Tensor) -> dict:
    """L2-penalised logistic regression on standardised features, fitted by Newton's method
    from zero in float64 (deterministic, a fixed number of steps); the two classes carry
    equal total weight whatever the person's share of the pixels."""
    weights = {"mean": x.mean(dim=0), "std": x.std(dim=0).clamp(min=1e-6)}
    x = torch.cat([_standardised(x, weights), torch.ones_like(x[:, :1])], dim=1).double()
    y = y.double()
    positive = y.mean().clamp(1e-6, 1 - 1e-6)
    sample_weight = torch.where(y > 0, 0.5 / positive, 0.5 / (1 - positive)) / y.numel()
    penalty = torch.full((x.shape[1],), 2 * L2_PENALTY, dtype=torch.float64, device=x.device)
    penalty[-1] = 0.0  # the intercept is not shrunk
    w = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for _ in range(NEWTON_STEPS):
        p = torch.sigmoid(x @ w)
        gradient = x.T @ (sample_weight * (p - y)) + penalty * w
        hessian = (x * (sample_weight * p * (1 - p))[:, None]).T @ x + torch.diag(penalty)
        w = w - torch.linalg.solve(hessian, gradient)
    return {**weights, "w": w[:-1].float(), "b": w[-1].float()}


def roc_auc(scores: Tensor, positive: Tensor) -> float:
    """ROC AUC of ``scores`` for the boolean labels ``positive`` (Mann-Whitney U with tied
    scores counted half); NaN when one class is absent."""
    scores, positive = scores.flatten().double(), positive.flatten().bool()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    # Average rank (1-based) of each tie group: the mean of the ranks its members occupy.
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    rank_sum = float(mean_rank[inverse][positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
