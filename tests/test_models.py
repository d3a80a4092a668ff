"""Model factory and FashionNet: shapes, training step, weights loading, spec round trip."""

import json
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

from fgvc.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FashionNet,
    FGVCNet,
    ModelSpec,
    PretrainedWeightsError,
    available_archs,
    build_model,
    create_model,
)

EMBEDDING_WIDTH = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "fn-small": 256,
    "fn-medium": 384,
    "timm:resnet10t": 512,
}
ALL_ARCHS = list(EMBEDDING_WIDTH)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads; on a shared 2-core box they only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def empty_weight_caches(monkeypatch, tmp_path):
    """Every test sees empty torch hub and Hugging Face caches unless it fills them."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


def images(batch=2, height=32, width=32):
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(0))


def test_available_archs_lists_the_fixed_names():
    assert available_archs() == sorted(["resnet18", "resnet34", "resnet50", "fn-small", "fn-medium"])


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_every_arch_trains_one_step_and_exposes_its_feature_stage(arch):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=3, pretrained=False)
    assert isinstance(model, FGVCNet) and model.num_features == EMBEDDING_WIDTH[arch]
    x, y = images(), torch.tensor([0, 2])
    captured = {}
    handle = model.feature_stage.register_forward_hook(lambda m, i, out: captured.update(out=out))
    before = [p.detach().clone() for p in model.parameters()]
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    features = model.forward_features(x)
    loss = nn.functional.cross_entropy(model.forward_head(features), y)
    loss.backward()
    optimiser.step()
    handle.remove()

    assert features.shape == (2, EMBEDDING_WIDTH[arch])
    fmap = captured["out"]  # the Grad-CAM layer's map is what gets pooled into the embedding
    assert fmap.ndim == 4 and fmap.shape[1] == model.num_features
    torch.testing.assert_close(fmap.mean(dim=(2, 3)), features)
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.backbone_parameters(), strict=False))
    assert not torch.equal(before[-1], list(model.parameters())[-1])  # the head moved


@pytest.mark.parametrize("arch", ["resnet18", "fn-small", "timm:resnet10t"])
def test_param_groups_are_disjoint_and_complete(arch):
    model = create_model(arch, num_classes=4, pretrained=False)
    head = {id(p) for p in model.head_parameters()}
    backbone = {id(p) for p in model.backbone_parameters()}
    assert head and backbone and not head & backbone
    assert head | backbone == {id(p) for p in model.parameters()}


def test_forward_head_of_forward_features_is_forward():
    model = create_model("timm:resnet10t", num_classes=3, pretrained=False).eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x))


def test_channels_last_gives_the_same_logits():
    model = create_model("fn-small", num_classes=3, pretrained=False).eval()
    x = images()
    with torch.no_grad():
        reference = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)


# ---- FashionNet --------------------------------------------------------------------------------

@pytest.mark.parametrize("name, widths", [
    ("fashionnet_small", [32, 64, 64, 64, 128, 128, 128, 256, 256, 256]),
    ("fashionnet_medium", [32, 64, 128, 128, 256, 256, 256, 384, 384, 384]),
])
def test_fashionnet_layer_structure(name, widths):
    net = timm.create_model(name, num_classes=10)
    assert isinstance(net, FashionNet)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == widths
    # Convs carry a bias, as in the original project's checkpoints.
    assert all(c.kernel_size == (3, 3) and c.bias is not None and c.bias.shape == (c.out_channels,)
               for c in convs)
    assert [c.stride[0] for c in convs] == [1, 2, 1, 1, 2, 1, 1, 2, 1, 1]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 10
    assert net.num_features == widths[-1] and net.head.out_features == 10
    x = images()
    assert net.forward_feature_maps(x).shape == (2, widths[-1], 4, 4)  # overall stride 8
    assert net.forward_features(x).shape == (2, widths[-1])
    assert net(x).shape == (2, 10)
    assert [f["reduction"] for f in net.feature_info] == [2, 2, 4, 8]


@pytest.mark.parametrize("name, expected", [("fashionnet_small", 1_953_202),
                                            ("fashionnet_medium", 5_280_050)])
def test_fashionnet_parameter_count_matches_the_original_project(name, expected):
    net = timm.create_model(name, num_classes=50)
    assert sum(p.numel() for p in net.parameters()) == expected


def test_fashionnet_init_statistics():
    torch.manual_seed(0)
    net = FashionNet(timm.create_model("fashionnet_small").config, num_classes=4)
    assert abs(net.head.weight.std().item() - 0.01) < 0.0015
    assert torch.count_nonzero(net.head.bias) == 0
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    for conv in (m for m in net.modules() if isinstance(m, nn.Conv2d)):
        assert torch.count_nonzero(conv.bias) == 0
    conv = net.stage3[1].conv  # 256 -> 256, fan_out = 256 * 9
    expected = (2.0 / (256 * 9)) ** 0.5
    assert abs(conv.weight.std().item() - expected) / expected < 0.02


def test_fashionnet_pretrained_is_refused_with_a_reason():
    with pytest.raises(RuntimeError, match="No pretrained weights exist for fashionnet_small"):
        timm.create_model("fashionnet_small", pretrained=True)
    with pytest.raises(PretrainedWeightsError, match="No pretrained weights exist for fn-medium"):
        create_model("fn-medium", num_classes=2, pretrained=True)


def test_fashionnet_auto_is_scratch_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = create_model("fn-small", num_classes=2)
    assert model.spec.pretrained_effective == "none" and model.spec.mean is None


# ---- spec and rebuild --------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["fn-medium", "timm:resnet10t"])
def test_spec_round_trip_and_rebuild_reproduces_outputs(arch):
    model = create_model(arch, num_classes=3, pretrained=False, image_size=(32, 32)).eval()
    data = json.loads(json.dumps(model.spec.to_dict()))
    spec = ModelSpec.from_dict(data)
    assert spec == model.spec and spec.image_size == (32, 32)

    rebuilt = build_model(data).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = images()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert rebuilt.spec == model.spec


def fill_torch_hub_cache(tmp_path, url: str, net: nn.Module) -> None:
    """Save ``net``'s weights where torch hub would have cached ``url`` (TORCH_HOME is tmp)."""
    path = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True)
    torch.save(net.state_dict(), path)


def test_imagenet_weights_from_cache_and_rebuild(tmp_path):
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18(num_classes=1000)
    fill_torch_hub_cache(tmp_path, torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url, imagenet)

    model = create_model("resnet18", num_classes=3, pretrained=True).eval()
    assert model.spec.pretrained_effective == "imagenet:ResNet18_Weights.IMAGENET1K_V1"
    assert model.spec.mean == IMAGENET_MEAN and model.spec.std == IMAGENET_STD
    torch.testing.assert_close(model.input_std.flatten(), torch.tensor(IMAGENET_STD))
    assert torch.equal(model.body.conv1.weight, imagenet.conv1.weight)
    assert model.head.out_features == 3

    rebuilt = build_model(model.spec).eval()
    assert not torch.equal(rebuilt.body.conv1.weight, imagenet.conv1.weight)  # no weights read
    rebuilt.load_state_dict(model.state_dict())
    x = images()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_pretrained_true_with_empty_cache_names_the_missing_file(tmp_path):
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    with pytest.raises(PretrainedWeightsError) as error:
        create_model("resnet50", num_classes=2, pretrained=True)
    message = str(error.value)
    assert str(expected) in message and "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in message
    assert "FGVC_TORCH_MIRROR" in message and "\n" not in message


def test_pretrained_auto_with_empty_cache_warns_and_uses_identity_normalisation(tmp_path):
    with pytest.warns(UserWarning, match="resnet34-b627a593.pth"):
        model = create_model("resnet34", num_classes=2)
    assert model.spec.pretrained == "auto" and model.spec.pretrained_effective == "none"
    assert model.spec.mean is None and model.spec.std is None
    x = images()
    assert torch.equal(model.normalize(x), x)


def test_pretrained_path_loads_that_file(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18(num_classes=7)
    path = tmp_path / "mine.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model = create_model("resnet18", num_classes=3, pretrained=str(path))
    assert model.spec.pretrained_effective == f"file:{path.resolve()}"
    assert torch.equal(model.body.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.head.out_features == 3


def test_pretrained_path_errors(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="nowhere.pth"):
        create_model("resnet18", num_classes=3, pretrained=str(tmp_path / "nowhere.pth"))
    wrong = tmp_path / "fn.pth"
    torch.save(create_model("fn-small", 3, pretrained=False).body.state_dict(), wrong)
    with pytest.raises(PretrainedWeightsError, match="shares no tensor"):
        create_model("resnet18", num_classes=3, pretrained=str(wrong))


def test_timm_weights_from_torch_hub_cache(tmp_path):
    cfg = timm.models.get_pretrained_cfg("resnet10t")
    source = timm.create_model("resnet10t")
    fill_torch_hub_cache(tmp_path, cfg.url, source)
    model = create_model("timm:resnet10t", num_classes=2, pretrained=True)
    assert model.spec.pretrained_effective == "timm:timm/resnet10t.c3_in1k"
    assert model.spec.mean == tuple(cfg.mean)
    assert torch.equal(model.body.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_timm_pretrained_true_without_cache_is_an_error():
    with pytest.raises(PretrainedWeightsError, match="resnet10t"):
        create_model("timm:resnet10t", num_classes=2, pretrained=True)


def test_pretrained_takes_python_values_and_the_cli_words_mean_the_same():
    for value, spelled in ((False, "false"), (False, "False"), (False, "no")):
        model = create_model("fn-small", 3, pretrained=spelled)
        assert model.spec.pretrained == "false" and model.spec.pretrained_effective == "none"
        assert create_model("fn-small", 3, pretrained=value).spec.pretrained == "false"
    assert create_model("fn-small", 3, pretrained="auto").spec.pretrained == "auto"
    with pytest.raises(PretrainedWeightsError, match=r"Weights file not found: flase \(did you mean pretrained=None"):
        create_model("fn-small", 3, pretrained="flase")


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError) as error:
        create_model("resnet101", num_classes=2)
    message = str(error.value)
    assert all(name in message for name in available_archs())
    assert "timm:<name>" in message
    with pytest.raises(ValueError, match="Unknown timm model 'not_a_model'"):
        create_model("timm:not_a_model", num_classes=2)
