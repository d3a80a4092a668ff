"""The silhouette score on runway-synth No-FG images: the box fill is at the level of the true
backdrop (rendered without the person), and the earlier row-wise fill and a flat box are caught.

Measured on 96 val images of 32 x 24 (6 designers, demo seed 0). The true backdrop itself
scores a mask-recovery AUC of about 0.58 here, not 0.5: wall, light bands and floor are
local structures, and people stand more over some than others. So the AUC margin is stated
against 0.5 (0.1) and against the true backdrop (0.03).
"""

from __future__ import annotations

import math

import pytest
import torch

from fgvc.analysis.person_fill import fill_person_hole, fill_person_rows, person_box
from fgvc.analysis.silhouette import SilhouetteScore, mask_recovery_auc, roc_auc, silhouette_score
from fgvc.data.dataset import ShardDataset
from fgvc.data.demo import DemoConfig, generate_demo, render_split_with_backdrops

DEMO = DemoConfig(num_designers=6, train_per_class=1, val_per_class=16, height=32, width=24, seed=0)


@pytest.fixture(scope="module")
def shots() -> dict[str, torch.Tensor]:
    return render_split_with_backdrops(DEMO, "val")


def score(filled: torch.Tensor, shots: dict) -> SilhouetteScore:
    filled = filled.round().clamp(0, 255).to(torch.uint8)
    return silhouette_score(filled, shots["masks"], originals=shots["images"],
                            backdrops=shots["backdrops"], seed=0)


@pytest.fixture(scope="module")
def truth(shots) -> SilhouetteScore:
    return score(shots["backdrops"].float(), shots)


# --- the demo's backdrops -----------------------------------------------------------------

def test_backdrops_are_the_written_photos_without_the_person(tmp_path):
    # 270 training images: more than one render chunk (256), several shards
    cfg = DemoConfig(num_designers=3, train_per_class=90, val_per_class=4, height=32, width=24,
                     shard_size=100, seed=3)
    generate_demo(tmp_path, cfg)
    for split in ("train", "val"):
        dataset = ShardDataset(tmp_path, split)
        written = dataset.gather(torch.arange(len(dataset)))
        rendered = render_split_with_backdrops(cfg, split)
        for key in ("images", "masks", "labels", "venues"):
            assert torch.equal(rendered[key], written[key]), key
        background = ~rendered["masks"].bool()[:, None].expand_as(rendered["images"])
        assert torch.equal(rendered["backdrops"][background], rendered["images"][background])
        person = ~background
        assert (rendered["backdrops"][person] != rendered["images"][person]).float().mean() > 0.9


def test_an_unknown_split_is_refused():
    with pytest.raises(ValueError, match="demo split must be one of train, val, got 'test'"):
        render_split_with_backdrops(DEMO, "test")


# --- the score: reference level, the new fill, and fills that must fail -------------------

def test_the_true_backdrop_sets_the_background_level(truth):
    assert truth.num_images == 96
    assert truth.backdrop_error == 0.0
    assert truth.hole_texture == pytest.approx(1.0, abs=0.1)
    assert truth.seam == pytest.approx(1.0, abs=0.1)
    assert 0.5 < truth.mask_auc < 0.62


def test_the_box_fill_leaves_no_silhouette(shots, truth):
    new = score(fill_person_hole(shots["images"].float(), shots["masks"]), shots)
    assert 0.85 <= new.hole_texture <= 1.15  # neither a smooth blob nor busier than the backdrop
    assert 0.85 <= new.seam <= 1.15  # no seam, and no pixels copied across the boundary
    assert abs(new.mask_auc - 0.5) <= 0.1
    assert new.mask_auc <= truth.mask_auc + 0.03


def test_the_earlier_row_fill_is_detected(shots, truth):
    old = score(fill_person_rows(shots["images"].float(), shots["masks"]), shots)
    assert old.seam < 0.5  # each boundary pixel copies its outside neighbour
    assert old.mask_auc >= truth.mask_auc + 0.1  # the outline is recoverable


def test_a_flat_box_is_detected_as_a_smooth_blob(shots):
    images = shots["images"].float()
    box = person_box(shots["masks"])[:, None]
    flat = torch.where(box, images.mean(dim=(2, 3), keepdim=True), images)
    blob = score(flat, shots)
    assert blob.hole_texture < 0.2
    assert blob.mask_auc > 0.9


def test_the_score_is_deterministic_and_checks_its_inputs(shots):
    filled = fill_person_hole(shots["images"][:16].float(), shots["masks"][:16]) / 255.0
    first = silhouette_score(filled, shots["masks"][:16], seed=3)
    assert silhouette_score(filled, shots["masks"][:16], seed=3) == first
    assert math.isnan(first.backdrop_error)
    with pytest.raises(ValueError, match="person_mask"):
        silhouette_score(filled, shots["masks"][:16, :8])
    with pytest.raises(ValueError, match="at least 4 images"):
        mask_recovery_auc(filled[:3], shots["masks"][:3])


def test_roc_auc_values():
    labels = torch.tensor([0, 0, 1, 1]).bool()
    assert roc_auc(torch.tensor([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert roc_auc(torch.tensor([0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert roc_auc(torch.zeros(4), labels) == 0.5  # all tied
    assert roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), labels) == 0.75
    assert roc_auc(torch.tensor([0.1, 0.3, 0.3, 0.8]), labels) == 0.875  # one tie counts half
    assert math.isnan(roc_auc(torch.rand(3), torch.ones(3).bool()))
