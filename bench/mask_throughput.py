"""Throughput of `mask`: the full pipeline against the segmenter's raw forward pass and
against the original project's per-image PIL preprocessing loop.

Same images, same batch size, same randomly initialised DeepLabV3-MobileNetV3 (no weights
are needed, so it runs offline on a CPU):

  raw       model(x) over batches of a tensor already resized and normalised, in the
            segmenter's memory format (channels-last): the ceiling
  original  per image: tensor -> PIL, Resize(seg_size), ToTensor, Normalize; then a batched
            forward (NCHW, as the original), argmax label map upsampled (nearest), == person,
            masking (no file I/O)
  pipeline  mask_dataset(src, dst): validating and reading shards, batched tensor
            preprocessing, segmentation, masking and writing shards, statistics and meta.json

Targets: pipeline / raw >= 0.90, pipeline / original >= 1. Each method runs --repeats times,
interleaved; the ratios use the best (least disturbed) wall time; the median wall time and
the process CPU time are shown too, since a shared machine makes wall times noisy.

    python bench/mask_throughput.py --images 64 --height 224 --width 160 --seg-size 224
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from fgvc.data.demo import DemoConfig, generate_demo
from fgvc.data.shards import load_shard, shards_of, write_shard
from fgvc.masking import build_segmenter, mask_dataset, preprocess, remove_background
from fgvc.masking.segmenters import IMAGENET_MEAN, IMAGENET_STD, VOC_PERSON


def make_source(root: Path, images: int, height: int, width: int, shard_size: int) -> Path:
    """A train-only runway-synth root of `images` images, each shard in its own storage."""
    full = root / "generated"
    generate_demo(full, DemoConfig(num_designers=2, train_per_class=images // 2, val_per_class=1,
                                   height=height, width=width, shard_size=shard_size))
    src = root / "src"
    for path in shards_of(full, "train"):
        shard = {k: v.clone() for k, v in load_shard(path, mmap=False).items()}
        write_shard(src / "train" / path.name, shard)
    shutil.copy(full / "index_to_label.json", src / "index_to_label.json")
    return src


def all_images(src: Path) -> torch.Tensor:
    return torch.cat([load_shard(p, mmap=False)["images"] for p in shards_of(src, "train")])


class Clock:
    """Wall and process CPU seconds of a block (CPU time is less disturbed by other jobs on a
    shared machine; it counts every thread of this process, the pipeline's reader and writer
    included)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def time_raw(model, x: torch.Tensor, batch: int) -> Clock:
    with Clock() as clock, torch.inference_mode():
        for s in range(0, len(x), batch):
            model(x[s:s + batch])["out"]
    return clock


def time_original(model, images: torch.Tensor, batch: int, seg_size: int) -> Clock:
    to_input = T.Compose([T.Resize(seg_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with Clock() as clock, torch.inference_mode():
        for s in range(0, len(images), batch):
            chunk = images[s:s + batch]
            x = torch.stack([to_input(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in chunk])
            labels = model(x)["out"].argmax(dim=1, keepdim=True).to(torch.uint8)
            person = (F.interpolate(labels, size=tuple(chunk.shape[2:]), mode="nearest")[:, 0]
                      == VOC_PERSON).to(torch.uint8)
            remove_background(chunk, person)
    return clock


def time_pipeline(segmenter, src: Path, dst: Path, batch: int) -> Clock:
    with Clock() as clock:
        mask_dataset(src, dst, segmenter=segmenter, batch_size=batch, device="cpu", progress=False,
                     overwrite=True)
    return clock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--height", type=int, default=224)
    ap.add_argument("--width", type=int, default=160)
    ap.add_argument("--seg-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="fgvc-bench-") as tmp:
        tmp = Path(tmp)
        src = make_source(tmp, args.images, args.height, args.width, args.shard_size)
        images = all_images(src)
        n = len(images)
        segmenter = build_segmenter("deeplabv3_mobilenet_v3_large", "random", args.seg_size, "cpu")
        model = segmenter.model
        # The original ran the model in the default NCHW layout.
        original_model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
        x = preprocess(images, args.seg_size, channels_last=segmenter.channels_last)
        print(f"{n} images {args.height}x{args.width} -> {list(x.shape[2:])}, batch "
              f"{args.batch_size}, shards of {args.shard_size}, "
              f"deeplabv3_mobilenet_v3_large (random init), {torch.get_num_threads()} threads, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        with torch.inference_mode():  # warm-up
            model(x[: args.batch_size])
            original_model(x[: args.batch_size].contiguous())

        times = {"raw": [], "original": [], "pipeline": []}
        for r in range(args.repeats):
            times["raw"].append(time_raw(model, x, args.batch_size))
            times["original"].append(time_original(original_model, images, args.batch_size,
                                                   args.seg_size))
            times["pipeline"].append(time_pipeline(segmenter, src, tmp / f"dst{r}", args.batch_size))
            print(f"  repeat {r + 1}: " + ", ".join(
                f"{k} {v[-1].wall:.2f}s (cpu {v[-1].cpu:.2f}s)" for k, v in times.items()), flush=True)

    best = {k: n / min(c.wall for c in v) for k, v in times.items()}
    median = {k: n / statistics.median(c.wall for c in v) for k, v in times.items()}
    per_cpu = {k: n / min(c.cpu for c in v) for k, v in times.items()}
    print(f"{'method':<10}{'best img/s':>12}{'median img/s':>14}{'img/cpu-s':>11}")
    for k in times:
        print(f"{k:<10}{best[k]:>12.2f}{median[k]:>14.2f}{per_cpu[k]:>11.2f}")
    for name, other, target in (("pipeline / raw forward", "raw", 0.90),
                                ("pipeline / original", "original", 1.0)):
        ratio = best["pipeline"] / best[other]
        verdict = "ok" if ratio >= target else "BELOW TARGET"
        print(f"{name:<24} {ratio:5.3f}  target >= {target:.2f}  {verdict}   (median "
              f"{median['pipeline'] / median[other]:5.3f}, per cpu-s "
              f"{per_cpu['pipeline'] / per_cpu[other]:5.3f})")


if __name__ == "__main__":
    main()
