"""Uncertainty of the suite's measures: seeded percentile bootstrap over images, and the
spread across training seeds.

An accuracy is the mean of per-image 0/1 correctness, so every interval here is an
interval of a mean of per-image values (Efron & Tibshirani, "An Introduction to the
Bootstrap", 1993, ch. 13, the percentile interval): draw ``resamples`` sets of ``N`` images
with replacement, take each set's mean, and report the ``(1 - level) / 2`` and
``(1 + level) / 2`` quantiles of those means. A paired difference (two measures on the same
images) resamples the images jointly, which is the mean of the per-image differences. The
same seed and ``N`` give the same resampled sets, so intervals computed with one seed on one
set of images come from the same resamples.

With several training seeds a measure varies with the seed and with the images, and how the
two meet decides how to resample (Davison & Hinkley, "Bootstrap Methods and their
Application", 1997, sec. 3.8; Owen, "The pigeonhole bootstrap", Ann. Appl. Stat. 2007):

- **nested** (the default, ``crossed=False``): each seed has images of its own (e.g. each
  seed drew its own analysed images). A resample draws the seeds with replacement and, within
  each, that seed's images, independently per seed. For ``y[s, i] = a_si + b_s + e_si``
  (image effect ``a``, drawn anew for each seed's images; seed effect ``b``; noise ``e``;
  variances ``σa², σb², σe²``) the mean over ``S`` seeds of ``N`` images each has variance
  ``σa²/(SN) + σb²/S + σe²/(SN)``.
- **crossed** (``crossed=True``): every seed measured the SAME images (the analysis seed is
  fixed, so a study's seeds analyse one set of images; vector ``s`` holds image ``i`` at
  position ``i`` for every seed). With ``y[s, i] = a_i + b_s + e_si`` an image that is hard
  is hard for every seed, so the image term does not average out over seeds: the mean has
  variance ``σa²/N + σb²/S + σe²/(SN)``. A resample draws the images once, the same indices
  for every seed, and the seeds with replacement. The nested resampling applied to crossed
  data counts about ``(2 - 1/S)/S`` of the image term (a quarter with 8 seeds): its
  intervals are too narrow.

Drawing at both levels is not exact in either design. The seeds' plug-in variance is
``(S - 1)/S`` of theirs, so the seed term is understated when ``S`` is 2 or 3 and it
dominates. Nested: a seed drawn twice reuses its resampled mean, so the within-seed term
``(σa² + σe²)/(SN)`` is counted about ``3 - 2/S`` times: conservative where images, not seeds,
dominate. Crossed: the noise term ``σe²/(SN)`` is counted about three times (Owen 2007),
conservative only while it is a large part of the variance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from fgvc.errors import ConfigError


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile-bootstrap interval, over ``n`` images."""

    estimate: float
    low: float
    high: float
    n: int


class SeedSpread(NamedTuple):
    """A measure across training seeds: mean, sample standard deviation (``None`` for a
    single seed: one run shows no spread, not a spread of 0) and the number of seeds."""

    mean: float
    std: float | None
    n: int


def bootstrap_mean(values, *, seed: int, resamples: int = 2000, level: float = 0.95) -> Interval:
    """Mean of ``values`` ``[N]`` (e.g. per-image 0/1 correctness) and its percentile
    bootstrap interval, from one seeded ``[resamples, N]`` draw of image indices
    (``8 * resamples * N`` bytes)."""
    values = _vector(values)
    if resamples < 1:
        raise ConfigError(f"bootstrap: resamples must be at least 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"bootstrap: level must lie strictly between 0 and 1, got {level}")
    n = values.numel()
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(n, (resamples, n), generator=generator)
    means = values[index].mean(dim=1)
    low, high = _percentiles(means, level)
    return Interval(estimate=float(values.mean()), low=low, high=high, n=n)


def bootstrap_paired_difference(first, second, *, seed: int, resamples: int = 2000,
                                level: float = 0.95) -> Interval:
    """``mean(first) - mean(second)`` for two measures ``[N]`` of the same images (e.g. the
    BG-gap: correctness on Mixed-Same minus on Mixed-Rand), resampling images jointly."""
    first, second = _vector(first), _vector(second)
    if first.shape != second.shape:
        raise ConfigError(f"bootstrap: paired values must have the same length, got "
                          f"{first.numel()} and {second.numel()}")
    return bootstrap_mean(first - second, seed=seed, resamples=resamples, level=level)


def bootstrap_difference(pairs: Sequence, *, seed: int, resamples: int = 2000, level: float = 0.95,
                         crossed: bool = False) -> Interval:
    """``mean(first) - mean(second)`` for two measures of different images (e.g. the same
    cell's accuracy on two different validation splits), averaged over training seeds:
    ``pairs`` holds one ``(first [N_s], second [M_s])`` per seed. Each resample draws each
    side's images with replacement independently (an unpaired two-sample bootstrap), and with
    several seeds then draws the seeds with replacement (as :func:`hierarchical_bootstrap`).

    ``crossed=False`` (nested): each seed's images are drawn on their own.
    ``crossed=True``: every seed measured the same images on each side (``first`` of every
    seed holds the same ``N`` images in the same order, ``second`` the same ``M``), so each
    resample draws each side's images once, the same indices for every seed (see the module
    docstring); seeds whose vectors differ in length are refused. With one seed the two are
    the same draw. ``n`` = seeds."""
    vectors = [(_vector(a), _vector(b)) for a, b in pairs]
    if not vectors:
        raise ConfigError("bootstrap: needs at least one seed")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"bootstrap: level must lie strictly between 0 and 1, got {level}")
    generator = torch.Generator().manual_seed(seed)
    if crossed and len(vectors) > 1:
        first = _aligned([a for a, _ in vectors], "first")
        second = _aligned([b for _, b in vectors], "second")
        seed_differences = _crossed_means(first, resamples, generator) - _crossed_means(second, resamples, generator)
    else:
        draw = lambda v: v[torch.randint(v.numel(), (resamples, v.numel()), generator=generator)].mean(1)  # noqa: E731
        # [resamples, seeds]: per bootstrap draw, each seed's difference of resampled means
        seed_differences = torch.stack([draw(a) - draw(b) for a, b in vectors], dim=1)
    if len(vectors) > 1:
        chosen = torch.randint(len(vectors), (resamples, len(vectors)), generator=generator)
        seed_differences = seed_differences.gather(1, chosen)
    means = seed_differences.mean(1)
    low, high = _percentiles(means, level)
    estimate = float(torch.stack([a.mean() - b.mean() for a, b in vectors]).mean())
    return Interval(estimate=estimate, low=low, high=high, n=len(vectors))


def bootstrap_ratio(values, constant: float, *, seed: int, resamples: int = 2000,
                    level: float = 0.95) -> Interval:
    """``mean(values) / constant`` (e.g. No-FG accuracy in multiples of chance); dividing by
    a positive constant maps the mean's interval end to end."""
    if not constant > 0:
        raise ConfigError(f"bootstrap: the ratio's constant must be positive, got {constant}")
    mean = bootstrap_mean(values, seed=seed, resamples=resamples, level=level)
    return Interval(mean.estimate / constant, mean.low / constant, mean.high / constant, mean.n)


def hierarchical_bootstrap(groups: Sequence | Tensor, *, seed: int, resamples: int = 2000, level: float = 0.95,
                           crossed: bool = False) -> Interval:
    """Mean over training seeds of each seed's mean over images, with a two-level percentile
    bootstrap interval (Davison & Hinkley, "Bootstrap Methods and their Application", 1997,
    sec. 3.8): each resample draws the seeds with replacement, and the images with replacement.
    ``groups`` holds one ``[N_s]`` vector per seed (e.g. per-image paired differences of one
    seed's two cells), or is an ``[S, N]`` matrix (one row per seed).

    ``crossed=False`` (nested): each seed has images of its own; within each drawn seed its
    images are drawn on their own. ``crossed=True``: every seed measured the same images
    (position ``i`` of every seed's vector is the same image; :func:`align_on_images` builds
    such a matrix from per-seed tables), so each resample draws the images once, the same
    indices for every seed, and the image-level variance does not shrink with the number of
    seeds (see the module docstring); seeds whose vectors differ in length are refused.

    The interval covers training randomness and the choice of images; with one seed it is
    :func:`bootstrap_mean`'s in both designs. ``n`` = seeds."""
    vectors = [_vector(g) for g in groups]
    if not vectors:
        raise ConfigError("bootstrap: needs at least one seed")
    if len(vectors) == 1:
        one = bootstrap_mean(vectors[0], seed=seed, resamples=resamples, level=level)
        return Interval(one.estimate, one.low, one.high, 1)
    if not 0.0 < level < 1.0:
        raise ConfigError(f"bootstrap: level must lie strictly between 0 and 1, got {level}")
    generator = torch.Generator().manual_seed(seed)
    if crossed:
        # [resamples, seeds]: every seed's mean over the same resampled images, per bootstrap draw
        seed_means = _crossed_means(_aligned(vectors, "seeds"), resamples, generator)
    else:
        # [resamples, seeds]: the mean of each seed's images resampled, per bootstrap draw
        seed_means = torch.stack([v[torch.randint(v.numel(), (resamples, v.numel()), generator=generator)].mean(1)
                                  for v in vectors], dim=1)
    chosen = torch.randint(len(vectors), (resamples, len(vectors)), generator=generator)
    means = seed_means.gather(1, chosen).mean(1)
    low, high = _percentiles(means, level)
    estimate = float(torch.stack([v.mean() for v in vectors]).mean())
    return Interval(estimate=estimate, low=low, high=high, n=len(vectors))


def align_on_images(seeds: Sequence[tuple[Sequence, Sequence]]) -> tuple[list, Tensor]:
    """The crossed layout of per-seed measures: ``seeds`` holds one ``(image ids, values)``
    per seed (e.g. ``dataset_index`` and a per-image column of each seed's table); returns the
    ids every seed has (in the first seed's order) and float64 ``[S, N]`` with row ``s`` =
    seed ``s``'s values on those images, ready for ``hierarchical_bootstrap(...,
    crossed=True)``. An id listed twice by one seed keeps its first value; ``N`` may be 0."""
    if not seeds:
        raise ConfigError("bootstrap: needs at least one seed")
    lookups = []
    for ids, values in seeds:
        ids, values = list(ids), [float(v) for v in values]
        if len(ids) != len(values):
            raise ConfigError(f"bootstrap: {len(ids)} image ids for {len(values)} values")
        lookup: dict = {}
        for key, value in zip(ids, values, strict=True):
            lookup.setdefault(key, value)
        lookups.append(lookup)
    common = [key for key in lookups[0] if all(key in lookup for lookup in lookups[1:])]
    matrix = torch.tensor([[lookup[key] for key in common] for lookup in lookups], dtype=torch.float64)
    return common, matrix.reshape(len(lookups), len(common))


def across_seeds(values: Sequence[float]) -> SeedSpread:
    """Mean and sample standard deviation (``n - 1`` in the denominator) of one measure
    over training seeds; ``std`` is ``None`` for a single seed."""
    values = [float(v) for v in values]
    if not values:
        raise ConfigError("across_seeds: needs at least one value")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return SeedSpread(mean, None, 1)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return SeedSpread(mean, math.sqrt(variance), len(values))


# Student's t 0.975 quantile for 1..10 degrees of freedom; beyond, 1.96 + 2.4 / df (within 0.02).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def seed_interval(values: Sequence[float]) -> Interval | None:
    """A seed-level 95% interval of the mean of one measure over training seeds: the
    t-interval ``mean ± t(0.975, n-1) * std / sqrt(n)``; it covers training randomness (each
    seed's value already averages its images). ``None`` for a single seed."""
    spread = across_seeds(values)
    if spread.std is None:
        return None
    t = _T975[spread.n - 2] if spread.n - 2 < len(_T975) else 1.96 + 2.4 / (spread.n - 1)
    half = t * spread.std / math.sqrt(spread.n)
    return Interval(spread.mean, spread.mean - half, spread.mean + half, spread.n)


def _aligned(vectors: Sequence[Tensor], what: str) -> Tensor:
    """``[S, N]`` from the seeds' vectors of one crossed design (every seed the same images)."""
    lengths = sorted({v.numel() for v in vectors})
    if len(lengths) > 1:
        raise ConfigError(f"bootstrap: crossed {what} must hold the same images for every seed, got vectors of "
                          f"{', '.join(map(str, lengths))} values (align them on image ids first)")
    return torch.stack(list(vectors))


def _crossed_means(matrix: Tensor, resamples: int, generator: torch.Generator) -> Tensor:
    """``[resamples, S]``: each row of ``matrix`` ``[S, N]`` averaged over one draw of ``N``
    image indices with replacement, the same draw for every row (as counts, so memory is
    ``resamples * N``, not ``resamples * S * N``)."""
    n = matrix.shape[1]
    index = torch.randint(n, (resamples, n), generator=generator)
    ones = torch.ones(resamples, n, dtype=matrix.dtype)
    counts = torch.zeros(resamples, n, dtype=matrix.dtype).scatter_add_(1, index, ones)
    return counts @ matrix.T / n


def _percentiles(means: Tensor, level: float) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of bootstrap means."""
    tail = (1.0 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=means.dtype)).tolist()
    return low, high


def _vector(values) -> Tensor:
    values = torch.as_tensor(values).detach().cpu().to(torch.float64).flatten()
    if values.numel() == 0:
        raise ConfigError("bootstrap: needs at least one value")
    if not bool(values.isfinite().all()):
        raise ConfigError("bootstrap: values must be finite (no NaN or inf)")
    return values
