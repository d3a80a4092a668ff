"""The `prepare` configuration: the demo generator's knobs or an ingest's."""

from __future__ import annotations

from dataclasses import dataclass

from fgvc.config import (
    BOOL,
    FLOAT,
    INT,
    STR,
    Choice,
    Config,
    Maybe,
    below_one,
    fraction,
    non_negative,
    option,
    positive,
)
from fgvc.data.splits import DEFAULT_GROUP_PATTERN, SPLIT_RULES

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
    test_per_class: int = 0  # a held-out test split when > 0
    looks_per_show: int = 8  # 1: every look is its own show
    collection_spread: float = 0.0  # how far a show's collection departs from the signature, 0..1
    split_by: str = "show"  # "show" (whole shows per split) or "random" (looks dealt at random)

    def __post_init__(self):
        if not 0.0 <= self.bg_correlation <= 1.0:
            raise ValueError(f"bg_correlation must be in [0, 1], got {self.bg_correlation}")
        if self.num_designers < 2:
            raise ValueError(f"num_designers must be at least 2, got {self.num_designers}")
        if self.height < 16 or self.width < 12:
            raise ValueError(f"image size {self.height}x{self.width} is too small (min 16x12)")
        if self.looks_per_show < 1:
            raise ValueError(f"looks_per_show must be at least 1, got {self.looks_per_show}")
        if not 0.0 <= self.collection_spread <= 1.0:
            raise ValueError(f"collection_spread must be in [0, 1], got {self.collection_spread}")
        if self.split_by not in ("show", "random"):
            raise ValueError(f"split_by must be show or random, got {self.split_by!r}")
        if self.test_per_class < 0:
            raise ValueError(f"test_per_class must be >= 0, got {self.test_per_class}")

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", "val", "test") if self.test_per_class else ("train", "val")

    def per_class(self, split: str) -> int:
        return {"train": self.train_per_class, "val": self.val_per_class, "test": self.test_per_class}[split]

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
    test_fraction: float = option(FLOAT, 0.0, "Ingest: share of each designer's images for a held-out test "
                                  "split (kept whole by show like val); 0: none.", check=below_one)
    test_per_class: int = option(INT, _DEMO.test_per_class, "Demo: test images per designer (0: no test split).",
                                 check=non_negative)
    split_by: str = option(Choice(SPLIT_RULES), "auto", "show: whole runway shows per split (no show in two "
                           "splits); random: images dealt at random; auto: show when most files carry a show "
                           "code (the demo always has shows).")
    group_pattern: str = option(STR, DEFAULT_GROUP_PATTERN, "Ingest: regular expression over the file name whose "
                                "capture groups are the show (default: iDesigner season codes such as SS11, "
                                "HCFW10; _HC_ later in the name marks couture). A CSV's group column wins.")
    looks_per_show: int = option(INT, _DEMO.looks_per_show, "Demo: looks per runway show (1: every look its "
                                 "own show).", check=positive)
    collection_spread: float = option(FLOAT, _DEMO.collection_spread, "Demo: how far each show's collection "
                                      "departs from the designer's signature (0: not at all, 1: anything).",
                                      check=fraction)
    unlabelled_test: str | None = option(Maybe(STR, "none"), None, "Ingest: a Kaggle test folder (numbered "
                                         "photos and sample.csv with a column Id), kept in the root beside the "
                                         "splits, unlabelled, keyed by Id; `fgvc predict --source ROOT` predicts it.")
    check: str | None = option(Maybe(STR, "none"), None, "Only check the dataset root given here: does any "
                               "show (group) span two splits? Builds nothing.", identity=False)
    seed: int = option(INT, 0, "Demo: generator seed; ingest: split seed.")
    overwrite: bool = option(BOOL, False, "Rebuild an existing root (only the files prepare wrote are removed).")

    @property
    def is_demo(self) -> bool:
        return self.source == DEMO

    def demo(self) -> DemoConfig:
        return DemoConfig(num_designers=self.num_designers, train_per_class=self.train_per_class,
                          val_per_class=self.val_per_class, height=self.height, width=self.width,
                          bg_correlation=self.bg_correlation, seed=self.seed, test_per_class=self.test_per_class,
                          looks_per_show=self.looks_per_show, collection_spread=self.collection_spread,
                          split_by="random" if self.split_by == "random" else "show")


PREDICT_FORMATS = ("csv", "kaggle")


@dataclass(frozen=True)
class PredictConfig(Config):
    model: str = option(STR, "models:/fgvc-resnet18@champion",
                        "models:/<name>@<alias>, models:/<name>/<version> or <name>@<alias>.")
    source: str = option(STR, "photos", "A folder of photos (any layout; a Kaggle test folder with sample.csv is "
                         "read by Id), a CSV with a path or Id column, or a dataset root prepared with "
                         "--unlabelled-test (its test set, by Id).")
    out: str = option(STR, "predictions.csv", "Where to write the predictions (also logged as the run's artifact).")
    format: str = option(Choice(PREDICT_FORMATS), "csv", "csv: file, designer, probability, top-k; kaggle: "
                         "Id,Category (the designer) for every Id listed, an unreadable photo given the most "
                         "frequent training designer and listed in <out name>.unreadable.csv.")
    top_k: int = option(INT, 5, "Designers listed per photo, most likely first.", check=positive)
    batch_size: int = option(INT, 64, "Photos per forward pass.", check=positive, identity=False)
