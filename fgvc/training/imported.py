"""Checkpoints of the original project's scripts, brought in as fgvc models.

`fgvc register --checkpoint best_resnet50.pt --arch resnet50 --data-root ROOT` loads the
checkpoint exactly (fgvc.models.original), evaluates it on the root's validation split the
way a training evaluates an epoch, and writes it as an fgvc checkpoint (state_dict + spec +
label names), so it can be registered and analysed like a model fgvc trained.

Input normalisation follows the original scripts' rule: ImageNet statistics for a ResNet
trained from ImageNet weights (its default), none for one trained ``--from_scratch`` and
for FashionNet (always trained from scratch on raw pixels); ``--normalization`` says which.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fgvc.data.dataset import BatchLoader, ShardDataset
from fgvc.devices import resolve_device
from fgvc.errors import ConfigError
from fgvc.models import FGVCNet
from fgvc.models.original import (
    ORIGINAL_ARCHS,
    ClassCountError,
    Normalization,
    detect_arch,
    import_original,
    read_original_state,
)
from fgvc.regimes import regime_of
from fgvc.safeload import require_finite
from fgvc.training.checkpoint import save_checkpoint
from fgvc.training.config import RegisterConfig  # noqa: F401  (defined there, torch-free)
from fgvc.training.loop import EvalResult, evaluate
from fgvc.training.session import TrainingData


@dataclass
class Imported:
    model: FGVCNet
    arch: str
    normalization: str
    data: TrainingData
    val: EvalResult
    val_set: ShardDataset


def import_checkpoint(cfg: RegisterConfig) -> Imported:
    """Load, check against the data root (class count, image size) and evaluate."""
    state = read_original_state(cfg.checkpoint)
    require_finite(state, cfg.checkpoint)
    arch = cfg.arch or detect_arch(state)
    if arch is None:
        raise ConfigError(f"{cfg.checkpoint}: its tensors fit none of {', '.join(ORIGINAL_ARCHS)}; pass --arch")
    normalization: Normalization = cfg.normalization or ("none" if arch.startswith("fn-") else "imagenet")
    data = TrainingData.of(cfg.data_root)
    try:
        model = import_original(state, arch, data.num_classes, normalization=normalization,
                                image_size=data.image_size, source=cfg.checkpoint)
    except ClassCountError as e:
        raise ConfigError(f"{e} ({data.root})") from None
    device = resolve_device(cfg.device)
    model = model.to(device).eval()
    val_set = ShardDataset(data.root, "val")
    val = evaluate(model, BatchLoader(val_set, cfg.batch_size, device=device, prefetch=0), data.num_classes, device)
    return Imported(model.cpu(), arch, normalization, data, val, val_set)


def fgvc_checkpoint(imported: Imported, path: Path) -> Path:
    """The imported model as an fgvc best.pt (what a registered version holds)."""
    return save_checkpoint(path, {"model": {k: v.detach().cpu() for k, v in imported.model.state_dict().items()},
                       "spec": imported.model.spec.to_dict(), "epoch": 0, "val_acc": imported.val.acc,
                       "dataset_digest": imported.data.digest, "label_names": list(imported.data.label_names),
                       "regime": regime_of(imported.data.masked, None), "resize": imported.data.resize,
                       "config": {"checkpoint": str(Path(imported.model.spec.pretrained))}})


def example_images(val_set: ShardDataset, count: int = 2) -> np.ndarray:
    items = val_set.gather(torch.arange(min(count, len(val_set))))
    return items["images"].permute(0, 2, 3, 1).contiguous().numpy()
