"""Study scale: the study's wall time with the local executor against Ray with two
single-thread workers on this machine, and a projection of the iDesigner study on GPUs.

1. Executors (interleaved rounds on the harness): `fgvc study` of one grid with
   `--executor local` (one process, one thread) and with `--executor ray --ray-address none
   --cpus-per-cell 1` (Ray started on this machine with two CPUs: two cells at once, one
   thread each). Every round uses a fresh tracking store, so every cell trains; the dataset
   root (and its masked copy) is built once and shared. Ray's start-up is part of its time.
2. Projection: per-image training seconds of each architecture at 224x160 (forward, backward
   and AdamW step on random images, a few batches after a warm-up, on this CPU with its
   threads), scaled by a stated CPU->GPU factor into per-cell hours of the iDesigner study
   (60 cells: resnet18/34/50 and FashionNet-Small/Medium x 4 regimes x 3 seeds), then packed
   longest-first onto 1, 8 and 32 GPUs (one cell per GPU at a time). The assumptions are
   printed with the table.

    python bench/study_scale.py --quick        # smoke run: no figures
    python bench/study_scale.py                # the figures (a quiet machine, about 15 minutes)
"""

from __future__ import annotations

import argparse
import heapq
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Contender, Machine, compare  # noqa: E402

ARCHS = ("resnet18", "resnet34", "resnet50", "fn-small", "fn-medium")
REGIMES, SEEDS = 4, 3
IDESIGNER_TRAIN_IMAGES = 36_400  # ~45,500 photos, 80 % for training
VAL_SHARE = 0.25  # validation and analyses per epoch, relative to a training epoch


def study_command(root: Path, grid: list[str], executor: list[str]) -> list[str]:
    return [sys.executable, "-m", "fgvc.cli", "study", "--data-root", str(root), *grid, *executor]


def run_study(command: list[str], scratch: Path) -> None:
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "OMP_NUM_THREADS": "1",
               "RAY_memory_monitor_refresh_ms": "0", "FGVC_CACHE_DIR": f"{tmp}/cache"}
        env.pop("MLFLOW_RUN_ID", None)
        done = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")


def executors(args, scratch: Path) -> None:
    from fgvc.data.demo import DemoConfig, generate_demo

    root = scratch / "demo"
    generate_demo(root, DemoConfig(num_designers=args.designers, train_per_class=args.per_class,
                                   val_per_class=max(2, args.per_class // 4), height=args.height, width=args.width))
    grid = ["--archs", "fn-small", "--regimes", args.regimes, "--seeds", args.seeds, "--epochs", str(args.epochs),
            "--batch-size", "16", "--num-images", "8", "--num-workers", "0"]
    cells = len(args.regimes.split(",")) * len(args.seeds.split(","))
    local = study_command(root, grid, ["--executor", "local"])
    ray = study_command(root, grid, ["--executor", "ray", "--ray-address", "none", "--cpus-per-cell", "1"])
    run_study(local, scratch)  # builds the masked root once, outside the timing
    with Machine(f"study of {cells} cells ({args.height}x{args.width}, {args.epochs} epochs): local vs Ray x2"):
        timings = compare([Contender("local (1 process, 1 thread)", lambda: run_study(local, scratch), cells, "cell"),
                           Contender("ray (2 workers, 1 thread each)", lambda: run_study(ray, scratch), cells,
                                     "cell")], rounds=args.rounds, warmup=0)
        timings.print()
        ratio = timings.ratio("ray (2 workers, 1 thread each)", "local (1 process, 1 thread)")
        print(f"  ray / local (cells per second): {ratio.text()}")


def seconds_per_image(arch: str, batch: int, batches: int, size: tuple[int, int]) -> float:
    from fgvc.models import create_model

    model = create_model(arch, num_classes=50, pretrained=False)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(batch, 3, *size)
    labels = torch.randint(0, 50, (batch,))
    model.train()

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimiser.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        step()
    return (time.perf_counter() - start) / (batches * batch)


def makespan(cell_hours: list[float], gpus: int) -> float:
    """Longest-first onto the GPU that frees first (one cell per GPU at a time)."""
    free = [0.0] * gpus
    for hours in sorted(cell_hours, reverse=True):
        heapq.heappush(free, heapq.heappop(free) + hours)
    return max(free)


def projection(args) -> None:
    size = (224, 160)
    print(f"\nper-image training time at {size[0]}x{size[1]} on this CPU ({torch.get_num_threads()} threads, "
          f"batch {args.batch}, {args.batches} batches after one warm-up):")
    per_image = {}
    for arch in ARCHS:
        per_image[arch] = seconds_per_image(arch, args.batch, args.batches, size)
        print(f"  {arch:10s} {per_image[arch] * 1e3:8.1f} ms/img")
    cell_hours = {arch: s * IDESIGNER_TRAIN_IMAGES * (1 + VAL_SHARE) * args.study_epochs / args.gpu_factor / 3600
                  for arch, s in per_image.items()}
    cells = [cell_hours[a] for a in ARCHS for _ in range(REGIMES * SEEDS)]
    print(f"\niDesigner study projection: {len(cells)} cells ({len(ARCHS)} archs x {REGIMES} regimes x {SEEDS} "
          f"seeds), {args.study_epochs} epochs of {IDESIGNER_TRAIN_IMAGES} training images each")
    print("| arch | CPU ms/img | GPU h/cell |")
    print("|---|---|---|")
    for arch in ARCHS:
        print(f"| {arch} | {per_image[arch] * 1e3:.1f} | {cell_hours[arch]:.2f} |")
    print("\n| GPUs | wall time (h) | GPU utilisation |")
    print("|---|---|---|")
    for gpus in (1, 8, 32):
        wall = makespan(cells, gpus)
        print(f"| {gpus} | {wall:.1f} | {sum(cells) / (wall * gpus):.0%} |")
    print(f"\nassumptions: a GPU trains {args.gpu_factor:g}x faster than this CPU did here (--gpu-factor; "
          f"measure it with bench/gpu.py on the GPU you have); validation and analyses add "
          f"{VAL_SHARE:.0%} of a training epoch; data loading keeps up (shards are memory-mapped); one cell "
          f"per GPU; Ray's and the tracking server's overheads (seconds per cell) are left out; cells do not "
          f"fail. The longest cells (resnet50) bound the wall time once GPUs outnumber them.")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regimes", default="unmasked,masked")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--designers", type=int, default=6)
    p.add_argument("--per-class", type=int, default=30)
    p.add_argument("--height", type=int, default=48)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=16, help="projection: batch size of the timed steps")
    p.add_argument("--batches", type=int, default=3, help="projection: timed batches per architecture")
    p.add_argument("--study-epochs", type=int, default=30, help="projection: epochs per cell (20-40 in practice)")
    p.add_argument("--gpu-factor", type=float, default=50.0,
                   help="projection: how much faster one GPU trains than this CPU (stated, not measured here)")
    p.add_argument("--skip-executors", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny, one round, no figures")
    args = p.parse_args(argv)
    if args.quick:
        print("--quick: a smoke run; the figures below are not measurements")
        args.regimes, args.seeds, args.epochs, args.rounds = "unmasked", "0,1", 1, 1
        args.designers, args.per_class, args.height, args.width = 3, 8, 32, 24
        args.batch, args.batches = 2, 1
    with tempfile.TemporaryDirectory(prefix="fgvc-bench-study-") as scratch:
        if not args.skip_executors:
            executors(args, Path(scratch))
        projection(args)


if __name__ == "__main__":
    main()
