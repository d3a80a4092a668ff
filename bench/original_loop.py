"""The original project's data path and training loop: the reference the benchmarks compare
our loader and loop with (one copy, used by train_throughput.py, data_loading.py, scale.py
and gpu.py).

- every shard of a split loaded whole into RAM with `torch.load` and concatenated;
- a per-sample `Dataset.__getitem__` returning `images[i].float() / 255` and the label, with
  optional torchvision (v1) transforms applied per sample on the CHW float tensor:
  RandomResizedCrop(scale 0.6-1, ratio 0.8-1.25), RandomHorizontalFlip,
  ColorJitter(0.3, 0.3, 0.3, 0.08), RandomApply(GaussianBlur(3), p=0.3),
  RandomErasing(p=0.4, scale 0.02-0.2, ratio 0.3-3.3, value="random");
- a torch `DataLoader(batch_size=64, shuffle=True, num_workers=6..12, pin_memory=True)`
  (a fresh set of worker processes every epoch, as its scripts did);
- AdamW, CrossEntropyLoss(label_smoothing=0.1), forward / backward / step per batch.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from fgvc.data.shards import shards_of

# The original scripts' DataLoader settings (num_workers was 6 to 12 depending on the script).
OWN_WORKERS = 6
BATCH_SIZE = 64


class OriginalShardDataset(Dataset):
    """All shards of a split in RAM (`torch.load`, concatenated); one float image per item."""

    def __init__(self, root: Path, split: str = "train", transform=None, limit: int | None = None):
        images, labels, held = [], [], 0
        for path in shards_of(root, split):
            shard = torch.load(path, weights_only=True)
            images.append(shard["images"])
            labels.append(shard["labels"])
            held += len(shard["labels"])
            if limit is not None and held >= limit:
                break
        self.images = torch.cat(images)[:limit]
        self.labels = torch.cat(labels)[:limit]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i].float() / 255.0
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[i]


def original_transform(size: tuple[int, int]):
    """The heavy recipe as the original wrote it (torchvision v1, per sample, CHW float)."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.3, 0.3, 0.3, 0.08),
        T.RandomApply([T.GaussianBlur(3)], p=0.3),
        T.RandomErasing(p=0.4, scale=(0.02, 0.2), ratio=(0.3, 3.3), value="random"),
    ])


def original_loader(dataset: Dataset, workers: int, batch_size: int = BATCH_SIZE,
                    pin_memory: bool | None = None) -> DataLoader:
    """The original's DataLoader. `pin_memory` defaults to True where a GPU is present (the
    original always asked for it; on a CPU-only machine torch ignores it with a warning)."""
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                      pin_memory=pin_memory)


class OriginalTrainer:
    """The original's per-batch step over its DataLoader: `run()` trains one epoch."""

    def __init__(self, model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype=None,
                 channels_last: bool = False):
        self.model, self.loader, self.device = model.to(device), loader, device
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.05)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
        self.amp_dtype, self.channels_last = amp_dtype, channels_last

    def run(self) -> int:
        self.model.train()
        images = 0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            for x, y in self.loader:
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss = self.criterion(self.model(x), y)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                images += len(y)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return images


def worker_settings(quick: bool) -> list[int]:
    """The original's DataLoader worker counts to measure: 0/1/2 (the best for a small
    machine is among them) and its own setting."""
    counts = [0] if quick else [0, 1, 2]
    return sorted({*counts, OWN_WORKERS})
