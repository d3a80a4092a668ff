import pytest
import torch
from captum.attr import Occlusion as CaptumOcclusion
from torch import nn

from fgvc.analysis import Occlusion
from fgvc.analysis.incremental import UnsupportedModel, flop_estimate, lower
from fgvc.analysis.incremental.windows import window_starts
from fgvc.errors import ConfigError
from fgvc.models import create_model


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


class ImageScaled(nn.Module):
    """Not a per-pixel op: every output depends on the whole image."""

    def forward(self, x):
        return x * x.mean(dim=(1, 2, 3), keepdim=True)


def _randomize_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding them matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
    return model


def _with_conv_biases(model: nn.Module, seed: int) -> nn.Module:
    """Every bias-free conv of ``model`` replaced by one with the same weight and a bias."""
    g = torch.Generator().manual_seed(seed)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and child.bias is None:
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size,
                                 child.stride, child.padding, bias=True)
                with torch.no_grad():
                    conv.weight.copy_(child.weight)
                    conv.bias.copy_(torch.randn(child.out_channels, generator=g) * 0.1)
                setattr(parent, name, conv)
    return model


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "fn-small+bias":
        model = _with_conv_biases(create_model("fn-small", 4, pretrained=False), 1)
    else:
        model = create_model(arch, 4, pretrained=False)
    return _randomize_batchnorm(model, 2).eval()


def _captum(model, images, window, stride, baseline, targets):
    return CaptumOcclusion(model).attribute(
        images,
        sliding_window_shapes=(3, window, window),
        strides=(3, stride, stride),
        baselines=baseline,
        target=targets,
        perturbations_per_eval=16,
    )[:, 0]


def _assert_close_to(expected, got, tolerance=1e-4):
    """Per image, within ``tolerance`` of the expected map's range."""
    span = (expected.amax(dim=(1, 2)) - expected.amin(dim=(1, 2)))[:, None, None]
    assert (span > 0).all()
    assert ((got - expected).abs() <= tolerance * span).all(), (
        ((got - expected).abs() / span).amax().item())


def _pearson(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


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
    expected = _captum(model, images, window, stride, ours.baseline(images), targets)
    _assert_close_to(expected, result.raw)
    assert result.mode == "exact" and result.approximation is None


# (arch, fill, targets): every architecture family, every fill, predicted and explicit targets
INCREMENTAL_CASES = [
    ("resnet18", "zero", None),
    ("resnet18", "mean", [3, 1]),
    ("resnet18", "blur", 2),
    ("resnet50", "zero", [0, 2]),  # Bottleneck blocks
    ("fn-small", "zero", None),
    ("fn-small", "mean", 1),
    ("fn-small", "blur", [1, 3]),
    ("fn-small+bias", "zero", [2, 0]),
    ("fn-small+bias", "blur", None),
]


@pytest.mark.parametrize("arch, fill, targets", INCREMENTAL_CASES)
def test_incremental_equals_batched_and_captum(arch, fill, targets):
    model = _model(arch)
    torch.manual_seed(3)
    images = torch.rand(2, 3, 64, 48)
    # 5 x 4 windows, the last column cut at the border; several windows per conv call
    incremental = Occlusion(model, window=16, stride=12, fill=fill, batch_size=15)
    fast = incremental.attribute(images, targets)
    assert fast.engine == "incremental"
    expected = _captum(model, images, 16, 12, incremental.baseline(images), fast.targets)
    _assert_close_to(expected, fast.raw)
    if fill == "zero":  # the batched engine agrees as well (and with Captum: above)
        plain = Occlusion(model, window=16, stride=12, engine="batched").attribute(images, targets)
        assert plain.engine == "batched" and torch.equal(fast.targets, plain.targets)
        _assert_close_to(expected, plain.raw)
        _assert_close_to(plain.raw, fast.raw)
    if targets is None:
        assert torch.equal(fast.targets, model(images).argmax(1))


def test_incremental_handles_windows_cut_at_the_border_and_odd_sizes():
    model = _model("resnet18")
    images = torch.rand(2, 3, 45, 37)
    fast = Occlusion(model, window=12, stride=7, batch_size=7).attribute(images, [0, 3])
    expected = _captum(model, images, 12, 7, 0.0, [0, 3])
    assert fast.engine == "incremental"
    _assert_close_to(expected, fast.raw)


def test_unknown_module_falls_back_to_batched_and_still_equals_captum():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), ImageScaled(), nn.Conv2d(6, 6, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    ).eval()
    images = torch.rand(2, 3, 32, 24)
    with pytest.raises(UnsupportedModel, match="ImageScaled"):
        lower(model)
    result = Occlusion(model, window=8, stride=4).attribute(images, [1, 2])
    assert result.engine == "batched"
    _assert_close_to(_captum(model, images, 8, 4, 0.0, [1, 2]), result.raw)
    with pytest.raises(ConfigError, match="engine 'incremental' cannot run this model.*ImageScaled"):
        Occlusion(model, window=8, stride=4, engine="incremental").attribute(images)


def test_hooked_model_is_evaluated_as_written():
    """A forward hook can change what a module computes: such models run unmodified."""
    model = _model("fn-small")
    images = torch.rand(2, 3, 32, 24)
    handle = model.body.stage1[0].register_forward_hook(lambda m, i, out: out * 2.0)
    try:
        result = Occlusion(model, window=8, stride=8).attribute(images, [0, 1])
        assert result.engine == "batched"
        _assert_close_to(_captum(model, images, 8, 8, 0.0, [0, 1]), result.raw)
    finally:
        handle.remove()


def test_fashionnet_gains_most_from_incrementality():
    """Conv work per occluded copy at 224x160, window 32, stride 16: the bound on the gain."""
    fashionnet = flop_estimate(create_model("fn-small", 4, pretrained=False), 224, 160, 32, 16)
    resnet = flop_estimate(create_model("resnet18", 4, pretrained=False), 224, 160, 32, 16)
    assert fashionnet["gain"] > 6
    assert 1.5 < resnet["gain"] < fashionnet["gain"]


def _blob_images(count: int, height: int = 64, width: int = 48) -> torch.Tensor:
    """Dark images with one bright Gaussian blob each, at different places."""
    g = torch.Generator().manual_seed(5)
    ys = torch.arange(height)[:, None].float()
    xs = torch.arange(width)[None, :].float()
    images = []
    for _ in range(count):
        cy, cx = torch.rand(2, generator=g) * torch.tensor([height - 20.0, width - 20.0]) + 10
        blob = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * 7.0 ** 2))
        images.append(0.1 + 0.8 * blob.expand(3, -1, -1))
    return torch.stack(images)


def _brightness_model() -> nn.Module:
    """Logit 0 grows with the amount of bright image: occlusion maps show the blob."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )
    with torch.no_grad():
        model[0].weight.fill_(1 / 27)
        model[0].bias.fill_(-0.3)
        model[3].weight.fill_(1 / 36)
        model[3].bias.zero_()
        model[7].weight.copy_(torch.tensor([[1.0] * 4, [-1.0] * 4]))
        model[7].bias.zero_()
    return _randomize_batchnorm(model, 4).eval()


@pytest.mark.parametrize("options", [
    {},  # default approximation: projective-field threshold + bfloat16 where native
    {"coarse_step": 2, "refine_fraction": 0.25},
    {"coarse_step": 3, "refine_fraction": 0.1, "low_precision": False},
])
def test_approx_mode_correlates_with_exact_on_structured_maps(options):
    model = _brightness_model()
    images = _blob_images(3)
    exact = Occlusion(model, window=16, stride=4).attribute(images, 0)
    approx = Occlusion(model, window=16, stride=4, mode="approx", **options).attribute(images, 0)
    assert approx.mode == "approx" and "approx" in approx.approximation
    assert approx.engine == "incremental"
    for a, e in zip(approx.raw, exact.raw, strict=True):
        assert _pearson(a, e) >= 0.95
    if options.get("coarse_step", 1) > 1:
        assert f"every {options['coarse_step']}th window" in approx.approximation
        assert approx.evaluated_fraction < 0.5
    else:
        assert approx.evaluated_fraction == 1.0


def test_approx_mode_on_a_model_it_cannot_lower():
    model = RegionLogit()
    images = torch.rand(2, 3, 32, 32) + 0.1
    exact = Occlusion(model, window=8, stride=4).attribute(images, 0)
    approx = Occlusion(model, window=8, stride=4, mode="approx", coarse_step=2,
                       refine_fraction=0.5).attribute(images, 0)
    assert approx.engine == "batched" and "projective-field" not in approx.approximation
    for a, e in zip(approx.raw, exact.raw, strict=True):
        assert _pearson(a, e) >= 0.95


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


@pytest.mark.parametrize("make", [_small_net, lambda: _model("resnet18")])
def test_batch_size_does_not_change_result_and_mode_restored(make):
    model = make().train()
    model[0].eval() if isinstance(model, nn.Sequential) else model.body.layer1.eval()
    flags = [m.training for m in model.modules()]
    images = torch.rand(3, 3, 32, 32)
    a = Occlusion(model, 16, 8, batch_size=5).attribute(images).raw
    b = Occlusion(model, 16, 8, batch_size=1000).attribute(images).raw
    assert torch.allclose(a, b, atol=1e-5)
    assert [m.training for m in model.modules()] == flags


@pytest.mark.parametrize("make", [_small_net, lambda: _model("fn-small")])
def test_target_count_mismatch(make):
    with pytest.raises(ValueError, match=r"1 targets for a batch of 2"):
        Occlusion(make()).attribute(torch.rand(2, 3, 32, 32), targets=[1])


@pytest.mark.parametrize("options, message", [
    ({"mode": "fast"}, "mode must be 'exact' or 'approx'"),
    ({"engine": "gpu"}, "engine must be"),
    ({"fill": "noise"}, "fill must be"),
    ({"window": 0}, "window, stride and batch_size must be positive"),
    ({"field_limit": 1.5}, "field_limit"),
])
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ConfigError, match=message):
        Occlusion(_small_net(), **options)


def test_coarse_to_fine_on_a_single_row_of_windows():
    model = _brightness_model()
    images = _blob_images(2, height=16, width=64)
    exact = Occlusion(model, window=16, stride=4).attribute(images, 0)
    approx = Occlusion(model, window=16, stride=4, mode="approx", coarse_step=2,
                       refine_fraction=0.5).attribute(images, 0)
    assert approx.evaluated_fraction < 1
    for a, e in zip(approx.raw, exact.raw, strict=True):
        assert _pearson(a, e) >= 0.95


def test_reused_explainer_follows_weight_and_hook_changes():
    model = _model("fn-small")
    images = torch.rand(2, 3, 32, 24)
    occlusion = Occlusion(model, window=8, stride=8)
    before = occlusion.attribute(images, [0, 1])
    with torch.no_grad():
        model.body.stage1[0].conv.weight.mul_(-1.0)
    after = occlusion.attribute(images, [0, 1])
    assert after.engine == "incremental"
    assert not torch.allclose(before.raw, after.raw)
    _assert_close_to(_captum(model, images, 8, 8, 0.0, [0, 1]), after.raw)
    handle = model.body.stage2[0].register_forward_hook(lambda m, i, out: out * 0.5)
    try:
        hooked = occlusion.attribute(images, [0, 1])
        assert hooked.engine == "batched"
        _assert_close_to(_captum(model, images, 8, 8, 0.0, [0, 1]), hooked.raw)
    finally:
        handle.remove()
