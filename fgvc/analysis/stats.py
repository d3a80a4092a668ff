"""Placeholder bootstrap (replaced by the full statistics module)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    n: int


def bootstrap_mean(values, *, seed: int = 0, resamples: int = 2000, level: float = 0.95) -> Interval:
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = len(values)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=g)
    means = values[idx].mean(dim=1)
    alpha = (1 - level) / 2
    return Interval(float(values.mean()), float(means.quantile(alpha)), float(means.quantile(1 - alpha)), n)
