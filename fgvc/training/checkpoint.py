"""Checkpoint files: what `best.pt` and `last.pt` hold, how they are read back safely, and
the callback that writes them after every epoch.

- ``best.pt``: the model (state_dict + the spec that rebuilds it), the epoch, the canonical
  config, dataset digest, label names and validation accuracy: all a later analysis needs.
- ``last.pt``: the same plus optimiser, scheduler, history and best-epoch record: all a
  resume needs, so an interrupted training continues exactly where it stopped.

Files are read with ``weights_only=True``; a file that holds more than tensors is refused in
one line (never executed), and so is a checkpoint of another architecture before any
state_dict is loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fgvc.data.shards import atomic_write
from fgvc.errors import ConfigError, FgvcError, MissingFileError
from fgvc.safeload import load_tensors

BEST, LAST = "best", "last"


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint dict, read without executing anything; one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: checkpoint file does not exist")
    obj = load_tensors(path, what="checkpoint")
    if not isinstance(obj, dict):
        raise FgvcError(f"{path}: a checkpoint must be a dict, found {type(obj).__name__}")
    return obj


def require_fgvc_checkpoint(ckpt: dict, where: str) -> None:
    missing = [k for k in ("model", "spec") if k not in ckpt]
    if missing:
        raise FgvcError(f"{where}: not an fgvc checkpoint (missing {', '.join(missing)}; keys: "
                        f"{', '.join(sorted(map(str, ckpt)))})")


def check_resumable(ckpt: dict, where: str, arch: str, num_classes: int, digest: str) -> None:
    """Refuse to resume from a checkpoint of another architecture, class count or dataset,
    before anything is loaded (a state_dict mismatch would dump every key)."""
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


def save(path: Path, content: dict) -> Path:
    """Atomically: a crash mid-write never leaves a half checkpoint under the final name."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(content, f)

    atomic_write(path, write)
    return path


class CheckpointWriter:
    """Epoch callback: ``last.pt`` after every epoch, ``best.pt`` when validation improves,
    both in ``directory`` (local disk; the tracking layer decides what to upload when)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, which: str) -> Path:
        return self.directory / f"{which}.pt"

    def on_epoch_end(self, record, session) -> None:
        if record.is_best:
            save(self.path(BEST), session.model_checkpoint(record))
        save(self.path(LAST), session.resume_checkpoint(record))
