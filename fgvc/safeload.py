"""Reading torch files without ever executing what they hold.

Every `.pt` file (shards, checkpoints, weights) is a pickle; it is read with
``weights_only=True`` and, when torch's restricted unpickler refuses it, the file is
reported in one line that names it and says it holds more than tensors. torch's own message
runs to a dozen lines and ends by suggesting ``weights_only=False``: never shown.

Before anything is read, the records' uncompressed sizes (the zip directory's
``ZipInfo.file_size``) are checked: ``torch.save`` stores records uncompressed, so a file whose
records inflate beyond its own size plus ``FGVC_MAX_INFLATE_BYTES`` (default 64 MB) is refused
in one line; a 1 MB "checkpoint" can otherwise inflate to gigabytes. Weights that are NaN or
infinite are refused by :func:`require_finite` wherever a model is built from a checkpoint.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from fgvc.errors import FgvcError, MissingFileError, UnsafeFileError, first_line


def refused_global(error: BaseException) -> str | None:
    """The pickled global (``posix.system``, ``builtins.eval``, a class) torch's weights-only
    unpickler refused, from its message; None when it refused something else."""
    found = re.search(r"GLOBAL\s+([\w.]+)", re.sub(r"\x1b\[[0-9;]*m", "", str(error)))
    return found.group(1) if found else None


def _detail(error: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text) or re.search(r"(Unsupported operand \d+)", text)
    return found.group(1).strip() if found else first_line(error)


def load_tensors(path: str | Path, what: str = "file", mmap: bool = False,
                 error: type[FgvcError] = FgvcError):
    """torch.load(path, weights_only=True): tensors, numbers, strings and containers only.

    A file holding code is refused with :class:`UnsafeFileError` (or ``error`` when that is a
    subclass of it); an unreadable one with ``error``. A legacy (non-zip) torch file cannot
    be memory-mapped and is read whole.
    """
    path = Path(path)
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        check_inflation(path, what, error)
    if mmap and not is_zip:
        mmap = False
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch words the refusal of a callable several ways ("Unsupported global: GLOBAL x.y",
        # "Trying to load unsupported GLOBAL x.y whose module x is blocked", "... call reduce ...").
        name = refused_global(e)
        if name is None and not re.search(r"unsupported global|\breduce\b", str(e), re.IGNORECASE):
            raise error(f"{path}: cannot be read as a torch file (truncated or corrupt?): {_detail(e)}") from None
        unsafe = error if issubclass(error, UnsafeFileError) else _unsafe(error)
        what_ran = f"a pickled {name}" if name else "a pickled callable"
        raise unsafe(f"{path}: refused to load: the {what} holds more than tensors ({what_ran}, "
                     f"whose loading would run code); it was not loaded") from None
    except Exception as e:  # the readers raise RuntimeError, EOFError, KeyError, OSError, ...
        raise error(f"{path}: cannot be read as a torch file (truncated or corrupt?): "
                    f"{type(e).__name__}: {first_line(e)}") from None


def _unsafe(error: type[FgvcError]) -> type[FgvcError]:
    """An exception type that is both ``error`` (what the caller catches) and UnsafeFileError."""
    if error is FgvcError:
        return UnsafeFileError
    return type(f"Unsafe{error.__name__}", (error, UnsafeFileError), {})


INFLATE_ENV = "FGVC_MAX_INFLATE_BYTES"
DEFAULT_INFLATE_BYTES = 64 << 20


def inflate_budget() -> int:
    text = os.environ.get(INFLATE_ENV, "")
    try:
        return int(float(text)) if text else DEFAULT_INFLATE_BYTES
    except ValueError:
        raise FgvcError(f"{INFLATE_ENV}={text!r} is not a number of bytes") from None


def check_inflation(path: Path, what: str = "file", error: type[FgvcError] = FgvcError) -> None:
    """Refuse a torch zip file whose records would inflate beyond its size plus the budget,
    reading only the zip directory (nothing is decompressed)."""
    try:
        with zipfile.ZipFile(path) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # torch's reader reports what is wrong with it
    on_disk = path.stat().st_size
    budget = inflate_budget()
    if inflated > on_disk + budget:
        raise _unsafe(error)(f"{path}: refused to load: the {what}'s records inflate to {_mb(inflated)} from "
                             f"{_mb(on_disk)} on disk (torch.save stores them uncompressed; allowed: its size + "
                             f"{INFLATE_ENV}={budget}); it was not loaded")


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MB"


def require_finite(state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse weights holding NaN or infinity (one line naming the first such tensor)."""
    bad = [(name, int((~torch.isfinite(t)).sum())) for name, t in state_dict.items()
           if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        name, count = bad[0]
        more = f" and {len(bad) - 1} other tensor{'s' * (len(bad) > 2)}" if len(bad) > 1 else ""
        raise FgvcError(f"{where}: refused: its weights are not finite ({count} NaN/inf value{'s' * (count > 1)} "
                        f"in {name}{more}); a model built from them predicts NaN")


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint dict, read without executing anything; one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: checkpoint file does not exist")
    obj = load_tensors(path, what="checkpoint")
    if not isinstance(obj, dict):
        raise FgvcError(f"{path}: a checkpoint must be a dict, found {type(obj).__name__}")
    return obj
