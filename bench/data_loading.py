"""Data loading on the harness: our shard loader against the original in-RAM per-sample
Dataset + DataLoader, and how our loader's memory grows with the data.

Throughput, in interleaved rounds (one epoch of every contender per round) on the same shards
(random uint8 images, 224x160 by default); every float batch is consumed (summed), so no
work can be skipped:

  ours (N thr.)   ShardDataset + BatchLoader: memory-mapped shards, one gather per shard
                  and batch, seeded shuffle, float conversion in N loader threads (0: in
                  line);
  original (N w.) every shard loaded whole with torch.load and concatenated in RAM, a
                  per-sample Dataset returning images[i].float() / 255, a DataLoader with N
                  worker processes (shuffle=True; 0/1/2 and the original's own 6).

Target: our fastest setting >= 3x the original's fastest.

Memory: anonymous resident memory (RssAnon, /proc/self/status) growth from just before
iterating to the peak during one shuffled epoch of our loader (fastest thread setting), over
1x and Kx the data, each in a fresh process. Shards are memory-mapped (file pages, shared and
reclaimable), so the growth should not scale with the data: target Kx / 1x <= 1.10. The
original's RssAnon after building its dataset is shown beside it (it holds every image).

    python bench/data_loading.py --quick       # smoke run, under a minute: no figures
    python bench/data_loading.py               # 2,000 images 224x160 (and 8,000 for memory)
    python bench/data_loading.py --images 1000 --height 64 --width 48 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Contender, Machine, compare, report_target  # noqa: E402
from original_loop import OWN_WORKERS, OriginalShardDataset, original_loader  # noqa: E402

from fgvc.data.dataset import BatchLoader, ShardDataset  # noqa: E402
from fgvc.data.shards import make_shard, shard_name, write_shard  # noqa: E402

TARGET_SPEEDUP = 3.0
TARGET_GROWTH = 1.10


def build_root(root: Path, images: int, height: int, width: int, shard_size: int, num_classes: int,
               seed: int) -> Path:
    """A dataset root with a `train` split of random uint8 images."""
    g = torch.Generator().manual_seed(seed)
    for k, start in enumerate(range(0, images, shard_size)):
        n = min(shard_size, images - start)
        pixels = torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        write_shard(root / "train" / shard_name(k), make_shard(pixels, labels, num_classes))
    return root


def consume(batches) -> float:
    """Read every pixel and label of every batch (a sum), as training would."""
    total = 0.0
    for images, labels in batches:
        total += float(images.sum()) + float(labels.sum())
    return total


def ours(root: Path, batch_size: int, workers: int):
    loader = BatchLoader(ShardDataset(root, "train"), batch_size, shuffle=True, seed=0, workers=workers)

    def run():
        loader.set_epoch(loader.epoch + 1)
        return consume((b.images, b.labels) for b in loader)
    return run


def original(dataset: OriginalShardDataset, batch_size: int, workers: int):
    loader = original_loader(dataset, workers, batch_size, pin_memory=False)
    return lambda: consume(loader)


def original_name(workers: int) -> str:
    return f"original ({workers} w.{', own' if workers == OWN_WORKERS else ''})"


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("RssAnon not found in /proc/self/status (Linux only)")


class PeakRss:
    """RssAnon just before a block and its peak during it, sampled every millisecond by a
    thread (so peaks inside a batch are seen too)."""

    def __enter__(self) -> PeakRss:
        self.before = self.peak = rss_anon_bytes()
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, rss_anon_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._sampler.join()
        self.after = rss_anon_bytes()
        self.peak = max(self.peak, self.after)


def measure_memory(root: Path, batch_size: int, workers: int) -> dict:
    """One shuffled epoch of our loader."""
    loader = BatchLoader(ShardDataset(root, "train"), batch_size, shuffle=True, seed=0, workers=workers)
    images, total = 0, 0.0
    with PeakRss() as rss:
        for batch in loader:
            total += float(batch.images.sum())
            images += len(batch.labels)
    return {"images": images, "before": rss.before, "peak": rss.peak, "growth": rss.peak - rss.before,
            "checksum": total}


def measure_original_memory(root: Path) -> dict:
    """The original's dataset built: every shard loaded, then concatenated."""
    with PeakRss() as rss:
        dataset = OriginalShardDataset(root, "train")
    return {"images": len(dataset), "peak_growth": rss.peak - rss.before, "held": rss.after - rss.before}


def in_subprocess(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="images in the 1x dataset")
    p.add_argument("--height", type=int, default=224)
    p.add_argument("--width", type=int, default=160)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--our-workers", default="0,1,2", help="loader threads of ours to measure")
    p.add_argument("--original-workers", default=f"0,1,2,{OWN_WORKERS}", help="DataLoader workers of the original")
    p.add_argument("--memory-scale", type=int, default=4, help="K: the memory test compares 1x and Kx")
    p.add_argument("--workdir", type=Path, default=None, help="where to write shards (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="smoke run (< 1 minute): tiny, one round, no figures")
    p.add_argument("--memory-of", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--original-memory-of", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.memory_of is not None:
        print(json.dumps(measure_memory(args.memory_of, args.batch_size, args.workers)))
        return
    if args.original_memory_of is not None:
        print(json.dumps(measure_original_memory(args.original_memory_of)))
        return
    if args.quick:
        args.images, args.rounds, args.memory_scale = 256, 1, 2
        args.our_workers, args.original_workers = "0,2", "0"
        print("--quick: a smoke run; the figures below are not measurements")
    our_workers = [int(w) for w in args.our_workers.split(",")]
    original_workers = [int(w) for w in args.original_workers.split(",")]
    warnings.filterwarnings("ignore", message="This DataLoader will create")

    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="fgvc-bench-data-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        one = build_root(tmp / "x1", args.images, args.height, args.width, args.shard_size, args.classes, seed=1)
        many = build_root(tmp / f"x{args.memory_scale}", args.images * args.memory_scale, args.height, args.width,
                          args.shard_size, args.classes, seed=2)
        image_bytes = 3 * args.height * args.width
        print(f"data: {args.images} images {args.height}x{args.width} uint8 in shards of {args.shard_size} "
              f"({mib(args.images * image_bytes)}), and {args.memory_scale}x that; written in "
              f"{time.perf_counter() - start:.1f} s")

        with Machine(f"data loading: {args.images} images {args.height}x{args.width}, batch {args.batch_size}"):
            dataset = OriginalShardDataset(one, "train")
            contenders = [Contender(f"ours ({w} thr.)", ours(one, args.batch_size, w), args.images, "img")
                          for w in our_workers]
            contenders += [Contender(original_name(w), original(dataset, args.batch_size, w), args.images, "img")
                           for w in original_workers]
            timings = compare(contenders, rounds=args.rounds, warmup=args.warmup)
            timings.print()
            best_ours = max((c.name for c in contenders if c.name.startswith("ours")),
                            key=lambda n: timings.rate(n).median)
            originals = [c.name for c in contenders if c.name.startswith("original")]
            best_original = max(originals, key=lambda n: timings.rate(n).median)
            for name in originals:
                print(f"  {best_ours} / {name}: {timings.ratio(best_ours, name).text()}")
            speedup = timings.ratio(best_ours, best_original)
            report_target(f"our fastest ({best_ours}) / the original's fastest ({best_original})",
                          speedup.median, ">=", TARGET_SPEEDUP, speedup)
            del dataset

        fastest = int(best_ours.split("(")[1].split()[0])
        print(f"\nmemory (RssAnon; one shuffled epoch of ours with {fastest} loader threads, a fresh process "
              f"each):")
        small = in_subprocess("--memory-of", str(one), "--batch-size", str(args.batch_size), "--workers",
                              str(fastest))
        large = in_subprocess("--memory-of", str(many), "--batch-size", str(args.batch_size), "--workers",
                              str(fastest))
        for label, m in (("1x", small), (f"{args.memory_scale}x", large)):
            print(f"  ours     {label:3s} {m['images']:6d} images: before {mib(m['before'])}, peak {mib(m['peak'])}, "
                  f"growth {mib(m['growth'])}")
        for label, root in (("1x", one), (f"{args.memory_scale}x", many)):
            m = in_subprocess("--original-memory-of", str(root))
            pixels = max(m["images"] * image_bytes, 1)
            print(f"  original {label:3s} {m['images']:6d} images: holds {mib(m['held'])} "
                  f"({m['held'] / pixels:.2f}x the pixel bytes), peak {mib(m['peak_growth'])} while building "
                  f"({m['peak_growth'] / pixels:.2f}x: the loaded shards and their concatenation)")
        growth = large["growth"] / max(small["growth"], 1)
        report_target(f"our loader's RssAnon growth, {args.memory_scale}x / 1x the data", growth, "<=", TARGET_GROWTH)


if __name__ == "__main__":
    main()
