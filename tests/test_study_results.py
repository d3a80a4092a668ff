"""The study's computation (fgvc.study.results.compute) on hand-made records: no tracking store,
no files. The numbers are chosen so every expected value can be worked out by hand from the
per-image tables (20 images each) and the records' metrics."""

from __future__ import annotations

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
           status: str = "trained", attribution: bool = True) -> CellRecord:
    """A finished cell: ``correct`` of N analysed images right; ``swap`` = how many right on
    the original, No-FG, Mixed-Same and Mixed-Rand images; background preference ``excess``
    above the masked baseline on every image."""
    index = list(range(N))
    base = [1.0 + 0.01 * i for i in index]
    original, no_fg, same, rand = swap
    per_image = {"shortcut": {"dataset_index": index, "correct_original": ones(original),
                              "correct_no_fg": ones(no_fg), "correct_mixed_same": ones(same),
                              "correct_mixed_rand": ones(rand)}}
    if attribution:
        per_image.update({method: {"dataset_index": index, "correct": ones(correct),
                                   "bg_preference": [b + excess for b in base]} for method in ("gradcam", "occlusion")})
    analyses = {"shortcut": {**interval(original / N, original / N - 0.15, min(1.0, original / N + 0.1),
                                        "acc_original"), **swap_metrics},
                "gradcam": {"bg_preference_mean": 1.1 + excess}, "occlusion": {"bg_preference_mean": 1.1 + excess}}
    return CellRecord(cell, f"run-{cell.run_name}", status, f"models:/fgvc-study-fn-small/{cell.seed}",
                      {"best/val_acc": 0.8, "best/val_balanced_acc": 0.78}, analyses,
                      {m: f"record-{m}-{cell.key}" for m in per_image}, per_image, "test")


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
