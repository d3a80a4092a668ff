"""The `prepare` configuration: the demo generator's knobs or an ingest's."""

from __future__ import annotations

from dataclasses import dataclass

from fgvc.config import BOOL, FLOAT, INT, STR, Choice, Config, below_one, fraction, option, positive
from fgvc.data.demo import DemoConfig
from fgvc.data.ingest import RESIZE_POLICIES

DEMO = "demo"
_DEMO = DemoConfig()


@dataclass(frozen=True)
class PrepareConfig(Config):
    source: str = option(STR, DEMO, "demo (synthetic runway data), a folder <designer>/*.jpg or a CSV path,label.")
    root: str = option(STR, "data/demo", "Dataset root to write.")
    num_designers: int = option(INT, _DEMO.num_designers, "Demo: number of designers (classes).", check=positive)
    train_per_class: int = option(INT, _DEMO.train_per_class, "Demo: training images per designer.",
                                  check=positive)
    val_per_class: int = option(INT, _DEMO.val_per_class, "Demo: validation images per designer.",
                                check=positive)
    height: int = option(INT, _DEMO.height, "Image height in pixels.", check=positive)
    width: int = option(INT, _DEMO.width, "Image width in pixels.", check=positive)
    bg_correlation: float = option(FLOAT, _DEMO.bg_correlation, "Demo: probability that an image is shot at its "
                                   "designer's home venue (the planted shortcut).", check=fraction)
    resize: str = option(Choice(RESIZE_POLICIES), "pad", "Ingest: how images are fitted to height x width.")
    val_fraction: float = option(FLOAT, 0.2, "Ingest: share of each designer's images for validation.",
                                 check=below_one)
    seed: int = option(INT, 0, "Demo: generator seed; ingest: split seed.")
    overwrite: bool = option(BOOL, False, "Rebuild an existing root (only the files prepare wrote are removed).")

    @property
    def is_demo(self) -> bool:
        return self.source == DEMO

    def demo(self) -> DemoConfig:
        return DemoConfig(num_designers=self.num_designers, train_per_class=self.train_per_class,
                          val_per_class=self.val_per_class, height=self.height, width=self.width,
                          bg_correlation=self.bg_correlation, seed=self.seed)
