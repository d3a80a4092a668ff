"""Checkpoint files: what `best.pt` and `last.pt` hold, how they are read back safely, and
the callback that writes them after every epoch.

- ``best.pt``: the model (state_dict + the spec that rebuilds it), the epoch, the canonical
  config, dataset digest, label names and validation accuracy: all a later analysis needs.
- ``last.pt``: the same plus optimiser, scheduler, history and best-epoch record: all a
  resume needs, so an interrupted training continues exactly where it stopped.
- :class:`CheckpointWriter` writes both on a time budget (see there).

Files are read with ``weights_only=True``; a file that holds more than tensors is refused in
one line (never executed), and so is a checkpoint of another architecture before any
state_dict is loaded.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from fgvc.data.shards import atomic_write
from fgvc.errors import ConfigError, FgvcError
from fgvc.files import writing
from fgvc.safeload import read_checkpoint  # noqa: F401  (where trainings read their checkpoints)

if TYPE_CHECKING:
    from fgvc.training.config import TrainConfig
    from fgvc.training.loop import EpochRecord

BEST, LAST = "best", "last"


def require_fgvc_checkpoint(ckpt: dict, where: str) -> None:
    missing = [k for k in ("model", "spec") if k not in ckpt]
    if missing:
        raise FgvcError(f"{where}: not an fgvc checkpoint (missing {', '.join(missing)}; keys: "
                        f"{', '.join(sorted(map(str, ckpt)))})")


def check_resumable(ckpt: dict, where: str, arch: str, num_classes: int, digest: str,
                    recipe: dict[str, str] | None = None) -> None:
    """Refuse to resume from a checkpoint of another architecture, class count, dataset or
    device recipe (precision, memory layout, augmentation path: a CPU run continued on a GPU
    would change recipe mid-run), before anything is loaded."""
    require_fgvc_checkpoint(ckpt, where)
    for key in ("optimizer", "scheduler", "history", "best", "epoch"):
        if key not in ckpt:
            raise FgvcError(f"{where}: holds no resume state ('{key}' missing); only last.pt can be resumed")
    spec = ckpt["spec"]
    if spec.get("arch") != arch:
        raise ConfigError(f"cannot resume {where}: it trained arch {spec.get('arch')}, not --arch {arch}")
    if spec.get("num_classes") != num_classes:
        raise ConfigError(f"cannot resume {where}: its checkpoint has {spec.get('num_classes')} classes but "
                          f"the data root has {num_classes}")
    if ckpt.get("dataset_digest") not in (None, digest):
        raise ConfigError(f"cannot resume {where}: it trained on dataset {ckpt['dataset_digest']}, but the "
                          f"data root has digest {digest}")
    before = ckpt.get("device_recipe")
    if recipe is not None and before is not None and before != recipe:
        changed = ", ".join(f"{k} {before.get(k)} -> {v}" for k, v in recipe.items() if before.get(k) != v)
        raise ConfigError(f"cannot resume {where}: this device changes how it trains ({changed}); resume it on "
                          f"the kind of device it started on (--device), or start a new run")


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested dict/list (about what torch.save writes)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(path: Path, content: dict) -> Path:
    """Atomically: a crash or a full disk mid-write never leaves a half checkpoint under the
    final name (the earlier file stays); a failed write is one line naming the path."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(content, f)

    kept = f"the earlier {path.name} is kept unchanged" if path.is_file() else f"no earlier {path.name} exists"
    with writing(path, "checkpoint", needed=tensor_bytes(content), kept=kept):
        atomic_write(path, write)
    return path


class Checkpointable(Protocol):
    """What the writer needs of a training (fgvc.training.session.Session): its config and the
    two checkpoints of an epoch."""

    cfg: TrainConfig

    def model_checkpoint(self, record: EpochRecord) -> dict: ...

    def resume_checkpoint(self, record: EpochRecord) -> dict: ...


class CheckpointWriter:
    """Epoch callback keeping ``best.pt`` and ``last.pt`` in ``directory`` (local disk; the
    tracking layer decides what to upload when).

    Writing a ResNet-18's ``last.pt`` (with optimiser state, ~130 MB) costs about a third of a
    second here, several percent of a short epoch. So the files are written when the time
    spent writing stays within ``budget`` of the training's wall time, and always after the
    first and the last epoch and on :meth:`flush` (Ctrl-C, a failure). Between writes the best
    epoch's weights wait in memory (a copy, ~45 MB for a ResNet-18). ``best.pt`` and
    ``last.pt`` are written together, so on disk they always agree; a crash loses at most the
    epochs since the last write (with the default budget, about 40 times one write's duration).
    """

    def __init__(self, directory: str | Path, budget: float = 0.025):
        self.directory = Path(directory)
        with writing(self.directory, "checkpoint folder (FGVC_CACHE_DIR)"):
            self.directory.mkdir(parents=True, exist_ok=True)
        self.budget = budget
        self.started = time.monotonic()
        self.spent = 0.0  # seconds spent writing
        self.pending_best: dict | None = None
        self.latest: tuple[EpochRecord, Checkpointable] | None = None  # the newest epoch not yet on disk
        self.writes = 0

    def path(self, which: str) -> Path:
        return self.directory / f"{which}.pt"

    def on_epoch_end(self, record: EpochRecord, session: Checkpointable) -> None:
        if record.is_best:  # a copy: the live weights keep changing
            self.pending_best = _copied(session.model_checkpoint(record))
        self.latest = (record, session)
        due = (self.writes == 0 or record.epoch >= session.cfg.epochs
               or self.spent <= self.budget * (time.monotonic() - self.started))
        if due:
            self.flush()

    def flush(self) -> None:
        """Write what is not on disk yet: the pending best weights, then the newest resume state."""
        if self.latest is None:
            return
        record, session = self.latest
        begun = time.monotonic()
        if self.pending_best is not None:
            save_checkpoint(self.path(BEST), self.pending_best)
            self.pending_best = None
        save_checkpoint(self.path(LAST), session.resume_checkpoint(record))
        self.spent += time.monotonic() - begun
        self.latest = None
        self.writes += 1


def _copied(checkpoint: dict) -> dict:
    return {**checkpoint, "model": {k: v.clone() for k, v in checkpoint["model"].items()}}
