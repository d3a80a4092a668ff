"""`train`: one MLflow run per training, checkpointed every epoch, resumable, registered.

Order of work per epoch: checkpoint files first (so a metric never refers to an epoch whose
state is lost), then metrics with `step=epoch`, then refreshed plots.

Under `torchrun` (see fgvc.training.distributed) every rank trains its share of each batch;
only rank 0 talks to MLflow: it resolves the data root and the checkpoint to resume from and
sends them to the other ranks, and alone logs, checkpoints and registers. The result is one
MLflow run with `world_size` among its params.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import timm
import torch
import torch.nn as nn
import torchvision
from mlflow.tracking import MlflowClient

from fgvc.data.dataset import BatchLoader, ShardDataset
from fgvc.data.shards import ShardError, dataset_digest, read_meta, validate_root
from fgvc.models import create_model
from fgvc.training import distributed
from fgvc.training.augment import get_preset
from fgvc.training.config import DEFAULT_DATA_ROOT, TrainConfig, regime_of
from fgvc.training.distributed import World
from fgvc.training.loop import EpochRecord, NonFiniteLoss, Precision, build_optimizer, evaluate, evaluate_sharded, fit
from fgvc.tracking.prepare_run import ensure_demo
from fgvc.tracking.registry import download_checkpoint, load_checkpoint, register_version, registered_name
from fgvc.tracking.runs import RunFailed, configure_tracking, git_commit, log_dataset, log_params, tracked_run
from fgvc.viz.training_plots import save_confusion, save_curves, save_per_class

log = logging.getLogger("fgvc")

EXPERIMENT = "fgvc-train"


def is_masked_root(root: str | Path) -> bool:
    """A root written by `mask` says so in meta.json (or carries the `bg_removed` flag)."""
    meta = read_meta(root)
    return bool(meta.get("segmenter") or meta.get("masked") or meta.get("regime") == "masked"
                or meta.get("source") == "mask" or (meta.get("masking") or {}).get("segmenter"))


def resolve_data_root(data_root: str) -> Path:
    """The default demo root is generated on first use; any other missing path is an error."""
    root = Path(data_root)
    if not (root / "meta.json").exists() and not root.exists():
        if os.path.normpath(data_root) == os.path.normpath(DEFAULT_DATA_ROOT):
            return ensure_demo(root)
        raise ShardError(f"{root}: dataset root does not exist (run `fgvc prepare --root {root}` "
                         f"or `fgvc mask` to create it)")
    return root


def find_resumable_run(cfg: TrainConfig) -> str:
    """The newest unfinished run of this configuration, in any experiment (`mlflow run`
    puts runs where `--experiment-name` says, standalone runs go to fgvc-train)."""
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list", max_results=50,
                              filter_string=f"tags.`fgvc.config_id` = '{cfg.identity()}'",
                              order_by=["attributes.start_time DESC"])
    for run in runs:
        if run.info.status != "FINISHED":
            return run.info.run_id
    raise ValueError(f"resume=true: no unfinished run of this configuration (config id "
                     f"{cfg.identity()}) in any experiment; pass resume=<run_id> to pick one")


@dataclass
class TrainResult:
    run_id: str
    best_epoch: int
    best_val_acc: float
    history: list[dict]
    registered_model: str | None
    model_version: str | None


class _Checkpointer:
    """Writes last.pt (full state) every epoch and best.pt (model + spec) on improvement,
    logging each to the run's `checkpoints/` artifacts."""

    def __init__(self, model, optimizer, scheduler, cfg: TrainConfig, extra: dict):
        self.model, self.optimizer, self.scheduler, self.cfg, self.extra = model, optimizer, scheduler, cfg, extra
        self._tmp = tempfile.TemporaryDirectory(prefix="fgvc-ckpt-")
        self.dir = Path(self._tmp.name)

    def close(self) -> None:
        self._tmp.cleanup()

    def model_state(self) -> dict:
        model = self.model.module if hasattr(self.model, "module") else self.model
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def save(self, record: EpochRecord, best: dict) -> None:
        model = self.model.module if hasattr(self.model, "module") else self.model
        common = {"model": self.model_state(), "spec": model.spec.to_dict(), "epoch": record.epoch,
                  "config": self.cfg.to_dict(), **self.extra}
        if record.is_best:
            torch.save({**common, "val_acc": record.val.acc}, self.dir / "best.pt")
            mlflow.log_artifact(str(self.dir / "best.pt"), "checkpoints")
        torch.save({**common, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "history": record.history, "best": best},
                   self.dir / "last.pt")
        mlflow.log_artifact(str(self.dir / "last.pt"), "checkpoints")


def _log_plots(history: list[dict], record: EpochRecord, names: list[str], support: list[int]) -> None:
    with tempfile.TemporaryDirectory(prefix="fgvc-plots-") as tmp:
        tmp = Path(tmp)
        paths = [
            save_curves(tmp / "loss.png", history, {"train/loss": "train (label smoothing)",
                                                    "val/loss": "val"}, "cross-entropy", "Loss"),
            save_curves(tmp / "error.png", history, {"val/error": "val top-1 error",
                                                     "train/acc": "train accuracy"}, "rate",
                        "Validation error"),
        ]
        if record.is_best:
            paths += [
                save_confusion(tmp / "confusion_matrix.png", record.val.confusion, names,
                               f"Confusion matrix (val, best epoch {record.epoch})"),
                save_per_class(tmp / "per_class_accuracy.png", record.val.per_class_acc, names, support,
                               f"Per-class accuracy (val, best epoch {record.epoch})"),
            ]
        for p in paths:
            mlflow.log_artifact(str(p), "plots")


def _summary_markdown(cfg: TrainConfig, params: dict, history: list[dict], best: dict,
                      names: list[str], version: str | None, reg_name: str | None) -> str:
    lines = [f"# {params['run_name']}", "",
             f"Designer classification on `{params['data_root']}` (dataset digest "
             f"`{params['dataset_digest']}`, regime **{params['regime']}**).", "",
             "## Configuration", "", "| param | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in params.items()]
    lines += ["", "## Results", "",
              f"Best epoch {best['epoch']}: val accuracy **{best['val/acc']:.4f}** "
              f"(top-5 {best['val/top5']:.4f}, balanced {best['val/balanced_acc']:.4f}, "
              f"chance {1 / len(names):.4f}).", "",
              "| epoch | train loss | train acc | val loss | val acc | val top5 | lr backbone | lr head | s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for h in history:
        lines.append(f"| {h['epoch']} | {h['train/loss']:.4f} | {h['train/acc']:.4f} | {h['val/loss']:.4f} | "
                     f"{h['val/acc']:.4f} | {h['val/top5']:.4f} | {h['lr/backbone']:.2e} | "
                     f"{h['lr/head']:.2e} | {h['time/epoch_s']:.1f} |")
    if version:
        lines += ["", "## Registry", "",
                  f"Registered as `models:/{reg_name}/{version}` (alias `candidate`). Analyse with:", "",
                  f"    mlflow run . -e analyze --env-manager local -P model=models:/{reg_name}/{version}"]
    lines += ["", "Artifacts: `plots/` (loss, error, confusion matrix, per-class accuracy), "
              "`checkpoints/best.pt` and `checkpoints/last.pt` (state_dict + model spec)."]
    return "\n".join(lines) + "\n"


def _missing_steps(run_id: str, key: str = "val/acc") -> set[int]:
    return {m.step for m in MlflowClient().get_metric_history(run_id, key)}


@dataclass
class _Inputs:
    """What rank 0 works out before training (it may need MLflow) and sends to every rank."""

    root: Path
    num_classes: int
    image_size: tuple[int, int]
    label_names: dict
    digest: str
    masked: bool
    resume_id: str | None
    checkpoint: dict | None


def _resolve_inputs(cfg: TrainConfig, resume: str) -> _Inputs:
    configure_tracking()
    root = resolve_data_root(cfg.data_root)
    info = validate_root(root)
    digest = dataset_digest(root)
    resume_id = None
    ckpt = None
    if str(resume).lower() not in ("false", "", "none"):
        resume_id = find_resumable_run(cfg) if str(resume).lower() == "true" else str(resume)
        ckpt = load_checkpoint(download_checkpoint(resume_id, "last"))
        if ckpt["spec"]["num_classes"] != info.num_classes:
            raise ValueError(f"cannot resume run {resume_id}: its checkpoint has "
                             f"{ckpt['spec']['num_classes']} classes but {root} has {info.num_classes}")
        if ckpt.get("dataset_digest") not in (None, digest):
            raise ValueError(f"cannot resume run {resume_id}: it trained on dataset "
                             f"{ckpt['dataset_digest']}, but {root} has digest {digest}")
        log.info("resuming run %s after epoch %d", resume_id, ckpt["epoch"])
    return _Inputs(root, info.num_classes, info.image_size, info.label_names, digest,
                   is_masked_root(root), resume_id, ckpt)


def run_train(cfg: TrainConfig, resume: str = "false", register: bool = True,
              registered_model: str | None = None, progress: bool = True,
              sync_bn: bool = False, experiment: str | None = None, parent_run_id: str | None = None,
              tags: dict | None = None) -> TrainResult | None:
    """Train one configuration in one MLflow run (new, or resumed from its `last.pt`).

    Under torchrun this runs on every rank with DDP (`sync_bn`: SyncBatchNorm); rank 0 returns
    the result, the other ranks None. `experiment` (default fgvc-train), `parent_run_id` and
    extra `tags` place a new run elsewhere, e.g. as a cell of a study.
    """
    placement = dict(experiment=experiment or EXPERIMENT, parent_run_id=parent_run_id, tags=tags or {})
    with distributed.process_group(cfg.resolve_device()) as world:
        return _train(cfg, world, resume, register, registered_model, progress and world.is_main, sync_bn,
                      placement)


def _train(cfg: TrainConfig, world: World, resume: str, register: bool, registered_model: str | None,
           progress: bool, sync_bn: bool, placement: dict) -> TrainResult | None:
    if cfg.batch_size % world.world_size:
        raise ValueError(f"batch_size {cfg.batch_size} is the global batch and must be divisible by "
                         f"the number of processes ({world.world_size})")
    inputs: _Inputs = distributed.from_main(lambda: _resolve_inputs(cfg, resume))
    root, digest, masked = inputs.root, inputs.digest, inputs.masked
    resume_id, ckpt = inputs.resume_id, inputs.checkpoint
    regime = regime_of(masked, cfg.aug)
    augment = get_preset(cfg.aug)
    device = world.device
    precision = Precision.for_device(device, cfg.amp, cfg.channels_last)
    run_name = f"{cfg.arch.replace('timm:', '')}-{regime}"
    reg_name = registered_model or registered_name(cfg.arch)

    torch.manual_seed(cfg.seed)
    model = create_model(cfg.arch, inputs.num_classes, cfg.pretrained, image_size=inputs.image_size)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model = model.to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = distributed.wrap_model(model, world, sync_bn)
    train_set = ShardDataset(root, "train", count=cfg.train_count, seed=cfg.seed)
    val_set = ShardDataset(root, "val", count=cfg.val_count, seed=cfg.seed)
    loader_opts = dict(device=device, workers=cfg.num_workers, prefetch=2,
                       channels_last=precision.channels_last, rank=world.rank, world_size=world.world_size)
    train_loader_class = distributed.EqualShareLoader if world.is_distributed else BatchLoader
    train_loader = train_loader_class(train_set, cfg.batch_size // world.world_size, shuffle=True,
                                      seed=cfg.seed, drop_last=False,
                                      transform=distributed.per_rank_transform(augment, world.rank),
                                      **loader_opts)
    val_loader = BatchLoader(val_set, max(cfg.batch_size, 128), **loader_opts)
    optimizer = build_optimizer(distributed.unwrap(model), cfg.effective_lr_backbone, cfg.lr_head,
                                cfg.effective_weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    start_epoch, history, best = 0, [], {}
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, history, best = ckpt["epoch"], ckpt["history"], ckpt["best"]
        if start_epoch >= cfg.epochs:
            log.info("run %s already trained %d epochs", resume_id, start_epoch)
    fit_opts = dict(precision=precision, grad_clip=cfg.grad_clip, start_epoch=start_epoch,
                    history=history, progress=progress,
                    evaluate_fn=evaluate_sharded if world.is_distributed else evaluate)
    if not world.is_main:
        try:
            fit(model, train_loader, val_loader, optimizer, scheduler, criterion, cfg.epochs,
                inputs.num_classes, device, **fit_opts)
        except NonFiniteLoss as e:
            raise RunFailed(f"{e} (rank {world.rank})") from e
        return None

    names = [inputs.label_names.get(i, str(i)) for i in range(inputs.num_classes)]
    spec = distributed.unwrap(model).spec
    params = {
        **{k: v for k, v in cfg.to_dict().items()},
        "run_name": run_name, "regime": regime, "masked": masked,
        "aug_preset": getattr(augment, "name", "none"),
        "lr_backbone_effective": cfg.effective_lr_backbone,
        "weight_decay_effective": cfg.effective_weight_decay,
        "pretrained_effective": spec.pretrained_effective,
        "input_mean": spec.mean, "input_std": spec.std,
        "num_classes": inputs.num_classes,
        "image_size": f"{inputs.image_size[0]}x{inputs.image_size[1]}",
        "train_images": len(train_set), "val_images": len(val_set),
        "data_root": str(root), "data_root_abs": str(root.resolve()), "dataset_digest": digest, "device_effective": str(device),
        "amp_effective": str(precision.amp_dtype).replace("torch.", "") if precision.amp_dtype else "off",
        "channels_last_effective": precision.channels_last,
        "optimizer": "AdamW", "scheduler": "cosine", "world_size": world.world_size,
        "batch_size_per_rank": cfg.batch_size // world.world_size,
        "sync_bn": bool(sync_bn and world.is_distributed),
        "registered_model": reg_name if register else "none",
        "git_commit": git_commit(), "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__, "timm_version": timm.__version__,
        "python_version": platform.python_version(),
    }
    tags = {"fgvc.config_id": cfg.identity(), "fgvc.regime": regime, "fgvc.arch": cfg.arch,
            "fgvc.dataset_digest": digest}
    checkpoint_extra = {"dataset_digest": digest, "regime": regime, "label_names": names}

    tags.update(placement["tags"])
    with tracked_run(placement["experiment"], run_name, tags=tags, run_id=resume_id,
                     parent_run_id=None if resume_id else placement["parent_run_id"]) as run:
        run_id = run.info.run_id
        log_params(params)
        if ckpt is None:
            log_dataset(root, digest, name=root.name, context="training")
        else:  # re-log epochs whose metrics the interrupted process did not get to write
            logged = _missing_steps(run_id)
            for h in history:
                if h["epoch"] not in logged:
                    mlflow.log_metrics({k: v for k, v in h.items() if k != "epoch"}, step=h["epoch"])
        checkpointer = _Checkpointer(model, optimizer, scheduler, cfg, checkpoint_extra)
        support = val_set.class_counts()

        def on_epoch_end(record: EpochRecord) -> None:
            if record.is_best:
                best.clear()
                best.update(record.history[-1])
            checkpointer.save(record, best)
            mlflow.log_metrics(record.metrics(), step=record.epoch)
            _log_plots(record.history, record, names, support)
            if os.environ.get("FGVC_FAULT_KILL_AFTER_EPOCH") == str(record.epoch):
                os.kill(os.getpid(), 9)  # fault injection for the resume tests: a hard crash

        try:
            history = fit(model, train_loader, val_loader, optimizer, scheduler, criterion, cfg.epochs,
                          inputs.num_classes, device, on_epoch_end=on_epoch_end, **fit_opts)
        except NonFiniteLoss as e:
            raise RunFailed(f"{e}. The last good checkpoint is checkpoints/last.pt of run {run_id}.") from e
        finally:
            checkpointer.close()

        version = None
        if register and best:
            version = register_version(run_id, reg_name, {
                "regime": regime, "dataset_digest": digest, "val_acc": f"{best['val/acc']:.6f}",
                "val_balanced_acc": f"{best['val/balanced_acc']:.6f}", "arch": cfg.arch,
                "best_epoch": best["epoch"], "data_root": str(root)})
            mlflow.set_tag("fgvc.model_version", f"{reg_name}/{version}")
        mlflow.log_metrics({"best/val_acc": best["val/acc"], "best/epoch": best["epoch"]})
        mlflow.log_text(_summary_markdown(cfg, params, history, best, names, version, reg_name),
                        "run_summary.md")
        log.info("run %s: best val acc %.4f at epoch %d%s", run_id, best["val/acc"], best["epoch"],
                 f"; registered {reg_name} version {version} (alias candidate)" if version else "")
        return TrainResult(run_id, best["epoch"], best["val/acc"], history,
                           reg_name if version else None, version)

