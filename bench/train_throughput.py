"""Training throughput, side by side in one run, on the same shards, model and batch size:

  (a) raw model step: forward, backward, optimiser step on a batch already in memory;
  (b) our training loop: `fgvc.training.loop.train_one_epoch` over `BatchLoader` (memory-mapped
      shards, batched gather, augmentation in the prefetch thread), plus the per-epoch
      tracking work of `fgvc train` (checkpoint + metrics + plots, timed separately, amortised
      over the epoch);
  (c) the original approach: shards loaded into RAM, a per-sample `Dataset.__getitem__` with
      torchvision transforms, a standard `DataLoader`.

Prints (b)/(a) and (b)/(c), without and with augmentation.

    python bench/train_throughput.py [--arch resnet18] [--images 1024] [--height 64 --width 48]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from fgvc.data.dataset import BatchLoader, ShardDataset
from fgvc.data.shards import make_shard, write_shard
from fgvc.models import create_model
from fgvc.training.augment import get_preset
from fgvc.training.loop import build_optimizer, train_one_epoch


def make_root(root: Path, images: int, height: int, width: int, classes: int = 10, shard_size: int = 500) -> None:
    g = torch.Generator().manual_seed(0)
    for k, start in enumerate(range(0, images, shard_size)):
        n = min(shard_size, images - start)
        x = torch.randint(0, 256, (n, 3, height, width), generator=g, dtype=torch.uint8)
        y = torch.randint(0, classes, (n,), generator=g)
        write_shard(root / "train" / f"shard_{k:03d}.pt", make_shard(x, y, classes))


def fresh_model(arch: str, classes: int, size):
    torch.manual_seed(0)
    model = create_model(arch, classes, pretrained="false", image_size=size)
    return model, build_optimizer(model, 1e-4, 1e-3, 0.05), nn.CrossEntropyLoss(label_smoothing=0.1)


def raw_step_rate(arch, classes, size, batch, steps) -> float:
    model, opt, loss_fn = fresh_model(arch, classes, size)
    model.train()
    x = torch.rand(batch, 3, *size)
    y = torch.randint(0, classes, (batch,))

    def step():
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def our_loop_rate(root, arch, classes, size, batch, aug) -> tuple[float, float]:
    """Images/s of train_one_epoch over our loader, and the same including the per-epoch
    tracking work (checkpoint files + metrics + plots logged to a local MLflow store)."""
    from fgvc.viz.training_plots import save_curves

    model, opt, loss_fn = fresh_model(arch, classes, size)
    ds = ShardDataset(root, "train")
    loader = BatchLoader(ds, batch, shuffle=True, seed=0, transform=get_preset(aug), prefetch=2)
    loader.set_epoch(0)
    train_one_epoch(model, BatchLoader(ds, batch, prefetch=0, transform=get_preset(aug)), opt, loss_fn,
                    torch.device("cpu"))  # warm-up epoch
    loader.set_epoch(1)
    stats = train_one_epoch(model, loader, opt, loss_fn, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        mlflow.set_experiment("bench")
        with mlflow.start_run():
            start = time.perf_counter()
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f"{tmp}/last.pt")
            mlflow.log_artifact(f"{tmp}/last.pt", "checkpoints")
            mlflow.log_metrics({"train/loss": stats["loss"], "train/acc": stats["acc"]}, step=1)
            history = [{"epoch": 1, "train/loss": stats["loss"], "val/loss": stats["loss"]}]
            mlflow.log_artifact(str(save_curves(Path(tmp) / "loss.png", history,
                                                {"train/loss": "train", "val/loss": "val"}, "", "")), "plots")
            tracking_s = time.perf_counter() - start
    return stats["images"] / stats["seconds"], stats["images"] / (stats["seconds"] + tracking_s)


class OriginalShardDataset(Dataset):
    """The original approach: every shard in RAM, per-sample conversion and transforms."""

    def __init__(self, root: Path, transform):
        shards = [torch.load(p, weights_only=True) for p in sorted((root / "train").glob("*.pt"))]
        self.images = torch.cat([s["images"] for s in shards])
        self.labels = torch.cat([s["labels"] for s in shards])
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i].float() / 255.0
        return self.transform(image), self.labels[i]


def original_transform(size, aug: bool):
    if not aug:
        return T.Compose([])
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.3, 0.3, 0.3, 0.08),
        T.RandomApply([T.GaussianBlur(3)], p=0.3),
        T.RandomErasing(p=0.4, scale=(0.02, 0.2), ratio=(0.3, 3.3), value="random"),
    ])


def original_loop_rate(root, arch, classes, size, batch, aug, workers) -> float:
    model, opt, loss_fn = fresh_model(arch, classes, size)
    model.train()
    loader = DataLoader(OriginalShardDataset(root, original_transform(size, aug)), batch_size=batch,
                        shuffle=True, num_workers=workers)
    for epoch in range(2):  # first epoch warms up
        n, start = 0, time.perf_counter()
        for x, y in loader:
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(y)
    return n / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="median over this many measurements")
    parser.add_argument("--original-workers", type=int, default=0,
                        help="DataLoader workers for the original approach (its scripts used 0-2)")
    args = parser.parse_args()
    size = (args.height, args.width)
    steps = max(2, args.images // args.batch)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}; "
          f"{args.arch}, {args.images} images {args.height}x{args.width}, batch {args.batch}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        make_root(root, args.images, *size)
        med = lambda f: statistics.median(f() for _ in range(args.repeats))  # noqa: E731
        raw = med(lambda: raw_step_rate(args.arch, 10, size, args.batch, steps))
        print(f"(a) raw model step:                 {raw:8.1f} img/s")
        for aug in (False, True):
            ours = [our_loop_rate(root, args.arch, 10, size, args.batch, aug) for _ in range(args.repeats)]
            loop = statistics.median(o[0] for o in ours)
            tracked = statistics.median(o[1] for o in ours)
            orig = med(lambda: original_loop_rate(root, args.arch, 10, size, args.batch, aug,
                                                  args.original_workers))
            tag = "aug  " if aug else "noaug"
            target = 0.80 if aug else 0.90
            print(f"[{tag}] (b) our loop:                 {loop:8.1f} img/s; with per-epoch tracking "
                  f"{tracked:8.1f} img/s")
            print(f"[{tag}] (c) original loop:            {orig:8.1f} img/s")
            print(f"[{tag}] (b)/(a) = {loop / raw:.3f} (target >= {target:.2f}); with tracking "
                  f"{tracked / raw:.3f}; (b)/(c) = {loop / orig:.2f} (target >= 1)")


if __name__ == "__main__":
    main()
