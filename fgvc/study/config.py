"""The background-reliance study: its typed config, its presets and its grid of cells.

A cell is one architecture trained on one data regime with one seed (and, on the demo data,
optionally one strength of the planted background shortcut: the dose-response axis).
`StudyConfig` holds what the user said (None = the preset's value); `plan()` resolves it into
a `StudyPlan` of concrete values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fgvc import mlflow_names
from fgvc.catalog import SEGMENTERS, arch_problem
from fgvc.config import (
    FLOAT,
    INT,
    STR,
    Choice,
    Config,
    FlagOr,
    ListOf,
    Maybe,
    each,
    fraction,
    non_negative,
    option,
    positive,
)
from fgvc.data.config import DemoConfig
from fgvc.errors import ConfigError
from fgvc.regimes import REGIMES, Regime
from fgvc.study.executors import gpus_per_cell

EXPERIMENT = mlflow_names.STUDY
EXECUTORS = ("local", "ray")
SPLIT_AXIS = ("random", "show")  # the leaky split first: the show leak is random minus show

# Each preset's demo holds a test split: the best epoch is chosen on val, the study reports on
# test (fgvc.study.tables.report_split), so no reported number comes from the images that chose it.
PRESETS: dict[str, dict] = {
    # A few minutes on a 2-core CPU: one small network, every regime, one seed, a small demo.
    # Wide 48x64 frames keep columns of backdrop beside the figure at every stage.
    "quick": dict(archs=("fn-small",), regimes=REGIMES.names(), seeds=(0,), epochs=5, batch_size=16,
                  num_images=24, occlusion_window=16, occlusion_stride=16,
                  demo=DemoConfig(num_designers=6, train_per_class=30, val_per_class=10, test_per_class=10, height=48,
                                  width=64)),
    # The study of the design: every standard network, three seeds, the default demo with a test split.
    "full": dict(archs=("resnet18", "resnet34", "fn-small", "fn-medium"), regimes=REGIMES.names(),
                 seeds=(0, 1, 2), epochs=8, batch_size=64, num_images=64, occlusion_window=None,
                 occlusion_stride=None, demo=DemoConfig(test_per_class=40)),
}


def _archs(values) -> str | None:
    for arch in values or ():
        problem = arch_problem(arch)
        if problem:
            return problem
    return None


def _distinct(values) -> str | None:
    if values is not None and len(set(values)) != len(values):
        return f"lists a value twice: {list(values)}"
    return None


def _known(what: str, allowed) -> Callable[[Any], str | None]:
    """A check: every value in ``allowed()``, none twice."""
    def check(values) -> str | None:
        unknown = [v for v in values or () if v not in allowed()]
        if unknown:
            return f"unknown {what}(s) {', '.join(map(repr, unknown))}; choose from {', '.join(allowed())}"
        return _distinct(values)
    return check


_regimes = _known("regime", REGIMES.names)
_splits = _known("split rule", lambda: SPLIT_AXIS)


@dataclass(frozen=True)
class StudyConfig(Config):
    preset: str = option(Choice(PRESETS), "quick",
                         "quick: fn-small, 4 regimes, 1 seed, small demo (minutes on a CPU); full: resnet18,resnet34,"
                         "fn-small,fn-medium x 4 regimes x 3 seeds, default demo; both with a test split.")
    archs: tuple[str, ...] | None = option(Maybe(ListOf(STR)), None, "Comma list of architectures.", check=_archs)
    regimes: tuple[str, ...] | None = option(Maybe(ListOf(Choice(REGIMES.names))), None,
                                             "Comma list of regimes (unmasked, masked, unmasked+aug, masked+aug).",
                                             check=_regimes)
    seeds: tuple[int, ...] | None = option(Maybe(ListOf(INT)), None, "Comma list of seeds, e.g. 0,1,2.",
                                           check=_distinct)
    epochs: int | None = option(Maybe(INT), None, "Training epochs per cell.", check=positive)
    batch_size: int | None = option(Maybe(INT), None, "Batch size per cell.", check=positive)
    lr_head: float = option(FLOAT, 1e-3, "Learning rate of the classifier head.", check=positive)
    pretrained: bool | str | None = option(Maybe(FlagOr(STR, "path")), None, "auto | true | false, for every cell.")
    data_root: str | None = option(Maybe(STR), None, "Source dataset root (auto: the preset's demo data, generated "
                                   "when missing).")
    masked_root: str | None = option(Maybe(STR), None, "Background-removed root (auto: <data-root>-masked; built "
                                     "when missing).")
    segmenter: str | None = option(Maybe(Choice(SEGMENTERS.names)), None,
                                   "For building the masked root (auto: groundtruth when the source has person "
                                   "masks, as the demo data does; else deeplabv3_resnet101).")
    num_designers: int | None = option(Maybe(INT), None, "Demo data: designers (classes).", check=positive)
    train_per_class: int | None = option(Maybe(INT), None, "Demo data: training images per designer.",
                                         check=positive)
    val_per_class: int | None = option(Maybe(INT), None, "Demo data: validation images per designer.",
                                       check=positive)
    test_per_class: int | None = option(Maybe(INT), None, "Demo data: test images per designer, the split the "
                                        "study reports on (0: no test split, the numbers then come from val, which "
                                        "chose the best epoch).", check=non_negative)
    height: int | None = option(Maybe(INT), None, "Demo data: image height.", check=positive)
    width: int | None = option(Maybe(INT), None, "Demo data: image width.", check=positive)
    bg_correlation: float | None = option(Maybe(FLOAT), None, "Demo data: strength of the planted background "
                                          "shortcut.", check=fraction)
    bg_correlations: tuple[float, ...] | None = option(
        Maybe(ListOf(FLOAT), "none"), None, "Demo data: a grid axis of shortcut strengths (e.g. 0,0.5,0.9,1.0), one "
        "demo root per value: the dose-response curve.", check=each(fraction))
    splits: tuple[str, ...] | None = option(
        Maybe(ListOf(Choice(SPLIT_AXIS)), "none"), None, "A grid axis of splits of the same images: random,show trains "
        "every cell on both (the root dealt again by show and at random) and reports the show leak, random minus "
        "show, with intervals (none: the root as it is split).", check=_splits)
    num_images: int | None = option(Maybe(INT), None, "Validation images per analysis (the same for every cell).",
                                    check=positive)
    occlusion_window: int | None = option(Maybe(INT), None, "auto: a third of the shorter image side.",
                                          check=positive)
    occlusion_stride: int | None = option(Maybe(INT), None, "auto: half the window.", check=positive)
    device: str | None = option(Maybe(STR), None, "auto | cpu | cuda | cuda:N.", identity=False)
    num_workers: int | None = option(Maybe(INT), None, "Loader threads per training (auto: the fastest here).",
                                     identity=False)
    registered_model: str | None = option(Maybe(STR), None, "Registry name for every cell (auto: fgvc-study-<arch>, "
                                          "apart from your own trainings; cells move no alias).",
                                          identity=False)
    executor: str = option(Choice(EXECUTORS), "local", "Where cells run: local (in this process, one after "
                           "another) or ray (one Ray task per cell, on a Ray cluster or on this machine).",
                           identity=False)
    ray_address: str | None = option(Maybe(STR, "none"), None, "--executor ray: the cluster to use (auto: the one "
                                     "this machine belongs to; HOST:PORT; none: start Ray on this machine).",
                                     identity=False)
    gpus_per_cell: float | None = option(
        Maybe(FLOAT), None, "--executor ray: GPUs each cell reserves (auto: 1 when the Ray cluster has GPUs and "
        "--device is auto, cuda or cuda:N, else 0; a fraction such as 0.5 shares a GPU; --device cpu: 0).",
        check=non_negative, identity=False)
    cpus_per_cell: float = option(FLOAT, 1.0, "--executor ray: CPUs each cell reserves (its torch threads).",
                                  check=positive, identity=False)

    def plan(self, experiment: str = EXPERIMENT) -> StudyPlan:
        preset = PRESETS[self.preset]
        pick = lambda name: getattr(self, name) if getattr(self, name) is not None else preset[name]  # noqa: E731
        demo = preset["demo"]
        overrides = {k: getattr(self, k) for k in ("num_designers", "train_per_class", "val_per_class",
                                                   "test_per_class", "height", "width", "bg_correlation")
                     if getattr(self, k) is not None}
        if overrides:
            try:
                demo = dataclasses.replace(demo, **overrides)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.gpus_per_cell is not None:
            gpus_per_cell(self.gpus_per_cell, self.device, {})  # GPUs for a cell on the CPU: refused before any run
        if self.bg_correlations is not None and self.data_root is not None:
            raise ConfigError("--bg-correlations varies the demo data's planted shortcut; it cannot be combined "
                              "with --data-root")
        return StudyPlan(self.preset, tuple(pick("archs")), tuple(pick("regimes")), tuple(pick("seeds")),
                         pick("epochs"), pick("batch_size"), self.lr_head, self.pretrained, self.data_root,
                         self.masked_root, self.segmenter, demo, self.bg_correlations or (None,),
                         self.splits or (None,),
                         pick("num_images"), pick("occlusion_window"), pick("occlusion_stride"), self.device,
                         self.num_workers, self.registered_model, experiment)


@dataclass(frozen=True)
class Cell:
    arch: str
    regime: str
    seed: int
    bg_correlation: float | None = None  # the dose-response axis (demo data), None: not varied
    split: str | None = None  # the split axis (random | show), None: the root as it is split

    @property
    def spec(self) -> Regime:
        return REGIMES.get(self.regime)

    @property
    def data(self) -> tuple[float | None, str | None]:
        """Which roots the cell trains on: its shortcut strength and split."""
        return self.bg_correlation, self.split

    @property
    def key(self) -> str:
        dose = f"/bg{self.bg_correlation:g}" if self.bg_correlation is not None else ""
        split = f"/{self.split}-split" if self.split is not None else ""
        return f"{self.arch}/{self.regime}/seed{self.seed}{dose}{split}"

    @property
    def run_name(self) -> str:
        dose = f"-bg{self.bg_correlation:g}" if self.bg_correlation is not None else ""
        split = f"-{self.split}-split" if self.split is not None else ""
        return f"{self.arch.replace('timm:', '')}-{self.regime}-s{self.seed}{dose}{split}"


@dataclass(frozen=True)
class StudyPlan:
    """A study with every value resolved."""

    preset: str
    archs: tuple[str, ...]
    regimes: tuple[str, ...]
    seeds: tuple[int, ...]
    epochs: int
    batch_size: int
    lr_head: float
    pretrained: bool | str | None
    data_root: str | None  # None: the demo data
    masked_root: str | None
    segmenter: str | None
    demo: DemoConfig
    bg_correlations: tuple[float | None, ...]
    splits: tuple[str | None, ...]
    num_images: int
    occlusion_window: int | None
    occlusion_stride: int | None
    device: str | None
    num_workers: int | None
    registered_model: str | None
    experiment: str

    def cells(self) -> list[Cell]:
        """The grid in a fixed order: shortcut strength, split, architecture, regime, seed."""
        return [Cell(a, r, s, b, split) for b in self.bg_correlations for split in self.splits for a in self.archs
                for r in self.regimes for s in self.seeds]

    def data(self) -> list[tuple[float | None, str | None]]:
        """Every (shortcut strength, split) the grid trains on: one source root each."""
        return [(b, split) for b in self.bg_correlations for split in self.splits]

    def demo_for(self, bg_correlation: float | None, split: str | None = None) -> DemoConfig:
        demo = self.demo if bg_correlation is None else dataclasses.replace(self.demo, bg_correlation=bg_correlation)
        return demo if split is None else dataclasses.replace(demo, split_by=split)
