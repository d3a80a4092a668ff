"""Pairing of study cells and their per-image numbers: a cell's masked twin, the regime pairs
compared, per-image values of two cells aligned on the same images (fgvc.study.tables builds
the comparisons from these), and how a value is written with its interval.

Per-image tables are keyed by the cell (``Cell.key``, a row's ``cell``), never by its training
run: cells with identical training pixels share one training (the masked cells of a
dose-response grid), but each has its own analysis records (the swap test of each runs on its
own strength's source images)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fgvc.analysis.stats import Interval
from fgvc.regimes import REGIMES

PerImage = Mapping[tuple, Mapping[str, Sequence]]  # (cell key, method) -> per-image columns
# Paired regime differences on the common source images, from the background-swap records:
# (row key, header, per-image column; bg_gap = Mixed-Same minus Mixed-Rand correctness).
DIFFERENCE_MEASURES = (("acc_source", "acc, source images", "correct_original"),
                       ("no_fg_acc", "No-FG acc", "correct_no_fg"),
                       ("bg_gap", "BG-gap", "bg_gap"),
                       # per Mixed-Rand swap whose backdrop is another designer's: 1 = names the backdrop's designer
                       ("backdrop_follow", "backdrop-follow", "backdrop_follow"))


def twin_regime(regime: str) -> str | None:
    """The masked twin of an unmasked regime: masked, with the same augmentation."""
    if regime not in REGIMES.names() or REGIMES.get(regime).masked:
        return None
    augment = REGIMES.get(regime).augment
    return next((name for name, r in REGIMES.items() if r.masked and r.augment == augment), None)


def regime_pairs(regimes: Sequence[str]) -> list[tuple[str, str]]:
    """``(first, second)`` pairs compared as ``first - second``: unmasked - masked (same
    augmentation) and +aug - plain (same masking), among ``regimes``."""
    known = [r for r in regimes if r in REGIMES.names()]
    pairs = []
    for a in known:
        for b in known:
            ra, rb = REGIMES.get(a), REGIMES.get(b)
            if (ra.augment == rb.augment and not ra.masked and rb.masked) or \
                    (ra.masked == rb.masked and ra.augment is not None and rb.augment is None):
                pairs.append((a, b))
    return pairs


def first_table(per_image: PerImage, cell: str, methods: Sequence[str]) -> Mapping | None:
    """The per-image table of the first of ``methods`` that ran for the cell ``cell`` (its
    key), else None."""
    return next((per_image[(cell, m)] for m in methods if (cell, m) in per_image), None)


# Per-image columns derived from others: (the columns they need, how)
DERIVED = {"bg_gap": ("correct_mixed_same", "correct_mixed_rand"),
           "backdrop_follow": ("follows_backdrop", "backdrop_label")}


def has_column(table: Mapping | None, name: str) -> bool:
    """Whether ``table`` holds ``name`` or what it is derived from."""
    if not table:
        return False
    return name in table or name in DERIVED and all(c in table for c in DERIVED[name])


def per_image_column(table: Mapping[str, Sequence], name: str) -> list[float]:
    """A per-image column of a record's table, as floats. Derived: ``bg_gap`` = Mixed-Same minus
    Mixed-Rand correctness; ``backdrop_follow`` = ``follows_backdrop`` on the Mixed-Rand swaps whose
    backdrop is another designer's, NaN on the others (a partner fallback with the image's own
    designer; the table's ``label`` says whose image it is, see :func:`with_labels`; without it
    every image counts)."""
    if name == "bg_gap":
        return [float(a) - float(b) for a, b in zip(table["correct_mixed_same"], table["correct_mixed_rand"],
                                                                  strict=True)]
    if name == "backdrop_follow":
        labels = table.get("label") or [math.nan] * len(table["follows_backdrop"])
        return [math.nan if float(backdrop) == float(label) else float(follows)
                for follows, backdrop, label in zip(table["follows_backdrop"], table["backdrop_label"], labels,
                                                            strict=True)]
    return [float(v) for v in table[name]]


def with_labels(table: Mapping[str, Sequence], designers: Sequence[str]) -> dict[str, Sequence]:
    """``table`` with a ``label`` column (the class index of each image's ``designer``, by
    ``designers``, index -> name; a name that is a number is that index), when it has designers
    and ``designers`` names them; else ``table`` as it is."""
    if "designer" not in table or "label" in table:
        return dict(table)
    index = {name: i for i, name in enumerate(designers)}

    def label(name) -> float:
        if str(name) in index:
            return float(index[str(name)])
        try:
            return float(int(float(name)))
        except (TypeError, ValueError):
            return math.nan

    labels = [label(name) for name in table["designer"]]
    return {**table, "label": labels} if all(math.isfinite(v) for v in labels) else dict(table)


def image_values(table: Mapping | None, name: str) -> tuple[list[int], list[float]]:
    """``(dataset_index, values)`` of ``name`` in ``table``, images with a finite value only
    (([], []) when the table or the column is missing)."""
    if not has_column(table, name):
        return [], []
    assert table is not None
    pairs = [(int(float(i)), v) for i, v in zip(table["dataset_index"], per_image_column(table, name), strict=True)
             if math.isfinite(v)]
    return [i for i, _ in pairs], [v for _, v in pairs]


def paired_images(first: Mapping | None, second: Mapping | None,
                  name: str) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Per-image values of ``name`` in two tables, aligned by ``dataset_index``: the images in
    both with finite values on both sides (in the first table's order) and the two value
    vectors (empty when a table or the column is missing)."""
    ids, first_values = image_values(first, name)
    b = dict(zip(*image_values(second, name), strict=True))
    pairs = [(i, x, b[i]) for i, x in zip(ids, first_values, strict=True) if i in b]
    if not pairs:
        return [], torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    return ([i for i, _, _ in pairs], torch.tensor([x for _, x, _ in pairs], dtype=torch.float64),
            torch.tensor([y for _, _, y in pairs], dtype=torch.float64))


def paired(first: Mapping | None, second: Mapping | None, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image values of ``name`` in two tables, aligned by ``dataset_index``; only images
    in both with finite values on both sides ([] when a table or the column is missing)."""
    _, x, y = paired_images(first, second, name)
    return x, y


def put_interval(row: dict, name: str, interval: Interval | None) -> None:
    nan = math.nan
    row[name], row[f"{name}_low"], row[f"{name}_high"] = \
        (interval.estimate, interval.low, interval.high) if interval else (nan, nan, nan)


def fmt(value, digits: int = 3, sign: bool = False) -> str:
    """A number as the tables write it (``sign``: a difference, with + or −); – for NaN."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "–" if not math.isfinite(value) else f"{value:{'+' if sign else ''}.{digits}f}"


def interval_text(row: Mapping, name: str, sign: bool = False) -> str:
    """``row[name]`` with its 95% interval ``[low, high]`` when the row has one."""
    low, high = row.get(f"{name}_low"), row.get(f"{name}_high")
    value = row.get(name, row.get(f"{name}_mean"))
    if low is None or high is None or not all(math.isfinite(float(x)) for x in (low, high)):
        return fmt(value, sign=sign)
    return f"{fmt(value, sign=sign)} [{fmt(low, sign=sign)}, {fmt(high, sign=sign)}]"


def shared_axes(row: Mapping) -> tuple:
    """What a cell shares with the cells it is compared with: architecture, seed, shortcut
    strength and split (a twin or a regime pair is always on the same images)."""
    return row["arch"], row["seed"], row.get("bg_correlation"), row.get("split_by")
