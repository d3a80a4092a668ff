"""`train` as an MLflow run: the training of fgvc.training, recorded.

The session (fgvc.training.session) trains; this module adds one epoch callback, the
:class:`Recorder`, and what happens around the training: the run (new, or the one to
resume), its params and dataset input, the plots and summary at the end, the MLflow model
and its registry version.

What is kept how often (a checkpoint of a ResNet-18 with optimiser state is ~134 MB):
- every epoch: the metrics (`step=epoch`);
- on local disk, in the run's checkpoint cache (`$FGVC_CACHE_DIR/checkpoints/<run_id>`,
  default `~/.cache/fgvc`): `last.pt` and `best.pt`, written after the first and last epoch
  and otherwise while writing takes at most 2.5% of the training's time (CheckpointWriter),
  so a crash loses little and `resume=true` on this machine continues from the newest state;
- to the run's artifacts (`checkpoints/`): when `UPLOAD_INTERVAL_S` has passed since the last
  upload, and always at the end, on Ctrl-C and on a failure;
- plots, `metrics.csv` and `run_summary.md`: at the end (also after Ctrl-C or a failure).
The cache of a finished run is removed once everything is uploaded.

Under torchrun every rank trains its share of each batch; only rank 0 talks to MLflow.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import timm
import torch
import torchvision
from mlflow.tracking import MlflowClient

from fgvc import distributed, mlflow_names
from fgvc.config import render_params
from fgvc.devices import resolve_device
from fgvc.errors import ConfigError, TrackingUnreachable, WriteFailed
from fgvc.files import write_failed
from fgvc.mlflow_names import registered_name
from fgvc.tasks.train_outputs import log_and_register, metrics_csv, summary_markdown
from fgvc.tracking import fencing
from fgvc.tracking.failures import Patience, is_unreachable, unreachable
from fgvc.tracking.runs import (
    RunFailed,
    artifact_dir,
    configure_tracking,
    git_commit,
    log_dataset,
    log_params,
    tracked_run,
)
from fgvc.tracking.search import find_runs
from fgvc.training.checkpoint import BEST, LAST, CheckpointWriter, read_checkpoint
from fgvc.training.config import TrainConfig
from fgvc.training.loop import EpochRecord, NonFiniteLoss
from fgvc.training.session import Callback, Session, TrainingData, build_session
from fgvc.viz.training_plots import save_confusion, save_curves, save_per_class

log = logging.getLogger("fgvc")

EXPERIMENT = mlflow_names.TRAIN
EXPERIMENT_DESCRIPTION = ("Training runs: one architecture on one data regime each. Compare regimes in the "
                          "Model training view (Chart: val/acc, train/loss; Compare: params side by side).")
UPLOAD_INTERVAL_S = 300.0
VALIDATION = ("val/acc", "val/balanced_acc", "val/top5", "val/loss", "val/error")


def best_metrics(best: dict) -> dict[str, float]:
    """The best epoch's validation metrics as `best/val_acc`, ..., and `best/epoch`: one value
    each, logged at the best epoch's step (linked to the run's MLflow model when there is one);
    a study's cell logs them at step 0 (:func:`best_step`)."""
    return {**{f"best/{k.replace('/', '_')}": best[k] for k in VALIDATION}, "best/epoch": best["epoch"]}


def best_step(best: dict, tags: dict) -> int:
    """The step the `best/...` metrics are logged at: the best epoch's, or 0 on a study's cell
    (tag `fgvc.study_cell`). The MLflow UI's chart view draws a metric that no run has at a step
    of 1 or more as a bar per run, so a study's experiment compares its cells' best epochs as
    bars rather than as lone points at different steps; `best/epoch` says which epoch it was."""
    return 0 if "fgvc.study_cell" in tags else int(best["epoch"])


def checkpoint_cache(run_id: str) -> Path:
    base = os.environ.get("FGVC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fgvc")
    return Path(base) / "checkpoints" / run_id


def run_name(cfg: TrainConfig, regime: str) -> str:
    return f"{cfg.arch.replace('timm:', '')}-{regime}"


def find_resumable_run(cfg: TrainConfig, digest: str) -> str:
    """The newest unfinished run of this configuration and dataset, in any experiment (`mlflow
    run` puts runs where `--experiment-name` says, standalone runs go to fgvc-train)."""
    for run in find_runs({"fgvc.config_id": cfg.identity(), "fgvc.dataset_digest": digest}):
        if run.info.status != "FINISHED":
            return run.info.run_id
    raise ConfigError(f"--resume true: no unfinished run of this configuration (config id {cfg.identity()}, "
                      f"dataset {digest}) in any experiment; pass --resume <run_id> to pick one")


def resume_state(run_id: str) -> tuple[dict, str]:
    """The newest resume state of a run: the local cache's last.pt when it is at least as
    recent as the uploaded one (a crash leaves the cache ahead), else the artifact."""
    local = checkpoint_cache(run_id) / f"{LAST}.pt"
    candidates = []
    if local.is_file():
        candidates.append((read_checkpoint(local), str(local)))
    try:
        uploaded = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"checkpoints/{LAST}.pt")
        candidates.append((read_checkpoint(uploaded), f"checkpoints/{LAST}.pt of run {run_id}"))
    except Exception as error:  # no artifact yet: the cache may still have it
        if not candidates:
            raise ConfigError(f"cannot resume run {run_id}: it has no checkpoints/{LAST}.pt and this machine "
                              f"has no cached one ({local}): {str(error).splitlines()[0]}") from None
    return max(candidates, key=lambda c: c[0].get("epoch", -1))


@dataclass
class Prepared:
    """What rank 0 works out before training (it needs MLflow) and sends to every rank."""

    data: TrainingData
    run_id: str | None
    checkpoint: dict | None
    checkpoint_from: str


def _prepare(cfg: TrainConfig) -> Prepared:
    configure_tracking()
    data = TrainingData.of(cfg.data_root)
    if cfg.resume is False:
        return Prepared(data, None, None, "")
    run_id = find_resumable_run(cfg, data.digest) if cfg.resume is True else cfg.resume
    try:
        MlflowClient().get_run(run_id)
    except Exception:
        raise ConfigError(f"--resume {run_id}: no such run in {mlflow.get_tracking_uri()}") from None
    ckpt, where = resume_state(run_id)
    log.info("resuming run %s after epoch %d (%s)", run_id, ckpt["epoch"], where)
    return Prepared(data, run_id, ckpt, where)


class Recorder:
    """Epoch callback recording into the run: metrics every epoch, checkpoint uploads on the
    interval; `flush` uploads what is newer and writes the end-of-run files.

    Every call waits out a short outage of the tracking server (:class:`Patience`, up to
    FGVC_TRACKING_TIMEOUT_S); after a longer one the checkpoints stay in the local cache and
    the message says how to resume."""

    def __init__(self, run_id: str, writer: CheckpointWriter, interval_s: float = UPLOAD_INTERVAL_S):
        self.run_id, self.writer, self.interval_s = run_id, writer, interval_s
        self.last_upload = time.monotonic()
        self.pending: set[str] = set()
        self.best_record: EpochRecord | None = None
        self.model_logged = False  # the MLflow model carries the best/... metrics then
        self.tags: dict = {}  # the run's tags: a study's cell logs best/... at step 0 (best_step)
        self.kept = (f"the checkpoints are kept at {writer.directory}; once the server answers, run the same "
                     f"`fgvc train` with `--resume true` (or `--resume {run_id}`)")
        self.patience = Patience(kept=self.kept)

    def on_epoch_end(self, record: EpochRecord, session: Session) -> None:
        fencing.ensure_held(f"logging epoch {record.epoch}")  # a study cell: its claim is still this process's
        self.patience.call(f"logging epoch {record.epoch}", mlflow.log_metrics, record.metrics(), step=record.epoch)
        self.pending |= {LAST} | ({BEST} if record.is_best else set())
        if record.is_best:
            self.best_record = record
        if time.monotonic() - self.last_upload >= self.interval_s:
            self.upload()

    def upload(self) -> None:
        self.writer.flush()  # what goes up is the newest state, never an older file
        for which in sorted(self.pending):
            path = self.writer.path(which)
            if path.is_file():
                try:
                    self.patience.call(f"uploading {path.name}", mlflow.log_artifact, str(path), "checkpoints")
                except OSError as error:  # a local artifact store that cannot take the file
                    failed = write_failed(error, getattr(error, "filename", None) or mlflow.get_artifact_uri(),
                                          "checkpoint artifact", path.stat().st_size, self.kept)
                    if failed is None or isinstance(error, WriteFailed):
                        raise
                    raise failed from None
        self.pending.clear()
        self.last_upload = time.monotonic()

    def flush(self, session: Session) -> None:
        """Write and upload the newest checkpoints; write plots and metrics.csv (also after a
        failure or Ctrl-C). After the server was given up on, or the claim of the work may be
        lost (fgvc.tracking.fencing), only the local files are written."""
        if self.patience.gave_up or fencing.lost() is not None:
            self.writer.flush()
            return
        self.upload()
        if session.best and not self.model_logged:
            self.patience.call("logging the best epoch", mlflow.log_metrics, best_metrics(session.best),
                               step=best_step(session.best, self.tags))
        if session.history:
            self.patience.call("logging plots", _log_plots, session, self.best_record)
            self.patience.call("logging metrics.csv", mlflow.log_text, metrics_csv(session.history), "metrics.csv")


def _log_plots(session: Session, best: EpochRecord | None) -> None:
    history, names = session.history, session.data.label_names
    with_error = [{**h, "train/error": 1.0 - h["train/acc"]} for h in history]
    with artifact_dir() as tmp:
        paths = [save_curves(tmp / "loss.png", history, {"train/loss": "train (with label smoothing)",
                                                         "val/loss": "val"}, "cross-entropy", "Loss"),
                 save_curves(tmp / "error.png", with_error, {"train/error": "train error",
                                                             "val/error": "val error"},
                             "top-1 error (1 - accuracy)", "Error")]
        if best is not None:
            paths += [save_confusion(tmp / "confusion_matrix.png", best.val.confusion, names,
                                     f"Confusion matrix (val, best epoch {best.epoch})"),
                      save_per_class(tmp / "per_class_accuracy.png", best.val.per_class_acc, names,
                                     session.val_set.class_counts(),
                                     f"Per-class accuracy (val, best epoch {best.epoch})")]
        for path in paths:
            mlflow.log_artifact(str(path), "plots")


def train_params(cfg: TrainConfig, session: Session) -> dict:
    """The config's canonical params plus what was derived from it."""
    spec, data, world = session.network.spec, session.data, session.world
    return {
        **render_params(cfg),
        "regime": session.regime, "masked": "true" if data.masked else "false",
        "lr_backbone_effective": repr(cfg.effective_lr_backbone),
        "weight_decay_effective": repr(cfg.effective_weight_decay),
        "pretrained_effective": spec.pretrained_effective,
        "input_mean": spec.mean, "input_std": spec.std, "num_classes": data.num_classes,
        "image_size": f"{data.image_size[0]}x{data.image_size[1]}",
        "train_images": len(session.train_set), "val_images": len(session.val_set),
        "data_root_abs": str(data.root.resolve()), "dataset_digest": data.digest,
        "device_effective": str(world.device), "num_workers_effective": session.train_loader.workers,
        **session.device_recipe,  # amp_effective, channels_last_effective, augment_path, cudnn_benchmark
        "optimizer": "AdamW", "scheduler": "cosine", "world_size": world.world_size,
        "batch_size_per_rank": cfg.batch_size // world.world_size,
        "git_commit": git_commit(), "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__, "timm_version": timm.__version__,
        "python_version": platform.python_version(),
    }


@dataclass
class TrainResult:
    run_id: str
    best_epoch: int
    best_val_acc: float
    history: list[dict]
    registered_model: str | None
    model_version: str | None


def run_train(cfg: TrainConfig, callbacks: Sequence[Callback] = (), progress: bool = True,
              experiment: str | None = None, parent_run_id: str | None = None,
              tags: dict | None = None) -> TrainResult | None:
    """Train one configuration in one MLflow run (new, or resumed from its `last.pt`).

    Under torchrun this runs on every rank with DDP; rank 0 returns the result, the others
    None. `experiment` (default fgvc-train), `parent_run_id` and `tags` place a new run
    elsewhere, e.g. as a cell of a study. `callbacks` see each epoch after it is recorded.
    """
    with distributed.process_group(resolve_device(cfg.device)) as world:
        prepared: Prepared = distributed.from_main(lambda: _prepare(cfg))
        session = build_session(cfg, prepared.data, world, prepared.checkpoint, prepared.checkpoint_from)
        if not world.is_main:
            train_unrecorded(session)
            return None
        return record_training(cfg, session, prepared, callbacks, progress, experiment, parent_run_id, tags or {})


def train_unrecorded(session: Session) -> None:
    """A rank other than 0 trains its share of each batch and records nothing."""
    try:
        session.run(progress=False)
    except NonFiniteLoss as e:
        raise RunFailed(f"{e} (rank {session.world.rank})") from e


def record_training(cfg: TrainConfig, session: Session, prepared: Prepared, callbacks: Sequence[Callback],
                    progress: bool, experiment: str | None, parent_run_id: str | None, tags: dict) -> TrainResult:
    """Rank 0's training, in its MLflow run: params and dataset, each epoch recorded, then the
    best checkpoint as the run's MLflow model and registered version, and run_summary.md."""
    name = run_name(cfg, session.regime)
    reg_name = registered_model_of(cfg)
    tags = training_tags(cfg, session, tags)
    experiment = experiment or EXPERIMENT
    with tracked_run(experiment, name, task="train", tags=tags, run_id=prepared.run_id,
                     experiment_description=EXPERIMENT_DESCRIPTION if experiment == EXPERIMENT else "",
                     description=f"Training {name} on `{session.data.root}` (running).",
                     parent_run_id=None if prepared.run_id else parent_run_id) as run:
        recorder = start_recording(cfg, session, prepared, run.info.run_id, reg_name)
        recorder.tags = tags
        train_recorded(session, recorder, callbacks, progress, reg_name)
        version = finish_recording(name, session, recorder, reg_name, tags)
    shutil.rmtree(recorder.writer.directory, ignore_errors=True)  # uploaded: the run's artifacts hold it now
    best = session.best
    return TrainResult(run.info.run_id, best["epoch"], best["val/acc"], session.history,
                       reg_name if version else None, version)


def registered_model_of(cfg: TrainConfig) -> str | None:
    """The registered model the training's best checkpoint becomes a version of; None: none."""
    if cfg.registered_model is False:
        return None
    return cfg.registered_model or registered_name(cfg.arch)


def training_tags(cfg: TrainConfig, session: Session, extra: dict) -> dict:
    """The run's tags, `extra` (e.g. a study's) last."""
    # fgvc.request_id: what was asked (the same from any machine); fgvc.config_id adds how this
    # device runs it (what a resume must match); fgvc.device_recipe says what that is.
    return {"fgvc.config_id": cfg.identity(session.world.device), "fgvc.request_id": cfg.request_id(),
            "fgvc.device_recipe": ", ".join(f"{k}={v}" for k, v in session.device_recipe.items()),
            "fgvc.regime": session.regime, "fgvc.arch": cfg.arch, "fgvc.dataset_digest": session.data.digest,
            **extra}


def start_recording(cfg: TrainConfig, session: Session, prepared: Prepared, run_id: str,
                    reg_name: str | None) -> Recorder:
    """Log the params and the dataset (resumed: the epochs not recorded yet instead) and make
    the recorder, with its checkpoint writer on the run's local cache."""
    data = session.data
    log_params({**train_params(cfg, session), "registered_model": reg_name or "none"})
    if prepared.checkpoint is None:
        log_dataset(data.root, data.digest, name=data.root.name, context="training")
    else:
        _relog_missing_epochs(run_id, session.history)
    writer = CheckpointWriter(checkpoint_cache(run_id))
    if prepared.checkpoint is not None and not writer.path(BEST).is_file():
        _fetch_best(run_id, writer)  # resumed elsewhere: the best epoch so far is the run's artifact
    return Recorder(run_id, writer)


def train_recorded(session: Session, recorder: Recorder, callbacks: Sequence[Callback], progress: bool,
                   reg_name: str | None) -> None:
    """Train with the checkpoint writer, the recorder and `callbacks` as epoch callbacks; what
    was trained is flushed to the run also after a failure or Ctrl-C."""
    try:
        session.run([recorder.writer, recorder, *callbacks], progress)
        recorder.model_logged = bool(reg_name)
    except NonFiniteLoss as e:
        raise RunFailed(f"{e}. The last good checkpoint is checkpoints/last.pt of run {recorder.run_id}.") from e
    finally:
        recorder.flush(session)


def finish_recording(name: str, session: Session, recorder: Recorder, reg_name: str | None,
                     tags: dict) -> str | None:
    """Register the best checkpoint (when `reg_name`) and write run_summary.md, also the run's
    description; returns the version. The finished training waits out a short outage here too
    (a blip must not fail it); after a longer one the message says where the checkpoints are."""
    # A study's cell moves no alias, whether its study runs it or it runs alone (`study --cell`).
    alias = None if "fgvc.study_cell" in tags else "candidate"
    with checkpoints_kept_on_outage(recorder):
        fencing.ensure_held("logging the model")
        version = register_best(session, recorder, reg_name, tags.get("fgvc.study"), alias) if reg_name else None
        describe_training(name, session, recorder, version, reg_name, alias)
    return version


@contextmanager
def checkpoints_kept_on_outage(recorder: Recorder):
    """A tracking server that stopped answering ends the run with one message saying where
    the checkpoints are kept and how to resume."""
    try:
        yield
    except Exception as e:
        if is_unreachable(e) and not isinstance(e, TrackingUnreachable):
            raise unreachable(e, kept=recorder.kept) from None
        raise


def register_best(session: Session, recorder: Recorder, reg_name: str, study: str | None,
                  alias: str | None) -> str:
    """The best checkpoint as the run's MLflow model, registered as a version of `reg_name`;
    the run's tag `fgvc.model_version` names it."""
    wait = recorder.patience.call
    version = wait("registering the model", log_and_register, recorder.writer.path(BEST), reg_name,
                   best_metrics(session.best), session, recorder.run_id, study=study, alias=alias,
                   metrics_step=best_step(session.best, recorder.tags))
    wait("tagging the run", mlflow.set_tag, "fgvc.model_version", f"{reg_name}/{version}")
    return version


def describe_training(name: str, session: Session, recorder: Recorder, version: str | None,
                      reg_name: str | None, alias: str | None) -> None:
    """run_summary.md, also the run's description (`mlflow.note.content`)."""
    best = session.best
    summary = summary_markdown(name, session, best, version, reg_name, alias=alias)
    recorder.patience.call("logging run_summary.md", mlflow.log_text, summary, "run_summary.md")
    recorder.patience.call("describing the run", mlflow.set_tag, "mlflow.note.content", summary)
    log.debug("run %s: best val acc %.4f at epoch %d%s", recorder.run_id, best["val/acc"], best["epoch"],
              f"; registered {reg_name} version {version}" if version else "")


def _fetch_best(run_id: str, writer: CheckpointWriter) -> None:
    with tempfile.TemporaryDirectory(dir=writer.directory.parent) as tmp:
        try:
            found = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"checkpoints/{BEST}.pt",
                                                        dst_path=tmp)
        except Exception:  # no best.pt uploaded yet: the resumed epochs will make one
            return
        shutil.move(found, writer.path(BEST))


def _relog_missing_epochs(run_id: str, history: list[dict]) -> None:
    """Epochs the interrupted process trained but did not get to record."""
    logged = {m.step for m in MlflowClient().get_metric_history(run_id, "val/acc")}
    for h in history:
        if h["epoch"] not in logged:
            mlflow.log_metrics({k: v for k, v in h.items() if k != "epoch"}, step=h["epoch"])
