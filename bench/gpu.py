"""The GPU benchmark: training throughput and masking on one CUDA device, on the harness.

For resnet18 and resnet50 at 224x160, bf16 autocast and channels-last, batch 64, heavy
augmentation (runway-synth images), in interleaved rounds (one epoch of every contender):

  raw step            forward, backward, AdamW step over batches already on the GPU;
  ours, aug on GPU    `train_one_epoch` over `BatchLoader(augment_on_device=True)` with
                      `HeavyAugment.batch`: two loader threads gather and pin uint8 batches,
                      the recipe runs on the whole batch on the GPU, no per-sample work (what
                      `fgvc train` does on CUDA);
  ours, exact aug     the same with the CPU path's recipe (`HeavyAugment.__call__`, per-sample
  on GPU              draws and crops) run on the GPU;
  ours, aug on CPU    the same loop with the recipe in the loader threads (--cpu-aug-workers);
  original            the original loop (bench/original_loop.py): in-RAM per-sample Dataset,
                      torchvision transforms per sample in DataLoader worker processes
                      (num_workers=6, pin_memory=True), with the same autocast and layout.

Targets: ours (aug on GPU) >= 0.90 of the raw step; ours >= 2x the original.
Then the masking pipeline (mask_dataset) against the segmenter's raw forward (>= 0.90) and the
original per-image PIL loop (>= 1x) (DeepLabV3, random weights), on the GPU.

Exit status: 0 when every target is met, 1 when any is missed (each missed one is printed at
the end and listed under "targets_missed" in the JSON), 2 without CUDA. A dry run measures
nothing: it exits 0 whatever its ratios.

Every figure goes to a JSON file ($OUT/gpu.json when $OUT is set, else bench/out/gpu.json).
The data is made in a temp dir first.

    python bench/gpu.py                  # every figure: ResNet-18 and ResNet-50, 5 rounds (~4-6 min)
    python bench/gpu.py --quick          # the same targets for ResNet-18 only, 3 rounds, fewer
                                         # images (~2 min; well under 5 on one GPU)
    python bench/gpu.py --dry-run        # every step on the CPU at a tiny size: no figures
    python bench/gpu.py --archs resnet50 --images 4096 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mask_throughput  # noqa: E402
from harness import Contender, Machine, compare, report_target  # noqa: E402
from original_loop import (  # noqa: E402
    OWN_WORKERS,
    OriginalShardDataset,
    OriginalTrainer,
    original_loader,
    original_transform,  # noqa: E402
)

from fgvc.data.dataset import BatchLoader, ShardDataset  # noqa: E402
from fgvc.data.demo import DemoConfig, generate_demo  # noqa: E402
from fgvc.models import create_model  # noqa: E402
from fgvc.training.augment import get_preset  # noqa: E402
from fgvc.training.config import cudnn_benchmark  # noqa: E402
from fgvc.training.loop import Precision, build_optimizer, train_one_epoch  # noqa: E402

TARGET_RAW, TARGET_ORIGINAL = 0.90, 2.0
# --quick: the full run's settings and targets on one architecture and fewer images and rounds.
# Each contender runs 4 epochs (1 warm-up + 3 rounds) of 1,024 images at 224x160; the slowest
# (the original loop's fresh DataLoader workers, the per-sample recipe) take a few seconds each.
QUICK = {"archs": "resnet18", "images": 1024, "rounds": 3, "mask_images": 256}
NO_CUDA = ("bench/gpu.py measures a CUDA GPU and this machine has none (torch.cuda.is_available() is False). "
           "Run it on a CUDA machine, or run `python bench/gpu.py --dry-run` to check every step on the CPU "
           "at a tiny size (no figures).")


def fresh_model(arch: str, classes: int, size, device: torch.device, channels_last: bool) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(arch, classes, pretrained=False, image_size=size).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def raw_step(arch, dataset: ShardDataset, batch: int, device, precision: Precision):
    model = fresh_model(arch, dataset.num_classes, dataset.image_size, device, precision.channels_last)
    optimizer = build_optimizer(model, 1e-4, 1e-3, 0.05)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    batches = []
    for start in range(0, len(dataset), batch):
        items = dataset.gather(torch.arange(start, min(start + batch, len(dataset))))
        x = items["images"].to(device).float().div_(255.0)
        if precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batches.append((x, items["labels"].to(device)))

    def run():
        model.train()
        for x, y in batches:
            with precision.autocast(device):
                loss = criterion(model(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        synchronize(device)
    return run


def our_loop(arch, dataset: ShardDataset, batch: int, device, precision: Precision, where: str, workers: int):
    """where: "gpu" (the batch path on the device, what `fgvc train` does on CUDA), "gpu, exact"
    (the CPU path's bit-exact batched recipe, run on the device) or "cpu" (in loader threads)."""
    model = fresh_model(arch, dataset.num_classes, dataset.image_size, device, precision.channels_last)
    optimizer = build_optimizer(model, 1e-4, 1e-3, 0.05)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    recipe = get_preset("heavy")
    loader = BatchLoader(dataset, batch, shuffle=True, seed=0, device=device,
                         transform=recipe.batch if where == "gpu" else recipe, augment_on_device=where != "cpu",
                         workers=workers, prefetch=2, channels_last=precision.channels_last)

    def run():
        loader.set_epoch(loader.epoch + 1)
        train_one_epoch(model, loader, optimizer, criterion, device, precision)
        synchronize(device)
    return run


def original(arch, root: Path, dataset: ShardDataset, batch: int, device, precision: Precision, workers: int):
    data = OriginalShardDataset(root, "train", original_transform(dataset.image_size))
    model = fresh_model(arch, dataset.num_classes, dataset.image_size, device, precision.channels_last)
    trainer = OriginalTrainer(model, original_loader(data, workers, batch, pin_memory=device.type == "cuda"),
                              device, precision.amp_dtype, precision.channels_last)
    return trainer.run


def figures(timings) -> dict:
    return {name: {"median_img_s": timings.rate(name).median, "iqr_img_s": list(timings.rate(name).iqr),
                   "per_round_img_s": timings.rate(name).values} for name in timings.contenders}


def training(args, tmp: Path, device: torch.device, precision: Precision, out: dict) -> None:
    size = args.size
    root = tmp / "train-root"
    generate_demo(root, DemoConfig(num_designers=10, train_per_class=max(1, args.images // 10), val_per_class=1,
                                   height=size[0], width=size[1]))
    dataset = ShardDataset(root, "train")
    n = len(dataset)
    for arch in args.archs:
        label = f"{arch} {size[0]}x{size[1]}, bf16 autocast, channels-last, heavy augmentation"
        with Machine(f"GPU training: {label}, {n} images per epoch, batch {args.batch} on {device_name(device)}"):
            contenders = [
                Contender("raw step", raw_step(arch, dataset, args.batch, device, precision), n, "img"),
                Contender("ours, aug on GPU", our_loop(arch, dataset, args.batch, device, precision, "gpu",
                                                        args.loader_workers), n, "img"),
                Contender("ours, exact aug on GPU", our_loop(arch, dataset, args.batch, device, precision,
                                                              "gpu, exact", args.loader_workers), n, "img"),
                Contender("ours, aug on CPU", our_loop(arch, dataset, args.batch, device, precision, "cpu",
                                                        args.cpu_aug_workers), n, "img"),
                Contender("original", original(arch, root, dataset, args.batch, device, precision,
                                               args.original_workers), n, "img"),
            ]
            timings = compare(contenders, rounds=args.rounds, warmup=args.warmup)
            timings.print()
            vs_raw = timings.ratio("ours, aug on GPU", "raw step")
            vs_original = timings.ratio("ours, aug on GPU", "original")
            cpu_aug = timings.ratio("ours, aug on CPU", "raw step")
            exact_aug = timings.ratio("ours, exact aug on GPU", "raw step")
            met_raw = report_target(f"[{arch}] ours (aug on GPU) / raw step", vs_raw.median, ">=", TARGET_RAW, vs_raw)
            met_original = report_target(f"[{arch}] ours (aug on GPU) / original", vs_original.median, ">=",
                                         TARGET_ORIGINAL, vs_original)
            print(f"  ours (exact per-sample-equivalent aug on the GPU) / raw step: {exact_aug.text()}")
            print(f"  ours (aug on CPU, {args.cpu_aug_workers} loader threads) / raw step: {cpu_aug.text()}")
        out["training"][arch] = {
            "images_per_epoch": n, "batch": args.batch, "size": list(size), "figures": figures(timings),
            "ratios": {"ours_gpu_aug/raw": vs_raw.median, "ours_gpu_aug/original": vs_original.median,
                       "ours_exact_gpu_aug/raw": exact_aug.median, "ours_cpu_aug/raw": cpu_aug.median},
            "targets": {f"ours_gpu_aug/raw >= {TARGET_RAW}": met_raw,
                        f"ours_gpu_aug/original >= {TARGET_ORIGINAL}": met_original},
        }


def masking(args, tmp: Path, device: torch.device, out: dict) -> None:
    found, setting = mask_throughput.contenders(tmp / "mask", args.mask_images, args.size[0], args.size[1],
                                                args.seg_size, args.mask_batch, args.mask_batch * 4, device,
                                                args.segmenter)
    with Machine(f"GPU masking: {setting}"):
        timings = compare(found, rounds=args.rounds, warmup=args.warmup)
        timings.print()
        ratios = mask_throughput.report(timings)
    out["masking"] = {"setting": setting, "figures": figures(timings), "ratios": ratios,
                      "targets": {f"pipeline/{k} >= {t}": ratios[k] >= t for k, t in mask_throughput.TARGETS}}


def summary(out: dict) -> dict:
    """The three ratios the GPU path is judged by, printed together at the end: per arch, the
    loop (augmentation on the device) against the raw step (>= 0.90) and against the original
    loop at its own settings (>= 2x); masking against DeepLabV3's raw forward (>= 0.90)."""
    rows = {}
    for arch, found in out["training"].items():
        rows[f"{arch}: loop / raw step"] = (found["ratios"]["ours_gpu_aug/raw"], TARGET_RAW)
        rows[f"{arch}: loop / original loop"] = (found["ratios"]["ours_gpu_aug/original"], TARGET_ORIGINAL)
    if "masking" in out:
        rows["masking / raw DeepLabV3 forward"] = (out["masking"]["ratios"]["raw"],
                                                   dict(mask_throughput.TARGETS)["raw"])
    print("\nsummary" + (" (dry run: not measurements)" if out["dry_run"] else f" on {out['device']}"))
    for name, (ratio, target) in rows.items():
        print(f"  {name:<40} {ratio:6.2f}  target >= {target:g}  {'met' if ratio >= target else 'NOT met'}")
    return {name: {"ratio": ratio, "target": target, "met": ratio >= target} for name, (ratio, target) in rows.items()}


def missed_targets(out: dict) -> list[str]:
    """Every target of the run that was not met: each architecture's two training targets and
    masking's two (against the raw forward and against the original loop)."""
    found = {f"{arch}: {name}": met for arch, figures in out["training"].items()
             for name, met in figures["targets"].items()}
    found.update({f"masking: {name}": met for name, met in out.get("masking", {}).get("targets", {}).items()})
    return [name for name, met in found.items() if not met]


def verdict(out: dict) -> int:
    """Print the missed targets; the exit status: 1 if any was missed, else 0 (a dry run: 0)."""
    missed = out["targets_missed"]
    if out["dry_run"]:
        print("dry run: no target is judged")
        return 0
    if missed:
        print(f"{len(missed)} target(s) NOT met: " + "; ".join(missed))
        return 1
    print("every target met")
    return 0


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"


def output_path(args) -> Path:
    if args.json is not None:
        return args.json
    base = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent / "out"
    return base / ("gpu-dry-run.json" if args.dry_run else "gpu.json")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="resnet18,resnet50")
    p.add_argument("--size", type=lambda t: tuple(int(v) for v in t.split("x")), default=(224, 160), help="HxW")
    p.add_argument("--images", type=int, default=2048, help="training images per epoch")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--loader-workers", type=int, default=2, help="loader threads of ours (num_workers=auto on CUDA)")
    p.add_argument("--cpu-aug-workers", type=int, default=2, help="loader threads of ours with the aug on the CPU")
    p.add_argument("--original-workers", type=int, default=OWN_WORKERS)
    p.add_argument("--segmenter", default="deeplabv3_resnet101", help="DeepLabV3 of the masking section")
    p.add_argument("--seg-size", type=int, default=224)
    p.add_argument("--mask-images", type=int, default=512)
    p.add_argument("--mask-batch", type=int, default=32)
    p.add_argument("--skip-masking", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="where to write the figures")
    p.add_argument("--quick", action="store_true",
                   help="the same targets in ~2 minutes on one GPU (well under 5): resnet18 only, 1,024 images "
                        "an epoch, 3 rounds after 1 warm-up, masking on 256 images; options given explicitly win")
    p.add_argument("--dry-run", action="store_true",
                   help="every step on the CPU at a tiny size, to check the script without a GPU (no figures)")
    args = p.parse_args(argv)
    if args.quick:  # other defaults; an option given explicitly still wins
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    args.archs = args.archs.split(",")

    if args.dry_run:
        device = torch.device("cpu")
        args.archs, args.size, args.images, args.batch = ["resnet18"], (32, 24), 40, 16
        args.rounds, args.warmup, args.original_workers, args.cpu_aug_workers, args.loader_workers = 1, 0, 0, 1, 1
        args.segmenter, args.seg_size, args.mask_images, args.mask_batch = \
            "deeplabv3_mobilenet_v3_large", 64, 8, 4
        print("--dry-run: every step on the CPU at a tiny size; the figures below are not measurements")
    elif not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = cudnn_benchmark(device)  # as `fgvc train` sets it
        if args.quick:
            print(f"--quick: {', '.join(args.archs)}, {args.images} images an epoch, {args.rounds} rounds after "
                  f"{args.warmup} warm-up, masking on {args.mask_images} images")
    precision = Precision(torch.bfloat16, channels_last=True)
    warnings.filterwarnings("ignore", message="This DataLoader will create")

    out = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
           "cpus": os.cpu_count(), "dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                        if k != "json"},
           "training": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fgvc-bench-gpu-") as tmp:
        tmp = Path(tmp)
        training(args, tmp, device, precision, out)
        if not args.skip_masking:
            masking(args, tmp, device, out)
    out["seconds"] = time.perf_counter() - start
    out["summary"] = summary(out)
    out["targets_missed"] = missed_targets(out)
    path = output_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"\nfigures written to {path} ({out['seconds']:.0f} s in all)")
    return verdict(out)


if __name__ == "__main__":
    sys.exit(main())
