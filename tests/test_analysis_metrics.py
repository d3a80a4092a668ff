import pytest
import torch
from torch import nn

from fgvc.analysis import bg_energy_fraction, bg_preference, deletion_insertion_auc


def _mask():
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 2:6] = 1  # person covers 16 of 64 pixels -> background share 0.75
    return mask


def test_map_inside_person_has_no_background_energy():
    mask = _mask()
    maps = mask * torch.rand(1, 8, 8)
    assert bg_energy_fraction(maps, mask).item() == pytest.approx(0.0)
    assert bg_preference(maps, mask).item() == pytest.approx(0.0)


def test_uniform_map_gets_background_area_share():
    mask = _mask()
    maps = torch.ones(1, 8, 8)
    assert bg_energy_fraction(maps, mask).item() == pytest.approx(0.75)
    assert bg_preference(maps, mask).item() == pytest.approx(1.0)


def test_background_only_map_and_negative_values():
    mask = _mask()
    maps = (1 - mask) * 2.0 - mask * 5.0  # negative mass on the person is ignored
    assert bg_energy_fraction(maps, mask).item() == pytest.approx(1.0)
    assert bg_preference(maps, mask).item() == pytest.approx(1 / 0.75)


def test_edge_cases_are_defined():
    empty = torch.zeros(2, 8, 8)
    full = torch.ones(2, 8, 8)
    maps = torch.stack([torch.rand(8, 8), torch.zeros(8, 8)])
    assert bg_energy_fraction(maps, empty).tolist() == [1.0, 1.0]
    assert bg_preference(maps, empty).tolist() == [1.0, 1.0]
    assert bg_energy_fraction(maps, full).tolist() == [0.0, 0.0]
    assert bg_preference(maps, full).tolist() == [1.0, 1.0]
    zero_map = bg_energy_fraction(torch.zeros(1, 8, 8), _mask())
    assert zero_map.item() == pytest.approx(0.75)


class BrightRegion(nn.Module):
    """Class 0 logit grows with the fraction of bright pixels in the top-left 8x8 block."""

    def forward(self, x):
        bright = (x[:, :, :8, :8].mean(dim=1) > 0.5).float().mean(dim=(1, 2))
        return torch.stack([24 * bright - 6, torch.zeros_like(bright)], dim=1)


def _bright_region_images():
    """Dim noise with a 1/0 checkerboard in the top-left block (half its pixels bright, so a
    blur removes them too)."""
    torch.manual_seed(0)
    images = torch.rand(3, 3, 16, 16) * 0.4
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    images[:, :, :8, :8] = ((rows + cols) % 2 == 0).float()
    good = torch.zeros(3, 16, 16)
    good[:, :8, :8] = 1.0
    good += torch.rand(3, 16, 16) * 0.1
    return images, good


@pytest.mark.parametrize("baseline", ["zero", "blur"])
def test_faithful_map_wins_deletion_and_insertion(baseline):
    images, good = _bright_region_images()
    model = BrightRegion()
    d_good, i_good = deletion_insertion_auc(model, images, good, targets=0, baseline=baseline)
    d_bad, i_bad = deletion_insertion_auc(model, images, -good, targets=0, baseline=baseline)
    assert d_good.shape == i_good.shape == (3,)
    assert (d_good < d_bad).all()
    assert (i_good > i_bad).all()
    assert ((d_good >= 0) & (i_good <= 1)).all()


def test_auc_values_and_batching():
    images, good = _bright_region_images()
    model = BrightRegion()
    a = deletion_insertion_auc(model, images, good, steps=4, batch_size=3)
    b = deletion_insertion_auc(model, images, good, steps=4, batch_size=1000)
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
    # With steps=4 the good map removes the whole 64-px region at fraction 0.25 (= 64/256):
    # deletion curve p(1), p(0), p(0), p(0), p(0) -> AUC = p(1) / 8.
    p_full, p_none = torch.sigmoid(torch.tensor(6.0)), torch.sigmoid(torch.tensor(-6.0))
    expected = (p_full + p_none) / 8 + 3 * p_none / 4
    assert a[0] == pytest.approx(torch.full((3,), float(expected)), abs=1e-5)


def test_rejects_bad_arguments():
    images, good = _bright_region_images()
    with pytest.raises(ValueError, match="maps"):
        deletion_insertion_auc(BrightRegion(), images, good[:, :8], targets=0)
    with pytest.raises(ValueError, match="2 targets for a batch of 3"):
        deletion_insertion_auc(BrightRegion(), images, good, targets=[0, 0])
