"""Throughput of `mask` on the harness: the full pipeline against the segmenter's raw forward
pass and against the original project's per-image PIL preprocessing loop.

Same images, same batch size, the same randomly initialised DeepLabV3-MobileNetV3-Large
(seg_weights="random": no weights are needed, so it runs offline), in interleaved rounds:

  raw       model(x)["out"] over batches of a tensor already resized and normalised, in the
            segmenter's memory format: the ceiling
  original  per image: tensor -> PIL, Resize(seg_size), ToTensor, Normalize; then a batched
            forward (NCHW, as the original), argmax label map upsampled (nearest), == person,
            background removed (no file I/O)
  pipeline  mask_dataset(src, dst): validating and reading shards, batched tensor
            preprocessing, segmentation, masking and writing shards, statistics, meta.json

Targets: pipeline / raw >= 0.90, pipeline / original >= 1.

    python bench/mask_throughput.py --quick      # smoke run, under a minute: no figures
    python bench/mask_throughput.py              # 64 images 224x160, seg size 224, 5 rounds
    python bench/mask_throughput.py --images 128 --rounds 7
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Contender, Machine, compare, report_target  # noqa: E402

from fgvc.data.demo import DemoConfig, generate_demo  # noqa: E402
from fgvc.data.shards import load_shard, shards_of, write_shard  # noqa: E402
from fgvc.masking import build_segmenter, mask_dataset, preprocess, remove_background  # noqa: E402
from fgvc.masking.segmenters import IMAGENET_MEAN, IMAGENET_STD, VOC_PERSON  # noqa: E402

SEGMENTER = "deeplabv3_mobilenet_v3_large"
TARGETS = (("raw", 0.90), ("original", 1.0))


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


def raw_forward(model, x: torch.Tensor, batch: int):
    def run():
        with torch.inference_mode():
            for s in range(0, len(x), batch):
                model(x[s:s + batch])["out"]
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
    return run


def original_loop(model, images: torch.Tensor, batch: int, seg_size: int, device: torch.device):
    to_input = T.Compose([T.Resize(seg_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def run():
        with torch.inference_mode():
            for s in range(0, len(images), batch):
                chunk = images[s:s + batch]
                x = torch.stack([to_input(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in chunk])
                labels = model(x.to(device))["out"].argmax(dim=1, keepdim=True).to(torch.uint8)
                person = (F.interpolate(labels, size=tuple(chunk.shape[2:]), mode="nearest")[:, 0]
                          == VOC_PERSON).to(torch.uint8)
                remove_background(chunk, person.cpu())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return run


def pipeline(segmenter, src: Path, dst: Path, batch: int, device: torch.device):
    def run():
        mask_dataset(src, dst, segmenter=segmenter, batch_size=batch, device=str(device), progress=False,
                     overwrite=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return run


def contenders(tmp: Path, images: int, height: int, width: int, seg_size: int, batch: int, shard_size: int,
               device: torch.device, name: str = SEGMENTER) -> tuple[list[Contender], str]:
    """raw / original / pipeline on `device`, and a line describing the setting (shared with
    bench/gpu.py)."""
    src = make_source(tmp, images, height, width, shard_size)
    pixels = all_images(src)
    n = len(pixels)
    segmenter = build_segmenter(name, "random", seg_size, str(device))
    model = segmenter.model
    # The original ran the model in the default NCHW layout.
    original_model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    x = preprocess(pixels.to(device), seg_size, channels_last=segmenter.channels_last)
    setting = (f"{n} images {height}x{width} -> {list(x.shape[2:])}, batch {batch}, shards of {shard_size}, "
               f"{name} (random init) on {device}")
    return [Contender("raw", raw_forward(model, x, batch), n, "img"),
            Contender("original", original_loop(original_model, pixels, batch, seg_size, device), n, "img"),
            Contender("pipeline", pipeline(segmenter, src, tmp / "dst", batch, device), n, "img")], setting


def report(timings, prefix: str = "") -> dict[str, float]:
    """Print the pipeline's targets; returns the ratios' medians."""
    ratios = {}
    for other, target in TARGETS:
        r = timings.ratio("pipeline", other)
        report_target(f"{prefix}masking pipeline / {other}", r.median, ">=", target, r)
        ratios[other] = r.median
    return ratios


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--height", type=int, default=224)
    ap.add_argument("--width", type=int, default=160)
    ap.add_argument("--seg-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--segmenter", default=SEGMENTER, help="a registered segmenter (random weights)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--quick", action="store_true", help="smoke run (< 1 minute): tiny, one round, no figures")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.images, args.height, args.width, args.seg_size, args.rounds = 16, 96, 64, 96, 1
        args.batch_size = args.shard_size = 8
        print("--quick: a smoke run; the figures below are not measurements")

    with tempfile.TemporaryDirectory(prefix="fgvc-bench-mask-") as tmp:
        found, setting = contenders(Path(tmp), args.images, args.height, args.width, args.seg_size,
                                    args.batch_size, args.shard_size, torch.device("cpu"), args.segmenter)
        with Machine(f"masking throughput: {setting}"):
            timings = compare(found, rounds=args.rounds, warmup=args.warmup)
            timings.print()
            report(timings)


if __name__ == "__main__":
    main()
