"""The heavy augmentation recipe: per sample, seeded, in range."""

import pytest
import torch

from fgvc.training.augment import HeavyAugment, get_preset


def batch(n=8, h=32, w=24):
    return torch.randint(0, 256, (n, 3, h, w), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_heavy_recipe_is_seeded_per_sample_and_keeps_shape_and_range():
    aug = get_preset("heavy")
    assert isinstance(aug, HeavyAugment) and aug.crop_scale == (0.6, 1.0) and aug.erase_p == 0.4
    x = batch()
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    c = aug(x, torch.Generator().manual_seed(2))
    assert a.shape == (8, 3, 32, 24) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    # every sample is transformed, and differently from its neighbours
    identity = x.float() / 255
    assert all(not torch.allclose(a[i], identity[i]) for i in range(8))


def test_same_image_gets_different_draws_within_a_batch():
    x = batch(1).expand(6, -1, -1, -1).contiguous()
    out = HeavyAugment()(x, torch.Generator().manual_seed(0))
    assert len({tuple(o.flatten()[:50].tolist()) for o in out}) == 6


def test_flip_only_recipe_flips_exactly():
    flip = HeavyAugment(crop_scale=(1.0, 1.0), crop_ratio=(24 / 32, 24 / 32), flip_p=1.0, brightness=0,
                        contrast=0, saturation=0, hue=0, blur_p=0, erase_p=0)
    x = batch(2)
    out = flip(x, torch.Generator().manual_seed(0))
    assert torch.allclose(out, (x.float() / 255).flip(-1), atol=1e-6)


def test_presets_by_name_and_the_aug_option_words():
    from fgvc.config import parse_value
    from fgvc.training.config import TrainConfig

    assert get_preset(None) is None and isinstance(get_preset("heavy"), HeavyAugment)
    with pytest.raises(ValueError, match="unknown augmentation recipe 'wild'; choose from heavy"):
        get_preset("wild")
    # every spelling of "off" is one value, so one config id; "true" is the heavy recipe
    assert {parse_value(TrainConfig, "aug", w) for w in ("false", "none", "False", "no", "0")} == {None}
    assert parse_value(TrainConfig, "aug", "true") == parse_value(TrainConfig, "aug", "heavy") == "heavy"
    assert TrainConfig(aug=None).identity() == TrainConfig(aug=parse_value(TrainConfig, "aug", "none")).identity()
    assert TrainConfig(aug="heavy").params()["aug"] == "true"
