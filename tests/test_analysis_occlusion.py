import pytest
import torch
from captum.attr import Occlusion as CaptumOcclusion
from torch import nn

from fgvc.analysis import Occlusion
from fgvc.analysis.occlusion import window_starts


def _small_net(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    ).eval()


class RegionLogit(nn.Module):
    """Logit 0 = sum of the pixels in rows/cols [8, 16); logit 1 = 0."""

    def forward(self, x):
        region = x[:, :, 8:16, 8:16].sum(dim=(1, 2, 3))
        return torch.stack([region, torch.zeros_like(region)], dim=1)


@pytest.mark.parametrize("fill", ["zero", "mean", "blur"])
@pytest.mark.parametrize(
    "size, window, stride", [((64, 48), 32, 16), ((40, 40), 32, 16), ((32, 32), 12, 8)]
)
def test_matches_captum(fill, size, window, stride):
    model = _small_net()
    torch.manual_seed(1)
    images = torch.rand(2, 3, *size)
    targets = [2, 0]
    ours = Occlusion(model, window=window, stride=stride, fill=fill, batch_size=16)
    result = ours.attribute(images, targets)
    expected = CaptumOcclusion(model).attribute(
        images,
        sliding_window_shapes=(3, window, window),
        strides=(3, stride, stride),
        baselines=ours.baseline(images),
        target=targets,
        perturbations_per_eval=8,
    )[:, 0]
    span = (expected.amax(dim=(1, 2)) - expected.amin(dim=(1, 2)))[:, None, None]
    assert (span > 0).all()
    assert ((result.raw - expected).abs() <= 1e-4 * span).all()


def test_window_placement_follows_captum_convention():
    assert window_starts(48, 32, 16) == [0, 16]
    assert window_starts(224, 32, 16) == list(range(0, 193, 16))
    assert window_starts(40, 32, 16) == [0, 16]  # last window cut at the border
    assert window_starts(20, 32, 16) == [0]  # window clipped to the image


def test_fills_give_different_maps():
    model = _small_net()
    images = torch.rand(2, 3, 32, 32)
    maps = {
        fill: Occlusion(model, window=8, stride=4, fill=fill).attribute(images, [0, 1]).raw
        for fill in ("zero", "mean", "blur")
    }
    assert not torch.allclose(maps["zero"], maps["mean"])
    assert not torch.allclose(maps["zero"], maps["blur"])
    assert not torch.allclose(maps["mean"], maps["blur"])


def test_attribution_only_where_the_model_looks():
    images = torch.rand(3, 3, 32, 32) + 0.1
    result = Occlusion(RegionLogit(), window=8, stride=8).attribute(images, targets=0)
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[8:16, 8:16] = True
    assert (result.raw[:, inside] > 0).all()
    assert (result.raw[:, ~inside] == 0).all()
    expected = images[:, :, 8:16, 8:16].sum(dim=(1, 2, 3))
    assert torch.allclose(result.raw[:, 8, 8], expected, rtol=1e-5)
    assert torch.allclose(result.maps[:, inside], torch.ones(3, 64), atol=1e-6)


def test_oversized_window_and_uncovered_pixels():
    images = torch.rand(1, 3, 20, 20)
    full = Occlusion(RegionLogit(), window=64, stride=16).attribute(images, 0).raw
    assert torch.allclose(full, torch.full_like(full, float(images[:, :, 8:16, 8:16].sum())))
    # stride > window leaves gaps, which carry no attribution
    gaps = Occlusion(RegionLogit(), window=4, stride=8).attribute(images, 0).raw
    assert (gaps[:, 4:8, :] == 0).all() and (gaps[:, :, 4:8] == 0).all()


def test_batch_size_does_not_change_result_and_mode_restored():
    model = _small_net().train()
    images = torch.rand(3, 3, 32, 32)
    a = Occlusion(model, 16, 8, batch_size=5).attribute(images).raw
    b = Occlusion(model, 16, 8, batch_size=1000).attribute(images).raw
    assert torch.allclose(a, b, atol=1e-5)
    assert model.training


def test_target_count_mismatch():
    with pytest.raises(ValueError, match=r"1 targets for a batch of 2"):
        Occlusion(_small_net()).attribute(torch.rand(2, 3, 32, 32), targets=[1])
