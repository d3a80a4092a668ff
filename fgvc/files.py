"""Small table files written beside the figures (per-image values, study tables)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Mapping, Sequence


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6f}" if math.isfinite(value) else ""
    return str(value)


def write_csv(path: str | Path, table: Mapping[str, Sequence] | Sequence[Mapping]) -> Path:
    """A CSV from columns (``{name: values}``) or rows (``[{name: value}, ...]``); floats with
    six decimals, NaN as an empty cell."""
    path = Path(path)
    rows = [dict(zip(table, values)) for values in zip(*table.values())] if isinstance(table, Mapping) else table
    header = list(table) if isinstance(table, Mapping) else list(rows[0]) if rows else []
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow([_cell(row.get(k, "")) for k in header])
    return path
