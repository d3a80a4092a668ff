"""The model every caller sees: an :class:`FGVCNet` and the :class:`ModelSpec` that rebuilds it.

Every model takes float images in ``[0, 1]`` shaped ``[B, 3, H, W]``, applies the input
normalisation its weights were trained with, and exposes the same ``forward_features`` /
``forward_head`` / ``feature_stage`` / ``stages`` surface whatever the backbone, so training and
analysis code never branch on architecture.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from fgvc.errors import ConfigError, FgvcError

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
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
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

    input_mean: torch.Tensor  # buffers, registered in __init__
    input_std: torch.Tensor

    def __init__(self, body: nn.Module, head: nn.Module, spec: ModelSpec, feature_stage_name: str | None,
                 stage_names: tuple[str, ...] = ()):
        super().__init__()
        self.body = body
        self.head = head
        self.spec = spec
        self.feature_stage_name = feature_stage_name
        self.stage_names = tuple(stage_names)  # body modules of the successive stages, shallow to deep
        self.num_classes = spec.num_classes
        in_features = head.in_features
        if not isinstance(in_features, int):
            raise ConfigError(f"{spec.arch}: classifier {type(head).__name__} has no integer in_features")
        self.num_features = in_features
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
