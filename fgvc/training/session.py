"""A training, from typed config to trained model, with no tracking store involved.

    from fgvc.training import TrainConfig, train
    outcome = train(TrainConfig(arch="fn-small", epochs=2))   # e.g. in a notebook

`build_session` assembles what a training needs (data, model, loaders, optimiser, schedule,
resume state) and `Session.run` trains, reporting each finished epoch to its callbacks in
order: `CheckpointWriter` writes the checkpoint files, and `fgvc.tracking` adds one that
records the epoch in MLflow. Under torchrun every rank builds the same session (DDP);
callbacks run on rank 0 only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn

from fgvc import distributed
from fgvc.config import render_params
from fgvc.data.dataset import BatchLoader, ShardDataset
from fgvc.data.roots import is_masked_root, resolve_root
from fgvc.data.shards import dataset_digest, read_meta, validate_root
from fgvc.devices import resolve_device
from fgvc.distributed import World
from fgvc.models import FGVCNet, create_model
from fgvc.regimes import regime_of
from fgvc.training import ddp
from fgvc.training.augment import get_preset
from fgvc.training.checkpoint import check_resumable
from fgvc.training.config import TrainConfig, cudnn_benchmark
from fgvc.training.loop import EpochRecord, Precision, build_optimizer, evaluate, evaluate_sharded, fit

log = logging.getLogger("fgvc")


@dataclass(frozen=True)
class TrainingData:
    """A validated dataset root and the facts a training records about it."""

    root: Path
    num_classes: int
    image_size: tuple[int, int]
    label_names: list[str]
    digest: str
    masked: bool
    resize: str = "pad"  # how the root's images were fitted to their size (ingest's policy)

    @classmethod
    def of(cls, data_root: str | Path) -> TrainingData:
        root = resolve_root(data_root)
        info = validate_root(root)
        names = [info.label_names.get(i, str(i)) for i in range(info.num_classes)]
        meta = read_meta(root)
        resize = meta.get("resize") or (meta.get("source_meta") or {}).get("resize") or "pad"
        return cls(root, info.num_classes, info.image_size, names, dataset_digest(root), is_masked_root(root),
                   resize)


class Callback(Protocol):
    def on_epoch_end(self, record: EpochRecord, session: Session) -> None: ...


def loader_workers(cfg: TrainConfig, device: torch.device) -> int:
    """``num_workers=auto``: the loader thread count that measured fastest (bench/README.md,
    "Loader threads").

    - On a CPU: none. The model step already keeps every core busy (its intra-op threads);
      a loader thread can only take cores from it, and on two cores the training thread and
      a busy loader thread slow each other more than the loader's work costs when done in
      line. Loading a batch (one gather from the memory-mapped shards, the uint8->float
      conversion) is under 1% of a step, and heavy augmentation, batched, a few percent.
    - Beside a GPU: two threads gather and pin the next batches while the GPU trains (the
      augmentation itself runs on the GPU, see `build_session`).
    Results do not depend on the choice: every batch's augmentation draws are seeded by
    (seed, epoch, batch) and run on one intra-op thread, wherever the batch is loaded.
    """
    if cfg.num_workers is not None:
        return cfg.num_workers
    return 2 if device.type == "cuda" else 0


@dataclass
class Session:
    cfg: TrainConfig
    data: TrainingData
    world: World
    model: nn.Module  # DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: nn.Module
    precision: Precision
    train_set: ShardDataset
    val_set: ShardDataset
    train_loader: BatchLoader
    val_loader: BatchLoader
    device_recipe: dict[str, str] = field(default_factory=dict)  # TrainConfig.device_recipe here
    start_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)  # the history entry of the best epoch so far

    @property
    def network(self) -> FGVCNet:
        return _network_of(self.model)

    @property
    def regime(self) -> str:
        return regime_of(self.data.masked, self.cfg.aug)

    def model_checkpoint(self, record: EpochRecord) -> dict:
        """What best.pt holds: enough to rebuild, preprocess and label the model anywhere."""
        return {"model": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
                "spec": self.network.spec.to_dict(), "epoch": record.epoch, "val_acc": record.val.acc,
                "config": render_params(self.cfg), "dataset_digest": self.data.digest,
                "label_names": list(self.data.label_names), "regime": self.regime,
                "resize": self.data.resize, "device_recipe": dict(self.device_recipe)}

    def resume_checkpoint(self, record: EpochRecord) -> dict:
        """What last.pt holds: best.pt's content plus everything a resume needs."""
        return {**self.model_checkpoint(record), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "history": list(record.history),
                "best": dict(self.best)}

    def run(self, callbacks: Sequence[Callback] = (), progress: bool = True) -> list[dict]:
        """Train the remaining epochs; returns the history (one metrics dict per epoch)."""
        def on_epoch_end(record: EpochRecord) -> None:
            if record.is_best:
                self.best = dict(record.history[-1])
            self.history = record.history
            if self.world.is_main:
                for callback in callbacks:
                    callback.on_epoch_end(record, self)

        evaluate_fn = evaluate_sharded if self.world.is_distributed else evaluate
        self.history = fit(self.model, self.train_loader, self.val_loader, self.optimizer, self.scheduler,
                           self.criterion, self.cfg.epochs, self.data.num_classes, self.world.device,
                           precision=self.precision, grad_clip=self.cfg.grad_clip, start_epoch=self.start_epoch,
                           history=self.history, on_epoch_end=on_epoch_end,
                           progress=progress and self.world.is_main, evaluate_fn=evaluate_fn)
        return self.history


def _network_of(model: nn.Module) -> FGVCNet:
    """The FGVCNet under a DDP wrapper (SyncBatchNorm conversion keeps its class)."""
    network = ddp.unwrap(model)
    if not isinstance(network, FGVCNet):
        raise TypeError(f"a training trains an FGVCNet, not a {type(network).__name__}")
    return network


def build_session(cfg: TrainConfig, data: TrainingData, world: World, resume: dict | None = None,
                  resume_from: str = "checkpoint") -> Session:
    """Everything a training needs, on `world.device`; `resume` is a last.pt dict."""
    device = world.device
    device_recipe = cfg.device_recipe(device)
    if resume is not None:
        check_resumable(resume, resume_from, cfg.arch, data.num_classes, data.digest, device_recipe)
    precision = Precision.for_device(device, cfg.amp, cfg.channels_last)
    if device.type == "cuda":  # the benchmark measures this setting too (bench/gpu.py)
        torch.backends.cudnn.benchmark = cudnn_benchmark(device)
    torch.manual_seed(cfg.seed)
    network = create_model(cfg.arch, data.num_classes, cfg.pretrained, image_size=data.image_size)
    if resume is not None:
        network.load_state_dict(resume["model"])
    network = network.to(device)
    if precision.channels_last:
        network = network.to(memory_format=torch.channels_last)
    model = ddp.wrap_model(network, world, cfg.sync_bn)

    train_set = ShardDataset(data.root, "train", count=cfg.train_count, seed=cfg.seed)
    val_set = ShardDataset(data.root, "val", count=cfg.val_count, seed=cfg.seed)
    loader_opts: dict[str, Any] = dict(device=device, workers=loader_workers(cfg, device), prefetch=2,
                       channels_last=precision.channels_last, rank=world.rank, world_size=world.world_size)
    # On a GPU the augmentation runs there, batched (`HeavyAugment.batch`): CPU threads
    # cannot keep up with a GPU step at 224x160, the GPU does it in a small share of one.
    recipe = get_preset(cfg.aug)
    on_device = device_recipe["augment_path"] == "device"
    train_loader = (ddp.EqualShareLoader if world.is_distributed else BatchLoader)(
        train_set, cfg.batch_size // world.world_size, shuffle=True, seed=cfg.seed, drop_last=False,
        transform=ddp.per_rank_transform(recipe.batch if on_device else recipe, world.rank),
        augment_on_device=on_device, **loader_opts)
    val_loader = BatchLoader(val_set, max(cfg.batch_size, 128), **loader_opts)

    optimizer = build_optimizer(_network_of(model), cfg.effective_lr_backbone, cfg.lr_head,
                                cfg.effective_weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    session = Session(cfg, data, world, model, optimizer, scheduler,
                      nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), precision,
                      train_set, val_set, train_loader, val_loader, device_recipe)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        session.start_epoch, session.history, session.best = resume["epoch"], resume["history"], resume["best"]
    return session


@dataclass
class TrainOutcome:
    history: list[dict]
    best: dict
    spec: dict
    regime: str
    data: TrainingData


def train(cfg: TrainConfig, callbacks: Sequence[Callback] = (), resume: dict | None = None,
          progress: bool = True) -> TrainOutcome | None:
    """Train one configuration, here or under torchrun (rank 0 returns the outcome, the other
    ranks None). No tracking store is touched; `callbacks` see every finished epoch."""
    with distributed.process_group(resolve_device(cfg.device)) as world:
        data = distributed.from_main(lambda: TrainingData.of(cfg.data_root))
        session = build_session(cfg, data, world, resume)
        session.run(callbacks, progress)
        if not world.is_main:
            return None
        return TrainOutcome(session.history, session.best, session.network.spec.to_dict(), session.regime, data)
