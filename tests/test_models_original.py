"""Importing the original project's checkpoints: exact logits, accepted layouts, one-line errors.

The reference models below are written from the original project's layer description (a
``features`` Sequential of conv/BN/ReLU triples for FashionNet, torchvision ResNets with a new
``fc``); their weights and BatchNorm statistics are randomised so no layer is an identity.
"""

from __future__ import annotations

import os

import pytest
import timm
import torch
import torchvision.models as tvm
import torchvision.transforms.functional as TF
from torch import nn

from fgvc.errors import ConfigError, FgvcError, MissingFileError, UnsafeFileError
from fgvc.models import IMAGENET_MEAN, IMAGENET_STD, build_model
from fgvc.models.original import (
    ORIGINAL_ARCHS,
    ArchMismatchError,
    CheckpointError,
    ClassCountError,
    detect_arch,
    import_original,
    load_original,
    num_classes_of,
)
from fgvc.models.original import (
    read_original_state as read_checkpoint,
)

H, W = 64, 48

# (in, out, stride) of every conv, stem first, as in the original FashionNetSmall / Medium.
REFERENCE_LAYERS = {
    "fn-small": [(3, 32, 1), (32, 64, 2), (64, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1),
                 (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 256, 1)],
    "fn-medium": [(3, 32, 1), (32, 64, 2), (64, 128, 1), (128, 128, 1), (128, 256, 2), (256, 256, 1),
                  (256, 256, 1), (256, 384, 2), (384, 384, 1), (384, 384, 1)],
}


class ReferenceFashionNet(nn.Module):
    """The original project's FashionNet layout: ``features.{3k}`` conv, ``features.{3k+1}`` BN."""

    def __init__(self, layers, num_classes):
        super().__init__()
        modules = []
        for c_in, c_out, stride in layers:
            modules += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=True),
                        nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*modules)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.5)  # present in the original, unused in forward
        self.classifier = nn.Linear(layers[-1][1], num_classes)

    def pooled_features(self, x):
        return torch.flatten(self.pool(self.features(x)), 1)

    def forward(self, x):
        return self.classifier(self.pooled_features(x))


def reference_model(arch: str, num_classes: int) -> nn.Module:
    if arch in REFERENCE_LAYERS:
        return ReferenceFashionNet(REFERENCE_LAYERS[arch], num_classes)
    model = getattr(tvm, arch)(weights=None)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BN statistics at a scale that keeps activations O(1)."""
    generator = torch.Generator().manual_seed(seed)

    def noise(tensor, scale):
        return torch.randn(tensor.shape, generator=generator) * scale

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(noise(module.weight, (2.0 / fan_in) ** 0.5))
                if module.bias is not None:
                    module.bias.copy_(noise(module.bias, 0.1))
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(1 + noise(module.weight, 0.2))
                module.bias.copy_(noise(module.bias, 0.1))
                module.running_mean.copy_(noise(module.running_mean, 0.1))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
                module.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=generator)))
            elif isinstance(module, nn.Linear):
                module.weight.copy_(noise(module.weight, 1.0 / module.in_features ** 0.5))
                module.bias.copy_(noise(module.bias, 0.1))
    return model.eval()


_REFERENCES: dict = {}


def reference(arch: str, num_classes: int = 5) -> nn.Module:
    """One randomised reference per (arch, class count), shared by the tests of this module."""
    key = (arch, num_classes)
    if key not in _REFERENCES:
        torch.manual_seed(0)
        _REFERENCES[key] = randomised(reference_model(arch, num_classes))
    return _REFERENCES[key]


def save_original(path, model, num_classes):
    torch.save({"model": model.state_dict(), "num_classes": num_classes}, path)
    return path


def inputs(seed=1):
    return torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(seed))


# ---- the reference is the described model --------------------------------------------------------

@pytest.mark.parametrize("arch, expected", [("fn-small", 1_953_202), ("fn-medium", 5_280_050)])
def test_reference_fashionnet_has_the_described_parameter_count(arch, expected):
    model = reference_model(arch, 50)
    assert sum(p.numel() for p in model.parameters()) == expected
    fgvc_model = build_model({"arch": arch, "num_classes": 50})
    assert sum(p.numel() for p in fgvc_model.parameters()) == expected


# ---- exact import ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, normalization", [
    ("fn-small", "none"), ("fn-medium", "none"), ("resnet18", "imagenet"), ("resnet50", "none")])
def test_imported_checkpoint_gives_the_reference_logits(tmp_path, arch, normalization):
    ref = reference(arch)
    path = save_original(tmp_path / f"best_{arch}.pt", ref, 5)
    model = load_original(path, arch, 5, normalization=normalization, image_size=(H, W)).eval()
    x = inputs()
    ref_x = TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD) if normalization == "imagenet" else x
    with torch.no_grad():
        expected, got = ref(ref_x), model(x)
    assert got.shape == (2, 5)
    assert expected.std() > 0.1  # logits of O(1): the tolerance below is meaningful
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    spec = model.spec
    assert spec.arch == arch and spec.num_classes == 5 and spec.image_size == (H, W)
    assert spec.pretrained_effective == f"file:{path.resolve()}"
    if normalization == "imagenet":
        assert spec.mean == IMAGENET_MEAN and spec.std == IMAGENET_STD
    else:
        assert spec.mean is None and spec.std is None


def test_imported_fashionnet_features_are_the_reference_pooled_features():
    ref = reference("fn-medium")
    model = import_original(ref.state_dict(), "fn-medium", normalization="none").eval()
    x = inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ref.pooled_features(x), rtol=0, atol=1e-5)
        # Grad-CAM hooks the feature stage: its output is the reference's last ReLU output.
        torch.testing.assert_close(model.body.forward_feature_maps(x), ref.features(x), rtol=0, atol=1e-5)
    assert model.feature_stage is model.body.stage3[2]
    assert torch.equal(model.feature_stage.conv.weight, ref.features[27].weight)
    assert torch.equal(model.feature_stage.bn.running_var, ref.features[28].running_var)


def test_imported_model_rebuilds_from_its_spec():
    ref = reference("fn-small")
    model = import_original(ref.state_dict(), "fn-small", 5, normalization="none").eval()
    rebuilt = build_model(model.spec.to_dict()).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = inputs()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert model.spec.pretrained_effective == "state_dict"


def test_bare_state_dict_and_ddp_prefix_are_accepted(tmp_path):
    ref = reference("resnet18")
    state = ref.state_dict()
    torch.save(state, tmp_path / "bare.pt")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "num_classes": 5}, tmp_path / "ddp.pt")
    torch.save({"state_dict": state, "epoch": 7}, tmp_path / "lightning.pt")
    x = inputs()
    with torch.no_grad():
        expected = ref(x)
    for name in ("bare.pt", "ddp.pt", "lightning.pt"):
        read = read_checkpoint(tmp_path / name)
        assert list(read) == list(state)
        model = load_original(tmp_path / name, "resnet18", normalization="none").eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    # import_original takes an in-memory DDP state_dict as well.
    model = import_original({f"module.{k}": v for k, v in state.items()}, "resnet18", normalization="none")
    assert model.num_classes == 5


# ---- detection -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ORIGINAL_ARCHS)
def test_detect_arch_and_class_count(arch):
    with torch.device("meta"):  # shapes only: detection never reads values
        state = reference_model(arch, 7).state_dict()
    assert detect_arch(state) == arch
    assert detect_arch({f"module.{k}": v for k, v in state.items()}) == arch
    assert num_classes_of(state) == 7


def test_auto_arch_imports_the_detected_architecture():
    ref = reference("fn-medium")
    model = import_original(ref.state_dict(), "auto", normalization="none").eval()
    assert model.spec.arch == "fn-medium" and model.num_classes == 5
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-5)


def test_arch_takes_none_for_detection_and_the_cli_word_auto_means_the_same(tmp_path):
    ref = reference("fn-small")
    save_original(tmp_path / "best.pt", ref, 5)
    for arch in (None, "auto"):
        model = load_original(tmp_path / "best.pt", arch, normalization="none")
        assert model.spec.arch == "fn-small"
    assert load_original(tmp_path / "best.pt", normalization="none").spec.arch == "fn-small"  # the default
    with pytest.raises(ConfigError, match="arch 'fn_small': did you mean 'fn-small'"):
        load_original(tmp_path / "best.pt", "fn_small", normalization="none")


def test_detect_arch_is_none_for_a_foreign_state_dict():
    state = nn.Sequential(nn.Linear(3, 4)).state_dict()
    assert detect_arch(state) is None
    with pytest.raises(CheckpointError, match=r"no 2-D classifier.weight \(FashionNet\) or fc.weight"):
        num_classes_of(state)
    with pytest.raises(ArchMismatchError, match=r"neither FashionNet keys .* nor ResNet keys"):
        import_original(state, "auto", normalization="none")


# ---- errors: one line, saying what disagrees ------------------------------------------------------

def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_fashionnet_checkpoint_as_resnet_names_both_key_families(tmp_path):
    path = save_original(tmp_path / "best_FashionNetMedium.pt", reference("fn-medium"), 5)
    with pytest.raises(ArchMismatchError) as excinfo:
        load_original(path, "resnet50", normalization="none")
    message = one_line(excinfo)
    assert message.startswith(str(path))
    assert ("the checkpoint has FashionNet keys (features.*, classifier.*) but arch resnet50 expects "
            "conv1.*, layer1.*, ..., fc.*") in message
    assert "it fits fn-medium" in message


def test_resnet_checkpoint_as_fashionnet_names_both_key_families():
    with torch.device("meta"):
        state = reference_model("resnet34", 5).state_dict()
    with pytest.raises(ArchMismatchError) as excinfo:
        import_original(state, "fn-small", normalization="none")
    assert ("the checkpoint has ResNet keys (conv1.*, layer1.*, ..., fc.*) but arch fn-small expects "
            "features.*, classifier.*; it fits resnet34") in one_line(excinfo)


def test_fashionnet_variant_mismatch_names_the_first_differing_shape():
    with pytest.raises(ArchMismatchError) as excinfo:
        import_original(reference("fn-medium").state_dict(), "fn-small", normalization="none")
    message = one_line(excinfo)
    assert "the checkpoint does not fit fn-small" in message
    assert "features.6.weight: checkpoint [128, 64, 3, 3], fn-small expects [64, 64, 3, 3]" in message
    assert "it fits fn-medium" in message

    with pytest.raises(ArchMismatchError) as excinfo:
        import_original(reference("fn-small").state_dict(), "fn-medium", normalization="none")
    message = one_line(excinfo)
    assert "features.6.weight: checkpoint [64, 64, 3, 3], fn-medium expects [128, 64, 3, 3]" in message
    assert "it fits fn-small" in message


def test_resnet_depth_mismatch_names_the_missing_and_unexpected_blocks():
    with torch.device("meta"):
        r18, r34 = reference_model("resnet18", 5).state_dict(), reference_model("resnet34", 5).state_dict()
    with pytest.raises(ArchMismatchError) as excinfo:
        import_original(r34, "resnet18", normalization="imagenet")
    message = one_line(excinfo)
    assert ("the checkpoint does not fit resnet18: unexpected keys layer1.2.*, layer2.2.*, layer2.3.*"
            in message)
    assert "missing keys" not in message and "it fits resnet34" in message

    with pytest.raises(ArchMismatchError) as excinfo:
        import_original(r18, "resnet34", normalization="imagenet")
    message = one_line(excinfo)
    assert ("the checkpoint does not fit resnet34: missing keys layer1.2.*, layer2.2.*, layer2.3.*"
            in message)
    assert "unexpected keys" not in message and "it fits resnet18" in message


def test_a_partly_broken_checkpoint_names_the_key_and_fits_nothing():
    state = dict(reference("fn-small").state_dict())
    del state["features.4.running_var"]
    with pytest.raises(ArchMismatchError) as excinfo:
        import_original(state, "fn-small", normalization="none")
    message = one_line(excinfo)
    assert "missing keys features.4.running_var" in message and "it fits" not in message
    with pytest.raises(ArchMismatchError) as excinfo:
        import_original(state, "auto", normalization="none")
    assert ("fits none of resnet18, resnet34, resnet50, fn-small, fn-medium; closest is fn-small"
            in one_line(excinfo))


def test_class_count_mismatch_names_both_counts(tmp_path):
    with torch.device("meta"):
        small = reference_model("fn-small", 50).state_dict()
        r50 = reference_model("resnet50", 50).state_dict()
    with pytest.raises(ClassCountError) as excinfo:
        import_original(small, "fn-small", 10, normalization="none")
    assert ("the checkpoint has 50 classes (classifier.weight [50, 256]) but the data root has 10"
            in one_line(excinfo))
    with pytest.raises(ClassCountError) as excinfo:
        import_original(r50, "resnet50", 10, normalization="imagenet")
    assert ("the checkpoint has 50 classes (fc.weight [50, 2048]) but the data root has 10"
            in one_line(excinfo))


def test_bad_options_are_config_errors():
    state = reference("fn-small").state_dict()
    with pytest.raises(ConfigError, match=r"normalization 'auto': use 'imagenet' .* or 'none'"):
        import_original(state, "fn-small", normalization="auto")
    with pytest.raises(ConfigError, match=r"FashionNet on raw \[0, 1\] pixels; use normalization='none'"):
        import_original(state, "fn-small", normalization="imagenet")
    with pytest.raises(ConfigError, match=r"arch 'resnet101': .* one of resnet18, resnet34, resnet50, "
                                          r"fn-small, fn-medium \(or None to detect it\)"):
        import_original(state, "resnet101", normalization="none")


def test_malicious_pickle_is_refused_in_one_line_and_never_runs(tmp_path):
    target = tmp_path / "created-by-the-pickle"

    class MakesAFolder:
        def __reduce__(self):
            return (os.mkdir, (str(target),))

    path = tmp_path / "best_resnet50.pt"
    torch.save({"model": {"fc.weight": torch.zeros(2, 3), "payload": MakesAFolder()}, "num_classes": 2}, path)
    for read in (read_checkpoint, lambda p: load_original(p, normalization="none")):
        with pytest.raises(UnsafeFileError) as excinfo:
            read(path)
        message = one_line(excinfo)
        assert message.startswith(f"{path}: ") and "holds more than tensors" in message
        assert "weights_only=False" not in message and "mkdir" in message
        assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__
    assert not target.exists()


def test_missing_and_unreadable_files_are_one_line_errors(tmp_path):
    with pytest.raises(MissingFileError) as excinfo:
        read_checkpoint(tmp_path / "best_resnet18.pt")
    assert one_line(excinfo) == f"{tmp_path / 'best_resnet18.pt'}: checkpoint file does not exist"

    garbage = tmp_path / "notes.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError) as excinfo:
        read_checkpoint(garbage)
    assert one_line(excinfo).startswith(f"{garbage}: cannot be read as a torch file")

    good = save_original(tmp_path / "good.pt", reference("fn-small"), 5)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:4096])
    with pytest.raises(CheckpointError) as excinfo:
        read_checkpoint(truncated)
    assert one_line(excinfo).startswith(f"{truncated}: cannot be read as a torch file (truncated or corrupt?)")

    with pytest.raises(CheckpointError) as excinfo:
        read_checkpoint(tmp_path)
    assert one_line(excinfo).startswith(f"{tmp_path}: not a regular file")

    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(CheckpointError, match=r"holds a list, not a state_dict"):
        read_checkpoint(listed)
    assert all(issubclass(error, FgvcError)
               for error in (CheckpointError, ArchMismatchError, ClassCountError))


def test_timm_still_builds_fashionnet():
    net = timm.create_model("fashionnet_small", num_classes=3)
    assert net(torch.rand(1, 3, 32, 32)).shape == (1, 3)
