"""The study's computation (fgvc.study.results.compute) on hand-made records: no tracking store,
no files. The numbers are chosen so every expected value can be worked out by hand from the
per-image tables (20 images each) and the records' metrics."""

from __future__ import annotations

import math

import pytest

from fgvc.study.config import Cell
from fgvc.study.leak import ONLY_ON_RANDOM
from fgvc.study.records import CellRecord
from fgvc.study.results import compute
from fgvc.study.tables import DID_NOT_LEARN, GARMENT, LEARNED, NO_DATA, NO_DATA_VERDICT, NO_VERDICT, RUNWAY

CHANCE = 0.25  # four designers
N = 20


def ones(k: int) -> list[float]:
    """Per-image 0/1 correctness: the first k of N images right."""
    return [1.0] * k + [0.0] * (N - k)


def interval(estimate: float, low: float, high: float, name: str) -> dict[str, float]:
    return {name: estimate, f"{name}_low": low, f"{name}_high": high}


def record(cell: Cell, correct: int, swap: tuple[int, int, int, int], swap_metrics: dict, excess: float = 0.0,
           status: str = "trained", attribution: bool = True, swap_columns: dict | None = None,
           designers: tuple[str, ...] = ()) -> CellRecord:
    """A finished cell: ``correct`` of N analysed images right; ``swap`` = how many right on
    the original, No-FG, Mixed-Same and Mixed-Rand images; background preference ``excess``
    above the masked baseline on every image; ``swap_columns``: more per-image columns of the
    swap record (designer, backdrop_label, ...); ``designers``: the class names."""
    index = list(range(N))
    base = [1.0 + 0.01 * i for i in index]
    original, no_fg, same, rand = swap
    per_image = {"shortcut": {"dataset_index": index, "correct_original": ones(original),
                              "correct_no_fg": ones(no_fg), "correct_mixed_same": ones(same),
                              "correct_mixed_rand": ones(rand), **(swap_columns or {})}}
    if attribution:
        per_image.update({method: {"dataset_index": index, "correct": ones(correct),
                                   "bg_preference": [b + excess for b in base]} for method in ("gradcam", "occlusion")})
    analyses = {"shortcut": {**interval(original / N, original / N - 0.15, min(1.0, original / N + 0.1),
                                        "acc_original"), **swap_metrics},
                "gradcam": {"bg_preference_mean": 1.1 + excess}, "occlusion": {"bg_preference_mean": 1.1 + excess}}
    return CellRecord(cell, f"run-{cell.run_name}", status, f"models:/fgvc-study-fn-small/{cell.seed}",
                      {"best/val_acc": 0.8, "best/val_balanced_acc": 0.78}, analyses,
                      {m: f"record-{m}-{cell.key}" for m in per_image}, per_image, "test", list(designers))


def swap(no_fg: tuple, only_fg: tuple, bg_gap: tuple) -> dict[str, float]:
    return {**interval(*no_fg, "acc_no_fg"), **interval(*only_fg, "acc_only_fg"), **interval(*bg_gap, "bg_gap")}


RUNWAY_METRICS = swap((0.75, 0.55, 0.9), (0.8, 0.6, 0.95), (0.6, 0.35, 0.8))  # backdrop alone, and it helps
GARMENT_METRICS = swap((0.3, 0.1, 0.5), (0.75, 0.55, 0.9), (0.05, -0.15, 0.25))  # the person alone suffices


def leak_grid() -> list[CellRecord]:
    """fn-small, unmasked and masked, seed 0, on a random and a show split of the same images:
    unmasked reads the runway on the random split only; masked reads the garment on both."""
    cell = lambda regime, split: Cell("fn-small", regime, 0, None, split)  # noqa: E731
    return [record(cell("unmasked", "random"), 18, (18, 15, 20, 8), RUNWAY_METRICS, excess=0.3),
            record(cell("masked", "random"), 16, (14, 5, 10, 10), GARMENT_METRICS, status="reused"),
            record(cell("unmasked", "show"), 16, (16, 6, 12, 11), GARMENT_METRICS, excess=0.3),
            record(cell("masked", "show"), 15, (13, 5, 10, 10), GARMENT_METRICS, status="resumed")]


def test_rows_carry_the_records_numbers_and_the_swap_test_verdicts():
    tables = compute(leak_grid(), CHANCE)
    rows = tables.rows
    assert [r["cell"] for r in rows] == [c.cell.key for c in leak_grid()]  # grid order
    assert [r["verdict"] for r in rows] == [RUNWAY, GARMENT, GARMENT, GARMENT]
    assert [r["quality"] for r in rows] == [LEARNED] * 4
    runway = rows[0]
    assert runway["acc"] == pytest.approx(0.9) and runway["acc_low"] < 0.9 < runway["acc_high"]
    assert runway["val_acc"] == 0.8 and runway["acc_source"] == pytest.approx(0.9) and runway["no_fg_acc"] == 0.75
    assert runway["split"] == "test" and runway["chance"] == CHANCE and runway["status"] == "trained"
    assert runway["verdict_reason"].startswith("No-FG 0.750 [0.550, 0.900] vs chance 0.250; BG-gap 0.600 [0.350, "
                                               "0.800]; Only-FG 0.800 [0.600, 0.950]")
    # attribution against the masked twin: 0.3 more background preference on every image
    assert runway["twin"] == "fn-small-masked-s0-random-split" and rows[1]["twin"] == ""
    assert runway["gradcam_excess"] == pytest.approx(0.3) and runway["gradcam_excess_low"] > 0
    assert tables.split == "test" and tables.statuses == {"trained": 2, "resumed": 1, "reused": 1}
    assert tables.reading_the_runway == 1 and tables.did_not_learn == tables.no_data == 0
    assert "of 2 unmasked cells with a masked twin, the swap test says 'reads the runway' for 1" in tables.relation


def test_paired_regime_differences_are_per_image_on_the_same_source_images():
    """unmasked − masked per split, from the swap records: the difference of the per-image means."""
    tables = compute(leak_grid(), CHANCE)
    by_split = {d["split_by"]: d for d in tables.differences}
    assert set(by_split) == {"random", "show"}
    random = by_split["random"]
    assert random["comparison"] == "unmasked − masked" and random["seeds"] == 1 and random["did_not_learn"] == 0
    assert random["acc_source"] == pytest.approx(18 / N - 14 / N)
    assert random["no_fg_acc"] == pytest.approx(15 / N - 5 / N)
    assert random["bg_gap"] == pytest.approx((20 - 8) / N - 0.0)  # Mixed-Same minus Mixed-Rand, per image
    assert random["bg_gap_low"] > 0
    assert by_split["show"]["bg_gap"] == pytest.approx((12 - 11) / N)


def test_the_show_leak_and_a_verdict_that_holds_only_on_the_random_split():
    tables = compute(leak_grid(), CHANCE)
    unmasked, masked = tables.leak
    assert (unmasked["regime"], unmasked["seeds"]) == ("unmasked", 1)
    assert unmasked["leak_acc"] == pytest.approx(18 / N - 16 / N)
    assert unmasked["leak_bg_gap"] == pytest.approx((20 - 8) / N - (12 - 11) / N)
    assert unmasked["leak_no_fg_acc"] == pytest.approx(15 / N - 6 / N)
    assert (unmasked["verdict_random"], unmasked["verdict_show"], unmasked["only_on_random_split"]) == \
        (RUNWAY, GARMENT, 1)
    assert masked["only_on_random_split"] == 0 and masked["leak_acc"] == pytest.approx(16 / N - 15 / N)
    leaky = tables.rows[0]
    assert leaky["leak_note"] == ONLY_ON_RANDOM and "leak_note" not in tables.rows[2]
    assert leaky["verdict_reason"].endswith("on the show split the same cell says 'reads the garment'")
    assert tables.only_on_random_split == 1
    # every summary row of a split carries its group's leak
    assert [s["leak_acc"] for s in tables.summary] == pytest.approx([0.1, 0.05, 0.1, 0.05])
    assert tables.leak_text.startswith("Show leak, random split minus show split")
    assert "In 1 of 2 the verdict holds only on the random split" in tables.leak_text
    assert tables.findings == (tables.relation, tables.leak_text)


def test_a_cell_at_chance_did_not_learn_and_a_cell_without_per_image_data_has_no_verdict():
    chance_level = record(Cell("fn-small", "unmasked", 0), 5, (5, 5, 5, 5), RUNWAY_METRICS)
    unread = record(Cell("fn-small", "unmasked", 1), 18, (18, 15, 20, 8), RUNWAY_METRICS, attribution=False)
    tables = compute([chance_level, unread], CHANCE)
    at_chance, no_data = tables.rows
    assert at_chance["acc"] == pytest.approx(CHANCE) and at_chance["quality"] == DID_NOT_LEARN
    assert at_chance["verdict"] == NO_VERDICT and "does not clear 1.5 x chance (0.375)" in at_chance["verdict_reason"]
    assert no_data["quality"] == NO_DATA and no_data["verdict"] == NO_DATA_VERDICT
    assert (tables.did_not_learn, tables.no_data, tables.reading_the_runway) == (1, 1, 0)
    [summary] = tables.summary
    assert summary["verdict"] == f"{NO_VERDICT} (1/2); {NO_DATA_VERDICT} (1/2)" and summary["seeds"] == 2
    assert tables.leak == [] and tables.leak_text == "" and tables.findings == (tables.relation,)
    assert "the grid has no masked twin for its unmasked cells" in tables.relation


# --- the backdrop-follow rate, per designer, the instruments, crossed intervals --------------

DESIGNERS = ("Aline", "Bettina", "Carla", "Dora")  # four designers: chance 0.25
LABELS = [i % 4 for i in range(N)]
# Mixed-Rand: images 0 and 1 are partner fallbacks (their own designer's backdrop), the other 18
# stand on the next designer's backdrop
BACKDROPS = [label if i < 2 else (label + 1) % 4 for i, label in enumerate(LABELS)]


def swap_columns(follows: int, no_fg: int) -> dict:
    """The swap record's per-image columns of a model that names the backdrop's designer on the
    first ``follows`` Mixed-Rand images (else the person's) and is right on No-FG for the first
    ``no_fg`` images (else it names the designer two further on)."""
    return {"designer": [DESIGNERS[label] for label in LABELS], "backdrop_label": BACKDROPS,
            "predicted_mixed_rand": [b if i < follows else label for i, (label, b) in
                                     enumerate(zip(LABELS, BACKDROPS, strict=True))],
            "follows_backdrop": [1 if i < follows else int(b == label) for i, (label, b) in
                                 enumerate(zip(LABELS, BACKDROPS, strict=True))],
            "predicted_no_fg": [label if i < no_fg else (label + 2) % 4 for i, label in enumerate(LABELS)]}


def twin_grid(unmasked_excess: float = 0.3, unmasked_metrics: dict = RUNWAY_METRICS) -> list[CellRecord]:
    """fn-small unmasked (names the backdrop's designer on 12 of the 18 swaps) and its masked
    twin (on none), seed 0, with the swap records' per-designer columns."""
    follow = lambda rate: interval(rate, max(rate - 0.2, 0.0), min(rate + 0.2, 1.0), "backdrop_follow")  # noqa: E731
    return [record(Cell("fn-small", "unmasked", 0), 18, (18, 15, 20, 8), {**unmasked_metrics, **follow(12 / 18)},
                   excess=unmasked_excess, swap_columns=swap_columns(14, 15), designers=DESIGNERS),
            record(Cell("fn-small", "masked", 0), 16, (14, 5, 10, 10), {**GARMENT_METRICS, **follow(0.0)},
                   swap_columns=swap_columns(0, 5), designers=DESIGNERS)]


def test_backdrop_follow_beside_chance_and_the_masked_twin_with_a_paired_interval():
    from fgvc.study.render import backdrop_sentences, headline_table, terminal_table

    tables = compute(twin_grid(), CHANCE)
    unmasked, masked = tables.rows
    assert unmasked["backdrop_follow"] == pytest.approx(12 / 18) and unmasked["backdrop_swaps"] == 18
    assert unmasked["backdrop_follow_twin"] == 0.0 and unmasked["backdrop_follow_twin_high"] == pytest.approx(0.2)
    # per swap on the same 18 swaps (the two fallbacks left out): 12 of 18 minus 0 of 18
    assert unmasked["backdrop_follow_vs_twin"] == pytest.approx(12 / 18)
    assert 0 < unmasked["backdrop_follow_vs_twin_low"] < 12 / 18 < unmasked["backdrop_follow_vs_twin_high"] <= 1
    assert math.isnan(masked["backdrop_follow_vs_twin"]) and math.isnan(masked["backdrop_follow_twin"])
    assert "; backdrop-follow 0.667 [0.467, 0.867] vs chance 0.250, masked twin 0.000 (difference +0.667 [+" in \
        unmasked["verdict_reason"]
    [difference] = tables.differences
    assert difference["backdrop_follow"] == pytest.approx(12 / 18) and difference["images"] == N
    assert difference["interval"] == f"paired bootstrap over {N} images"
    [sentence] = backdrop_sentences(tables.rows, CHANCE)
    assert sentence.startswith("fn-small-unmasked-s0 (reads the runway): it names the backdrop's designer in 67 % "
                               "[47, 87] of 18 swaps; chance 25 %; its masked twin 0 % [0, 20] (difference +67 "
                               "points [+")
    headline = headline_table(tables.rows, CHANCE)
    assert headline.header[4] == "backdrop-follow (chance 0.250)" and headline.body[0][4] == "0.667 [0.467, 0.867]"
    assert headline.body[1][5:7] == ["", ""]  # the masked cell has no twin of its own
    assert "backdrop-follow" in terminal_table(tables.rows)


def test_the_swap_test_per_designer_and_the_no_fg_confusion():
    tables = compute(twin_grid(), CHANCE)
    rows = [r for r in tables.per_designer if r["cell"] == "fn-small/unmasked/seed0"]
    assert [r["designer"] for r in rows] == list(DESIGNERS) and len(tables.per_designer) == 2 * 4
    aline = rows[0]
    # Aline's images: 0, 4, 8, 12, 16 (right on the original up to 17, on No-FG up to 14); her backdrop
    # under another's person: images 3, 7, 11, 15, 19, named Aline on the first 14 Mixed-Rand images
    assert (aline["images"], aline["backdrop_swaps"]) == (5, 5) and aline["twin"] == "fn-small-masked-s0"
    assert aline["acc_original"] == pytest.approx(5 / 5) and aline["acc_no_fg"] == pytest.approx(4 / 5)
    assert aline["backdrop_follow"] == pytest.approx(3 / 5)
    confusion = tables.confusions["fn-small/unmasked/seed0"]
    assert sum(confusion[i][i] for i in range(4)) == 15 and sum(map(sum, confusion)) == N
    assert confusion[0][2] == 1  # image 16: Aline's backdrop, taken for Carla's
    assert tables.designers["fn-small/masked/seed0"] == list(DESIGNERS)


def test_instruments_disagree_when_the_swap_test_and_attribution_point_opposite_ways():
    from fgvc.study.render import headline_table, terminal_table
    from fgvc.study.tables import INSTRUMENTS_DISAGREE, NO_DISAGREEMENT

    tables = compute(twin_grid(unmasked_excess=-0.3), CHANCE)  # reads the runway, less attribution on it
    unmasked, masked = tables.rows
    assert unmasked["verdict"] == RUNWAY and unmasked["gradcam_excess_high"] < 0
    assert unmasked["instruments"] == f"{INSTRUMENTS_DISAGREE} (gradcam, occlusion)" and masked["instruments"] == ""
    assert tables.instruments_disagree == [unmasked]
    assert "Instruments disagree in 1 of the 1 cells with a swap-test verdict (runway or garment): " \
           "fn-small-unmasked-s0, the swap test " \
           "says 'reads the runway' while gradcam's excess is -0.300" in tables.relation
    assert "it measures use" in tables.relation and "attention, not use" in tables.relation
    assert headline_table(tables.rows, CHANCE).body[0][-1] == unmasked["instruments"]
    assert f"{RUNWAY}; {INSTRUMENTS_DISAGREE} (gradcam, occlusion)" in terminal_table(tables.rows)
    garment = compute(twin_grid(unmasked_excess=0.3, unmasked_metrics=GARMENT_METRICS), CHANCE).rows[0]
    assert garment["verdict"] == GARMENT and garment["instruments"] == f"{INSTRUMENTS_DISAGREE} (gradcam, occlusion)"
    agreeing = compute(twin_grid(), CHANCE)
    assert agreeing.rows[0]["instruments"] == NO_DISAGREEMENT and agreeing.instruments_disagree == []
    assert "In none of the 1 cells with a swap-test verdict (runway or garment)" in agreeing.relation


def reversed_rows(table: dict) -> dict:
    """The same per-image table with its images in the opposite order."""
    return {k: list(reversed(v)) for k, v in table.items()}


def test_seeds_on_the_same_images_get_the_crossed_interval():
    """Two seeds analyse the same 20 source images (the second seed's tables list them in the
    opposite order): the regime difference is the crossed bootstrap of the per-image differences
    aligned on dataset_index, not the nested one."""
    from fgvc.analysis.stats import align_on_images, hierarchical_bootstrap

    cells = []
    for seed, (unmasked_no_fg, masked_no_fg) in ((0, (14, 3)), (1, (14, 4))):
        pair = [record(Cell("fn-small", "unmasked", seed), 18, (18, unmasked_no_fg, 20, 8), RUNWAY_METRICS),
                record(Cell("fn-small", "masked", seed), 16, (14, masked_no_fg, 10, 10), GARMENT_METRICS)]
        if seed == 1:
            for cell in pair:
                cell.per_image = {m: reversed_rows(t) for m, t in cell.per_image.items()}
        cells += pair
    [difference] = compute(cells, CHANCE).differences
    assert difference["seeds"] == 2 and difference["images"] == N
    assert difference["interval"].startswith(f"crossed bootstrap: the same {N} images for all 2 seeds")
    per_seed = []
    for unmasked, masked in (cells[0:2], cells[2:4]):
        first, second = unmasked.per_image["shortcut"], masked.per_image["shortcut"]
        by_image = dict(zip(second["dataset_index"], second["correct_no_fg"], strict=True))
        per_seed.append((first["dataset_index"], [a - by_image[i] for i, a in
                                                  zip(first["dataset_index"], first["correct_no_fg"], strict=True)]))
    _, matrix = align_on_images(per_seed)
    crossed = hierarchical_bootstrap(matrix, seed=0, crossed=True)
    assert (difference["no_fg_acc"], difference["no_fg_acc_low"], difference["no_fg_acc_high"]) == \
        pytest.approx((crossed.estimate, crossed.low, crossed.high))
    assert crossed.estimate == pytest.approx(((14 - 3) / N + (14 - 4) / N) / 2)
    # the images are drawn once for both seeds: an image that is hard for one is hard for the other
    nested = hierarchical_bootstrap([matrix[0], matrix[1]], seed=0)
    assert crossed.high - crossed.low > nested.high - nested.low
    # without aligning, the second seed's reversed rows would pair other images
    unaligned = hierarchical_bootstrap([per_seed[0][1], per_seed[1][1]], seed=0, crossed=True)
    assert (unaligned.low, unaligned.high) != pytest.approx((crossed.low, crossed.high))
