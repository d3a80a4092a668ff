import pytest
import torch
import torchvision
from torch import nn

from fgvc.analysis import GradCAM
from fgvc.models import create_model


class TinyCNN(nn.Module):
    """conv-bn-relu x3 + global average pool + linear, with the fgvc model interface."""

    def __init__(self, num_classes: int = 4, width: int = 8) -> None:
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.stem = nn.Sequential(block(3, width, 2), block(width, 2 * width, 2))
        self.feature_stage = block(2 * width, 4 * width, 2)
        self.head = nn.Linear(4 * width, num_classes)

    def forward_features(self, x):
        return self.feature_stage(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.forward_features(x))


class ResNet18(nn.Module):
    """torchvision resnet18 exposing ``feature_stage = layer4[-1]``."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.net = torchvision.models.resnet18(num_classes=num_classes)
        self.feature_stage = self.net.layer4[-1]

    def forward_features(self, x):
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return torch.flatten(n.avgpool(x), 1)

    def forward(self, x):
        return self.net.fc(self.forward_features(x))


def _pearson(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


@pytest.mark.parametrize("model_cls", [TinyCNN, ResNet18])
@pytest.mark.parametrize("targets", [None, [1, 3, 0]])
def test_matches_pytorch_grad_cam(model_cls, targets):
    torch.manual_seed(0)
    model = model_cls().eval()
    images = torch.rand(3, 3, 64, 64)
    ours = GradCAM(model).attribute(images, targets)
    expected = _reference_maps(model, model.feature_stage, images, targets)
    assert ours.maps.shape == expected.shape == (3, 64, 64)
    for got, want in zip(ours.maps, expected, strict=True):
        assert want.std() > 0
        assert _pearson(got, want) >= 0.999
    assert ours.maps.min() >= 0 and ours.maps.max() <= 1
    expected_targets = ours.logits.argmax(1) if targets is None else torch.tensor(targets)
    assert torch.equal(ours.targets, expected_targets)


def test_result_fields():
    torch.manual_seed(1)
    model = TinyCNN().eval()
    images = torch.rand(2, 3, 40, 48)
    result = GradCAM(model).attribute(images)
    assert result.raw.shape == result.maps.shape == (2, 40, 48)
    assert (result.raw >= 0).all()
    assert torch.allclose(result.logits, model(images))
    assert torch.allclose(result.probs.sum(1), torch.ones(2))


def test_hooks_removed_and_train_mode_restored():
    model = TinyCNN().train()
    model.stem[0].eval()  # a mixed state must come back as it was
    GradCAM(model).attribute(torch.rand(2, 3, 32, 32))
    assert model.training and not model.stem[0].training and model.stem[1].training
    assert all(not m._forward_hooks for m in model.modules())

    with GradCAM(model) as cam:
        assert not model.training
        cam.attribute(torch.rand(2, 3, 32, 32))
        cam.attribute(torch.rand(1, 3, 32, 32), targets=[2])
        with torch.no_grad():  # plain forward passes inside the context are left alone
            assert not model(torch.rand(1, 3, 32, 32)).requires_grad
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_target_count_mismatch_raises_and_cleans_up():
    model = TinyCNN().train()
    with pytest.raises(ValueError, match=r"3 targets for a batch of 2"):
        GradCAM(model).attribute(torch.rand(2, 3, 32, 32), targets=[0, 1, 2])
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_parameter_gradients_stay_none():
    model = ResNet18().eval()
    GradCAM(model).attribute(torch.rand(2, 3, 64, 64), targets=torch.tensor([0, 4]))
    assert all(p.grad is None for p in model.parameters())


def test_frozen_model_and_explicit_layer():
    torch.manual_seed(2)
    model = TinyCNN().eval()
    images = torch.rand(2, 3, 32, 32)
    expected = GradCAM(model).attribute(images).maps
    for p in model.parameters():
        p.requires_grad_(False)
    frozen = GradCAM(model, target_layer=model.feature_stage).attribute(images).maps
    assert torch.allclose(expected, frozen, atol=1e-6)


def test_missing_feature_stage_needs_target_layer():
    with pytest.raises(ValueError, match="target_layer"):
        GradCAM(nn.Sequential(nn.Conv2d(3, 2, 3)))


def _fgvc_model(arch: str) -> nn.Module:
    """An fgvc model with non-trivial BatchNorm statistics (so folding them matters)."""
    torch.manual_seed(0)
    model = create_model(arch, 5, pretrained=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def _reference_maps(model, layer, images, targets):
    """pytorch-grad-cam's maps (imported here: it pulls in scikit-learn, 1 s of every collection)."""
    from pytorch_grad_cam import GradCAM as ReferenceGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    reference_targets = None if targets is None else [ClassifierOutputTarget(t) for t in targets]
    with ReferenceGradCAM(model=model, target_layers=[layer]) as reference:
        return torch.from_numpy(reference(input_tensor=images, targets=reference_targets))


@pytest.mark.parametrize("arch", ["resnet18", "fn-small"])
@pytest.mark.parametrize("targets", [None, [4, 0, 2]])
def test_fgvc_models_take_the_fast_path_and_match_pytorch_grad_cam(arch, targets):
    model = _fgvc_model(arch)
    images = torch.rand(3, 3, 64, 48, generator=torch.Generator().manual_seed(11))
    cam = GradCAM(model)
    ours = cam.attribute(images, targets)
    assert cam.fast_path
    assert all(p.grad is None for p in model.parameters())
    assert torch.allclose(ours.logits, model(images), rtol=1e-4, atol=1e-5)
    expected = _reference_maps(model, model.feature_stage, images, targets)
    compared = 0
    for got, want in zip(ours.maps, expected, strict=True):
        if want.std() == 0:  # the ReLU'd map is empty for this target: ours must be empty too
            assert torch.allclose(got, want.float(), atol=1e-6)
            continue
        assert _pearson(got, want) >= 0.999
        compared += 1
    assert compared >= 2


@pytest.mark.parametrize("layer, fast", [
    (lambda m: m.body.layer3, True),  # gradient flows back through layer4 of the lowered network
    (lambda m: m.body.layer3[-1].conv2, False),  # its BatchNorm is folded in: hooked instead
])
def test_other_target_layers(layer, fast):
    model = _fgvc_model("resnet18")
    images = torch.rand(2, 3, 64, 64)
    cam = GradCAM(model, target_layer=layer(model))
    ours = cam.attribute(images, [1, 3])
    assert cam.fast_path == fast
    expected = _reference_maps(model, layer(model), images, [1, 3])
    for got, want in zip(ours.maps, expected, strict=True):
        assert want.std() > 0
        assert _pearson(got, want) >= 0.999


def test_weights_changed_inside_the_context_are_used():
    model = _fgvc_model("fn-small")
    images = torch.rand(2, 3, 32, 24)
    with GradCAM(model) as cam:
        before = cam.attribute(images, 0).raw
        with torch.no_grad():
            model.body.stage3[-1].conv.weight.mul_(-1.0)
        after = cam.attribute(images, 0).raw
        assert cam.fast_path
    fresh = GradCAM(model).attribute(images, 0).raw
    assert not torch.allclose(before, after)
    assert torch.allclose(after, fresh, atol=1e-5)


def test_fgvc_model_mode_restored_and_no_hooks_left():
    model = _fgvc_model("resnet18").train()
    GradCAM(model).attribute(torch.rand(2, 3, 32, 32))
    assert all(m.training for m in model.modules())
    with pytest.raises(ValueError, match=r"1 targets for a batch of 2"):
        GradCAM(model).attribute(torch.rand(2, 3, 32, 32), targets=[0])
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())
