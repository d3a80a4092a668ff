"""The `prepare` configuration: the demo generator's knobs or an ingest's."""

from __future__ import annotations

from dataclasses import dataclass

from fgvc.config import (BOOL, FLOAT, INT, STR, Choice, Config, Maybe, below_one, fraction, non_negative, option,
                         positive)
from fgvc.data.demo import DemoConfig
from fgvc.data.ingest import RESIZE_POLICIES
from fgvc.data.splits import DEFAULT_GROUP_PATTERN, SPLIT_RULES

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
                         "read by Id) or a CSV with a path or Id column.")
    out: str = option(STR, "predictions.csv", "Where to write the predictions (also logged as the run's artifact).")
    format: str = option(Choice(PREDICT_FORMATS), "csv", "csv: file, designer, probability, top-k; kaggle: "
                         "Id,Category (the designer).")
    top_k: int = option(INT, 5, "Designers listed per photo, most likely first.", check=positive)
    batch_size: int = option(INT, 64, "Photos per forward pass.", check=positive, identity=False)
