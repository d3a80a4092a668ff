"""The show leak: how much a random split of runway photos flatters a cell.

A study over ``--splits random,show`` trains every cell twice on the same images: dealt at
random (a validation look has show-mates in training, which share its venue, backdrop and
lighting) and split by show (whole shows on one side). Per architecture, regime, shortcut
strength and seed, the leak of a measure is its value on the random split minus its value
on the show split. The two validation sets hold different images, so the interval is an
unpaired two-sample bootstrap over images (fgvc.analysis.stats.bootstrap_difference). With
several seeds the seeds are resampled too, crossed with the images: every seed of a study
analyses the same images of each split (the analysis seed is fixed), so each side's images are
aligned across seeds on ``dataset_index`` and drawn once per replicate for every seed.

Measures (LEAK_MEASURES): accuracy on the cell's own analysed images (the attribution
records' per-image correctness: the reported split's accuracy of the table), No-FG accuracy
and BG-gap (the background-swap record, on the split's source images).

A verdict holds only on the random split when the random-split cell reads the runway or the
garment and the same cell on the show split says otherwise: the verdict then describes
memorised shows, and the tables and the verdict text say so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fgvc.analysis.stats import Interval, align_on_images, bootstrap_difference
from fgvc.study.pairing import PerImage, first_table, fmt, image_values, interval_text, put_interval
from fgvc.study.tables import ATTRIBUTION, GARMENT, RUNWAY
from fgvc.viz.report import Table

LEAKY, CLEAN = "random", "show"
ONLY_ON_RANDOM = "holds only on the random split"
# (row key, header, per-image column, record): the value's leak is leak_<row key>
LEAK_MEASURES = (("acc", "acc, own images", "correct", ATTRIBUTION),
                 ("no_fg_acc", "No-FG acc", "correct_no_fg", ("shortcut",)),
                 ("bg_gap", "BG-gap", "bg_gap", ("shortcut",)))


def _values(per_image: PerImage, row: Mapping, column: str, methods: Sequence[str]) -> tuple[list[int], list[float]]:
    """(dataset_index, values) of a cell's per-image ``column`` in the first of ``methods``' records."""
    return image_values(first_table(per_image, row["cell"], methods), column)


def crossed_difference(samples: Sequence[tuple[tuple[list, list], tuple[list, list]]],
                       seed: int) -> Interval | None:
    """The leak across seeds: ``samples`` holds per seed ``((ids, values) random split, (ids,
    values) show split)``; each side is aligned across seeds on its image ids (the images every
    seed has) and the unpaired difference is bootstrapped crossed (fgvc.analysis.stats.
    bootstrap_difference with ``crossed=True``)."""
    sides = []
    for side in (0, 1):
        _, matrix = align_on_images([pair[side] for pair in samples])
        if matrix.shape[1] == 0:
            return None
        sides.append(matrix)
    return bootstrap_difference(list(zip(sides[0], sides[1], strict=True)), seed=seed, crossed=True)


def interval_note(seeds: int) -> str:
    """How the show leak's intervals were computed, in words."""
    return ("unpaired bootstrap over each split's images" + (
        f"; across {seeds} seeds crossed: each split's images are the same for every seed and drawn once per "
        f"replicate for all seeds, and the seeds drawn" if seeds > 1 else ""))


def leak_text(row: Mapping) -> str:
    """The show-leak cell of a table: accuracy and BG-gap, random minus show, with intervals."""
    return f"acc {interval_text(row, 'leak_acc', True)}; BG-gap {interval_text(row, 'leak_bg_gap', True)}"


def _counts(verdicts: Sequence[str]) -> str:
    return "; ".join(f"{v} ({verdicts.count(v)}/{len(verdicts)})" if len(verdicts) > 1 else v
                     for v in dict.fromkeys(verdicts))


def show_leak(rows: Sequence[dict], per_image: PerImage, seed: int = 0) -> list[dict]:
    """Complete the rows of a random/show grid in place and return one entry per
    (architecture, regime, strength) across seeds.

    Per row of a pair: ``leak_<measure>`` with ``_low``/``_high`` (that seed's pair); on a
    random-split row whose verdict holds only there, ``leak_note`` and a sentence at the end of
    ``verdict_reason``. Per entry: the leaks across seeds, the verdicts on each split,
    ``only_on_random_split`` (seeds whose verdict holds only there) and ``show_leak`` (text)."""
    pairs: dict[tuple, dict[int, dict[str, dict]]] = {}
    for row in rows:
        if row.get("split_by") in (LEAKY, CLEAN):
            key = row["arch"], row["regime"], row.get("bg_correlation")
            pairs.setdefault(key, {}).setdefault(row["seed"], {})[row["split_by"]] = row
    entries = []
    for (arch, regime, strength), by_seed in pairs.items():
        both = [p for _, p in sorted(by_seed.items()) if LEAKY in p and CLEAN in p]
        if not both:
            continue
        entry = {"arch": arch, "regime": regime, "bg_correlation": strength, "seeds": len(both)}
        for name, _, column, methods in LEAK_MEASURES:
            samples, intervals = [], []
            for pair in both:
                x, y = (_values(per_image, pair[s], column, methods) for s in (LEAKY, CLEAN))
                one = bootstrap_difference([(x[1], y[1])], seed=seed) if x[1] and y[1] else None
                if one is not None:
                    samples.append((x, y))
                    intervals.append(one)
                for row in pair.values():
                    put_interval(row, f"leak_{name}", one)
            # one seed: its interval is the across-seeds one, not drawn again
            across = intervals[0] if len(intervals) == 1 else crossed_difference(samples, seed) if samples else None
            put_interval(entry, f"leak_{name}", across)
        only = 0
        for pair in both:
            leaky, clean = pair[LEAKY], pair[CLEAN]
            if leaky["verdict"] in (RUNWAY, GARMENT) and leaky["verdict"] != clean["verdict"]:
                only += 1
                leaky["leak_note"] = ONLY_ON_RANDOM
                leaky["verdict_reason"] += (f". Holds only on the random split, where validation looks have show-mates "
                                            f"in training: on the show split the same cell says '{clean['verdict']}'")
        entry.update(verdict_random=_counts([p[LEAKY]["verdict"] for p in both]),
                     verdict_show=_counts([p[CLEAN]["verdict"] for p in both]), only_on_random_split=only)
        entry["show_leak"] = leak_text(entry) + (f"; verdict holds only on the random split ({only}/{len(both)} "
                                                 f"seeds)" if only else "")
        entry["interval"] = interval_note(len(both))  # how the leak's intervals were computed
        entries.append(entry)
    return entries


def annotate_summary(summary: Sequence[dict], entries: Sequence[Mapping]) -> None:
    """Give each summary row of a split its group's show leak across seeds (the same on both
    splits): ``leak_<measure>`` with its interval."""
    by_key = {(e["arch"], e["regime"], e["bg_correlation"]): e for e in entries}
    for row in summary:
        entry = by_key.get((row["arch"], row["regime"], row.get("bg_correlation")))
        if entry is not None and row.get("split_by"):
            row.update({k: v for k, v in entry.items() if k.startswith("leak_")})


def leak_table(entries: Sequence[Mapping]) -> Table:
    dose = any(e.get("bg_correlation") is not None for e in entries)
    seeds = max((e["seeds"] for e in entries), default=1)
    return Table(
        "Show leak (random split − show split, the same images)",
        ["arch", "regime", *(["bg corr."] if dose else []), "seeds", *(f"Δ {h}" for _, h, _, _ in LEAK_MEASURES),
         "verdict, random split", "verdict, show split", "holds only on the random split"],
        [[e["arch"], e["regime"], *([fmt(e["bg_correlation"], 2)] if dose else []), str(e["seeds"]),
          *(interval_text(e, f"leak_{name}", True) for name, _, _, _ in LEAK_MEASURES), e["verdict_random"],
          e["verdict_show"], f"{e['only_on_random_split']}/{e['seeds']}"] for e in entries],
        key_columns=3 + dose,
        note=("Each cell trained twice on the same images: split at random (validation looks have show-mates in "
              "training) and by show (no show on both sides). Value on the random split minus on the show split; "
              "the two validation sets differ, so the 95% interval is an " + interval_note(seeds) + ". Above 0: the "
              "random split rewards remembering the show."))


def leak_paragraph(entries: Sequence[Mapping]) -> str:
    """The report's and the description's sentence on the show leak."""
    if not entries:
        return ""
    parts = [f"{e['arch']} {e['regime']}" + (f" (bg {e['bg_correlation']:g})" if e.get("bg_correlation") is not None
                                             else "") + f": {leak_text(e)}" for e in entries]
    only = [e for e in entries if e["only_on_random_split"]]
    tail = (f" In {len(only)} of {len(entries)} the verdict holds only on the random split ("
            + ", ".join(f"{e['arch']} {e['regime']}: '{e['verdict_random']}' there, '{e['verdict_show']}' on the "
                        f"show split" for e in only)
            + "): it describes memorised shows, not the designer." if only else
            " No verdict holds only on the random split.")
    return ("Show leak, random split minus show split of the same images (95% unpaired bootstrap intervals): "
            + "; ".join(parts) + "." + tail)
