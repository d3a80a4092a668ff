"""The masking configuration: source, destination, segmenter and its settings."""

from __future__ import annotations

from dataclasses import dataclass

from fgvc.catalog import SEGMENTERS
from fgvc.config import BOOL, FLOAT, INT, STR, Choice, Config, ListOf, Maybe, fraction, option, positive
from fgvc.data.config import SPLITS

DEFAULT_MIN_PERSON_RATIO = 0.005
DEFAULT_SEG_SIZE = 520  # torchvision's DeepLabV3 evaluation size (shorter side)


@dataclass(frozen=True)
class MaskConfig(Config):
    src_root: str = option(STR, "data/demo", "Dataset root to mask (only read).")
    dst_root: str = option(STR, "data/demo-masked", "Dataset root to write (same shard layout); must lie "
                           "outside --src-root.")
    segmenter: str = option(Choice(SEGMENTERS.names), "deeplabv3_resnet101",
                            "Person segmenter; groundtruth uses the masks stored in the source (demo data).")
    seg_weights: str | None = option(Maybe(STR, "none"), None,
                                     "Segmenter weights file; none: the standard weights (torch hub cache, "
                                     "downloaded when missing); random: randomly initialised (tests).")
    min_person_ratio: float = option(FLOAT, DEFAULT_MIN_PERSON_RATIO,
                                     "Below this share of person pixels the image is kept unmasked (a "
                                     "fallback).", check=fraction)
    seg_size: int = option(INT, DEFAULT_SEG_SIZE, "Shorter side of the segmenter input (pixels).", check=positive)
    batch_size: int = option(INT, 16, "Images per segmenter forward pass.", check=positive, identity=False)
    splits: tuple[str, ...] | None = option(Maybe(ListOf(Choice(SPLITS)), "all"), None,
                                            "Splits to mask (all: every split of the source).")
    device: str | None = option(Maybe(STR), None, "auto | cpu | cuda | cuda:N.", identity=False)
    workers: int = option(INT, 1, "Processes on this machine (>1: relaunches under torchrun; shards are "
                          "dealt out).", check=positive, identity=False)
    overwrite: bool = option(BOOL, False, "Replace a complete destination (only the files mask wrote).",
                             identity=False)
