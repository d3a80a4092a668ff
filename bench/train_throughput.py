"""Training throughput on the harness: our loop against the raw model step and the original
project's loop, on the same data, model and batch size, in interleaved rounds.

For each image size and augmentation setting (resnet18, batch 64, runway-synth images):

  raw step         forward, backward, AdamW step over batches already in memory as float
                   (the most any loop can do on this machine);
  ours (N thr.)    `fgvc.training.loop.train_one_epoch` over `BatchLoader` with N loader
                   threads (0, 1, 2), heavy augmentation batched in the loader; the setting
                   `num_workers=auto` picks is marked "auto";
  ours + tracking  the auto setting plus the per-epoch tracking callbacks of `fgvc train`
                   (CheckpointWriter: last.pt and best.pt with fsync; Recorder: metrics into
                   a local SQLite MLflow store), each epoch counted as a new best;
  original (N w.)  the original approach (bench/original_loop.py): shards in RAM, per-sample
                   Dataset with torchvision transforms, DataLoader with N worker processes
                   (its own setting, 6, and 0/1/2, the candidates for a small machine).

One round = one epoch of every contender. Then, at the default demo size (1,200 train /
400 val images, 64x48), a whole epoch (train + validation) with and without the tracking
callbacks, and what each callback costs.

    python bench/train_throughput.py --quick          # smoke run, under a minute: no figures
    python bench/train_throughput.py                  # the figures (about 20 minutes on 2 cores)
    python bench/train_throughput.py --sizes 64x48 --aug on --rounds 7
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import Contender, Machine, Spread, compare, report_target  # noqa: E402
from original_loop import OWN_WORKERS, OriginalShardDataset, OriginalTrainer, original_loader, original_transform  # noqa: E402

from fgvc.data.dataset import BatchLoader  # noqa: E402
from fgvc.data.demo import DemoConfig, generate_demo  # noqa: E402
from fgvc.distributed import World  # noqa: E402
from fgvc.models import create_model  # noqa: E402
from fgvc.training.augment import get_preset  # noqa: E402
from fgvc.training.config import TrainConfig  # noqa: E402
from fgvc.training.loop import EpochRecord, build_optimizer, evaluate, train_one_epoch  # noqa: E402
from fgvc.training.session import TrainingData, build_session, loader_workers  # noqa: E402

CPU = torch.device("cpu")
TARGET_RAW = {False: 0.95, True: 0.90}  # ours / raw step, without and with heavy augmentation
TARGET_TRACKING_SHARE = 0.05


def parse_size(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def demo_root(base: Path, images: int, size: tuple[int, int], val: int, classes: int = 10) -> Path:
    root = base / f"demo-{size[0]}x{size[1]}-{images}"
    if not root.exists():
        generate_demo(root, DemoConfig(num_designers=classes, train_per_class=max(1, images // classes),
                                       val_per_class=max(1, val // classes), height=size[0], width=size[1]))
    return root


def fresh_model(arch: str, classes: int, size: tuple[int, int]) -> nn.Module:
    torch.manual_seed(0)
    return create_model(arch, classes, pretrained=False, image_size=size)


def raw_step(arch: str, classes: int, size, batches: list[tuple[torch.Tensor, torch.Tensor]]):
    model = fresh_model(arch, classes, size)
    optimizer = build_optimizer(model, 1e-4, 1e-3, 0.05)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    def run():
        model.train()
        for x, y in batches:
            loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return run


def our_loop(arch: str, session, workers: int, aug: str | None):
    """train_one_epoch over a BatchLoader with `workers` threads, a model of its own."""
    model = fresh_model(arch, session.data.num_classes, session.data.image_size)
    optimizer = build_optimizer(model, 1e-4, 1e-3, 0.05)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    loader = BatchLoader(session.train_set, session.train_loader.batch_size, shuffle=True, seed=0,
                         transform=get_preset(aug), workers=workers, prefetch=2)

    def run():
        loader.set_epoch(loader.epoch + 1)
        train_one_epoch(model, loader, optimizer, criterion, CPU)
    return run


class TimedCallback:
    """Wraps an epoch callback and adds up its wall time."""

    def __init__(self, name: str, callback):
        self.name, self.callback, self.seconds, self.calls = name, callback, 0.0, 0

    def on_epoch_end(self, record, session) -> None:
        start = time.perf_counter()
        self.callback.on_epoch_end(record, session)
        self.seconds += time.perf_counter() - start
        self.calls += 1


def open_store(tmp: Path) -> None:
    """A local SQLite MLflow store in `tmp` (made once: creating its tables takes seconds)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    mlflow.set_experiment("bench-train-throughput")


@contextlib.contextmanager
def tracking(tmp: Path):
    """An active run in the store; yields the two epoch callbacks of `fgvc train` (run_train
    wires the same two), timed."""
    import mlflow

    from fgvc.tasks.train import Recorder
    from fgvc.training.checkpoint import CheckpointWriter

    with mlflow.start_run() as run:
        writer = CheckpointWriter(tmp / "checkpoints" / run.info.run_id)
        yield [TimedCallback("CheckpointWriter (best.pt + last.pt)", writer),
               TimedCallback("Recorder (metrics)", Recorder(run.info.run_id, writer))]
    shutil.rmtree(writer.directory, ignore_errors=True)


def tracked_loop(session, callbacks):
    """Our auto setting's epoch, then the tracking callbacks on its record (validation taken
    once beforehand: it is not tracking work)."""
    val = evaluate(session.model, session.val_loader, session.data.num_classes, CPU)

    def run():
        session.train_loader.set_epoch(session.train_loader.epoch + 1)
        stats = train_one_epoch(session.model, session.train_loader, session.optimizer, session.criterion, CPU)
        record = EpochRecord(1, stats, val, 1e-4, 1e-3, stats["seconds"], True)
        record.history = [{"epoch": 1, **record.metrics()}]
        session.best, session.history = dict(record.history[-1]), record.history
        for callback in callbacks:
            callback.on_epoch_end(record, session)
    return run


def original(arch: str, root: Path, size, workers: int, aug: bool):
    dataset = OriginalShardDataset(root, "train", original_transform(size) if aug else None)
    trainer = OriginalTrainer(fresh_model(arch, 10, size), original_loader(dataset, workers), CPU)
    return trainer.run


def throughput(args, tmp: Path, size: tuple[int, int], aug: bool) -> None:
    label = f"{args.arch} {size[0]}x{size[1]}, {'heavy augmentation' if aug else 'no augmentation'}"
    images = args.images if size[0] * size[1] <= 64 * 48 * 2 else args.images_large
    root = demo_root(tmp, images, size, val=max(args.batch, 64))
    cfg = TrainConfig(arch=args.arch, data_root=str(root), pretrained=False, aug="heavy" if aug else None,
                      batch_size=args.batch, epochs=1, seed=0)
    data = TrainingData.of(root)
    tracked_session = build_session(cfg, data, World())
    n = len(tracked_session.train_set)
    auto = loader_workers(cfg, CPU)
    raw_batches = []
    for start in range(0, n, args.batch):
        items = tracked_session.train_set.gather(torch.arange(start, min(start + args.batch, n)))
        raw_batches.append((items["images"].float() / 255, items["labels"]))

    with Machine(f"training throughput: {label}, {n} images per epoch, batch {args.batch}"), \
            tracking(tmp) as callbacks:
        contenders = [Contender("raw step", raw_step(args.arch, data.num_classes, size, raw_batches), n, "img")]
        for w in sorted(set(args.our_workers) | {auto}):
            name = f"ours ({w} thr.{', auto' if w == auto else ''})"
            contenders.append(Contender(name, our_loop(args.arch, tracked_session, w, cfg.aug), n, "img"))
        contenders.append(Contender("ours + tracking", tracked_loop(tracked_session, callbacks), n, "img"))
        contenders += [Contender(original_name(w), original(args.arch, root, size, w, aug), n, "img")
                       for w in args.original_workers]
        timings = compare(contenders, rounds=args.rounds, warmup=args.warmup)
        timings.print()
        ours = f"ours ({auto} thr., auto)"
        ratio = timings.ratio(ours, "raw step")
        report_target(f"[{label}] ours (auto) / raw step", ratio.median, ">=", TARGET_RAW[aug], ratio)
        fastest = max((c.name for c in contenders if c.name.startswith("ours (")),
                      key=lambda name: timings.rate(name).median)
        pick = timings.ratio(ours, fastest)
        report_target(f"[{label}] num_workers=auto ({auto}) / fastest thread count ({fastest})",
                      pick.median, ">=", 0.98, pick)
        for w in args.original_workers:
            r = timings.ratio(ours, original_name(w))
            report_target(f"[{label}] ours (auto) / {original_name(w)}", r.median, ">=", 1.0, r)
        share = timings.ratio("ours + tracking", ours)
        print(f"  ours + tracking / ours: {share.text()} (checkpoint files and metrics every epoch; "
              f"the epoch-level share is measured below at the demo size)")
        for callback in callbacks:
            if callback.calls:
                print(f"    {callback.name}: {callback.seconds / callback.calls:.3f} s per epoch")


def original_name(workers: int) -> str:
    return f"original ({workers} w.{', own' if workers == OWN_WORKERS else ''})"


def tracking_share(args, tmp: Path) -> None:
    """A whole epoch (train + validation) at the default demo size, with and without the
    tracking callbacks."""
    demo = DemoConfig() if not args.quick else DemoConfig(train_per_class=24, val_per_class=8)
    root = tmp / "demo-default"
    if not root.exists():
        generate_demo(root, demo)
    cfg = TrainConfig(arch=args.arch, data_root=str(root), pretrained=False, batch_size=args.batch, epochs=1,
                      seed=0)
    data = TrainingData.of(root)
    plain, tracked = build_session(cfg, data, World()), build_session(cfg, data, World())
    for session in (plain, tracked):
        session.cfg = dataclasses.replace(cfg, epochs=1)

    def epoch(session, callbacks):
        def run():
            session.history, session.start_epoch = [], 0  # every epoch is epoch 1, a new best
            session.run(callbacks, progress=False)
        return run

    n = len(plain.train_set)
    label = (f"{args.arch} {demo.height}x{demo.width}, {n} train / {len(plain.val_set)} val images, "
             f"batch {args.batch}")
    with Machine(f"per-epoch tracking cost: {label}"), tracking(tmp) as callbacks:
        timings = compare([Contender("epoch", epoch(plain, []), n, "img"),
                           Contender("epoch + tracking", epoch(tracked, callbacks), n, "img")],
                          rounds=args.rounds, warmup=args.warmup)
        timings.print()
        share = [1 - 1 / r for r in timings.ratio("epoch", "epoch + tracking").values]
        spread = Spread(share)
        report_target(f"[{label}] tracking share of an epoch", statistics.median(share), "<=",
                      TARGET_TRACKING_SHARE, spread)
        epoch_s = statistics.median(timings.seconds["epoch + tracking"])
        for callback in callbacks:
            per_epoch = callback.seconds / max(callback.calls, 1)
            print(f"    {callback.name}: {per_epoch:.3f} s per epoch ({per_epoch / epoch_s:.1%} of a tracked epoch)")
        last = callbacks[0].callback.path("last")
        if last.is_file():
            print(f"    last.pt is {last.stat().st_size / 2**20:.0f} MiB (model + AdamW state), best.pt "
                  f"{callbacks[0].callback.path('best').stat().st_size / 2**20:.0f} MiB")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--sizes", default="64x48,224x160", help="HxW list")
    p.add_argument("--aug", default="off,on", help="off, on or off,on")
    p.add_argument("--images", type=int, default=512, help="training images per epoch at 64x48")
    p.add_argument("--images-large", type=int, default=128, help="training images per epoch at larger sizes")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (one epoch of every contender)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--our-workers", default="0,1,2", help="loader threads of our loop to measure")
    p.add_argument("--original-workers", default=f"0,1,2,{OWN_WORKERS}",
                   help="DataLoader worker processes of the original to measure")
    p.add_argument("--no-tracking-share", action="store_true", help="skip the per-epoch tracking section")
    p.add_argument("--tracking-share-only", action="store_true", help="only the per-epoch tracking section")
    p.add_argument("--dir", type=Path, default=None, help="where to write the data (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="smoke run (< 1 minute): tiny, one round, no figures")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.images, args.images_large, args.rounds, args.warmup = "64x48", 64, 64, 1, 0
        args.our_workers, args.original_workers = "0,1", "0,1"
    args.our_workers = [int(w) for w in str(args.our_workers).split(",")]
    args.original_workers = [int(w) for w in str(args.original_workers).split(",")]
    if args.quick:
        print("--quick: a smoke run; the figures below are not measurements")
    # The original's own DataLoader setting exceeds the 2 cores here; torch says so each epoch.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="fgvc-bench-train-") as tmp:
        tmp = Path(tmp)
        open_store(tmp)
        sizes = [] if args.tracking_share_only else [parse_size(s) for s in args.sizes.split(",")]
        for size in sizes:
            for aug in (a == "on" for a in args.aug.split(",")):
                throughput(args, tmp, size, aug)
        if not args.no_tracking_share:
            tracking_share(args, tmp)


if __name__ == "__main__":
    main()
