"""One model factory for every architecture: torchvision ResNets, FashionNet and any timm model.

``create_model(arch, num_classes, pretrained)`` builds an :class:`~fgvc.models.net.FGVCNet`
(starting from pretrained weights when asked, see fgvc.models.architectures);
``build_model(spec)`` rebuilds one from a checkpoint's spec at random init.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from fgvc.catalog import arch_problem
from fgvc.config import FALSE_WORDS, TRUE_WORDS
from fgvc.errors import ConfigError

from .architectures import ARCHS, Architecture, architecture_of, available_archs, register_arch
from .net import IMAGENET_MEAN, IMAGENET_STD, FGVCNet, ModelSpec, PretrainedWeightsError
from .weights import WeightsUnavailable
from .weights_file import load_weights_file

__all__ = [
    "ARCHS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Architecture",
    "FGVCNet",
    "ModelSpec",
    "PretrainedWeightsError",
    "arch_problem",
    "available_archs",
    "build_model",
    "create_model",
    "load_weights_file",
    "register_arch",
    "render_pretrained",
]

logger = logging.getLogger(__name__)


def render_pretrained(pretrained: bool | None | os.PathLike | str) -> str:
    """The request as recorded in a model spec: ``auto``, ``true``, ``false`` or the path."""
    if pretrained is None:
        return "auto"
    if isinstance(pretrained, bool):
        return "true" if pretrained else "false"
    return os.fspath(pretrained)


def pretrained_value(pretrained: bool | None | os.PathLike | str) -> bool | None | os.PathLike | str:
    """The typed request: ``None`` (auto), ``True``, ``False`` or a path. A command-line spelling
    passed from Python (``"auto"``, ``"true"``, ``"false"``, ``"yes"``, ...) that names no file
    means what it means on the command line."""
    if isinstance(pretrained, str) and not Path(pretrained).expanduser().exists():
        word = pretrained.strip().lower()
        if word == "auto":
            return None
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
    return pretrained


def _missing_weights(path: Path) -> str:
    hint = ""
    if len(path.parts) == 1 and not path.suffix:  # a bare word, not a path
        hint = (" (did you mean pretrained=None (auto: standard weights when they can be had), "
                "True (standard weights or stop) or False (random init)?)")
    return f"Weights file not found: {path}{hint}"


def image_size_of(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    height, width = (int(v) for v in image_size)
    return (height, width)


def _wrap(architecture: Architecture, net: nn.Module, spec: ModelSpec) -> FGVCNet:
    classifier_path = architecture.classifier_path(net)
    feature_stage = architecture.feature_stage_path(net)
    head = net.get_submodule(classifier_path)
    if not hasattr(head, "in_features"):
        raise ConfigError(f"{spec.arch}: classifier {classifier_path} ({type(head).__name__}) is not linear")
    stages = architecture.stage_paths(net)
    net.set_submodule(classifier_path, nn.Identity())
    return FGVCNet(net, head, spec, feature_stage, stages)


def create_model(arch: str, num_classes: int, pretrained: bool | None | os.PathLike | str = None,
                 image_size: int | tuple[int, int] | None = None) -> FGVCNet:
    """Build ``arch`` for ``num_classes`` classes.

    ``pretrained``:
      * ``None`` (auto, the default): the architecture's standard weights when they can be had
        (see :func:`obtain_standard_weights`); otherwise random init with a warning naming the
        URL and the cache path. FashionNet: random init (no pretrained weights exist).
      * ``True``: the standard weights, or :class:`PretrainedWeightsError` saying why not.
      * ``False``: random init.
      * a path: that state_dict (classifier tensors of another class count are re-initialised).
      * the command line's words (``"auto"``, ``"true"``, ``"false"``) mean the same values.

    The input normalisation is the weights' own (ImageNet mean/std for torchvision ImageNet
    weights and for a weights file given to a ResNet; the model's pretrained config for timm) and
    identity for random init.
    """
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    architecture = architecture_of(arch)
    size = image_size_of(image_size)
    pretrained = pretrained_value(pretrained)
    if pretrained is False:
        net, effective, mean, std = architecture.build(num_classes, size), "none", None, None
    elif pretrained is None or pretrained is True:
        net, effective, mean, std = _build_standard(architecture, arch, num_classes, size,
                                                    required=pretrained is True)
    else:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise PretrainedWeightsError(_missing_weights(path))
        net = architecture.build_with_weights(num_classes, size, path)
        effective = f"file:{path.resolve()}"
        # A weights file for a pretrainable architecture is taken to share the standard weights'
        # input recipe; FashionNet checkpoints come from scratch training on raw pixels.
        usual = architecture.standard_weights()
        mean, std = (usual.mean, usual.std) if usual is not None else (None, None)
    spec = ModelSpec(arch=arch, num_classes=num_classes, image_size=size,
                     pretrained=render_pretrained(pretrained), pretrained_effective=effective,
                     mean=mean, std=std)
    return _wrap(architecture, net, spec)


def _build_standard(architecture: Architecture, arch: str, num_classes: int,
                    size: tuple[int, int] | None, required: bool):
    """Auto / required standard weights: the weights file when it can be had, else random init
    (auto, with a warning saying why) or an error (required).
    Returns ``(net, pretrained_effective, mean, std)``."""
    standard = architecture.standard_weights()
    if standard is None:
        if required:
            raise PretrainedWeightsError(
                f"No pretrained weights exist for {arch}. Use pretrained=false (random init) "
                "or pretrained=/path/to/weights.pth.")
        return architecture.build(num_classes, size), "none", None, None
    try:
        weights_file = standard.obtain()
    except WeightsUnavailable as error:
        if required:
            raise PretrainedWeightsError(str(error)) from None
        warnings.warn(f"{error} Falling back to random initialisation.", stacklevel=3)
        return architecture.build(num_classes, size), "none", None, None
    net = architecture.build_with_standard_weights(num_classes, size, weights_file)
    logger.info("%s: loaded %s from %s", arch, standard.label, weights_file)
    return net, standard.label, standard.mean, standard.std


def build_model(spec: ModelSpec | Mapping[str, Any]) -> FGVCNet:
    """Rebuild the architecture described by ``spec`` (a :class:`ModelSpec` or its ``to_dict()``)
    at random init, with the same normalisation buffers; load a checkpoint's state_dict next.
    Never reads pretrained weights."""
    if not isinstance(spec, ModelSpec):
        spec = ModelSpec.from_dict(spec)
    architecture = architecture_of(spec.arch)
    net = architecture.build(spec.num_classes, spec.image_size)
    return _wrap(architecture, net, spec)
