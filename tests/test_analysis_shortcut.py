import csv
import math

import pytest
import torch
from torch import nn

from fgvc.analysis import VARIANT_NAMES, evaluate_variants, make_variants
from fgvc.analysis.person_fill import fill_person_hole, fill_person_rows
from fgvc.analysis.shortcut import (
    backdrop_follow_scores,
    no_fg_confusion,
    per_designer,
    person_box,
    pick_partners,
    variant_correctness,
    variant_intervals,
    variant_predictions,
    variant_scores,
)

CLASS_COLOURS = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])


def _runway(labels, size=24, seed=0):
    """Backdrop colour = the label's colour (a planted shortcut); a random-coloured person
    rectangle in the middle."""
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    images = CLASS_COLOURS[labels][:, :, None, None].expand(n, 3, size, size).clone()
    masks = torch.zeros(n, size, size, dtype=torch.uint8)
    masks[:, 4:20, 8:16] = 1
    person = 0.2 + 0.6 * torch.rand(n, 3, 1, 1, generator=g)
    images = torch.where(masks[:, None].bool(), person.expand_as(images), images)
    return images, masks


class ReadsBackground(nn.Module):
    """Classifies by the colour of the top-left pixel (always backdrop here)."""

    def forward(self, x):
        corner = x[:, :, 0, 0]
        return -((corner[:, None, :] - CLASS_COLOURS[None]) ** 2).sum(dim=2)


def test_only_fg_and_no_fg():
    labels = torch.tensor([0, 0, 1, 1])
    images, masks = _runway(labels)
    v = make_variants(images, masks, labels, seed=0)
    person = masks[:, None].bool().expand_as(images)
    assert torch.equal(v["only_fg"][person], images[person])
    assert (v["only_fg"][~person] == 0).all()
    outside = ~person_box(masks)[:, None].expand_as(images)
    assert torch.equal(v["no_fg"][outside], images[outside])
    assert not torch.isclose(v["no_fg"][person], images[person]).any()
    # constant backdrop: the box is filled with exactly the backdrop colour
    backdrop = CLASS_COLOURS[labels][:, :, None, None].expand_as(images)
    assert torch.allclose(v["no_fg"], backdrop)
    # rows 2..21, cols 6..17 of 24 x 24 replaced
    assert v["no_fg_filled_share"] == pytest.approx(20 * 12 / 24**2)


def test_person_box_is_the_grown_bounding_box_clipped_to_the_frame():
    masks = torch.zeros(3, 10, 8, dtype=torch.uint8)
    masks[0, 4, 3] = masks[0, 6, 4] = 1
    masks[1, 0:2, 6:8] = 1  # in the top-right corner
    box = person_box(masks, margin=2)
    expected = torch.zeros(3, 10, 8, dtype=torch.bool)
    expected[0, 2:9, 1:7] = True
    expected[1, 0:4, 4:8] = True
    assert torch.equal(box, expected)  # the empty mask (image 2) has no box
    assert torch.equal(person_box(masks, margin=0)[0].nonzero().amin(0), torch.tensor([4, 3]))


def test_no_fg_refills_the_box_from_the_wider_side_and_fades_the_other_in():
    torch.manual_seed(0)
    images = torch.rand(1, 3, 16, 20)
    masks = torch.zeros(1, 16, 20)
    masks[0, 3:11, 6:10] = 1  # box: rows 1..12, cols 4..11; strips 4 px left, 8 px right
    filled = fill_person_hole(images, masks)
    box = person_box(masks)[:, None].expand_as(images)
    assert torch.equal(filled[~box], images[~box])
    # the wider right strip, reflected about col 12 without repeating it: col 11 <- col 13
    rows = slice(1, 13)
    assert torch.equal(filled[0, :, rows, 6:12], images[0, :, rows, [18, 17, 16, 15, 14, 13]])
    assert not torch.isclose(filled[0, :, rows, 4:6], images[0, :, rows, 4:6]).all()


def test_the_fade_mixes_the_two_sides_linearly():
    a, b = torch.tensor([0.2, 0.4, 0.6]), torch.tensor([0.9, 0.1, 0.5])
    images = torch.cat([a[:, None, None].expand(3, 16, 8), b[:, None, None].expand(3, 16, 12)], dim=2)[None]
    masks = torch.zeros(1, 16, 20)
    masks[0, 3:11, 6:10] = 1  # box cols 4..11: b fills it, a fades in over cols 4 and 5
    filled = fill_person_hole(images, masks)[0, :, 5]
    assert torch.allclose(filled[:, 4], (2 * a + b) / 3)
    assert torch.allclose(filled[:, 5], (a + 2 * b) / 3)
    assert torch.allclose(filled[:, 6:12], b[:, None].expand(3, 6))


def test_a_full_width_box_is_filled_along_columns_with_reflection_tiling():
    torch.manual_seed(1)
    images = torch.rand(1, 3, 16, 12)
    masks = torch.zeros(1, 16, 12)
    masks[0, 5:9, :] = 1  # box rows 3..10; strips: 3 rows above (too few), 5 below
    filled = fill_person_hole(images, masks)
    sources = [11, 12, 13, 14, 15, 14, 13, 12]  # rows 3..10, bounced inside rows 11..15
    assert torch.equal(filled[0, :, 3:11], images[0, :, sources])
    assert torch.equal(filled[0, :, :3], images[0, :, :3])
    assert torch.equal(filled[0, :, 11:], images[0, :, 11:])


def test_a_box_over_the_whole_frame_takes_the_mean_of_the_non_person_pixels():
    images = torch.rand(2, 3, 8, 6)
    masks = torch.zeros(2, 8, 6)
    masks[0, 0, 0] = masks[0, 7, 5] = 1  # bounding box = the frame
    masks[1] = 1  # no background at all
    filled = fill_person_hole(images, masks)
    background = ~masks[0].bool()
    assert torch.allclose(filled[0], images[0][:, background].mean(dim=1)[:, None, None].expand(3, 8, 6))
    assert torch.equal(filled[1], torch.zeros(3, 8, 6))


def test_an_empty_mask_leaves_the_image_unchanged():
    images = torch.rand(2, 3, 8, 6)
    masks = torch.zeros(2, 8, 6)
    masks[1, 2:5, 2:4] = 1
    assert torch.equal(fill_person_hole(images, masks)[0], images[0])


def test_the_earlier_row_fill_mirrors_the_same_rows_background():
    torch.manual_seed(3)
    images = torch.rand(2, 3, 16, 16)
    masks = torch.zeros(2, 16, 16)
    masks[0, 2:10, 4:12] = 1
    masks[1, :, 0:5] = 1  # hole touching the left border
    masks[1, 7, :] = 1  # a row with no background at all
    filled = fill_person_rows(images, masks)
    person = masks.bool()[:, None].expand_as(images)
    assert torch.equal(filled[~person], images[~person])
    # an 8-px run at cols 4..11: left half mirrors cols 3..0, right half cols 15..12
    assert torch.equal(filled[0, :, 5, 4:8], images[0, :, 5, [3, 2, 1, 0]])
    assert torch.equal(filled[0, :, 5, 8:12], images[0, :, 5, [15, 14, 13, 12]])
    # a hole at the left border mirrors the background to its right
    assert torch.equal(filled[1, :, 3, 0:5], images[1, :, 3, [9, 8, 7, 6, 5]])
    # the all-person row takes the image's per-channel background mean
    bg = (1 - masks[1]).bool()
    assert torch.allclose(filled[1, :, 7, 3], images[1][:, bg].mean(dim=1))


def test_the_earlier_row_fill_interpolates_wide_holes():
    images = torch.rand(1, 3, 4, 10)
    masks = torch.zeros(1, 4, 10)
    masks[0, :, 2:9] = 1  # 7-px run, 2 px of background left, 1 px right
    filled = fill_person_rows(images, masks)
    row = images[0, :, 1]
    assert torch.equal(filled[0, :, 1, 2], row[:, 1])  # mirror of the left side
    assert torch.equal(filled[0, :, 1, 8], row[:, 9])  # mirror of the right side
    # col 5: no mirror source on the image's background -> interpolate cols 1 and 9
    expected = row[:, 1] + (row[:, 9] - row[:, 1]) * (5 - 1) / (9 - 1)
    assert torch.allclose(filled[0, :, 1, 5], expected)


def test_partners_and_fallbacks():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 3, 3])
    p = pick_partners(labels, seed=1)
    same, rand = p["same"], p["rand"]
    assert (labels[same] == labels).all()
    multi = labels != 2
    assert (same[multi] != torch.arange(9)[multi]).all()
    assert same[6] == 6 and p["same_fallbacks"] == 1
    assert (labels[rand] != labels).all() and p["rand_fallbacks"] == 0
    single = pick_partners(torch.tensor([5, 5, 5]), seed=0)
    assert single["rand_fallbacks"] == 3


def test_variants_are_seeded_and_mixed_use_partner_backgrounds():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    images, masks = _runway(labels)
    images = (images * 255).round().to(torch.uint8)
    a = make_variants(images, masks, labels, seed=7)
    b = make_variants(images, masks, labels, seed=7)
    for name in VARIANT_NAMES:
        assert a[name].dtype == torch.uint8 and a[name].shape == images.shape
        assert torch.equal(a[name], b[name])
    assert torch.equal(a["original"], images)
    partners = {
        tuple(make_variants(images, masks, labels, seed=s)["partner_same"].tolist())
        for s in range(6)
    }
    assert len(partners) > 1
    person = masks[:, None].bool().expand_as(images)
    for name, partner in (("mixed_same", a["partner_same"]), ("mixed_rand", a["partner_rand"])):
        assert torch.equal(a[name][person], images[person])
        assert torch.equal(a[name][~person], a["no_fg"][partner][~person])
    assert (labels[a["partner_same"]] == labels).all()
    assert (labels[a["partner_rand"]] != labels).all()
    outside = ~person_box(masks)[:, None].expand_as(images)
    assert torch.equal(a["no_fg"][outside], images[outside])
    wider = make_variants(images, masks, labels, seed=7, margin=4)
    assert wider["no_fg_filled_share"] > a["no_fg_filled_share"]


def test_background_reader_shows_a_gap():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    images, masks = _runway(labels)
    variants = make_variants(images, masks, labels, seed=0)
    scores = evaluate_variants(ReadsBackground(), variants, labels, num_classes=4, batch_size=3)
    assert scores["acc_original"] == 1.0
    assert scores["acc_mixed_same"] == 1.0 and scores["acc_mixed_rand"] == 0.0
    assert scores["bg_gap"] == pytest.approx(1.0)
    assert scores["chance"] == pytest.approx(0.25)
    assert scores["no_fg_vs_chance"] == pytest.approx(4.0)
    expected_keys = {f"acc_{n}" for n in VARIANT_NAMES} | {"chance", "bg_gap", "no_fg_vs_chance"}
    assert set(scores) == expected_keys


def test_per_image_correctness_gives_the_same_scores_and_intervals_around_them():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    images, masks = _runway(labels)
    variants = make_variants(images, masks, labels, seed=0)
    model = ReadsBackground()
    correct = variant_correctness(model, variants, labels, batch_size=3)
    assert set(correct) == set(VARIANT_NAMES)
    for hits in correct.values():
        assert hits.dtype == torch.bool and hits.shape == (8,)
    assert correct["mixed_same"].all() and not correct["mixed_rand"].any()
    scores = evaluate_variants(model, variants, labels, num_classes=4)
    assert variant_scores(correct, num_classes=4) == scores

    intervals = variant_intervals(correct, chance=0.25, seed=0, resamples=500)
    keys = [f"acc_{n}" for n in VARIANT_NAMES] + ["bg_gap", "no_fg_vs_chance"]
    assert set(intervals) == {f"{k}_{end}" for k in keys for end in ("low", "high")}
    for key in keys:
        assert intervals[f"{key}_low"] <= scores[key] <= intervals[f"{key}_high"]
    # every image right on Mixed-Same and wrong on Mixed-Rand: no spread at all
    assert intervals["bg_gap_low"] == intervals["bg_gap_high"] == 1.0
    assert intervals["no_fg_vs_chance_high"] == pytest.approx(4.0)
    assert variant_intervals(correct, chance=0.25, seed=0, resamples=500) == intervals


def test_mask_shape_mismatch():
    images, masks = _runway(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="masks"):
        make_variants(images, masks[:, :10], torch.tensor([0, 1]))


def test_a_background_reader_follows_every_backdrop():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    images, masks = _runway(labels)
    variants = make_variants(images, masks, labels, seed=0)
    predicted = variant_predictions(ReadsBackground(), variants, batch_size=3)
    assert set(predicted) == set(VARIANT_NAMES)
    assert all(p.dtype == torch.long and p.shape == (8,) for p in predicted.values())
    correct = variant_correctness(ReadsBackground(), variants, labels, batch_size=3)
    assert all(torch.equal(predicted[n] == labels, correct[n]) for n in VARIANT_NAMES)
    partner = variants["partner_rand"]
    assert torch.equal(predicted["mixed_rand"], labels[partner])  # it names the backdrop's designer
    scores = backdrop_follow_scores(predicted["mixed_rand"], labels, partner, chance=0.25, seed=0, resamples=500)
    assert scores == {"backdrop_follow": 1.0, "backdrop_follow_low": 1.0, "backdrop_follow_high": 1.0,
                      "backdrop_follow_vs_chance": 4.0, "backdrop_follow_vs_chance_low": 4.0,
                      "backdrop_follow_vs_chance_high": 4.0}
    # one that names the person's designer never follows the backdrop
    assert backdrop_follow_scores(labels, labels, partner, chance=0.25)["backdrop_follow_high"] == 0.0


def test_the_follow_rate_counts_only_swaps_onto_another_designers_backdrop():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    partner = torch.tensor([2, 4, 0, 4, 1, 4])  # the last backdrop is its own designer's (a fallback)
    predicted = torch.tensor([1, 0, 0, 1, 3, 2])  # backdrop designers: 1, 2, 0, 2, 0, (2)
    scores = backdrop_follow_scores(predicted, labels, partner, chance=0.25, seed=0, resamples=500)
    assert scores["backdrop_follow"] == pytest.approx(2 / 5)
    assert scores["backdrop_follow_vs_chance"] == pytest.approx(1.6)
    assert scores["backdrop_follow_low"] < 0.4 < scores["backdrop_follow_high"]
    assert scores["backdrop_follow_vs_chance_low"] == pytest.approx(scores["backdrop_follow_low"] * 4)
    # a single designer: every partner is a fallback, so there is no swap to count
    alone = backdrop_follow_scores(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long),
                                   torch.tensor([1, 2, 0]), chance=0.5)
    assert len(alone) == 6 and all(math.isnan(v) for v in alone.values())


def test_per_designer_counts_images_by_their_designer_and_swaps_by_the_backdrops():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    partner = torch.tensor([2, 4, 0, 4, 1, 4])  # backdrops of designers 1, 2, 0, 2, 0 and (own) 2
    predicted = {"original": torch.tensor([0, 1, 1, 1, 0, 2]),
                 "no_fg": torch.tensor([0, 0, 2, 1, 2, 0]),
                 "mixed_rand": torch.tensor([1, 0, 0, 1, 3, 2])}
    rows = per_designer(labels, predicted, partner, num_classes=4)
    nan = math.nan
    expected = [  # label, images, acc_original, acc_no_fg, backdrop_follow, backdrop_swaps
        (0, 2, 1 / 2, 1.0, 1 / 2, 2),  # backdrop 0 behind images 2 and 4: named 0 once
        (1, 2, 1.0, 1 / 2, 1.0, 1),  # backdrop 1 behind image 0: named 1
        (2, 2, 1 / 2, 1 / 2, 0.0, 2),  # behind images 1 and 3 (image 5 is its own designer's)
        (3, 0, nan, nan, nan, 0),  # no image, no backdrop
    ]
    keys = ("label", "images", "acc_original", "acc_no_fg", "backdrop_follow", "backdrop_swaps")
    assert [list(row) for row in rows] == [list(keys)] * 4
    for row, values in zip(rows, expected, strict=True):
        assert [row[k] for k in keys] == pytest.approx(list(values), nan_ok=True)
    # the overall rate is the per-designer rates weighted by their swaps
    overall = backdrop_follow_scores(predicted["mixed_rand"], labels, partner, chance=0.25)["backdrop_follow"]
    swaps = sum(r["backdrop_swaps"] for r in rows)
    assert overall == pytest.approx(sum(r["backdrop_follow"] * r["backdrop_swaps"] for r in rows[:3]) / swaps)


def test_no_fg_confusion_puts_the_backdrops_designer_in_rows():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    confusion = no_fg_confusion(labels, torch.tensor([0, 0, 2, 1, 2, 0]), num_classes=4)
    assert confusion.dtype == torch.long
    assert confusion.tolist() == [[2, 0, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]]


def test_the_swap_record_writes_the_follow_rate_per_image_and_per_designer(tiny_root, tmp_path):
    from fgvc.analysis.config import AnalyzeConfig
    from fgvc.analysis.data import load_analysis_data
    from fgvc.analysis.suite import run_methods
    from fgvc.models import create_model

    data = load_analysis_data(tiny_root, "val", 12, 0)
    torch.manual_seed(0)
    model = create_model("fn-small", 3, pretrained=False).eval()
    cfg = AnalyzeConfig(model="models:/x/1", num_images=12, batch_size=5)
    result = run_methods(model, data, cfg, tmp_path, ("shortcut",))["shortcut"]
    m, per_image = result.metrics, result.per_image
    follows = [int(p == b) for p, b in zip(per_image["predicted_mixed_rand"], per_image["backdrop_label"], strict=True)]
    assert per_image["follows_backdrop"] == follows and m["rand_fallbacks"] == 0
    assert m["backdrop_follow"] == pytest.approx(sum(follows) / len(follows))
    assert m["backdrop_follow_vs_chance"] == pytest.approx(m["backdrop_follow"] * 3)
    assert m["backdrop_follow_low"] <= m["backdrop_follow"] <= m["backdrop_follow_high"]
    labels = data.labels.tolist()
    assert all(b != y for b, y in zip(per_image["backdrop_label"], labels, strict=True))
    no_fg_correct = [int(p == y) for p, y in zip(per_image["predicted_no_fg"], labels, strict=True)]
    assert no_fg_correct == per_image["correct_no_fg"]

    folder = tmp_path / "shortcut"
    assert {"per_image.csv", "per_designer.csv", "no_fg_confusion.png"} <= {p.name for p in folder.iterdir()}
    with open(folder / "per_image.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == ["dataset_index", "designer", *(f"correct_{n}" for n in VARIANT_NAMES), "predicted_mixed_rand",
                      "backdrop_label", "follows_backdrop", "predicted_no_fg"]
    with open(folder / "per_designer.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["designer"] for r in rows] == data.names
    assert list(rows[0]) == ["designer", "label", "images", "acc_original", "acc_no_fg", "backdrop_follow",
                             "backdrop_swaps"]
    assert sum(int(r["images"]) for r in rows) == 12 and sum(int(r["backdrop_swaps"]) for r in rows) == 12
    swaps_followed = sum(float(r["backdrop_follow"]) * int(r["backdrop_swaps"])
                         for r in rows if r["backdrop_swaps"] != "0")
    assert swaps_followed == pytest.approx(sum(follows), abs=1e-4)
    no_fg = sum(float(r["acc_no_fg"]) * int(r["images"]) for r in rows if r["images"] != "0") / 12
    assert no_fg == pytest.approx(m["acc_no_fg"], abs=1e-4)
    assert int(result.payload["no_fg_confusion"].diagonal().sum()) == sum(per_image["correct_no_fg"])
