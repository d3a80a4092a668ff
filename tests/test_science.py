"""The study's numbers validated against the truth planted in the demo data.

With every designer always shot at its home venue (`bg_correlation=1.0`) the backdrop alone
identifies the designer. A model trained on the unmasked images must show it: accuracy from
the backdrop alone (No-FG) far above chance, a positive BG-gap, and more Grad-CAM and occlusion
attribution on the background than the same network trained on background-removed images;
that masked model must be no better than chance from the backdrop alone.

The dose-response test turns the planted strength: with no shortcut (`bg_correlation=0`,
venues at random) an unmasked model's No-FG accuracy is near chance and its BG-gap near 0;
with the full shortcut both are far above. Masked models stay near chance at every strength.

Sizes: 5 designers, 48x64 frames, 32 training images per designer, 5 epochs (both models
reach 98-100 % validation accuracy). Grad-CAM reads the deepest FashionNet stage with at least
7 cells on the map's shorter side (layer=auto): stage2, 12x16 at 48x64.
"""

from __future__ import annotations

import pytest
import torch

from fgvc.data.demo import DemoConfig
from fgvc.study.config import StudyConfig
from fgvc.analysis.sanity import FLAG_THRESHOLD
from fgvc.study.tables import GARMENT, LEARNED, RUNWAY
from fgvc.tracking.study_run import run_study

pytestmark = pytest.mark.slow
torch.set_num_threads(1)

SHORTCUT_DEMO = DemoConfig(num_designers=5, train_per_class=32, val_per_class=10, height=48, width=64,
                           bg_correlation=1.0)


def study(tmp_path_factory, name: str, **options) -> list[dict]:
    base = tmp_path_factory.mktemp(name)
    mp = pytest.MonkeyPatch()
    mp.chdir(base)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{base}/mlflow.db")
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    try:
        return run_study(StudyConfig(regimes=("unmasked", "masked"), seeds=(0,), epochs=5, batch_size=16,
                                     num_images=20, occlusion_window=16, occlusion_stride=16, **options),
                         progress=False).rows
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def dose(tmp_path_factory) -> dict[tuple[str, float], dict]:
    """fn-small trained unmasked and masked at planted strengths 0 and 1 (one demo root each),
    analysed by the study; the strength-1 root is SHORTCUT_DEMO."""
    rows = study(tmp_path_factory, "dose", bg_correlations=(0.0, 1.0), num_designers=SHORTCUT_DEMO.num_designers,
                 train_per_class=SHORTCUT_DEMO.train_per_class, val_per_class=SHORTCUT_DEMO.val_per_class,
                 height=SHORTCUT_DEMO.height, width=SHORTCUT_DEMO.width)
    return {(row["regime"], row["bg_correlation"]): row for row in rows}


@pytest.fixture(scope="module")
def cells(dose) -> dict[str, dict]:
    """The full-shortcut cells (bg_correlation 1.0), by regime."""
    return {regime: row for (regime, strength), row in dose.items() if strength == SHORTCUT_DEMO.bg_correlation}


def test_both_models_learn_the_task(cells):
    for regime, row in cells.items():
        assert row["val_acc"] >= 0.8, (regime, row["val_acc"])
        assert row["quality"] == LEARNED and row["split"] == "val", row  # the demo root here has no test split


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


def test_gradcam_maps_pass_the_sanity_check_on_the_trained_network(dose):
    """Once per architecture (its first unmasked cell): Grad-CAM's maps after randomising the
    whole network keep a mean rank correlation below FLAG_THRESHOLD with the trained ones."""
    rows = list(dose.values())
    assert {row["sanity_cell"] for row in rows} == {"fn-small-unmasked-s0-bg0"}
    gradcam = rows[0]["gradcam_sanity"]
    assert gradcam < FLAG_THRESHOLD, gradcam
    assert all(row["gradcam_sanity"] == gradcam for row in rows)
