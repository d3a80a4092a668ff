"""The one timing harness every benchmark under ``bench/`` uses.

A comparison is a few contenders (callables doing the same work). After warm-up rounds
the contenders run in interleaved rounds (A, B, A, B, ...), so load that drifts during the
run hits all of them alike; each contender's per-round rate is summarised by its median,
inter-quartile range and min-max, and each ratio is computed per round from the same
rounds and summarised the same way. The machine's state (load average, threads, versions)
is printed at the start and end, with a loud warning when the figures cannot be trusted.

    from harness import Contender, Machine, compare, report_target

    with Machine() as machine:
        timings = compare([Contender("ours", run_ours, work=32, unit="img"),
                           Contender("peer", run_peer, work=32, unit="img")], rounds=5)
        speedup = timings.ratio("ours", "peer")
        report_target("ours vs peer", speedup.median, ">=", 2.0, speedup)
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

SPREAD_LIMIT = 0.10  # IQR / median above this: the figure is not to be trusted


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


@dataclass
class Spread:
    """Median, inter-quartile range and extremes of per-round values."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def iqr(self) -> tuple[float, float]:
        q1, _, q3 = _quartiles(self.values)
        return q1, q3

    @property
    def relative_iqr(self) -> float:
        q1, q3 = self.iqr
        return (q3 - q1) / abs(self.median) if self.median else float("inf")

    def text(self, digits: int = 3) -> str:
        q1, q3 = self.iqr
        return (f"{self.median:.{digits}g} (IQR {q1:.{digits}g}-{q3:.{digits}g}, "
                f"range {min(self.values):.{digits}g}-{max(self.values):.{digits}g}, "
                f"n={len(self.values)})")


@dataclass
class Contender:
    """One way of doing the work: ``run()`` does ``work`` units (images, queries, ...)."""

    name: str
    run: Callable[[], object]
    work: float = 1.0
    unit: str = "item"


@dataclass
class Timings:
    """Per-round seconds of each contender, in the order they ran."""

    contenders: dict[str, Contender]
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def rate(self, name: str) -> Spread:
        """Units per second, per round."""
        work = self.contenders[name].work
        return Spread([work / s for s in self.seconds[name]])

    def time(self, name: str) -> Spread:
        return Spread(list(self.seconds[name]))

    def ratio(self, numerator: str, denominator: str) -> Spread:
        """Rate of ``numerator`` over rate of ``denominator``, per round (same rounds)."""
        a, b = self.rate(numerator).values, self.rate(denominator).values
        return Spread([x / y for x, y in zip(a, b, strict=True)])

    def print(self) -> None:
        width = max(len(n) for n in self.contenders)
        for name, contender in self.contenders.items():
            rate = self.rate(name)
            print(f"  {name:<{width}}  {rate.text()} {contender.unit}/s")
            warn_if_noisy(name, rate)


def compare(contenders: Sequence[Contender], rounds: int = 5, warmup: int = 1) -> Timings:
    """Run every contender ``warmup`` times untimed, then ``rounds`` interleaved timed
    rounds (each round runs every contender once, in the given order)."""
    named = {c.name: c for c in contenders}
    for _ in range(warmup):
        for contender in contenders:
            contender.run()
    timings = Timings(named, {c.name: [] for c in contenders})
    for _ in range(rounds):
        for contender in contenders:
            start = time.perf_counter()
            contender.run()
            timings.seconds[contender.name].append(time.perf_counter() - start)
    return timings


def warn_if_noisy(label: str, spread: Spread, limit: float = SPREAD_LIMIT) -> bool:
    """Print a loud warning when the IQR exceeds ``limit`` of the median; True if it did."""
    if len(spread.values) >= 2 and spread.relative_iqr > limit:
        print(f"  !!! WARNING: {label}: spread IQR/median = {spread.relative_iqr:.0%} > "
              f"{limit:.0%}: not a trustworthy figure (other load? rerun on a quiet machine)")
        return True
    return False


def report_target(label: str, value: float, relation: str, threshold: float,
                  spread: Spread | None = None) -> bool:
    """Print ``target: <label> <relation> <threshold>: met / NOT met (<figure>)``;
    ``relation`` is ``">="`` or ``"<="``. Returns whether it was met."""
    met = value >= threshold if relation == ">=" else value <= threshold
    figure = spread.text() if spread is not None else f"{value:.3g}"
    print(f"target: {label} {relation} {threshold:g}: {'met' if met else 'NOT met'} ({figure})")
    if spread is not None:
        warn_if_noisy(label, spread)
    return met


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Machine:
    """Prints the machine's state on entry and exit (load average, threads, versions) and
    warns when the 1-minute load average exceeds ``1 + threads``: something else runs."""

    def __init__(self, label: str = "") -> None:
        self.label = label

    @staticmethod
    def load() -> float:
        return os.getloadavg()[0]

    def __enter__(self) -> Machine:
        threads = torch.get_num_threads()
        print(f"== {self.label}".rstrip())
        print(f"torch {torch.__version__}, {threads} threads "
              f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
              f"MKL_NUM_THREADS={os.environ.get('MKL_NUM_THREADS', 'unset')}), "
              f"{os.cpu_count()} CPUs: {_cpu_name()}")
        self.start_load = os.getloadavg()
        print("load average at start: " + " ".join(f"{v:.2f}" for v in self.start_load))
        if self.start_load[0] > 1 + threads:
            print(f"!!! WARNING: 1-minute load average {self.start_load[0]:.2f} > 1 + {threads} "
                  "threads at start: other processes compete for the CPUs; figures below are "
                  "not trustworthy")
        return self

    def __exit__(self, *exc) -> None:
        end = os.getloadavg()
        print("load average at end: " + " ".join(f"{v:.2f}" for v in end))
