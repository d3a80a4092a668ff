"""Scale: a root the size of iDesigner's training split (45,000 images at 224x160, ~4.8 GB of
shards), on the harness.

1. Loader: images/s of one shuffled epoch of our loader over 4,500 and 45,000 images, and of
   the original in-RAM per-sample Dataset + DataLoader over the 4,500-image slice; our
   loader's anonymous memory (RssAnon) growth at 4,500 vs 45,000 images (target <= 1.10x:
   shards are memory-mapped, so file pages are shared and reclaimable, not anonymous);
   target ours >= 3x the original.
2. The original on the whole root: what its dataset would hold (every shard torch.load-ed,
   then concatenated: about 2x the pixel bytes at the peak, 1x after), estimated from the
   bytes per image and measured on the slice, against this machine's memory.
3. `prepare` (fgvc.data.ingest.ingest) ingesting 45,000 generated JPEG files, decoding on every
   core (a thread pool) against a single-process PIL loop (the same ingest with workers=1);
   target >= 1.8x on 2 cores; and the decoding alone with as many threads and with one (how
   much of the gap is the thread pool's, how much the single-threaded staging and writing).

The root and the JPEG files are written once under --dir (default bench/out/scale) and reused.

    python bench/scale.py --quick               # smoke run, under a minute: no figures
    python bench/scale.py                       # the figures (first run writes ~6 GB)
    python bench/scale.py --images 9000 --skip-ingest
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_loading import build_root, consume, mib  # noqa: E402
from harness import Contender, Machine, compare, report_target  # noqa: E402
from original_loop import OriginalShardDataset, original_loader  # noqa: E402

from fgvc.data.dataset import BatchLoader, ShardDataset  # noqa: E402
from fgvc.data.demo import DemoConfig, generate_demo  # noqa: E402
from fgvc.data.ingest import IngestOptions, decode_all, ingest, list_source  # noqa: E402
from fgvc.data.shards import load_shard, shards_of  # noqa: E402
from fgvc.devices import cpu_count  # noqa: E402

SHARD_SIZE = 500
CLASSES = 50
TARGET_SPEEDUP, TARGET_GROWTH, TARGET_INGEST = 3.0, 1.10, 1.8
DATA_LOADING = Path(__file__).resolve().parent / "data_loading.py"


def complete(marker: Path, spec: dict) -> bool:
    return marker.is_file() and json.loads(marker.read_text()) == spec


def scale_root(base: Path, images: int, height: int, width: int) -> Path:
    """`images` random uint8 images in shards of 500 (written once; a marker file written last
    says the root is whole)."""
    root = base / f"root-{images}-{height}x{width}"
    spec = {"images": images, "height": height, "width": width, "shard_size": SHARD_SIZE}
    if not complete(root / "complete.json", spec):
        shutil.rmtree(root, ignore_errors=True)
        start = time.perf_counter()
        build_root(root, images, height, width, SHARD_SIZE, CLASSES, seed=0)
        (root / "complete.json").write_text(json.dumps(spec))
        print(f"wrote {root} ({images} images) in {time.perf_counter() - start:.0f} s")
    return root


def slice_root(base: Path, root: Path, images: int) -> Path:
    """A root of the first `images` images of `root`: links to its first shards."""
    part = base / f"{root.name}-first-{images}"
    (part / "train").mkdir(parents=True, exist_ok=True)
    for path in shards_of(root, "train")[: -(-images // SHARD_SIZE)]:
        link = part / "train" / path.name
        if not link.exists():
            link.symlink_to(path)
    return part


def rss_in_subprocess(flag: str, root: Path, *extra: str) -> dict:
    out = subprocess.run([sys.executable, str(DATA_LOADING), flag, str(root), *extra], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def loader_section(args, root: Path, part: Path, n: int, n_part: int) -> None:
    image_bytes = 3 * args.height * args.width
    big = BatchLoader(ShardDataset(root, "train"), args.batch_size, shuffle=True, seed=0, workers=args.workers)
    small = BatchLoader(ShardDataset(part, "train"), args.batch_size, shuffle=True, seed=0, workers=args.workers)

    def ours(loader):
        def run():
            loader.set_epoch(loader.epoch + 1)
            consume((b.images, b.labels) for b in loader)
        return run

    with Machine(f"scale, loader: {n} and {n_part} images {args.height}x{args.width}, batch {args.batch_size}"):
        dataset = OriginalShardDataset(part, "train")

        def original():
            consume(original_loader(dataset, args.original_workers, args.batch_size, pin_memory=False))

        contenders = [Contender(f"ours, {n} images", ours(big), n, "img"),
                      Contender(f"ours, {n_part} images", ours(small), n_part, "img"),
                      Contender(f"original, {n_part} images", original, n_part, "img")]
        timings = compare(contenders, rounds=args.rounds, warmup=args.warmup)
        timings.print()
        r = timings.ratio(f"ours, {n} images", f"original, {n_part} images")
        report_target(f"our loader over {n} images / the original over {n_part} (in RAM, "
                      f"{args.original_workers} workers)", r.median, ">=", TARGET_SPEEDUP, r)
        same = timings.ratio(f"ours, {n} images", f"ours, {n_part} images")
        print(f"  ours at {n} / at {n_part} images: {same.text()} (the rate should not fall with the data)")

    print(f"\nmemory (RssAnon, one shuffled epoch of ours with {args.workers} loader threads, a fresh process each):")
    runs = {}
    for label, r in ((n_part, part), (n, root)):
        runs[label] = m = rss_in_subprocess("--memory-of", r, "--batch-size", str(args.batch_size),
                                            "--workers", str(args.workers))
        print(f"  {label:6d} images: before {mib(m['before'])}, peak {mib(m['peak'])}, growth {mib(m['growth'])}")
    growth = runs[n]["growth"] / max(runs[n_part]["growth"], 1)
    report_target(f"our loader's RssAnon growth, {n} / {n_part} images", growth, "<=", TARGET_GROWTH)

    print(f"\nthe original on the whole root ({n} images):")
    m = rss_in_subprocess("--original-memory-of", part)
    per_image_held, per_image_peak = m["held"] / m["images"], m["peak_growth"] / m["images"]
    total = mem_total()
    print(f"  estimate from the format: {image_bytes} bytes per image x {n} = {n * image_bytes / 1e9:.2f} GB "
          f"held; torch.cat of the loaded shards needs both copies at once: {2 * n * image_bytes / 1e9:.2f} GB "
          f"at the peak")
    print(f"  measured on the {m['images']}-image slice: {per_image_held / image_bytes:.2f}x the pixel bytes held, "
          f"{per_image_peak / image_bytes:.2f}x at the peak -> {n * per_image_held / 1e9:.2f} GB held, "
          f"{n * per_image_peak / 1e9:.2f} GB peak for {n} images")
    print(f"  this machine: {total / 1e9:.1f} GB of memory; the original's peak is "
          f"{n * per_image_peak / max(total, 1):.0%} of it (on a 24 GB machine: "
          f"{n * per_image_peak / 24e9:.0%}), before the model, the DataLoader's workers and their batches; "
          f"ours holds {mib(runs[n]['growth'])} of anonymous memory at any size")
    if args.original_full:
        m = rss_in_subprocess("--original-memory-of", root)
        print(f"  measured on the whole root: held {m['held'] / 1e9:.2f} GB, peak {m['peak_growth'] / 1e9:.2f} GB")


def jpeg_source(base: Path, files: int, height: int, width: int) -> Path:
    """`files` JPEG files in <designer>/<n>.jpg (50 designers), made with PIL from 500
    runway-synth images, each file a different shift and brightness (written once)."""
    source = base / f"jpeg-{files}-{height}x{width}"
    spec = {"files": files, "height": height, "width": width}
    if complete(source / ".complete.json", spec):
        return source
    shutil.rmtree(source, ignore_errors=True)
    start = time.perf_counter()
    pool_root = base / f"jpeg-pool-{height}x{width}"
    if not pool_root.exists():
        generate_demo(pool_root, DemoConfig(num_designers=CLASSES, train_per_class=10, val_per_class=1,
                                            height=height, width=width))
    pool = torch.cat([load_shard(p, mmap=False)["images"] for p in shards_of(pool_root, "train")])
    for c in range(CLASSES):
        (source / f"designer_{c:02d}").mkdir(parents=True, exist_ok=True)

    def write(i: int) -> None:
        image = pool[i % len(pool)].roll(i % 17, dims=-1).float().mul_(0.85 + 0.3 * ((i * 7919) % 101) / 100)
        array = image.clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(array).save(source / f"designer_{i % CLASSES:02d}" / f"{i:06d}.jpg", quality=90)

    with ThreadPoolExecutor(cpu_count()) as threads:
        list(threads.map(write, range(files)))
    (source / ".complete.json").write_text(json.dumps(spec))
    print(f"wrote {files} JPEG files {height}x{width} to {source} in {time.perf_counter() - start:.0f} s")
    return source


def read_all(source: Path) -> int:
    """Read every file once (so neither contender pays for the first read from disk)."""
    total = 0
    for path in source.rglob("*.jpg"):
        total += len(path.read_bytes())
    return total


def ingest_section(args, base: Path, files: int) -> None:
    source = jpeg_source(base, files, *args.jpeg_size)
    size = read_all(source)
    dst = base / "ingested"
    cores = cpu_count()

    def run(workers: int):
        return lambda: ingest(source, dst, IngestOptions(height=args.height, width=args.width), progress=False,
                              workers=workers)

    listing = list_source(source)

    def decode(workers: int):
        """The decoding alone (what the thread pool runs, into a staging file), without the
        shard writing."""
        def go():
            with tempfile.TemporaryFile(dir=base) as staging:
                for _, error in decode_all(listing.images, args.height, args.width, "pad", staging.fileno(),
                                           workers=workers):
                    if error is not None:
                        raise error
        return go

    with Machine(f"scale, prepare: ingest {files} JPEG files {args.jpeg_size[0]}x{args.jpeg_size[1]} "
                 f"({size / 1e6:.0f} MB) into {args.height}x{args.width} shards"):
        timings = compare([Contender(f"ingest, workers={cores} (every core)", run(cores), files, "img"),
                           Contender("ingest, workers=1 (single-process PIL loop)", run(1), files, "img"),
                           Contender(f"decoding only, {cores} threads", decode(cores), files, "img"),
                           Contender("decoding only, 1 thread", decode(1), files, "img")],
                          rounds=args.ingest_rounds, warmup=0)
        timings.print()
        r = timings.ratio(f"ingest, workers={cores} (every core)", "ingest, workers=1 (single-process PIL loop)")
        report_target(f"ingest on {cores} cores / single-process", r.median, ">=", TARGET_INGEST, r)
        d = timings.ratio(f"decoding only, {cores} threads", "decoding only, 1 thread")
        print(f"  decoding alone, {cores} threads / 1: {d.text()} (about the ceiling for ingest: "
              f"decoding is what the cores share; the shards are written after it, by {cores} threads)")
    shutil.rmtree(dst, ignore_errors=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent / "out" / "scale")
    p.add_argument("--images", type=int, default=45_000, help="images in the big root (the slice: a tenth)")
    p.add_argument("--height", type=int, default=224)
    p.add_argument("--width", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0,
                   help="loader threads of ours (0: the fastest here, see data_loading.py)")
    p.add_argument("--original-workers", type=int, default=0, help="DataLoader workers of the original")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--ingest-files", type=int, default=None, help="JPEG files to ingest (default: --images)")
    p.add_argument("--jpeg-size", type=lambda t: tuple(int(v) for v in t.split("x")), default=(336, 240),
                   help="HxW of the generated JPEG files")
    p.add_argument("--ingest-rounds", type=int, default=1, help="each round ingests every file twice")
    p.add_argument("--skip-ingest", action="store_true")
    p.add_argument("--skip-loader", action="store_true")
    p.add_argument("--original-full", action="store_true",
                   help="also load the whole root the original's way (needs ~2x the root's size in memory)")
    p.add_argument("--quick", action="store_true", help="smoke run (< 1 minute): tiny, one round, no figures")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.rounds, args.ingest_files, args.jpeg_size = 1_000, 1, 200, (112, 80)
        args.dir = args.dir.parent / "scale-quick"
        print("--quick: a smoke run; the figures below are not measurements")
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    args.dir.mkdir(parents=True, exist_ok=True)
    n_part = max(SHARD_SIZE, args.images // 10 // SHARD_SIZE * SHARD_SIZE)
    root = scale_root(args.dir, args.images, args.height, args.width)
    part = slice_root(args.dir, root, n_part)
    print(f"root {root}: {args.images} images, {args.images * 3 * args.height * args.width / 1e9:.2f} GB of "
          f"pixels; slice: the first {n_part}; {os.cpu_count()} CPUs")
    if not args.skip_loader:
        loader_section(args, root, part, args.images, n_part)
    if not args.skip_ingest:
        ingest_section(args, args.dir, args.ingest_files or args.images)


if __name__ == "__main__":
    main()
