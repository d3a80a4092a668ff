"""The study's numbers validated against the truth planted in the demo data.

With every designer always shot at its home venue (`bg_correlation=1.0`) the backdrop alone
identifies the designer. A model trained on the unmasked images must show it: accuracy from
the backdrop alone (No-FG) far above chance, a positive BG-gap, and more Grad-CAM and occlusion
attribution on the background than the same network trained on background-removed images;
that masked model must be no better than chance from the backdrop alone.

The dose-response test turns the planted strength: with no shortcut (`bg_correlation=0`,
venues at random) an unmasked model's No-FG accuracy is near chance and its BG-gap near 0;
with the full shortcut both are far above. Masked models stay near chance at every strength.

The backdrop-follow rate reads Mixed-Rand directly: how often the model names the designer
whose backdrop the person was pasted on. With the full shortcut the unmasked model follows the
backdrop above chance and above its masked twin. With none it does not: chance (1/C) is the rate
of a model that ignores the image, and a model that reads the garment names the person's
designer, so its rate lies at or below chance (on this demo: 0 of 20 swaps).

Sizes: 5 designers, 48x64 frames, 32 training and 10 validation images per designer (the best
epoch is chosen on val), 10 test images per designer (the numbers are reported on test), 5
epochs (both models reach 98-100 % validation accuracy). Grad-CAM reads the deepest FashionNet stage with at least
7 cells on the map's shorter side (layer=auto): stage2, 12x16 at 48x64.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import mlflow
import pytest
import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from fgvc.analysis.sanity import FLAG_THRESHOLD
from fgvc.data.demo import DemoConfig
from fgvc.study.config import StudyConfig
from fgvc.study.tables import GARMENT, LEARNED, RUNWAY
from fgvc.tasks.study import run_study

pytestmark = pytest.mark.slow
torch.set_num_threads(1)

SHORTCUT_DEMO = DemoConfig(num_designers=5, train_per_class=32, val_per_class=10, test_per_class=10, height=48,
                           width=64, bg_correlation=1.0)


@dataclass
class Study:
    rows: list[dict]
    differences: list[dict]  # study/regime_differences.csv
    swap_records: dict[str, dict[str, list]]  # cell key -> its swap-test record's per_image.csv columns
    runs: dict[str, Run]  # cell key -> its training run, as the study left it


def numeric_columns(text: str) -> dict[str, list[float]]:
    """A per_image.csv as columns of numbers (the designer names left out)."""
    reader = csv.DictReader(io.StringIO(text))
    lines = list(reader)
    return {k: [float(line[k]) for line in lines] for k in reader.fieldnames if k != "designer"}


def study(tmp_path_factory, name: str, **options) -> Study:
    base = tmp_path_factory.mktemp(name)
    mp = pytest.MonkeyPatch()
    mp.chdir(base)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{base}/mlflow.db")
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    try:
        result = run_study(StudyConfig(regimes=("unmasked", "masked"), seeds=(0,), epochs=5, batch_size=16,
                                       num_images=20, occlusion_window=16, occlusion_stride=16, **options),
                           progress=False)
        client = MlflowClient()
        text = lambda run_id, path: mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")  # noqa: E731
        differences = list(csv.DictReader(io.StringIO(text(result.run_id, "study/regime_differences.csv"))))
        return Study(result.rows, differences,
                     {c.cell.key: numeric_columns(text(c.records["shortcut"], "analysis/shortcut/per_image.csv"))
                      for c in result.cells},
                     {c.cell.key: client.get_run(c.run_id) for c in result.cells})
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def dose_study(tmp_path_factory) -> Study:
    """fn-small trained unmasked and masked at planted strengths 0 and 1 (one demo root each),
    analysed by the study; the strength-1 root is SHORTCUT_DEMO. The masked roots of the two
    strengths are pixel-identical (the backdrop is removed): one training serves both."""
    return study(tmp_path_factory, "dose", bg_correlations=(0.0, 1.0), num_designers=SHORTCUT_DEMO.num_designers,
                 train_per_class=SHORTCUT_DEMO.train_per_class, val_per_class=SHORTCUT_DEMO.val_per_class,
                 test_per_class=SHORTCUT_DEMO.test_per_class, height=SHORTCUT_DEMO.height, width=SHORTCUT_DEMO.width)


@pytest.fixture(scope="module")
def dose(dose_study) -> dict[tuple[str, float], dict]:
    """The dose-response rows by (regime, strength)."""
    return {(row["regime"], row["bg_correlation"]): row for row in dose_study.rows}


@pytest.fixture(scope="module")
def cells(dose) -> dict[str, dict]:
    """The full-shortcut cells (bg_correlation 1.0), by regime."""
    return {regime: row for (regime, strength), row in dose.items() if strength == SHORTCUT_DEMO.bg_correlation}


def test_both_models_learn_the_task(cells):
    for regime, row in cells.items():
        assert row["val_acc"] >= 0.8, (regime, row["val_acc"])
        assert row["quality"] == LEARNED and row["split"] == "test", row  # the best epoch on val, numbers on test


def test_unmasked_model_reads_the_venue(cells):
    unmasked = cells["unmasked"]
    assert unmasked["chance"] == pytest.approx(1 / 5)
    assert unmasked["no_fg_acc_low"] > unmasked["chance"], unmasked  # the interval lies above chance
    assert unmasked["bg_gap_low"] > 0, unmasked
    assert unmasked["verdict"] == RUNWAY


def test_masked_model_is_at_chance_from_the_backdrop_alone(cells):
    masked = cells["masked"]
    assert masked["no_fg_acc"] <= 1.5 * masked["chance"], masked
    assert masked["verdict"] == GARMENT, masked


def test_unmasked_model_puts_more_attribution_on_the_background(cells):
    unmasked, masked = cells["unmasked"], cells["masked"]
    # the headline measure, normalised by the background's area: 1 = no preference
    assert unmasked["gradcam_bg_preference"] > masked["gradcam_bg_preference"] + 0.1, (unmasked, masked)
    assert unmasked["gradcam_bg_preference_low"] > masked["gradcam_bg_preference_high"], (unmasked, masked)
    assert unmasked["occlusion_bg_preference"] > masked["occlusion_bg_preference"] + 0.1, (unmasked, masked)
    assert unmasked["bg_gap"] > masked["bg_gap"]


def test_dose_response_background_measures_follow_the_planted_shortcut(dose):
    low, high = dose[("unmasked", 0.0)], dose[("unmasked", 1.0)]
    assert low["no_fg_vs_chance"] < 2.0 <= high["no_fg_vs_chance"] - 1.0, (low, high)  # near chance -> far above
    assert high["no_fg_vs_chance"] > low["no_fg_vs_chance"] and high["bg_gap"] > low["bg_gap"] + 0.2
    assert low["bg_gap_low"] <= 0.0 < high["bg_gap_low"], (low, high)
    for strength in (0.0, 1.0):
        masked = dose[("masked", strength)]
        assert masked["no_fg_vs_chance"] <= 1.5, masked
        assert masked["bg_gap_low"] <= 0.05, masked


def test_attribution_excess_over_the_masked_twin_follows_the_planted_shortcut(dose):
    """The headline of the attribution columns: background preference minus the masked twin's
    (same architecture, seed, strength and images), paired bootstrap 95% interval."""
    for method in ("gradcam", "occlusion"):
        low, high = dose[("unmasked", 0.0)], dose[("unmasked", 1.0)]
        assert high["twin"] == "fn-small-masked-s0-bg1" and low["twin"] == "fn-small-masked-s0-bg0"
        assert high[f"{method}_excess_low"] > 0, (method, high[f"{method}_excess"], high[f"{method}_excess_low"])
        assert low[f"{method}_excess_low"] <= 0, (method, low[f"{method}_excess"], low[f"{method}_excess_low"])


def test_backdrop_follow_rate_follows_the_planted_shortcut(dose):
    """Mixed-Rand, read directly: with the full shortcut the unmasked model names the backdrop's
    designer above chance and above its masked twin (paired on the same swaps); with no shortcut
    its rate's 95% interval does not lie above chance, nor above its twin's (a garment reader
    names the person's designer: at or below chance)."""
    for (regime, strength), row in sorted(dose.items(), key=lambda item: (item[0][1], item[0][0])):
        twin = (f"; masked twin {row['backdrop_follow_twin']:.3f}, difference {row['backdrop_follow_vs_twin']:+.3f} "
                f"[{row['backdrop_follow_vs_twin_low']:+.3f}, {row['backdrop_follow_vs_twin_high']:+.3f}]"
                if regime == "unmasked" else "")
        print(f"strength {strength:g} {regime}: backdrop-follow {row['backdrop_follow']:.3f} "
              f"[{row['backdrop_follow_low']:.3f}, {row['backdrop_follow_high']:.3f}] of {row['backdrop_swaps']} "
              f"swaps, chance {row['chance']:.3f}{twin}")
    high, low = dose[("unmasked", 1.0)], dose[("unmasked", 0.0)]
    chance = high["chance"]
    assert high["backdrop_follow_low"] > chance, high  # the interval lies above chance
    assert high["backdrop_follow"] > high["backdrop_follow_twin"] == dose[("masked", 1.0)]["backdrop_follow"]
    assert high["backdrop_follow_vs_twin_low"] > 0, high  # paired on the same swaps
    assert low["backdrop_follow_low"] <= chance and low["backdrop_follow_vs_twin_low"] <= 0, low
    assert "backdrop-follow" in high["verdict_reason"] and "masked twin" in high["verdict_reason"]


def test_gradcam_maps_pass_the_sanity_check_on_the_trained_network(dose):
    """Once per architecture (its first unmasked cell): Grad-CAM's maps after randomising the
    whole network keep a mean rank correlation below FLAG_THRESHOLD with the trained ones."""
    rows = list(dose.values())
    assert {row["sanity_cell"] for row in rows} == {"fn-small-unmasked-s0-bg0"}
    gradcam = rows[0]["gradcam_sanity"]
    assert gradcam < FLAG_THRESHOLD, gradcam
    assert all(row["gradcam_sanity"] == gradcam for row in rows)


def test_regime_differences_at_each_strength_pair_that_strengths_own_records(dose_study):
    """unmasked − masked at each strength, from the study's regime_differences.csv, equals the
    difference computed by hand from that strength's two swap-test records (their per-image
    files): the masked cells share one training, not one record."""
    key = lambda regime, strength: f"fn-small/{regime}/seed0/bg{strength:g}"  # noqa: E731
    runs = dose_study.runs
    assert runs[key("masked", 0)].info.run_id == runs[key("masked", 1)].info.run_id  # one training for both
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    differences = {float(d["bg_correlation"]): d for d in dose_study.differences
                   if d["comparison"] == "unmasked − masked"}
    assert sorted(differences) == [0.0, 1.0]
    for strength in (0.0, 1.0):
        unmasked, masked = (dose_study.swap_records[key(r, strength)] for r in ("unmasked", "masked"))
        assert unmasked["dataset_index"] == masked["dataset_index"]  # the same source images
        by_hand = {name: mean(unmasked[column]) - mean(masked[column])
                   for name, column in (("acc_source", "correct_original"), ("no_fg_acc", "correct_no_fg"))}
        by_hand["bg_gap"] = (mean(unmasked["correct_mixed_same"]) - mean(unmasked["correct_mixed_rand"])) - \
            (mean(masked["correct_mixed_same"]) - mean(masked["correct_mixed_rand"]))
        for name, value in by_hand.items():
            reported = float(differences[strength][name])
            print(f"strength {strength:g} {name}: reported {reported:+.3f}, by hand {value:+.3f}")
            assert reported == pytest.approx(value, abs=1e-6), (strength, name, reported, value)
    # the shared run carries each strength's verdict and numbers, neither replacing the other
    shared = runs[key("masked", 0)].data
    for strength in (0.0, 1.0):
        row = next(r for r in dose_study.rows if r["cell"] == key("masked", strength))
        assert shared.tags[f"fgvc.verdict.bg{strength:g}"] == row["verdict"]
        assert shared.metrics[f"across_regimes/bg_gap.bg{strength:g}"] == pytest.approx(row["bg_gap"], abs=1e-9)
    assert "fgvc.verdict" not in shared.tags and "across_regimes/bg_gap" not in shared.metrics
    assert runs[key("unmasked", 1)].data.tags["fgvc.verdict"] == RUNWAY  # a run of one cell: the plain names
