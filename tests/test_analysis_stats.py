"""Percentile bootstrap over images and the spread across seeds."""

from __future__ import annotations

import math

import pytest
import torch

from fgvc.analysis.stats import (
    Interval,
    across_seeds,
    bootstrap_mean,
    bootstrap_difference,
    bootstrap_paired_difference,
    bootstrap_ratio,
    hierarchical_bootstrap,
    seed_interval,
)
from fgvc.errors import FgvcError


def test_degenerate_samples_have_exact_intervals():
    assert bootstrap_mean(torch.ones(50), seed=0) == Interval(1.0, 1.0, 1.0, 50)
    assert bootstrap_mean(torch.zeros(7, dtype=torch.bool), seed=0) == Interval(0.0, 0.0, 0.0, 7)
    assert bootstrap_mean([0.25], seed=0) == Interval(0.25, 0.25, 0.25, 1)


def test_the_interval_brackets_the_sample_mean_and_narrows_with_more_images():
    g = torch.Generator().manual_seed(0)
    small = bootstrap_mean((torch.rand(40, generator=g) < 0.3).float(), seed=1)
    large = bootstrap_mean((torch.rand(4000, generator=g) < 0.3).float(), seed=1)
    assert small.low <= small.estimate <= small.high
    assert large.high - large.low < (small.high - small.low) / 5
    # the binomial standard error at n = 4000 is 0.0072: the 95% interval is about +-1.96 of it
    assert large.high - large.low == pytest.approx(2 * 1.96 * math.sqrt(0.3 * 0.7 / 4000), rel=0.15)


def test_the_95_percent_interval_covers_the_true_mean_about_95_percent_of_the_time():
    # 400 binomial samples of 60 images with p = 0.3; the coverage of 400 trials has a
    # standard error of 0.011, and the percentile bootstrap runs slightly narrow at this n:
    # accept 0.90..0.98.
    g = torch.Generator().manual_seed(123)
    samples = (torch.rand(400, 60, generator=g) < 0.3).float()
    covered = 0
    for trial, sample in enumerate(samples):
        interval = bootstrap_mean(sample, seed=trial, resamples=1000)
        covered += interval.low <= 0.3 <= interval.high
    assert 0.90 <= covered / 400 <= 0.98


def test_a_seed_fixes_the_interval():
    values = (torch.rand(30, generator=torch.Generator().manual_seed(5)) < 0.5).float()
    assert bootstrap_mean(values, seed=3) == bootstrap_mean(values.clone(), seed=3)
    others = {bootstrap_mean(values, seed=s, resamples=200) for s in range(5)}
    assert len(others) > 1


def test_paired_differences_resample_the_images_jointly():
    g = torch.Generator().manual_seed(2)
    same = (torch.rand(80, generator=g) < 0.6).float()
    assert bootstrap_paired_difference(same, same, seed=0) == Interval(0.0, 0.0, 0.0, 80)
    # a constant per-image difference has no spread, however noisy each vector is
    shifted = same + 0.25
    assert bootstrap_paired_difference(shifted, same, seed=0) == Interval(0.25, 0.25, 0.25, 80)
    rand = (torch.rand(80, generator=g) < 0.4).float()
    gap = bootstrap_paired_difference(same, rand, seed=0)
    assert gap.estimate == pytest.approx(float(same.mean() - rand.mean()))
    assert gap.low < gap.estimate < gap.high
    with pytest.raises(FgvcError, match="same length"):
        bootstrap_paired_difference(same, rand[:10], seed=0)


def test_a_ratio_to_a_constant_scales_the_interval():
    values = (torch.rand(50, generator=torch.Generator().manual_seed(4)) < 0.5).float()
    mean = bootstrap_mean(values, seed=9)
    ratio = bootstrap_ratio(values, 0.25, seed=9)
    assert ratio.estimate == pytest.approx(mean.estimate * 4)
    assert (ratio.low, ratio.high) == pytest.approx((mean.low * 4, mean.high * 4))
    with pytest.raises(FgvcError, match="positive"):
        bootstrap_ratio(values, 0.0, seed=0)


@pytest.mark.parametrize("bad, message", [
    (dict(values=[]), "at least one value"),
    (dict(values=[0.5, math.nan]), "finite"),
    (dict(values=[1.0], level=1.0), "level"),
    (dict(values=[1.0], resamples=0), "resamples"),
])
def test_bad_inputs_are_refused(bad, message):
    values = bad.pop("values")
    with pytest.raises(FgvcError, match=message):
        bootstrap_mean(values, seed=0, **bad)


def test_a_single_seed_shows_no_spread():
    assert across_seeds([0.8]) == (0.8, None, 1)
    mean, std, n = across_seeds([0.7, 0.8, 0.9])
    assert mean == pytest.approx(0.8) and std == pytest.approx(0.1) and n == 3
    assert across_seeds([0.5, 0.5]).std == 0.0
    with pytest.raises(FgvcError, match="at least one value"):
        across_seeds([])


def test_a_hierarchical_interval_covers_the_spread_between_seeds():
    g = torch.Generator().manual_seed(5)
    # three seeds that agree within themselves but differ from each other by 0.2
    seeds = [(torch.rand(60, generator=g) < p).float() for p in (0.4, 0.6, 0.8)]
    pooled = bootstrap_mean(torch.cat(seeds), seed=0)
    nested = hierarchical_bootstrap(seeds, seed=0)
    assert nested.n == 3 and nested.estimate == pytest.approx(float(torch.stack([s.mean() for s in seeds]).mean()))
    assert nested.low < nested.estimate < nested.high
    assert nested.high - nested.low > 1.5 * (pooled.high - pooled.low)  # images alone understate it
    identical = [torch.full((10,), 0.3)] * 4
    flat = hierarchical_bootstrap(identical, seed=0)
    assert (flat.low, flat.high) == pytest.approx((0.3, 0.3))
    one = hierarchical_bootstrap(seeds[:1], seed=3)
    assert (one.low, one.high) == (bootstrap_mean(seeds[0], seed=3).low, bootstrap_mean(seeds[0], seed=3).high)


def test_a_seed_level_interval_is_the_t_interval_of_the_seed_values():
    assert seed_interval([0.8]) is None  # one seed: nothing about training randomness
    interval = seed_interval([0.7, 0.8, 0.9])
    assert interval.estimate == pytest.approx(0.8) and interval.n == 3
    assert (interval.low, interval.high) == pytest.approx((0.8 - 4.303 * 0.1 / math.sqrt(3),
                                                           0.8 + 4.303 * 0.1 / math.sqrt(3)))


def test_a_difference_of_different_images_resamples_each_side_on_its_own():
    # Two independent samples of 400 images, p = 0.7 and p = 0.4: the two-sample standard
    # error of the difference is sqrt(.7*.3/400 + .4*.6/400) = 0.0335, so the 95% interval is
    # about 0.3 +- 0.066; a paired bootstrap of the same numbers would be narrower.
    g = torch.Generator().manual_seed(7)
    first, second = (torch.rand(400, generator=g) < 0.7).float(), (torch.rand(300, generator=g) < 0.4).float()
    one = bootstrap_difference([(first, second)], seed=0)
    assert one.estimate == pytest.approx(float(first.mean() - second.mean()))
    assert one.n == 1 and one.low < one.estimate < one.high
    assert one.high - one.low == pytest.approx(2 * 1.96 * math.sqrt(.7 * .3 / 400 + .4 * .6 / 300), rel=0.15)
    # identical sides of different sizes: the interval straddles 0
    assert bootstrap_difference([(first, first[:200])], seed=0).low < 0 < \
        bootstrap_difference([(first, first[:200])], seed=0).high
    # several seeds: the seeds' spread widens it; the estimate is the mean of the seeds' differences
    shifted = [(first, second), ((torch.rand(400, generator=g) < 0.95).float(), second)]
    many = bootstrap_difference(shifted, seed=0)
    assert many.n == 2
    assert many.estimate == pytest.approx(sum(float(a.mean() - b.mean()) for a, b in shifted) / 2)
    assert many.high - many.low > one.high - one.low
    with pytest.raises(FgvcError, match="at least one seed"):
        bootstrap_difference([], seed=0)
