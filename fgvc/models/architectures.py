"""Architectures: how each family is built, where its classifier and stages are, and where
its standard pretrained weights come from. A new architecture is one ``register_arch`` call.

Pretrained weights come the standard way (fgvc.models.weights): torchvision's files through the
torch hub cache under ``TORCH_HOME``, timm's through the Hugging Face cache, downloaded into the
cache when missing and the network allows; or from an explicit path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torchvision.models as tvm
from torch import nn

from fgvc.catalog import ARCHS, timm_name_problem
from fgvc.errors import ConfigError

from .fashionnet import FASHIONNET_CONFIGS, FashionNet
from .net import IMAGENET_MEAN, IMAGENET_STD, TIMM_PREFIX, PretrainedWeightsError
from .weights import fetch_timm_weights, fetch_url
from .weights_file import load_weights_file

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Architectures: how to build a family and where its standard pretrained weights live.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StandardWeights:
    """Pretrained weights an architecture can start from.

    ``label`` is recorded as ``pretrained_effective``; ``fetch`` returns the weights file, from
    the standard cache or downloaded into it (fgvc.models.weights), or raises WeightsError
    saying why it cannot (offline, unreachable, corrupt) with the URL and the cache path.
    """

    label: str
    fetch: Callable[[], Path | None]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def obtain(self) -> Path:
        found = self.fetch()
        if found is None:
            raise PretrainedWeightsError(f"no pretrained weights are known for {self.label}")
        return found


class Architecture:
    """Base class of one buildable architecture.

    ``build`` returns the raw network at random init, with a classifier of ``num_classes`` outputs
    at ``classifier_path(net)``; with the classifier replaced by an identity the network must
    return the pooled embedding ``[B, D]``.
    """

    def build(self, num_classes: int, image_size: tuple[int, int] | None) -> nn.Module:
        raise NotImplementedError

    def classifier_path(self, net: nn.Module) -> str:
        raise NotImplementedError

    def feature_stage_path(self, net: nn.Module) -> str | None:
        raise NotImplementedError

    def stage_paths(self, net: nn.Module) -> tuple[str, ...]:
        """The network's successive stages (shallow to deep); default: only the last one."""
        last = self.feature_stage_path(net)
        return (last,) if last else ()

    def standard_weights(self) -> StandardWeights | None:
        """The usual pretrained weights, or ``None`` when none exist for this architecture."""
        return None

    def build_with_weights(self, num_classes: int, image_size: tuple[int, int] | None,
                           weights_file: Path) -> nn.Module:
        """Build and load a state_dict file (a user file, or the standard weights)."""
        net = self.build(num_classes, image_size)
        load_weights_file(net, weights_file, self.classifier_path(net))
        return net

    def build_with_standard_weights(self, num_classes: int, image_size: tuple[int, int] | None,
                                    weights_file: Path) -> nn.Module:
        """Build and load the cached file of :meth:`standard_weights`."""
        return self.build_with_weights(num_classes, image_size, weights_file)


class TorchvisionResNet(Architecture):
    """A torchvision ResNet; its ImageNet weights come from the torch hub cache."""

    def __init__(self, constructor, weights: tvm.WeightsEnum):
        self.constructor = constructor
        self.weights = weights

    def build(self, num_classes, image_size):
        return self.constructor(weights=None, num_classes=num_classes)

    def classifier_path(self, net):
        return "fc"

    def feature_stage_path(self, net):
        return f"layer4.{len(net.layer4) - 1}"

    def stage_paths(self, net):
        return ("layer1", "layer2", "layer3", "layer4")

    def standard_weights(self):
        label = f"imagenet:{type(self.weights).__name__}.{self.weights.name}"
        url = self.weights.url
        return StandardWeights(label=label, fetch=lambda: fetch_url(url, description=f"{label} weights"),
                               mean=IMAGENET_MEAN, std=IMAGENET_STD)


class FashionNetArchitecture(Architecture):
    """FashionNet-Small/Medium: no pretrained weights exist; trained from raw ``[0, 1]`` pixels."""

    def __init__(self, variant: str):
        self.config = FASHIONNET_CONFIGS[variant]

    def build(self, num_classes, image_size):
        return FashionNet(self.config, num_classes=num_classes)

    def classifier_path(self, net):
        return "head"

    def feature_stage_path(self, net):
        return f"stage{net.num_stages}.{len(net.stages[-1]) - 1}"

    def stage_paths(self, net):
        return ("stem", *(f"stage{i}" for i in range(1, net.num_stages + 1)))


def _rgb(values: Sequence[float]) -> tuple[float, float, float]:
    """timm's per-channel mean or std (a tuple of any length in its types) as the (R, G, B) FGVCNet takes."""
    red, green, blue = values
    return (red, green, blue)


class TimmArchitecture(Architecture):
    """Any timm model, named ``timm:<name>`` (a pretrained tag is allowed: ``timm:resnet10t.c3_in1k``)."""

    def __init__(self, model_name: str):
        problem = timm_name_problem(model_name)
        if problem:
            raise ConfigError(problem)
        self.cfg = timm.models.get_pretrained_cfg(model_name)
        self.model_name = model_name

    def _size_kwargs(self, image_size) -> dict[str, Any]:
        # Only models with a fixed input size (e.g. ViTs: position embeddings) take img_size.
        if image_size is not None and self.cfg is not None and self.cfg.fixed_input_size:
            return {"img_size": tuple(image_size)}
        return {}

    def build(self, num_classes, image_size):
        return timm.create_model(self.model_name, pretrained=False, num_classes=num_classes,
                                 **self._size_kwargs(image_size))

    def classifier_path(self, net):
        classifier = net.get_classifier()
        for name, module in net.named_modules():
            if module is classifier and name:
                return name
        raise ConfigError(f"timm model {self.model_name} has no single classifier module to replace")

    def feature_stage_path(self, net):
        paths = self.stage_paths(net)
        return paths[-1] if paths else None

    def stage_paths(self, net):
        found = []
        for entry in getattr(net, "feature_info", None) or ():
            name = entry["module"]
            # Some timm models flatten dotted names with underscores in feature_info.
            for candidate in (name, name.replace("_", ".")):
                try:
                    net.get_submodule(candidate)
                except AttributeError:
                    continue
                found.append(candidate)
                break
        return tuple(found)

    def standard_weights(self):
        cfg = self.cfg
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            return None
        label = cfg.hf_hub_id or (f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture)
        name = self.model_name
        return StandardWeights(label=f"timm:{label}", fetch=lambda: fetch_timm_weights(name),
                               mean=_rgb(cfg.mean), std=_rgb(cfg.std))

    def build_with_standard_weights(self, num_classes, image_size, weights_file: Path) -> nn.Module:
        # timm loads the file itself so its checkpoint filters and classifier adaptation apply;
        # the "file" override means timm never contacts the hub or a URL.
        try:
            return timm.create_model(self.model_name, pretrained=True, num_classes=num_classes,
                                     pretrained_cfg_overlay={"file": str(weights_file)},
                                     **self._size_kwargs(image_size))
        except Exception as error:
            raise PretrainedWeightsError(
                f"Could not load timm weights for {self.model_name} from {weights_file}: {error}") from error




def register_arch(name: str, architecture: Architecture) -> None:
    """Make ``architecture`` buildable as ``create_model(name, ...)``."""
    if name.startswith(TIMM_PREFIX):
        raise ValueError(f"Names starting with {TIMM_PREFIX!r} are reserved for timm models")
    ARCHS.register(name, architecture)


register_arch("resnet18", TorchvisionResNet(tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1))
register_arch("resnet34", TorchvisionResNet(tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1))
register_arch("resnet50", TorchvisionResNet(tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2))
register_arch("fn-small", FashionNetArchitecture("small"))
register_arch("fn-medium", FashionNetArchitecture("medium"))


def available_archs() -> list[str]:
    """Registered architecture names. Any timm model is also available as ``timm:<name>``."""
    return sorted(ARCHS.names())


def architecture_of(arch: str) -> Architecture:
    if arch in ARCHS:
        return ARCHS.get(arch)
    if arch.startswith(TIMM_PREFIX):
        return TimmArchitecture(arch[len(TIMM_PREFIX):])
    raise ConfigError(f"Unknown arch {arch!r}. Valid names: {', '.join(available_archs())}; "
                      f"or any timm model as '{TIMM_PREFIX}<name>' (e.g. '{TIMM_PREFIX}convnext_atto').")
