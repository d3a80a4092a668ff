"""Models: FashionNet and the one factory that builds every architecture as an :class:`FGVCNet`.

Importing this package registers ``fashionnet_small`` / ``fashionnet_medium`` with timm.
"""

from .factory import (
    ARCHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    FGVCNet,
    ModelSpec,
    PretrainedWeightsError,
    arch_problem,
    available_archs,
    build_model,
    create_model,
    register_arch,
    render_pretrained,
)
from .fashionnet import FASHIONNET_CONFIGS, FashionNet, FashionNetConfig

__all__ = [
    "ARCHS",
    "FASHIONNET_CONFIGS",
    "FashionNet",
    "FashionNetConfig",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FGVCNet",
    "ModelSpec",
    "PretrainedWeightsError",
    "arch_problem",
    "available_archs",
    "build_model",
    "create_model",
    "register_arch",
    "render_pretrained",
]
