"""One model factory for every architecture: torchvision ResNets, FashionNet and any timm model.

Every model comes back as an :class:`FGVCNet`: it takes float images in ``[0, 1]`` shaped
``[B, 3, H, W]``, applies the input normalisation its weights were trained with, and exposes the
same ``forward_features`` / ``forward_head`` / ``feature_stage`` surface whatever the backbone, so
training and analysis code never branch on architecture.

Pretrained weights come the standard way (fgvc.models.weights): torchvision's files through the
torch hub cache under ``TORCH_HOME``, timm's through the Hugging Face cache, downloaded into the
cache when missing and the network allows; or from an explicit path.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import timm
import torch
import torchvision.models as tvm
from torch import nn

from fgvc.errors import ConfigError, FgvcError
from fgvc.registry import Registry
from fgvc.safeload import load_tensors

from .fashionnet import FASHIONNET_CONFIGS, FashionNet
from .weights import WeightsUnavailable, fetch_timm_weights, fetch_url

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

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_PREFIX = "timm:"


class PretrainedWeightsError(FgvcError):
    """Requested weights cannot be had, or a weights file does not fit the model."""


# --------------------------------------------------------------------------------------------
# Spec: everything needed to rebuild a model before loading a checkpoint's state_dict.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """How a model was built.

    ``pretrained`` is the request (``"auto"``, ``"true"``, ``"false"`` or a file path);
    ``pretrained_effective`` is what happened: ``"imagenet:<torchvision weights enum>"``,
    ``"timm:<hub id>"``, ``"file:<absolute path>"`` or ``"none"`` (random init).
    ``mean`` / ``std`` are the per-channel input normalisation for ``[0, 1]`` pixels, or ``None``
    when the model sees raw pixels. ``image_size`` is ``(H, W)`` in pixels, or ``None`` if unknown.
    """

    arch: str
    num_classes: int
    image_size: tuple[int, int] | None = None
    pretrained: str = "auto"
    pretrained_effective: str = "none"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists)."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelSpec":
        """Inverse of :meth:`to_dict`; also accepts the output of ``json.loads``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown ModelSpec fields {unknown}; expected a subset of {sorted(known)}")
        values = dict(data)
        for key in ("image_size", "mean", "std"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        if values.get("image_size") is not None:
            values["image_size"] = tuple(int(v) for v in values["image_size"])
        return cls(**values)


# --------------------------------------------------------------------------------------------
# The wrapper every caller sees.
# --------------------------------------------------------------------------------------------

class FGVCNet(nn.Module):
    """Normalisation + backbone body + linear head, with one interface for every architecture.

    ``body`` maps normalised images ``[B, 3, H, W]`` to the pooled embedding ``[B, D]``;
    ``head`` maps it to logits ``[B, C]``. The normalisation lives in the buffers
    ``input_mean`` / ``input_std`` (``[1, 3, 1, 1]``; zeros / ones when ``spec.mean`` is ``None``)
    so it travels with every checkpoint.
    """

    def __init__(self, body: nn.Module, head: nn.Module, spec: ModelSpec, feature_stage_name: str | None,
                 stage_names: tuple[str, ...] = ()):
        super().__init__()
        self.body = body
        self.head = head
        self.spec = spec
        self.feature_stage_name = feature_stage_name
        self.stage_names = tuple(stage_names)  # body modules of the successive stages, shallow to deep
        self.num_classes = spec.num_classes
        self.num_features = int(head.in_features)
        mean = spec.mean if spec.mean is not None else (0.0, 0.0, 0.0)
        std = spec.std if spec.std is not None else (1.0, 1.0, 1.0)
        self.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("input_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    @property
    def feature_stage(self) -> nn.Module:
        """Module whose output is the last feature map before pooling: the layer Grad-CAM hooks.

        ``[B, D, h, w]`` for CNNs (``layer4[-1]`` of a ResNet, the last block of FashionNet
        stage 3, timm's last ``feature_info`` stage); a timm transformer gives its last block's
        tokens instead."""
        if self.feature_stage_name is None:
            raise AttributeError(f"No convolutional feature stage is known for {self.spec.arch}")
        return self.body.get_submodule(self.feature_stage_name)

    def stages(self) -> list[tuple[str, nn.Module]]:
        """``(qualified name, module)`` of each stage, shallow to deep (names as in
        ``named_modules``: ``body.layer3``, ``body.stage2``): the layers Grad-CAM can read."""
        return [(f"body.{name}", self.body.get_submodule(name)) for name in self.stage_names]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``[0, 1]`` images -> the input distribution the backbone's weights expect."""
        return (x - self.input_mean) / self.input_std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` -> pooled embedding ``[B, D]``."""
        return self.body(self.normalize(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled embedding ``[B, D]`` -> logits ``[B, C]``."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in ``[0, 1]`` -> logits ``[B, C]``."""
        return self.forward_head(self.forward_features(x))

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the classifier (newly initialised for our classes)."""
        return self.head.parameters()

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter not in the head; disjoint from :meth:`head_parameters`."""
        return self.body.parameters()

    def extra_repr(self) -> str:
        return (f"arch={self.spec.arch!r}, num_classes={self.num_classes}, "
                f"pretrained_effective={self.spec.pretrained_effective!r}")


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


class TimmArchitecture(Architecture):
    """Any timm model, named ``timm:<name>`` (a pretrained tag is allowed: ``timm:resnet10t.c3_in1k``)."""

    def __init__(self, model_name: str):
        base_name, _ = timm.models.split_model_name_tag(model_name)
        if not timm.is_model(base_name):
            close = timm.list_models(f"*{base_name[:8]}*")[:10]
            hint = f" Similar timm names: {', '.join(close)}." if close else ""
            raise ConfigError(f"Unknown timm model {model_name!r}.{hint} "
                             "See timm.list_models() for every name.")
        try:
            self.cfg = timm.models.get_pretrained_cfg(model_name)
        except RuntimeError as error:  # a pretrained tag timm does not know
            tags = timm.list_pretrained(f"{base_name}.*")
            raise ConfigError(f"{error} Known tags: {', '.join(tags) or 'none'}.") from error
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
                               mean=tuple(cfg.mean), std=tuple(cfg.std))

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


ARCHS: Registry[Architecture] = Registry("architecture")


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


def _architecture(arch: str) -> Architecture:
    if arch in ARCHS:
        return ARCHS.get(arch)
    if arch.startswith(TIMM_PREFIX):
        return TimmArchitecture(arch[len(TIMM_PREFIX):])
    raise ConfigError(f"Unknown arch {arch!r}. Valid names: {', '.join(available_archs())}; "
                      f"or any timm model as '{TIMM_PREFIX}<name>' (e.g. '{TIMM_PREFIX}convnext_atto').")


def arch_problem(arch: str) -> str | None:
    """None for a buildable architecture name, else what is wrong with it (for option checks)."""
    try:
        _architecture(arch)
    except ConfigError as error:
        return str(error)
    return None


# --------------------------------------------------------------------------------------------
# Weights files.
# --------------------------------------------------------------------------------------------

def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file; unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` and a DDP
    ``module.`` prefix. Pickles are read with ``weights_only=True``: a file never runs code."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = load_tensors(path, what="weights file", error=PretrainedWeightsError)
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise PretrainedWeightsError(f"{path} does not hold a state_dict (found {type(state).__name__})")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def load_weights_file(net: nn.Module, path: Path, classifier_path: str) -> None:
    """Load a backbone state_dict from ``path`` into ``net`` (the raw network, before wrapping).

    Classifier tensors whose shape differs (another class count) are dropped and keep their fresh
    init; any other shape mismatch, or a file sharing no tensor with the model, is an error.
    Other missing / unexpected keys are reported with a warning.
    """
    state = _read_state_dict(path)
    own = net.state_dict()
    prefix = classifier_path + "."
    mismatched = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    wrong = [k for k in mismatched if not k.startswith(prefix)]
    if wrong:
        details = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:5])
        raise PretrainedWeightsError(f"{path} does not fit this architecture: shape mismatch for {details}")
    usable = {k: v for k, v in state.items() if k not in mismatched}
    if not any(k in own for k in usable):
        raise PretrainedWeightsError(f"{path} shares no tensor name with this architecture "
                                     f"(file keys start {list(state)[:3]}, model keys {list(own)[:3]})")
    result = net.load_state_dict(usable, strict=False)
    missing = [k for k in result.missing_keys
               if not k.startswith(prefix) and not k.endswith("num_batches_tracked")]
    if mismatched:
        logger.info("Classifier %s re-initialised: %s has another class count", classifier_path, path)
    if missing or result.unexpected_keys:
        message = (f"Weights file {path}: {len(missing)} model tensors missing from the file "
                   f"{missing[:10]}, {len(result.unexpected_keys)} unexpected file tensors "
                   f"{result.unexpected_keys[:10]}")
        warnings.warn(message, stacklevel=3)
        logger.warning(message)


# --------------------------------------------------------------------------------------------
# Public entry points.
# --------------------------------------------------------------------------------------------

def render_pretrained(pretrained: bool | None | os.PathLike | str) -> str:
    """The request as recorded in a model spec: ``auto``, ``true``, ``false`` or the path."""
    if pretrained is None:
        return "auto"
    if isinstance(pretrained, bool):
        return "true" if pretrained else "false"
    return os.fspath(pretrained)


def _image_size(image_size) -> tuple[int, int] | None:
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

    The input normalisation is the weights' own (ImageNet mean/std for torchvision ImageNet
    weights and for a weights file given to a ResNet; the model's pretrained config for timm) and
    identity for random init.
    """
    num_classes = int(num_classes)
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    architecture = _architecture(arch)
    size = _image_size(image_size)
    if pretrained is False:
        net, effective, mean, std = architecture.build(num_classes, size), "none", None, None
    elif pretrained is None or pretrained is True:
        net, effective, mean, std = _build_standard(architecture, arch, num_classes, size,
                                                    required=pretrained is True)
    else:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise PretrainedWeightsError(f"Weights file not found: {path}")
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
        message = f"{error} Falling back to random initialisation."
        warnings.warn(message, stacklevel=3)
        logger.warning("%s", message)
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
    architecture = _architecture(spec.arch)
    net = architecture.build(spec.num_classes, spec.image_size)
    return _wrap(architecture, net, spec)
