"""The study's numbers: one row per cell, a summary across seeds, and a verdict per cell.

Columns come from two places: the training run (best-epoch validation accuracy) and every
registered analysis method's ``columns`` (fgvc.analysis.methods), so a new method appears in
the table without an edit here. Values computed with a bootstrap over images carry
``<column>_low`` / ``<column>_high`` (95%).

The verdict, per cell, from the background-swap test (it intervenes on the input, so it
measures use rather than attention):

- **reads the runway**: the No-FG accuracy's interval lies above chance (the backdrop alone
  predicts the designer) and BG-gap's interval lies above 0 (a backdrop of the right designer
  helps a pasted person);
- **reads the garment**: the Only-FG accuracy's interval lies above chance (the person alone
  suffices), and neither No-FG's interval lies above chance nor BG-gap's above 0;
- **undecided**: anything else (e.g. intervals too wide for the number of images);
- **no verdict (did not learn)**: the quality gate (:func:`quality`) failed: a model that is
  not clearly better than chance has no reliance to measure;
- **no verdict (no data)**: the gate could not be read (the cell's per-image accuracy is
  missing, e.g. a record's per_image.csv could not be read): its quality is "undecided (no
  data)", never "learned".

Rows carry the cell's key (``cell``, ``Cell.key``) beside its training run (``run_id``); cells
with identical training pixels share a run, so the per-image tables the comparisons read are
keyed by the cell (fgvc.study.pairing).

Reported numbers come from the root's ``test`` split when it has one (the best epoch is chosen
on ``val``), else from ``val``, and every row says which (``split``). Attribution is read
against the masked twin (:func:`add_comparisons`): the same architecture, seed and strength
trained on background-removed images, on the same images, with a paired bootstrap interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fgvc.analysis.methods import study_columns
from fgvc.analysis.stats import Interval, align_on_images, bootstrap_mean, hierarchical_bootstrap, seed_interval
from fgvc.data.shards import splits_of
from fgvc.study.pairing import (
    DIFFERENCE_MEASURES,
    PerImage,
    first_table,
    fmt,
    image_values,
    interval_text,
    paired,
    paired_images,
    put_interval,
    regime_pairs,
    shared_axes,
    twin_regime,
)

RUNWAY, GARMENT, UNDECIDED = "reads the runway", "reads the garment", "undecided"
NO_VERDICT, NO_DATA_VERDICT = "no verdict (did not learn)", "no verdict (no data)"
LEARNED, DID_NOT_LEARN, NO_DATA = "learned", "did not learn", "undecided (no data)"
# The quality gate: a cell learned when the lower end of its accuracy's 95% interval exceeds
# QUALITY_FACTOR x chance. Why 1.5: the swap tests read drops from the model's accuracy down
# towards chance; below 1.5 x chance the whole room for such a drop is under half of chance
# (e.g. under 0.1 with 5 designers), narrower than the 95% interval of an accuracy over the
# study's 20-64 images (half-width 0.1-0.2), so no drop could be told from noise.
QUALITY_FACTOR = 1.5
ATTRIBUTION = ("gradcam", "occlusion")  # methods whose maps have a background preference
# Occlusion fill in a study: the image's mean colour. The excess over the masked twin compares
# a network on its images with its twin on the twin's (background-removed) images; with a zero
# (black) fill, a window over the twin's black background changes nothing, so the twin scores no
# background attribution by construction and the excess is inflated even with no shortcut (on
# the science test's demo at planted strength 0: +0.25 [0.19, 0.30] with zero fill, +0.07
# [-0.02, 0.17] with the mean fill; at strength 1: +0.40 and +0.33, both intervals above 0).
STUDY_OCCLUSION_FILL = "mean"
# The swap test's Mixed-Rand reading: how often the model names the backdrop's designer
# (fgvc.analysis.shortcut.backdrop_follow_scores); chance is 1/C.
BACKDROP_FOLLOW = "backdrop_follow"


def report_split(root) -> str:
    """The split whose images give the reported numbers: ``test`` when the root has one."""
    return "test" if "test" in splits_of(root) else "val"


# The tables' column groups (a wide table is shown as one table per group): what they hold
GROUPS = {"train": "accuracy", "computed": "accuracy", "shortcut": "swap test", "gradcam": "attribution",
          "occlusion": "attribution", "sanity": "attribution", "neighbors": "retrieval"}


@dataclass(frozen=True)
class TableColumn:
    name: str
    header: str
    what: str
    interval: bool
    source: str  # "train:<metric>", "<method>:<metric>" or "computed"
    group: str = ""  # the group it is shown in (GROUPS): accuracy, swap test, attribution, retrieval


def columns(split: str = "val") -> list[TableColumn]:
    """The table's measured columns; ``split`` (test or val) labels the reported numbers.
    ``computed`` columns come from :func:`add_comparisons`, not from a run's metrics."""
    out = [TableColumn("val_acc", "val acc (best epoch)", "validation accuracy at the best epoch (metric "
                       "best/val_acc) on the regime's own images: the selection criterion, optimistic", False,
                       "train:best/val_acc", "accuracy"),
           TableColumn("val_balanced_acc", "val bal. acc", "mean per-designer validation accuracy at the best epoch "
                       "(best/val_balanced_acc)", False, "train:best/val_balanced_acc", "accuracy"),
           TableColumn("acc", f"{split} acc, own images", f"accuracy on the analysed {split} images of the regime's "
                       f"own data (masked cells on masked images); the quality gate reads it; interval: bootstrap "
                       f"over the images", True, "computed", "accuracy"),
           TableColumn("acc_source", f"{split} acc, source images", f"accuracy on the same source {split} images "
                       f"for every cell (shortcut/acc_original): comparable across regimes", True,
                       "shortcut:acc_original", "accuracy")]
    for name, (method, column) in study_columns().items():
        group = GROUPS.get(method, "attribution")
        if method in ATTRIBUTION and name == f"{method}_bg_preference":
            out.append(TableColumn(f"{method}_excess", f"{method} excess vs masked twin",
                                   f"{method}: background preference minus its masked twin's on the same images "
                                   f"(> 0 = more on the background than a network that cannot use it); interval: "
                                   f"paired bootstrap over the images", True, "computed", group))
        header, what = column.header, column.what
        if method in ATTRIBUTION and name == f"{method}_bg_preference":  # raw: its reference is the twin, not 1
            header, what = f"{method} bg pref. (raw)", (
                f"{method}: share of attribution on the background / the background's share of the image, mean "
                f"over images; raw: read it against the masked twin's (the excess), not against 1")
        out.append(TableColumn(name, header, what, column.interval, f"{method}:{column.metric}", group))
        if name == BACKDROP_FOLLOW:
            out += [TableColumn(f"{name}_twin", "masked twin's backdrop-follow",
                                "the masked twin's backdrop-follow rate on the same source images (its own record)",
                                True, "computed", group),
                    TableColumn(f"{name}_vs_twin", "backdrop-follow − masked twin's",
                                "backdrop-follow rate minus the masked twin's, per swap on the same source images "
                                "(> 0 = follows the backdrop more often than a network that cannot use it); "
                                "interval: paired bootstrap over the swaps", True, "computed", group)]
    return out


def cell_values(train_metrics: Mapping[str, float], analyses: Mapping[str, Mapping[str, float]]) -> dict:
    """A row's measured values: every column (and its interval) from the training run's
    metrics and the analysis records' metrics; NaN where a method did not run."""
    row = {}
    for column in columns():
        if column.source == "computed":
            row.update({column.name: math.nan, f"{column.name}_low": math.nan, f"{column.name}_high": math.nan})
            continue
        where, metric = column.source.split(":", 1)
        source = train_metrics if where == "train" else analyses.get(where, {})
        row[column.name] = float(source.get(metric, math.nan))
        if column.interval:
            row[f"{column.name}_low"] = float(source.get(f"{metric}_low", math.nan))
            row[f"{column.name}_high"] = float(source.get(f"{metric}_high", math.nan))
    return row


def quality(row: Mapping[str, float], chance: float) -> str:
    """``learned`` when the accuracy's interval (``acc_low``, the reported split) lies above
    QUALITY_FACTOR x chance, ``did not learn`` when it does not, ``undecided (no data)`` when
    there is no accuracy to read (NaN): missing data is never a model that learned."""
    low = float(row.get("acc_low", math.nan))
    if not math.isfinite(low):
        return NO_DATA
    return DID_NOT_LEARN if low <= QUALITY_FACTOR * chance else LEARNED


def verdict(row: Mapping[str, float], chance: float) -> str:
    """The rules in this module's docstring; NaN anywhere needed -> undecided."""
    if row.get("quality") == DID_NOT_LEARN:
        return NO_VERDICT
    if row.get("quality") == NO_DATA:
        return NO_DATA_VERDICT
    get = lambda key: float(row.get(key, math.nan))  # noqa: E731
    no_fg_low, gap_low, only_fg_low = get("no_fg_acc_low"), get("bg_gap_low"), get("only_fg_acc_low")
    if any(math.isnan(v) for v in (no_fg_low, gap_low, only_fg_low)):
        return UNDECIDED
    if no_fg_low > chance and gap_low > 0:
        return RUNWAY
    if only_fg_low > chance and no_fg_low <= chance and gap_low <= 0:
        return GARMENT
    return UNDECIDED


def verdict_reason(row: Mapping[str, float], chance: float) -> str:
    f = lambda key: interval_text(row, key)  # noqa: E731
    if row.get("quality") == DID_NOT_LEARN:
        return (f"{row.get('split', 'val')} accuracy {f('acc')} does not clear {QUALITY_FACTOR:g} x chance "
                f"({QUALITY_FACTOR * chance:.3f})")
    if row.get("quality") == NO_DATA:
        return (f"no per-image {row.get('split', 'val')} accuracy (the attribution records' per_image.csv could not "
                f"be read), so the quality gate cannot be read: not a verdict of reliance")
    return (f"No-FG {f('no_fg_acc')} vs chance {chance:.3f}; BG-gap {f('bg_gap')}; Only-FG {f('only_fg_acc')}"
            + backdrop_follow_reason(row, chance))


def backdrop_follow_reason(row: Mapping, chance: float) -> str:
    """The backdrop-follow part of a verdict's reason: the rate beside chance and, with a masked
    twin, beside the twin's with the paired difference ("" when the cell has no rate)."""
    if not math.isfinite(float(row.get(BACKDROP_FOLLOW, math.nan))):
        return ""
    text = f"; backdrop-follow {interval_text(row, BACKDROP_FOLLOW)} vs chance {chance:.3f}"
    if math.isfinite(float(row.get(f"{BACKDROP_FOLLOW}_twin", math.nan))):
        text += (f", masked twin {fmt(row[f'{BACKDROP_FOLLOW}_twin'])} (difference "
                 f"{interval_text(row, f'{BACKDROP_FOLLOW}_vs_twin', sign=True)}, paired)")
    return text


INSTRUMENTS_DISAGREE = "instruments disagree"
NO_DISAGREEMENT = "no disagreement"


def instruments(row: Mapping) -> str:
    """Whether the swap test's verdict and the attribution excess over the masked twin point
    opposite ways: ``instruments disagree (<methods>)`` where the verdict reads the runway while
    a method's excess interval lies below 0, or reads the garment while one lies above 0;
    ``no disagreement`` where the cell has an excess interval and none is opposite; "" where
    there is nothing to compare (no twin, no excess, or a verdict other than runway or garment)."""
    verdict_now = row.get("verdict")
    lows = {m: float(row.get(f"{m}_excess_low", math.nan)) for m in ATTRIBUTION}
    highs = {m: float(row.get(f"{m}_excess_high", math.nan)) for m in ATTRIBUTION}
    measured = [m for m in ATTRIBUTION if math.isfinite(lows[m]) and math.isfinite(highs[m])]
    if verdict_now not in (RUNWAY, GARMENT) or not measured:
        return ""
    opposite = [m for m in measured if (verdict_now == RUNWAY and highs[m] < 0) or
                (verdict_now == GARMENT and lows[m] > 0)]
    return f"{INSTRUMENTS_DISAGREE} ({', '.join(opposite)})" if opposite else NO_DISAGREEMENT


# --------------------------------------------------------------------------------------------
# Comparisons: the quality gate, the masked twin, paired regime differences, the sanity check
# --------------------------------------------------------------------------------------------

def add_comparisons(rows: Sequence[dict], per_image: PerImage, chance: float, seed: int = 0) -> list[dict]:
    """Complete the rows in place and return the paired regime differences.

    Per row: ``acc`` (own-regime accuracy on the analysed images, bootstrap interval),
    ``quality`` and the verdict again (the gate needs ``acc``); per unmasked row with a masked
    twin in the grid: ``<method>_excess``, the mean per-image difference of background
    preference from the twin's on the same images (the twin sees them background-removed,
    as it was trained), with a paired bootstrap interval, and
    ``twin`` (the twin's run name, or why there is none); ``backdrop_follow_twin`` (the twin's
    rate, from its record) and ``backdrop_follow_vs_twin`` (the per-swap difference on the same
    source images, paired bootstrap); ``instruments`` (:func:`instruments`); the verdict's
    reason again (it quotes the twin); the sanity columns shared by every cell of the
    architecture (:func:`share_sanity`)."""
    for row in rows:
        own = first_table(per_image, row["cell"], ATTRIBUTION)
        correct = [float(v) for v in own["correct"]] if own and own.get("correct") else []
        put_interval(row, "acc", bootstrap_mean(correct, seed=seed) if correct else None)
        row["quality"] = quality(row, chance)
        row["verdict"], row["verdict_reason"] = verdict(row, chance), verdict_reason(row, chance)
    cells = {(shared_axes(r), r["regime"]): r for r in rows}
    for row in rows:
        twin = twin_regime(row["regime"])
        other = cells.get((shared_axes(row), twin)) if twin else None
        row["twin"] = other["run_name"] if other else ("none in the grid" if twin else "")
        for method in ATTRIBUTION:
            reference = per_image.get((other["cell"], method)) if other else None
            x, y = paired(per_image.get((row["cell"], method)), reference, "bg_preference")
            put_interval(row, f"{method}_excess", bootstrap_mean(x - y, seed=seed) if len(x) else None)
        twin_rate = None
        if other is not None and math.isfinite(float(other.get(BACKDROP_FOLLOW, math.nan))):
            twin_rate = Interval(float(other[BACKDROP_FOLLOW]), float(other.get(f"{BACKDROP_FOLLOW}_low", math.nan)),
                                 float(other.get(f"{BACKDROP_FOLLOW}_high", math.nan)), 0)
        put_interval(row, f"{BACKDROP_FOLLOW}_twin", twin_rate)
        swaps = image_values(per_image.get((row["cell"], "shortcut")), BACKDROP_FOLLOW)[1]
        row["backdrop_swaps"] = len(swaps) if swaps else None
        x, y = paired(per_image.get((row["cell"], "shortcut")),
                      per_image.get((other["cell"], "shortcut")) if other else None, BACKDROP_FOLLOW)
        put_interval(row, f"{BACKDROP_FOLLOW}_vs_twin", bootstrap_mean(x - y, seed=seed) if len(x) else None)
        row["instruments"] = instruments(row) if other is not None else ""
        row["verdict_reason"] = verdict_reason(row, chance)
    share_sanity(rows)
    return regime_differences(rows, per_image, seed=seed)


def share_sanity(rows: Sequence[dict]) -> None:
    """The sanity check runs once per architecture: copy its columns to every row of that
    architecture (``sanity_cell`` = the cell it ran on)."""
    names = [c.name for c in columns() if c.name.endswith("_sanity")]
    for row in rows:
        source = next((r for r in rows if r["arch"] == row["arch"] and
                       any(math.isfinite(float(r.get(n, math.nan))) for n in names)), None)
        if source is None:
            continue
        row["sanity_cell"] = source["run_name"]
        for name in names:
            for suffix in ("", "_low", "_high"):
                row[f"{name}{suffix}"] = source.get(f"{name}{suffix}", math.nan)


def crossed_interval(per_seed: Sequence[tuple[Sequence[int], torch.Tensor]], seed: int) -> tuple[Interval | None, int]:
    """The mean over seeds of per-image values ``(dataset_index, values)`` per seed, with its
    95% interval, and the number of images it rests on. One seed: a bootstrap over its images.
    Several: every seed of a study analyses the same images (the analysis seed is fixed), so the
    seeds are aligned on ``dataset_index`` (the images all of them have) and resampled crossed
    (fgvc.analysis.stats.hierarchical_bootstrap with ``crossed=True``: each replicate draws the
    images once for every seed, and the seeds)."""
    per_seed = [(ids, values) for ids, values in per_seed if len(values)]
    if not per_seed:
        return None, 0
    if len(per_seed) == 1:
        ids, values = per_seed[0]
        return hierarchical_bootstrap([values], seed=seed), len(values)
    common, matrix = align_on_images([(ids, values.tolist()) for ids, values in per_seed])
    if not common:
        return None, 0
    return hierarchical_bootstrap(matrix, seed=seed, crossed=True), len(common)


def interval_method(seeds: int, images: int, what: str = "images") -> str:
    """How an interval over ``seeds`` seeds on the same ``images`` was computed, in words."""
    if seeds <= 1:
        return f"paired bootstrap over {images} {what}"
    return (f"crossed bootstrap: the same {images} {what} for all {seeds} seeds, drawn once per replicate for every "
            f"seed, and the seeds drawn")


def regime_differences(rows: Sequence[Mapping], per_image: PerImage, seed: int = 0) -> list[dict]:
    """Per architecture and strength, per regime pair (:func:`regime_pairs`): the paired
    difference ``first - second`` of each DIFFERENCE_MEASURE on the same source images, per
    seed; with one seed a bootstrap over images, across seeds the crossed bootstrap of
    :func:`crossed_interval` (the seeds analyse the same images). ``images``: the images the
    differences rest on; ``interval``: how the intervals were computed."""
    out = []
    groups: dict[tuple, list[Mapping]] = {}
    for row in rows:
        groups.setdefault((row["arch"], row.get("bg_correlation"), row.get("split_by")), []).append(row)
    for (arch, strength, split_by), members in groups.items():
        by_regime_seed = {(r["regime"], r["seed"]): r for r in members}
        for first, second in regime_pairs(list(dict.fromkeys(r["regime"] for r in members))):
            seeds = [s for (g, s) in by_regime_seed if g == first and (second, s) in by_regime_seed]
            pairs = [(by_regime_seed[(first, s)], by_regime_seed[(second, s)]) for s in seeds]
            entry = {"arch": arch, "bg_correlation": strength, "split_by": split_by,
                     "comparison": f"{first} − {second}",
                     "seeds": len(seeds), "did_not_learn": sum(r.get("quality") == DID_NOT_LEARN
                                                               for pair in pairs for r in pair),
                     "no_data": sum(r.get("quality") == NO_DATA for pair in pairs for r in pair)}
            images = 0
            for name, _, column in DIFFERENCE_MEASURES:
                diffs = []
                for a, b in pairs:
                    ids, x, y = paired_images(per_image.get((a["cell"], "shortcut")),
                                              per_image.get((b["cell"], "shortcut")), column)
                    diffs.append((ids, x - y))
                interval, n = crossed_interval(diffs, seed)
                put_interval(entry, name, interval)
                images = max(images, n) if name != BACKDROP_FOLLOW else images  # the swaps are fewer
            entry["images"] = images
            entry["interval"] = interval_method(len(seeds), images) if images else ""
            out.append(entry)
    return out


def runs_sanity(cells: Sequence, cell) -> bool:
    """Whether ``cell`` is the one cell of its architecture that gets the sanity check: its
    first unmasked cell in grid order (the first cell when it has none)."""
    same = [c for c in cells if c.arch == cell.arch]
    chosen = next((c for c in same if not c.spec.masked), same[0] if same else None)
    return chosen == cell


USE_AND_ATTENTION = ("The swap test changes the input and watches the prediction: it measures use. Attribution says "
                     "where the evidence for the predicted class sits at the explained layer and resolution (Grad-CAM: "
                     "one layer's coarse map, each cell covering figure and backdrop; occlusion: windows blanked out "
                     "at the input's resolution): it measures attention, not use. The verdict follows the swap test.")


def attribution_vs_swap(rows: Sequence[Mapping]) -> str:
    """The paragraph that says how the attribution excess and the swap-test verdict relate, which
    cells' instruments point opposite ways (:func:`instruments`) and what each measures (or that
    the grid has no masked twin to refer attribution to)."""
    unmasked = [r for r in rows if twin_regime(r["regime"]) is not None]
    with_twin = [r for r in unmasked if r.get("twin") not in (None, "", "none in the grid")
                 and r.get("quality") not in (DID_NOT_LEARN, NO_DATA)]
    if unmasked and not any(r.get("twin") not in (None, "", "none in the grid") for r in unmasked):
        return ("Attribution and the swap tests: the grid has no masked twin for its unmasked cells, so background "
                "preference has no reference and is shown raw only; it is not evidence of reliance. Add the masked "
                "regime to refer it to a network that cannot use the background.")
    if not with_twin:
        return "Attribution and the swap tests: no unmasked cell that learned has a masked twin to compare with."
    runway = [r for r in with_twin if r["verdict"] == RUNWAY]
    other = [r for r in with_twin if r["verdict"] != RUNWAY]
    parts = []
    for method in ATTRIBUTION:
        def above(group: Sequence[Mapping], method: str = method) -> int:
            return sum(float(r.get(f"{method}_excess_low", math.nan)) > 0 for r in group)

        parts.append(f"{method}'s excess over the masked twin lies above 0 in {above(runway)} of the {len(runway)} "
                     f"cells that read the runway and in {above(other)} of the {len(other)} others")
    compared = [r for r in with_twin if r.get("instruments")]
    flagged = [r for r in compared if str(r["instruments"]).startswith(INSTRUMENTS_DISAGREE)]
    if flagged:
        agreement = (f" Instruments disagree in {len(flagged)} of the {len(compared)} cells with a swap-test "
                     f"verdict (runway or garment): "
                     + "; ".join(f"{r.get('run_name', r['cell'])}, the swap test says '{r['verdict']}' while "
                                 + ", ".join(f"{m}'s excess is {interval_text(r, f'{m}_excess', sign=True)}"
                                             for m in ATTRIBUTION if m in str(r["instruments"]))
                                 for r in flagged) + ".")
    else:
        agreement = (f" In none of the {len(compared)} cells with a swap-test verdict (runway or garment) do the "
                     f"swap test and an attribution excess point opposite ways." if compared else "")
    return (f"Attribution and the swap tests: of {len(with_twin)} unmasked cells with a masked twin, the swap test "
            f"says '{RUNWAY}' for {len(runway)}. " + "; ".join(parts) + "." + agreement + " " + USE_AND_ATTENTION
            + " Raw background preference below 1 does not mean 'on the person': the twin, which cannot use the "
            "background, is the reference.")


GROUP_KEYS = ("arch", "regime", "bg_correlation", "split_by")


def summarize(rows: Sequence[Mapping]) -> list[dict]:
    """One row per (arch, regime, shortcut strength), first-seen order: ``<column>_mean``,
    ``<column>_std`` (sample standard deviation across seeds; None for a single seed),
    ``seeds``, with several seeds ``<column>_low`` / ``_high`` (seed-level 95% t-interval,
    :func:`fgvc.analysis.stats.seed_interval`), and the verdict counts (cells that did not
    learn, or have no data, count as "no verdict"; ``did_not_learn``, ``no_data``). NaN values
    are left out of a column's mean."""
    groups: dict[tuple, list[Mapping]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in GROUP_KEYS), []).append(row)
    out = []
    for key, members in groups.items():
        summary = {**dict(zip(GROUP_KEYS, key, strict=True)), "seeds": len(members)}
        for column in columns():
            values = np.array([float(r.get(column.name, math.nan)) for r in members], dtype=np.float64)
            values = values[np.isfinite(values)]
            summary[f"{column.name}_mean"] = float(values.mean()) if values.size else math.nan
            summary[f"{column.name}_std"] = float(values.std(ddof=1)) if values.size > 1 else None
            if column.interval and len(members) == 1:  # one seed: the spread is the bootstrap interval
                summary[f"{column.name}_low"] = members[0].get(f"{column.name}_low", math.nan)
                summary[f"{column.name}_high"] = members[0].get(f"{column.name}_high", math.nan)
            elif values.size > 1:  # several seeds: the seed-level t-interval (covers training randomness)
                interval = seed_interval(values.tolist())
                assert interval is not None  # None only for a single seed
                summary[f"{column.name}_low"], summary[f"{column.name}_high"] = interval.low, interval.high
        verdicts = [r.get("verdict", UNDECIDED) for r in members]
        summary["verdict"] = "; ".join(f"{v} ({verdicts.count(v)}/{len(verdicts)})" for v in dict.fromkeys(verdicts))
        summary["did_not_learn"] = sum(r.get("quality") == DID_NOT_LEARN for r in members)
        summary["no_data"] = sum(r.get("quality") == NO_DATA for r in members)
        out.append(summary)
    return out
