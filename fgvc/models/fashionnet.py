"""FashionNet-Small and FashionNet-Medium: plain VGG-style CNNs trained from scratch.

Both networks are a two-conv stem followed by three stages of 3x3 conv + BatchNorm + ReLU
blocks, global average pooling and one linear head. The layers, their shapes (convs carry a bias)
and their initialisation are those of the original project's FashionNetSmall / FashionNetMedium,
so its checkpoints load tensor for tensor (see :mod:`fgvc.models.original`); 50 classes give
1,953,202 (Small) and 5,280,050 (Medium) parameters. Overall stride is 8 (one stride-2 conv in
the stem, one at the start of stages 2 and 3), so a 224x224 image gives a 28x28 map in stage 3.

The models are registered with timm (``timm.create_model("fashionnet_small", num_classes=10)``)
once this module is imported. No pretrained weights exist for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models import register_model
from torch import nn

__all__ = ["ConvBNReLU", "FashionNet", "FashionNetConfig", "FASHIONNET_CONFIGS"]


@dataclass(frozen=True)
class FashionNetConfig:
    """Channel layout of one FashionNet variant.

    ``stem`` lists the output channels of the two stem convs (strides 1 and 2). Each entry of
    ``stages`` lists the output channels of that stage's blocks; the first block of every stage
    after the first has stride 2.
    """

    stem: tuple[int, int]
    stages: tuple[tuple[int, ...], ...]

    @property
    def num_features(self) -> int:
        """Width of the pooled embedding: the channels of the last block."""
        return self.stages[-1][-1]


FASHIONNET_CONFIGS: dict[str, FashionNetConfig] = {
    "small": FashionNetConfig(stem=(32, 64), stages=((64, 64), (128, 128, 128), (256, 256, 256))),
    "medium": FashionNetConfig(stem=(32, 64), stages=((128, 128), (256, 256, 256), (384, 384, 384))),
}


class ConvBNReLU(nn.Sequential):
    """3x3 conv + BatchNorm + ReLU; padding keeps H, W at stride 1 and halves them (rounding up)
    at stride 2. The conv keeps its bias although BatchNorm makes it redundant: the original
    project's checkpoints hold one per conv."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)


class FashionNet(nn.Module):
    """FashionNet classifier.

    ``forward_feature_maps(x)`` gives the stage-3 map ``[B, D, H/8, W/8]``, ``forward_features(x)``
    the pooled embedding ``[B, D]``, ``forward_head(f)`` the logits ``[B, num_classes]``.
    ``num_classes=0`` replaces the head with an identity, so ``forward`` returns the embedding.
    """

    pretrained_cfg: dict[str, object]  # timm's data config, set by the timm entry point below

    def __init__(self, config: FashionNetConfig, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0):
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.num_features = config.num_features
        stem_mid, stem_out = config.stem
        self.stem = nn.Sequential(ConvBNReLU(in_chans, stem_mid, 1), ConvBNReLU(stem_mid, stem_out, 2))
        channels = stem_out
        for index, widths in enumerate(config.stages, start=1):
            blocks = []
            for block_index, width in enumerate(widths):
                stride = 2 if (index > 1 and block_index == 0) else 1
                blocks.append(ConvBNReLU(channels, width, stride))
                channels = width
            self.add_module(f"stage{index}", nn.Sequential(*blocks))
        self.num_stages = len(config.stages)
        # timm's feature-extraction metadata: channels and stride of each stage's output.
        self.feature_info = [dict(num_chs=stem_out, reduction=2, module="stem")] + [
            dict(num_chs=widths[-1], reduction=2 ** i, module=f"stage{i}")
            for i, widths in enumerate(config.stages, start=1)
        ]
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self._init_head()

    def _init_head(self) -> None:
        if isinstance(self.head, nn.Linear):
            nn.init.normal_(self.head.weight, mean=0.0, std=0.01)
            nn.init.zeros_(self.head.bias)

    @property
    def stages(self) -> list[nn.Sequential]:
        """The three stages, in order."""
        return [getattr(self, f"stage{i}") for i in range(1, self.num_stages + 1)]

    @property
    def last_block(self) -> nn.Module:
        """Last conv block of the last stage: the Grad-CAM target layer."""
        return self.stages[-1][-1]

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one (timm convention)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_head()

    def forward_feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, H, W]`` -> stage-3 feature map ``[B, D, ceil(H/8), ceil(W/8)]``."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_in, H, W]`` -> pooled embedding ``[B, D]``."""
        return self.global_pool(self.forward_feature_maps(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled embedding ``[B, D]`` -> logits ``[B, num_classes]``."""
        return self.head(self.drop(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _fashionnet(variant: str, pretrained: bool, **kwargs) -> FashionNet:
    if pretrained:
        raise RuntimeError(
            f"No pretrained weights exist for fashionnet_{variant}: FashionNet is trained from "
            "scratch. Use pretrained=False, or load a state_dict from your own checkpoint."
        )
    # timm's create_model always passes these; FashionNet has no pretrained configs to use them.
    for unused in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(unused, None)
    model = FashionNet(FASHIONNET_CONFIGS[variant], **kwargs)
    # timm.data.resolve_data_config reads the input recipe from this attribute.
    model.pretrained_cfg = dict(_DATA_CFG, architecture=f"fashionnet_{variant}")
    return model


# timm reads per-architecture data configs from ``default_cfgs`` when registering. No url or
# hub id: timm then knows no weights exist. Mean 0 / std 1: FashionNet takes raw [0, 1] pixels.
_DATA_CFG = dict(input_size=(3, 224, 224), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                 interpolation="bilinear", crop_pct=1.0, first_conv="stem.0.conv", classifier="head",
                 num_classes=1000)
default_cfgs = {"fashionnet_small": dict(_DATA_CFG), "fashionnet_medium": dict(_DATA_CFG)}


@register_model
def fashionnet_small(pretrained: bool = False, **kwargs) -> FashionNet:
    """FashionNet-Small: stages 64,64 | 128(s2),128,128 | 256(s2),256,256; 256-d embedding."""
    return _fashionnet("small", pretrained, **kwargs)


@register_model
def fashionnet_medium(pretrained: bool = False, **kwargs) -> FashionNet:
    """FashionNet-Medium: stages 128,128 | 256(s2),256,256 | 384(s2),384,384; 384-d embedding."""
    return _fashionnet("medium", pretrained, **kwargs)
