"""Training configuration: every knob of a run, with the original scripts' defaults."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

import torch

DEFAULT_DATA_ROOT = "data/demo"


@dataclass
class TrainConfig:
    arch: str = "resnet18"
    pretrained: str = "auto"  # auto | true | false | path to a weights file
    data_root: str = DEFAULT_DATA_ROOT
    aug: str = "false"  # false | true (= the "heavy" recipe) | a preset name
    epochs: int = 6
    batch_size: int = 64
    lr_head: float = 1e-3
    lr_backbone: float | None = None  # None: 1e-4 for ResNets/timm, lr_head for FashionNet
    weight_decay: float | None = None  # None: 0.05 for ResNets/timm, 0.01 for FashionNet
    label_smoothing: float = 0.1
    seed: int = 0
    train_count: int | None = None
    val_count: int | None = None
    num_workers: int = 1  # background loader threads; 0 loads in the training thread
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (on for CUDA) | true | false
    channels_last: str = "auto"  # auto (on for CUDA) | true | false
    grad_clip: float = 0.0  # max gradient norm; 0 = off

    def __post_init__(self):
        self.pretrained = str(self.pretrained).lower() if str(self.pretrained).lower() in (
            "auto", "true", "false") else str(self.pretrained)
        self.aug = str(self.aug).lower()
        for name in ("epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("train_count", "val_count"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                setattr(self, name, None)  # 0 / negative means "all", as in the original flags

    @property
    def is_fashionnet(self) -> bool:
        return self.arch.startswith("fn-")

    @property
    def effective_lr_backbone(self) -> float:
        if self.lr_backbone is not None:
            return self.lr_backbone
        return self.lr_head if self.is_fashionnet else 1e-4

    @property
    def effective_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.01 if self.is_fashionnet else 0.05

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device} requested but CUDA is not available")
        return device

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def identity(self) -> str:
        """Digest of the knobs that define the result (not device or worker count): finds
        the run to resume and the finished cells a study can reuse."""
        keep = {k: v for k, v in self.to_dict().items() if k not in ("device", "num_workers")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def regime_of(masked: bool, aug: str) -> str:
    """`unmasked-noaug`, `masked-aug`, ...: the data regime, used in run names and tags."""
    return f"{'masked' if masked else 'unmasked'}-{'noaug' if aug in ('false', 'none') else 'aug'}"
