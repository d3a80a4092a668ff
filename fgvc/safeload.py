"""Reading torch files without ever executing what they hold.

Every `.pt` file (shards, checkpoints, weights) is a pickle; it is read with
``weights_only=True`` and, when torch's restricted unpickler refuses it, the file is
reported in one line that names it and says it holds more than tensors. torch's own message
runs to a dozen lines and ends by suggesting ``weights_only=False``: never shown.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch

from fgvc.errors import FgvcError, UnsafeFileError, first_line


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
    if mmap and not zipfile.is_zipfile(path):
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
