"""Small table files written beside the figures (per-image values, study tables), and what a
failed write (a full disk, a read-only folder) becomes: one line naming the path."""

from __future__ import annotations

import contextlib
import csv
import errno
import math
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from fgvc.errors import WriteFailed, first_line


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6f}" if math.isfinite(value) else ""
    return "" if value is None else str(value)


def write_csv(path: str | Path, table: Mapping[str, Sequence] | Sequence[Mapping]) -> Path:
    """A CSV from columns (``{name: values}``) or rows (``[{name: value}, ...]``: every key of
    any row is a column, in first-seen order); floats with six decimals, NaN and None (no
    value, e.g. the spread of a single seed) as an empty cell."""
    path = Path(path)
    if isinstance(table, Mapping):  # every column as long as the first (none silently cut short)
        header = list(table)
        rows: Sequence[Mapping] = [dict(zip(header, values, strict=True))
                                   for values in zip(*table.values(), strict=True)]
    else:
        rows, header = table, list(dict.fromkeys(k for row in table for k in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow([_cell(row.get(k, "")) for k in header])
    return path


# errno values that mean "this folder cannot take the file" rather than a bug; the first set only
# ever comes from a write, the second also from a read (so it counts only where a write failed).
_WRITE_ONLY_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
_WRITE_ERRNOS = _WRITE_ONLY_ERRNOS | {errno.EACCES, errno.EPERM, errno.EIO}
# torch's zip writer reports a failed write as a RuntimeError ("[enforce fail at inline_container.cc:...]").
_TORCH_WRITE = ("inline_container", "PytorchStreamWriter", "file write failed", "unexpected pos")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def free_bytes(path: str | Path) -> int | None:
    """Free space for unprivileged writers on the file system holding `path` (its nearest
    existing parent)."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def write_failed(error: BaseException, path: str | Path | None = None, what: str = "file",
                 needed: int | None = None, kept: str = "") -> WriteFailed | None:
    """The one-line :class:`WriteFailed` for an error raised while writing `path` (None: an
    error from anywhere, judged by its errno alone), or None when `error` is not a failed write
    (a bug keeps its traceback)."""
    if isinstance(error, WriteFailed):
        return error
    code = getattr(error, "errno", None) if isinstance(error, OSError) else None
    torch_write = isinstance(error, RuntimeError) and any(w in str(error) for w in _TORCH_WRITE)
    if code not in (_WRITE_ERRNOS if path is not None else _WRITE_ONLY_ERRNOS) and not torch_write:
        return None
    path = path or getattr(error, "filename", None)
    free = free_bytes(path) if path else None
    if code is None:  # torch does not say why; a full file system is the usual reason
        code = errno.ENOSPC if free is not None and (free < (needed or 1 << 20)) else None
    reason = os.strerror(code).lower() if code is not None else first_line(error)
    space = []
    if needed:
        space.append(f"needs about {human_bytes(needed)}")
    if free is not None and code in (errno.ENOSPC, errno.EDQUOT, None):
        space.append(f"{human_bytes(free)} free")
    where = str(path) if path else "a file"
    return WriteFailed(f"{where}: cannot write the {what}: {reason}" + (f" ({', '.join(space)})" if space else "")
                       + (f"; {kept}" if kept else "") + ("; free some space or point the folder elsewhere"
                                                          if code in (errno.ENOSPC, errno.EDQUOT) else ""))


@contextlib.contextmanager
def writing(path: str | Path, what: str, needed: int | None = None, kept: str = "") -> Iterator[None]:
    """Turn a failed write of `path` into one line naming it (see :func:`write_failed`)."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        failed = write_failed(error, path, what, needed, kept)
        if failed is None:
            raise
        raise failed from None
