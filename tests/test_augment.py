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


# --- the batched recipe against its per-sample definition --------------------------------------

def reference_heavy(aug: HeavyAugment, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The recipe as first written: draws and torchvision ops interleaved, one sample at a
    time. The batched recipe must reproduce it bit for bit, draws included."""
    import math

    import torchvision.transforms.v2.functional as F

    def uniform(low, high):
        return low + (high - low) * float(torch.rand(1, generator=g))

    def chance(p):
        return p > 0 and float(torch.rand(1, generator=g)) < p

    def box(height, width, scale, ratio):
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        for _ in range(10):
            target = height * width * uniform(*scale)
            aspect = math.exp(uniform(*log_ratio))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=g))
                left = int(torch.randint(0, width - w + 1, (1,), generator=g))
                return top, left, h, w
        return None

    out = []
    for image in images.float().div_(255.0):
        _, height, width = image.shape
        crop = box(height, width, aug.crop_scale, aug.crop_ratio) or (0, 0, height, width)
        image = F.resized_crop(image, *crop, size=[height, width], antialias=True)
        if chance(aug.flip_p):
            image = F.horizontal_flip(image)
        jitters = [(F.adjust_brightness, uniform(1 - aug.brightness, 1 + aug.brightness)),
                   (F.adjust_contrast, uniform(1 - aug.contrast, 1 + aug.contrast)),
                   (F.adjust_saturation, uniform(1 - aug.saturation, 1 + aug.saturation)),
                   (F.adjust_hue, uniform(-aug.hue, aug.hue))]
        for k in torch.randperm(4, generator=g).tolist():
            fn, factor = jitters[k]
            image = fn(image, factor)
        if chance(aug.blur_p):
            sigma = uniform(*aug.blur_sigma)
            image = F.gaussian_blur(image, kernel_size=[3, 3], sigma=[sigma, sigma])
        if chance(aug.erase_p):
            erase = box(height, width, aug.erase_scale, aug.erase_ratio)
            if erase is not None:
                top, left, h, w = erase
                image = image.clone()
                image[:, top:top + h, left:left + w] = torch.rand(3, h, w, generator=g)
        out.append(image.clamp_(0, 1))
    return torch.stack(out)


def contrasty_batch(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Random pixels plus the cases HSV treats specially: grey pixels (r = g = b), ties
    between channels, black and white."""
    x = batch(n, h, w) if seed == 0 else torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8,
                                                      generator=torch.Generator().manual_seed(seed))
    x[0, 1] = x[0, 0]
    x[0, 2] = x[0, 0]  # a grey image
    x[1, 1] = x[1, 0]  # red == green everywhere
    x[2, :, : h // 2] = 0
    x[2, :, h // 2:] = 255
    return x


@pytest.mark.parametrize("size", [(32, 24), (64, 48), (17, 13), (9, 31)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_recipe_equals_the_per_sample_definition_bit_for_bit(size, seed):
    aug = get_preset("heavy")
    x = contrasty_batch(12, *size, seed)
    g_batched, g_reference = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    out = aug(x, g_batched)
    expected = reference_heavy(aug, x, g_reference)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(out, expected)
    assert torch.equal(g_batched.get_state(), g_reference.get_state())  # the same draws, no more
    # and `sample`, the one-image path, is the same definition
    g = torch.Generator().manual_seed(seed)
    assert torch.equal(torch.stack([aug.sample(image, g) for image in x.float() / 255]), expected)


def test_every_step_of_the_recipe_is_exercised_by_those_seeds():
    aug = get_preset("heavy")
    seen = {"crop": 0, "whole": 0, "flip": 0, "blur": 0, "erase": 0}
    for size in [(32, 24), (64, 48), (17, 13), (9, 31)]:
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            for _ in range(12):
                d = aug.draw(g, *size)
                seen["crop" if d.crop[2:] != size else "whole"] += 1
                seen["flip"] += d.flip
                seen["blur"] += d.blur_sigma is not None
                seen["erase"] += d.erase is not None
    assert all(count > 5 for count in seen.values()), seen


def test_extreme_jitter_factors_match_torchvision():
    import torchvision.transforms.v2.functional as F

    from fgvc.training import augment

    x = contrasty_batch(6, 19, 23, 4).float() / 255
    for fn, ours, factors in ((F.adjust_brightness, augment._brightness_, [0.0, 0.5, 1.0, 1.7, 2.0, 1.3]),
                              (F.adjust_contrast, augment._contrast_, [0.0, 0.5, 1.0, 1.7, 2.0, 1.3]),
                              (F.adjust_saturation, augment._saturation_, [0.0, 0.5, 1.0, 1.7, 2.0, 1.3]),
                              (F.adjust_hue, augment._hue_, [-0.5, -0.25, 0.0, 0.08, 0.33, 0.5])):
        expected = torch.stack([fn(image, f) for image, f in zip(x, factors, strict=True)])
        assert torch.equal(ours(x.clone(), factors), expected), fn.__name__


# --- the batch path (for a GPU) -----------------------------------------------------------------

def still(**changes) -> HeavyAugment:
    """A recipe that changes nothing, except what `changes` turns on."""
    base = dict(crop_scale=(1.0, 1.0), crop_ratio=(24 / 32, 24 / 32), flip_p=0.0, brightness=0, contrast=0,
                saturation=0, hue=0, blur_p=0, erase_p=0)
    return HeavyAugment(**{**base, **changes})


def test_batch_path_is_seeded_in_range_and_draws_per_image():
    aug = get_preset("heavy")
    x = batch(8)
    a = aug.batch(x, torch.Generator().manual_seed(1))
    assert a.shape == (8, 3, 32, 24) and a.dtype == torch.float32
    assert torch.equal(a, aug.batch(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, aug.batch(x, torch.Generator().manual_seed(2)))
    assert a.min() >= 0 and a.max() <= 1
    same = batch(1).expand(6, -1, -1, -1).contiguous()
    out = aug.batch(same, torch.Generator().manual_seed(0))
    assert len({tuple(o.flatten()[:50].tolist()) for o in out}) == 6


def test_batch_path_steps_off_change_nothing_and_a_flip_flips():
    x = batch(4)
    identity = x.float() / 255
    assert torch.allclose(still().batch(x, torch.Generator().manual_seed(0)), identity, atol=1e-6)
    flipped = still(flip_p=1.0).batch(x, torch.Generator().manual_seed(0))
    assert torch.allclose(flipped, identity.flip(-1), atol=1e-6)


def test_batch_path_colour_jitters_agree_with_the_exact_ones():
    from fgvc.training import augment

    x = contrasty_batch(8, 19, 23, 5).float() / 255
    factors = torch.linspace(0.7, 1.3, 8)
    shifts = torch.linspace(-0.08, 0.08, 8)
    exact = (augment._brightness_, augment._contrast_, augment._saturation_, augment._hue_)
    for k, (batched, reference) in enumerate(zip(augment.DEVICE_JITTERS, exact, strict=True)):
        f = shifts if k == 3 else factors
        assert torch.allclose(batched(x, f.view(-1, 1, 1, 1)), reference(x.clone(), f.tolist()), atol=1e-5), k


def test_batch_path_boxes_follow_the_crop_and_erase_rules():
    from fgvc.training.augment_batch import batch_boxes

    g = torch.Generator().manual_seed(0)
    for scale, ratio in (((0.6, 1.0), (0.8, 1.25)), ((0.02, 0.2), (0.3, 3.3))):
        top, left, h, w, found = batch_boxes(g, 500, 64, 48, scale, ratio)
        assert found.float().mean() > 0.9
        top, left, h, w = top[found], left[found], h[found], w[found]
        assert bool((top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 48).all())
        share = (h * w).float() / (64 * 48)
        assert share.min() >= scale[0] * 0.8 and share.max() <= scale[1] * 1.2  # rounding of h and w
        aspect = w.float() / h.float()
        assert aspect.min() >= ratio[0] * 0.8 and aspect.max() <= ratio[1] * 1.25


def test_batch_path_erases_one_box_of_random_values_where_it_erases():
    x = torch.full((64, 3, 32, 24), 128, dtype=torch.uint8)
    out = still(erase_p=0.4).batch(x, torch.Generator().manual_seed(3))
    changed = (out != 128 / 255).any(1)  # [64, 32, 24]
    erased = changed.flatten(1).any(1)
    assert 10 < int(erased.sum()) < 45  # p = 0.4 of 64
    for mask in changed[erased]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert bool(box.all())  # one filled rectangle
        assert 0.02 * 0.8 <= box.numel() / (32 * 24) <= 0.2 * 1.2
