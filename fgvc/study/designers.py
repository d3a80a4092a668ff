"""The background-swap test per designer, for every cell of a study: which designers' backdrops
the model reads, from the swap records' per-image tables (fgvc.analysis.methods.background_swap).

Per cell and designer ``d`` (the same numbers as the record's own ``per_designer.csv``,
fgvc.analysis.shortcut.per_designer): ``images`` (analysed images of ``d``), ``acc_original`` and
``acc_no_fg`` (accuracy on them, and on their backdrop alone), ``backdrop_swaps`` (Mixed-Rand
images whose backdrop came from an image of ``d`` and whose person is another designer's) and
``backdrop_follow`` (the share of those predicted as ``d``). A share over no images is NaN. With
a few images per designer these shares are coarse: each row says how many images it rests on.

The No-FG confusion of a cell (:func:`no_fg_confusions`): row = the designer whose backdrop a
No-FG image shows, column = the designer predicted from it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fgvc.analysis.shortcut import no_fg_confusion
from fgvc.study.pairing import PerImage

# The per-image columns of a swap record these need.
NEEDED = ("designer", "label", "correct_original", "correct_no_fg", "backdrop_label", "predicted_mixed_rand",
          "predicted_no_fg")
# (row key, header) of the per-designer measures, as study/per_designer.csv and the figures name them
MEASURES = (("acc_no_fg", "No-FG accuracy (the designer's backdrop alone)"),
            ("backdrop_follow", "backdrop-follow (the designer's backdrop under another's person)"))


def _share(hits: int, total: int) -> float:
    return hits / total if total else math.nan


def designer_rows(table: Mapping[str, Sequence], designers: Sequence[str]) -> list[dict]:
    """One record per designer (class index order) from one swap record's per-image table with a
    ``label`` column (fgvc.study.pairing.with_labels); [] when a column is missing."""
    if not table or not all(c in table for c in NEEDED):
        return []
    labels = [int(float(v)) for v in table["label"]]
    backdrop = [int(float(v)) for v in table["backdrop_label"]]
    follows = [int(float(v)) for v in table["predicted_mixed_rand"]]
    out = []
    for index, name in enumerate(designers):
        mine = [i for i, label in enumerate(labels) if label == index]
        swaps = [i for i, (b, label) in enumerate(zip(backdrop, labels, strict=True)) if b == index and label != index]
        out.append({"designer": name, "label": index, "images": len(mine),
                    "acc_original": _share(sum(float(table["correct_original"][i]) == 1 for i in mine), len(mine)),
                    "acc_no_fg": _share(sum(float(table["correct_no_fg"][i]) == 1 for i in mine), len(mine)),
                    "backdrop_follow": _share(sum(follows[i] == index for i in swaps), len(swaps)),
                    "backdrop_swaps": len(swaps)})
    return out


def per_designer(rows: Sequence[Mapping], per_image: PerImage, designers: Mapping[str, Sequence[str]]) -> list[dict]:
    """study/per_designer.csv: a row per cell (grid order) and designer, with the cell's keys
    (architecture, regime, strength, split, seed, cell, run name) and its masked twin's run name;
    cells whose swap record has no per-designer columns have no rows. ``designers``: cell key ->
    the class names (index order)."""
    out = []
    for row in rows:
        names = designers.get(row["cell"], ())
        keys = {k: row.get(k) for k in ("arch", "regime", "bg_correlation", "split_by", "seed", "cell", "run_name")}
        for entry in designer_rows(per_image.get((row["cell"], "shortcut"), {}), names):
            out.append({**keys, "twin": row.get("twin", ""), **entry})
    return out


def no_fg_confusions(rows: Sequence[Mapping], per_image: PerImage,
                     designers: Mapping[str, Sequence[str]]) -> dict[str, list[list[int]]]:
    """Cell key -> its No-FG confusion counts ``[C, C]`` (row: the backdrop's designer, column:
    predicted), for every cell whose swap record has the columns."""
    out = {}
    for row in rows:
        table = per_image.get((row["cell"], "shortcut"), {})
        names = designers.get(row["cell"], ())
        if not names or not table or not all(c in table for c in ("label", "predicted_no_fg")):
            continue
        labels = torch.tensor([int(float(v)) for v in table["label"]], dtype=torch.long)
        predicted = torch.tensor([int(float(v)) for v in table["predicted_no_fg"]], dtype=torch.long)
        out[row["cell"]] = no_fg_confusion(labels, predicted, len(names)).tolist()
    return out
