"""The `prepare` configuration: the demo generator's knobs or an ingest's."""

from __future__ import annotations

from dataclasses import dataclass

from fgvc.config import BOOL, FLOAT, INT, STR, Choice, Config, below_one, fraction, option, positive

DEMO = "demo"
SPLITS = ("train", "val", "test")
RESIZE_POLICIES = ("pad", "stretch", "center-crop")


@dataclass(frozen=True)
class DemoConfig:
    num_designers: int = 10
    train_per_class: int = 120
    val_per_class: int = 40
    height: int = 64  # tall, like the real person crops
    width: int = 48
    bg_correlation: float = 0.9
    num_venues: int | None = None  # default: one home venue per designer
    shard_size: int = 500
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.bg_correlation <= 1.0:
            raise ValueError(f"bg_correlation must be in [0, 1], got {self.bg_correlation}")
        if self.num_designers < 2:
            raise ValueError(f"num_designers must be at least 2, got {self.num_designers}")
        if self.height < 16 or self.width < 12:
            raise ValueError(f"image size {self.height}x{self.width} is too small (min 16x12)")

    @property
    def venues(self) -> int:
        return self.num_venues or self.num_designers


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
