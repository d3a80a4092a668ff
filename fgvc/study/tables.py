"""The study's numbers: one row per cell, a summary across seeds, and a verdict per cell.

Columns come from two places: the training run (best-epoch validation accuracy) and every
registered analysis method's ``columns`` (fgvc.analysis.methods), so a new method appears in
the table without an edit here. Values computed with a bootstrap over images carry
``<column>_low`` / ``<column>_high`` (95%).

The verdict, per cell, from the background-swap test (it intervenes on the input, so it
measures use rather than attention):

- **reads the runway**: the No-FG accuracy's interval lies above chance (the backdrop alone
  predicts the designer) and BG-gap's interval lies above 0 (a backdrop of the right designer
  helps a pasted person);
- **reads the garment**: the Only-FG accuracy's interval lies above chance (the person alone
  suffices), and neither No-FG's interval lies above chance nor BG-gap's above 0;
- **undecided**: anything else (e.g. intervals too wide for the number of images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from fgvc.analysis.methods import study_columns
from fgvc.viz.report import Table

RUNWAY, GARMENT, UNDECIDED = "reads the runway", "reads the garment", "undecided"


@dataclass(frozen=True)
class TableColumn:
    name: str
    header: str
    what: str
    interval: bool
    source: str  # "train:<metric>" or "<method>:<metric>"


def columns() -> list[TableColumn]:
    out = [TableColumn("val_acc", "val acc", "validation accuracy at the best epoch (metric best/val_acc) on the "
                       "regime's own images", False, "train:best/val_acc"),
           TableColumn("val_balanced_acc", "val bal. acc", "mean per-designer validation accuracy at the best epoch "
                       "(best/val_balanced_acc)", False, "train:best/val_balanced_acc")]
    for name, (method, column) in study_columns().items():
        out.append(TableColumn(name, column.header, column.what, column.interval, f"{method}:{column.metric}"))
    return out


def cell_values(train_metrics: Mapping[str, float], analyses: Mapping[str, Mapping[str, float]]) -> dict:
    """A row's measured values: every column (and its interval) from the training run's
    metrics and the analysis records' metrics; NaN where a method did not run."""
    row = {}
    for column in columns():
        where, metric = column.source.split(":", 1)
        source = train_metrics if where == "train" else analyses.get(where, {})
        row[column.name] = float(source.get(metric, math.nan))
        if column.interval:
            row[f"{column.name}_low"] = float(source.get(f"{metric}_low", math.nan))
            row[f"{column.name}_high"] = float(source.get(f"{metric}_high", math.nan))
    return row


def verdict(row: Mapping[str, float], chance: float) -> str:
    """The rules in this module's docstring; NaN anywhere needed -> undecided."""
    get = lambda key: float(row.get(key, math.nan))  # noqa: E731
    no_fg_low, gap_low, only_fg_low = get("no_fg_acc_low"), get("bg_gap_low"), get("only_fg_acc_low")
    if any(math.isnan(v) for v in (no_fg_low, gap_low, only_fg_low)):
        return UNDECIDED
    if no_fg_low > chance and gap_low > 0:
        return RUNWAY
    if only_fg_low > chance and no_fg_low <= chance and gap_low <= 0:
        return GARMENT
    return UNDECIDED


def verdict_reason(row: Mapping[str, float], chance: float) -> str:
    f = lambda key: _interval(row, key)  # noqa: E731
    return (f"No-FG {f('no_fg_acc')} vs chance {chance:.3f}; BG-gap {f('bg_gap')}; Only-FG {f('only_fg_acc')}")


GROUP_KEYS = ("arch", "regime", "bg_correlation")


def summarize(rows: Sequence[Mapping]) -> list[dict]:
    """One row per (arch, regime, shortcut strength), first-seen order: ``<column>_mean``,
    ``<column>_std`` (sample standard deviation across seeds; None for a single seed),
    ``seeds`` and the verdict counts. NaN values are left out of a column's mean."""
    groups: dict[tuple, list[Mapping]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in GROUP_KEYS), []).append(row)
    out = []
    for key, members in groups.items():
        summary = {**dict(zip(GROUP_KEYS, key)), "seeds": len(members)}
        for column in columns():
            values = np.array([float(r.get(column.name, math.nan)) for r in members], dtype=np.float64)
            values = values[np.isfinite(values)]
            summary[f"{column.name}_mean"] = float(values.mean()) if values.size else math.nan
            summary[f"{column.name}_std"] = float(values.std(ddof=1)) if values.size > 1 else None
            if column.interval and len(members) == 1:  # one seed: the spread is the bootstrap interval
                summary[f"{column.name}_low"] = members[0].get(f"{column.name}_low", math.nan)
                summary[f"{column.name}_high"] = members[0].get(f"{column.name}_high", math.nan)
        verdicts = [r.get("verdict", UNDECIDED) for r in members]
        summary["verdict"] = "; ".join(f"{v} ({verdicts.count(v)}/{len(verdicts)})" for v in dict.fromkeys(verdicts))
        out.append(summary)
    return out


def fmt(value, digits: int = 3) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "–" if not math.isfinite(value) else f"{value:.{digits}f}"


def _interval(row: Mapping, name: str) -> str:
    low, high = row.get(f"{name}_low"), row.get(f"{name}_high")
    value = row.get(name, row.get(f"{name}_mean"))
    if low is None or high is None or not all(math.isfinite(float(x)) for x in (low, high)):
        return fmt(value)
    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]"


def cell_text(row: Mapping, column: TableColumn) -> str:
    """A cell of the per-cell table: the value, with its 95% interval when it has one."""
    return _interval(row, column.name) if column.interval else fmt(row.get(column.name))


def summary_text(summary: Mapping, column: TableColumn) -> str:
    """A cell of the summary table: mean ± sample std across seeds; with one seed, the
    value and its bootstrap interval (no spread is shown for one seed)."""
    mean, std = summary.get(f"{column.name}_mean"), summary.get(f"{column.name}_std")
    if std is not None and math.isfinite(float(std)):
        return f"{fmt(mean)} ± {fmt(std)}"
    if column.interval:
        return _interval({column.name: mean, f"{column.name}_low": summary.get(f"{column.name}_low"),
                          f"{column.name}_high": summary.get(f"{column.name}_high")}, column.name)
    return fmt(mean)


def _keys(row: Mapping, dose: bool) -> list[str]:
    return [row["arch"], row["regime"], *([fmt(row["bg_correlation"], 2)] if dose else [])]


def report_tables(rows: Sequence[Mapping], summary: Sequence[Mapping], chance: float) -> list[Table]:
    """The summary across seeds and the per-cell table, formatted."""
    cols = columns()
    dose = any(r.get("bg_correlation") is not None for r in rows)
    keys = ["arch", "regime", *(["bg corr."] if dose else [])]
    legend = {c.header: c.what for c in cols}
    legend["verdict"] = ("reads the runway: No-FG above chance and BG-gap above 0 (95% intervals); reads the "
                         "garment: Only-FG above chance, neither of the first two; else undecided")
    note = (f"Chance level {chance:.3f}. With several seeds: mean ± sample standard deviation across seeds; with one "
            f"seed: the value [bootstrap 95% interval over images]. Validation accuracy is the best-epoch value "
            f"(best/val_acc).")
    summary_table = Table("Summary across seeds", [*keys, "seeds", "verdict", *(c.header for c in cols)],
                          [[*_keys(s, dose), str(s["seeds"]), s["verdict"], *(summary_text(s, c) for c in cols)]
                           for s in summary], key_columns=len(keys) + 2, note=note, legend=legend)
    cells_table = Table(f"Cells ({len(rows)})", [*keys, "seed", "run", "status", "verdict", *(c.header for c in cols)],
                        [[*_keys(r, dose), str(r["seed"]), r["run_id"], r.get("status", ""), r["verdict"],
                          *(cell_text(r, c) for c in cols)] for r in rows], key_columns=len(keys) + 4)
    return [summary_table, cells_table]


def markdown_tables(rows: Sequence[Mapping], summary: Sequence[Mapping], chance: float) -> str:
    """The report's tables in Markdown (study/results.md)."""
    lines = []
    for table in report_tables(rows, summary, chance):
        lines += [f"## {table.title}", ""] + ([table.note, ""] if table.note else [])
        lines += ["| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
        lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in table.body]
        if table.legend:
            lines += ["", "Columns:", ""] + [f"- **{h}**: {w}" for h, w in table.legend.items()]
        lines.append("")
    return "\n".join(lines)
