"""Data loading: batches per second against the original per-sample loader, and memory.

    python bench/data_loading.py                      # 2,000 images at 224x224, batch 64
    python bench/data_loading.py --images 500 --size 128 --epochs 2

Throughput, side by side on the same shards (random uint8 images, written to a temp dir):
  ours      ShardDataset + BatchLoader: memory-mapped shards, whole-batch gathers, shuffled,
            float conversion on the CPU, background prefetch.
  original  every shard loaded whole into RAM with torch.load, a per-sample Dataset whose
            __getitem__ converts one image to float (/255), a standard DataLoader
            (shuffle=True, num_workers=0).
Every float batch is consumed (summed), so no work can be skipped. The two loaders alternate
epoch by epoch and each reports its median epoch, so load from other processes hits both alike.

Memory: anonymous resident memory (RssAnon) growth from just before iterating to the peak
during one epoch of our loader, over 1x and Kx the data, each in a fresh subprocess. Shards are
memory-mapped, so file pages are shared and reclaimable; the growth should not scale with data.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fgvc.data.dataset import BatchLoader, ShardDataset  # noqa: E402
from fgvc.data.shards import make_shard, shard_name, shards_of, write_shard  # noqa: E402


def build_root(root: Path, images: int, size: int, shard_size: int, num_classes: int, seed: int) -> Path:
    """A dataset root with a `train` split of random uint8 images."""
    g = torch.Generator().manual_seed(seed)
    for k, start in enumerate(range(0, images, shard_size)):
        n = min(shard_size, images - start)
        pixels = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        write_shard(root / "train" / shard_name(k), make_shard(pixels, labels, num_classes))
    return root


class OriginalShardDataset(Dataset):
    """The original project's loader: all shards in RAM, one float image per __getitem__."""

    def __init__(self, root: Path):
        shards = [torch.load(p, weights_only=True) for p in shards_of(root, "train")]
        self.images = torch.cat([s["images"] for s in shards])
        self.labels = torch.cat([s["labels"] for s in shards])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i].float() / 255.0, self.labels[i]


def epoch_ours(loader: BatchLoader, epoch: int) -> tuple[int, float]:
    loader.set_epoch(epoch)
    batches, total = 0, 0.0
    for batch in loader:
        total += float(batch.images.sum()) + float(batch.labels.sum())
        batches += 1
    return batches, total


def epoch_original(loader: DataLoader) -> tuple[int, float]:
    batches, total = 0, 0.0
    for images, labels in loader:
        total += float(images.sum()) + float(labels.sum())
        batches += 1
    return batches, total


def timed(fn) -> tuple[float, int]:
    start = time.perf_counter()
    batches, _ = fn()
    return time.perf_counter() - start, batches


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("RssAnon not found in /proc/self/status (Linux only)")


def measure_memory(root: Path, batch_size: int) -> dict:
    """One shuffled epoch of our loader; RssAnon before iterating and its peak during."""
    loader = BatchLoader(ShardDataset(root, "train"), batch_size, shuffle=True, seed=0)
    before = rss_anon_bytes()
    peak = before
    done = threading.Event()

    def sample():  # catches transient peaks inside a batch, not only between batches
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_anon_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    images = 0
    total = 0.0
    for batch in loader:
        total += float(batch.images.sum())
        images += len(batch.labels)
        peak = max(peak, rss_anon_bytes())
    done.set()
    sampler.join()
    return {"images": images, "before": before, "peak": peak, "growth": peak - before, "checksum": total}


def memory_in_subprocess(root: Path, batch_size: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-of", str(root), "--batch-size", str(batch_size)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000, help="images in the 1x dataset")
    p.add_argument("--size", type=int, default=224, help="image height and width")
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per loader")
    p.add_argument("--memory-scale", type=int, default=4, help="K: the memory test compares 1x and Kx")
    p.add_argument("--workdir", type=Path, default=None, help="where to write shards (default: a temp dir)")
    p.add_argument("--memory-of", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.memory_of is not None:
        print(json.dumps(measure_memory(args.memory_of, args.batch_size)))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="fgvc-bench-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        one = build_root(tmp / "x1", args.images, args.size, args.shard_size, args.classes, seed=1)
        many = build_root(tmp / f"x{args.memory_scale}", args.images * args.memory_scale, args.size,
                          args.shard_size, args.classes, seed=2)
        print(f"data: {args.images} images {args.size}x{args.size} uint8 in shards of {args.shard_size} "
              f"({mib(args.images * 3 * args.size ** 2)}), and {args.memory_scale}x that; "
              f"written in {time.perf_counter() - t:.1f} s")
        print(f"threads: torch {torch.get_num_threads()}; batch {args.batch_size}; "
              f"{args.epochs} timed epochs each after one warm-up")

        ours = BatchLoader(ShardDataset(one, "train"), args.batch_size, shuffle=True, seed=0)
        original = DataLoader(OriginalShardDataset(one), batch_size=args.batch_size, shuffle=True,
                              num_workers=0)
        epoch_ours(ours, 0)
        epoch_original(original)
        times = {"ours": [], "original": []}
        for epoch in range(1, args.epochs + 1):
            seconds, n_ours = timed(lambda: epoch_ours(ours, epoch))
            times["ours"].append(seconds)
            seconds, n_original = timed(lambda: epoch_original(original))
            times["original"].append(seconds)
        assert n_ours == n_original, (n_ours, n_original)
        rate = {k: n_ours / statistics.median(v) for k, v in times.items()}
        print("\nthroughput (median epoch):")
        for name in ("ours", "original"):
            print(f"  {name:9s} {rate[name]:8.1f} batches/s  {rate[name] * args.batch_size:9.0f} img/s  "
                  f"epochs {', '.join(f'{s:.2f}' for s in times[name])} s")
        ratio = rate["ours"] / rate["original"]
        print(f"  ratio ours/original: {ratio:.2f}x (target >= 3x: {'met' if ratio >= 3 else 'NOT met'})")
        del original

        print("\nmemory (RssAnon, one shuffled epoch of ours, fresh subprocess each):")
        small = memory_in_subprocess(one, args.batch_size)
        large = memory_in_subprocess(many, args.batch_size)
        for label, m in (("1x", small), (f"{args.memory_scale}x", large)):
            print(f"  {label:3s} {m['images']:6d} images: before {mib(m['before'])}, peak {mib(m['peak'])}, "
                  f"growth {mib(m['growth'])}")
        growth_ratio = large["growth"] / max(small["growth"], 1)
        print(f"  growth {args.memory_scale}x / 1x: {growth_ratio:.2f} "
              f"(target <= 1.10: {'met' if growth_ratio <= 1.10 else 'NOT met'})")


if __name__ == "__main__":
    main()
