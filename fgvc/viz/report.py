"""The study's figures and its self-contained HTML report.

Pure presentation: rows of numbers in, PNG files and an HTML string out. A row is a plain
dict (``arch``, ``regime``, ``seed``, optional ``bg_correlation`` and measured columns with
optional ``<column>_low`` / ``<column>_high``); a summary row has ``<column>_mean``,
``<column>_std`` (None for one seed) and ``seeds``. Tables arrive formatted (:class:`Table`).
The page, its style and the study's method notes are a Jinja2 template
(``templates/report.html.j2``) that every value passes through escaped; the numbers the notes
quote come in (:class:`MethodNotes`). Images are inlined as base64 ``data:`` URIs, so the one
file opens anywhere: in a browser from disk, or in the MLflow UI's artifact view.
"""

from __future__ import annotations

import base64
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np

from fgvc.viz._figure import PathLike, new_figure
from fgvc.viz.plots import save_with_svg

REGIME_COLOURS = {"unmasked": "#d73027", "unmasked+aug": "#fc8d59", "masked": "#4575b4", "masked+aug": "#91bfdb"}
ARCH_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
FALLBACK_COLOURS = ("#1a9850", "#984ea3", "#a65628", "#999999")

# (column, axis label) of the reliance measures drawn against accuracy / shortcut strength.
RELIANCE_MEASURES = (("no_fg_vs_chance", "No-FG accuracy / chance (backdrop alone)"),
                     ("bg_gap", "BG-gap (Mixed-Same - Mixed-Rand)"),
                     ("gradcam_excess", "Grad-CAM bg preference - masked twin's"),
                     ("occlusion_excess", "occlusion bg preference - masked twin's"))
DOSE_MEASURES = RELIANCE_MEASURES + (("gradcam_bg_preference", "Grad-CAM background preference (raw)"),
                                     ("occlusion_bg_preference", "occlusion background preference (raw)"))
REFERENCE_LINES = {"no_fg_vs_chance": 1.0, "bg_gap": 0.0, "gradcam_excess": 0.0, "occlusion_excess": 0.0}


def _colour(regime: str, order: Sequence[str]) -> str:
    if regime in REGIME_COLOURS:
        return REGIME_COLOURS[regime]
    return FALLBACK_COLOURS[list(order).index(regime) % len(FALLBACK_COLOURS)]


def _value(row: Mapping, key: str) -> float:
    try:
        value = row.get(key)
        return float("nan") if value is None else float(value)
    except (TypeError, ValueError):
        return float("nan")


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def _fit(ax, values: Sequence[float], axis: str, include: Sequence[float] = ()) -> None:
    """Fit an axis to the finite ``values`` (and the reference values in ``include``) with a
    5% margin, instead of a fixed 0-1 range that squeezes every point into a corner."""
    finite = [float(v) for v in (*values, *include) if v is not None and math.isfinite(float(v))]
    if not finite:
        return
    low, high = min(finite), max(finite)
    margin = 0.05 * (high - low) if high > low else 0.05 * max(abs(high), 1.0)
    (ax.set_xlim if axis == "x" else ax.set_ylim)(low - margin, high + margin)


def _rgb(hex_colour: str) -> tuple[float, float, float]:
    hex_colour = hex_colour.lstrip("#")
    red, green, blue = (int(hex_colour[i:i + 2], 16) / 255.0 for i in (0, 2, 4))
    return red, green, blue


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

def save_reliance_scatter(path: PathLike, rows: Sequence[Mapping], chance: float | None = None,
                          measures=RELIANCE_MEASURES) -> Path:
    """Accuracy (y: ``acc``, the reported split, else best-epoch ``val_acc``) against each
    measure of background reliance (x), one point per cell (colour = regime, marker =
    architecture), the 95% intervals as bars, the no-reliance value as a dashed line; axes
    fitted to the data. Size: 300 px per panel x 400 px; PNG and SVG."""
    accuracy = "acc" if any(math.isfinite(_value(r, "acc")) for r in rows) else "val_acc"
    regimes = _ordered(r["regime"] for r in rows)
    archs = _ordered(r["arch"] for r in rows)
    fig = new_figure((3.0 * len(measures), 4.0))
    axes = np.atleast_1d(fig.subplots(1, len(measures), sharey=True))
    for ax, (key, label) in zip(axes, measures, strict=True):
        for row in rows:
            x, y = _value(row, key), _value(row, accuracy)
            low, high = _value(row, f"{key}_low"), _value(row, f"{key}_high")
            y_low, y_high = _value(row, f"{accuracy}_low"), _value(row, f"{accuracy}_high")
            colour = _colour(row["regime"], regimes)
            if math.isfinite(low) and math.isfinite(high):
                ax.errorbar(x, y, xerr=[[max(x - low, 0)], [max(high - x, 0)]], color=colour, lw=0.8, capsize=2)
            if math.isfinite(y_low) and math.isfinite(y_high):
                ax.errorbar(x, y, yerr=[[max(y - y_low, 0)], [max(y_high - y, 0)]], color=colour, lw=0.8, capsize=2)
            ax.scatter(x, y, s=36, color=colour, marker=ARCH_MARKERS[archs.index(row["arch"]) % len(ARCH_MARKERS)],
                       edgecolors="black", linewidths=0.5, zorder=3)
        if key in REFERENCE_LINES:
            ax.axvline(REFERENCE_LINES[key], color="black", linestyle="--", linewidth=1)
        _fit(ax, [_value(r, k) for r in rows for k in (key, f"{key}_low", f"{key}_high")], "x",
             [REFERENCE_LINES[key]] if key in REFERENCE_LINES else [])
        ax.set_xlabel(label, fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    split = next((r.get("split") for r in rows if r.get("split")), "val")
    axes[0].set_ylabel(f"{split} accuracy" if accuracy == "acc" else "validation accuracy (best epoch)", fontsize=8)
    _fit(axes[0], [_value(r, k) for r in rows for k in (accuracy, f"{accuracy}_low", f"{accuracy}_high")], "y")
    low, high = axes[0].get_ylim()
    if chance is not None and low <= chance <= high:  # chance is drawn when the data reach down to it
        for ax in axes:
            ax.axhline(chance, color="grey", linestyle=":", linewidth=1)
    handles = [axes[0].scatter([], [], color=_colour(g, regimes), marker="o", edgecolors="black", linewidths=0.5,
                               label=g) for g in regimes]
    handles += [axes[0].scatter([], [], color="white", marker=ARCH_MARKERS[i % len(ARCH_MARKERS)], edgecolors="black",
                                linewidths=0.8, label=a) for i, a in enumerate(archs)]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=7, frameon=False)
    fig.subplots_adjust(left=0.06, right=0.99, top=0.86, bottom=0.14, wspace=0.08)
    return save_with_svg(fig, path)


def _spread(summary: Mapping, key: str) -> tuple[float, float]:
    """Error bar below/above the mean: the sample std across seeds, else the 95% interval."""
    mean, std = _value(summary, f"{key}_mean"), summary.get(f"{key}_std")
    if std is not None and math.isfinite(float(std)):
        return float(std), float(std)
    low, high = _value(summary, f"{key}_low"), _value(summary, f"{key}_high")
    if math.isfinite(low) and math.isfinite(high):
        return max(mean - low, 0.0), max(high - mean, 0.0)
    return 0.0, 0.0


def save_regime_bars(path: PathLike, summary: Sequence[Mapping], columns: Sequence, chance: float | None = None,
                     keys: Sequence[str] = ("acc", "acc_source", "no_fg_vs_chance", "bg_gap", "gradcam_excess",
                                            "occlusion_excess")) -> Path:
    """One panel per measure: a group of bars per regime, one bar per architecture, error bars
    = spread across seeds (or, for one seed, the 95% interval). Size: 300 px per panel x 350."""
    headers = {c.name: c.header for c in columns}
    keys = [k for k in keys if k in headers]
    regimes = _ordered(s["regime"] for s in summary)
    archs = _ordered(s["arch"] for s in summary)
    by_key = {(s["arch"], s["regime"]): s for s in summary}
    fig = new_figure((3.0 * len(keys), 3.5))
    axes = np.atleast_1d(fig.subplots(1, len(keys)))
    width = 0.8 / max(len(archs), 1)
    positions = np.arange(len(regimes))
    shades = np.linspace(1.0, 0.55, max(len(archs), 1))
    for ax, key in zip(axes, keys, strict=True):
        for i, arch in enumerate(archs):
            cells = [by_key.get((arch, g), {}) for g in regimes]
            means = np.nan_to_num([_value(c, f"{key}_mean") for c in cells])
            errors = np.array([_spread(c, key) for c in cells]).T
            colours = [np.array(_rgb(_colour(g, regimes))) * shades[i] for g in regimes]
            ax.bar(positions - 0.4 + width * (i + 0.5), means, width, yerr=errors, color=colours,
                   edgecolor="black", linewidth=0.4, capsize=2, label=arch)
        if key in REFERENCE_LINES:
            ax.axhline(REFERENCE_LINES[key], color="black", linestyle="--", linewidth=1)
        if key.startswith("acc") and chance is not None:
            ax.axhline(chance, color="grey", linestyle=":", linewidth=1)
        ax.set_title(headers[key], fontsize=9)
        ax.set_xticks(positions, regimes, rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    if len(archs) > 1:
        axes[0].legend(fontsize=6, title="arch (darker = later)", title_fontsize=6)
    fig.subplots_adjust(left=0.05, right=0.99, top=0.9, bottom=0.25, wspace=0.3)
    return save_with_svg(fig, path)


def save_dose_response(path: PathLike, summary: Sequence[Mapping], chance: float | None = None,
                       measures=DOSE_MEASURES) -> Path:
    """Each measure (y) against the planted shortcut strength `bg_correlation` (x), one line
    per (architecture, regime), error bars as in :func:`save_regime_bars`. A measure that
    tracks the planted strength for unmasked models and stays flat for masked ones is
    validated against the truth. Size: 300 px per panel x 350 px."""
    fig = new_figure((3.0 * len(measures), 3.5))
    axes = np.atleast_1d(fig.subplots(1, len(measures)))
    regimes = _ordered(s["regime"] for s in summary)
    lines = _ordered((s["arch"], s["regime"]) for s in summary)
    for ax, (key, label) in zip(axes, measures, strict=True):
        for arch, regime in lines:
            points = sorted((s for s in summary if (s["arch"], s["regime"]) == (arch, regime)),
                            key=lambda s: _value(s, "bg_correlation"))
            x = [_value(s, "bg_correlation") for s in points]
            y = [_value(s, f"{key}_mean") for s in points]
            errors = np.array([_spread(s, key) for s in points]).T
            ax.errorbar(x, y, yerr=errors, marker="o", capsize=2, color=_colour(regime, regimes),
                        label=f"{arch} {regime}", linewidth=1.2, markersize=4)
        if key in REFERENCE_LINES:
            ax.axhline(REFERENCE_LINES[key], color="black", linestyle="--", linewidth=1)
        ax.set_xlabel("planted shortcut strength (bg_correlation)", fontsize=7)
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.subplots_adjust(left=0.05, right=0.99, top=0.88, bottom=0.16, wspace=0.3)
    return save_with_svg(fig, path)


def save_backdrop_follow_bars(path: PathLike, summary: Sequence[Mapping], chance: float) -> Path:
    """The backdrop-follow rate per regime: one panel per shortcut strength and split (the grid's
    data), a group of bars per regime, one bar per architecture (darker = later), error bars =
    the summary's 95% interval (``backdrop_follow_low``/``_high``: one seed, the bootstrap over
    the swaps; several, the seed-level t-interval), a dotted line at ``chance``. Size: 450 px per
    panel x 350 px; PNG and SVG."""
    key = "backdrop_follow"
    panels = _ordered((s.get("bg_correlation"), s.get("split_by")) for s in summary)
    regimes = _ordered(s["regime"] for s in summary)
    archs = _ordered(s["arch"] for s in summary)
    fig = new_figure((4.5 * len(panels), 3.5))
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    width = 0.8 / max(len(archs), 1)
    shades = np.linspace(1.0, 0.55, max(len(archs), 1))
    top = chance
    for ax, (strength, split) in zip(axes, panels, strict=True):
        by_key = {(s["arch"], s["regime"]): s for s in summary
                  if (s.get("bg_correlation"), s.get("split_by")) == (strength, split)}
        for i, arch in enumerate(archs):
            cells = [by_key.get((arch, g), {}) for g in regimes]
            means = np.array([_value(c, f"{key}_mean") for c in cells])
            lows, highs = np.array([_value(c, f"{key}_low") for c in cells]), np.array([_value(c, f"{key}_high")
                                                                                      for c in cells])
            errors = np.nan_to_num(np.stack([np.clip(means - lows, 0, None), np.clip(highs - means, 0, None)]))
            x = np.arange(len(regimes)) - 0.4 + width * (i + 0.5)
            ax.bar(x, np.nan_to_num(means), width, yerr=errors,
                   color=[np.array(_rgb(_colour(g, regimes))) * shades[i] for g in regimes], edgecolor="black",
                   linewidth=0.4, capsize=3, label=arch if len(archs) > 1 else None)
            for position, mean in zip(x, means, strict=True):  # a rate of 0 reads as 0, not as a missing bar
                if math.isfinite(mean):
                    ax.text(position, mean, f"{mean:.2f}", ha="center", va="bottom", fontsize=6)
            top = max([top, *(v for v in highs if math.isfinite(v)), *(v for v in means if math.isfinite(v))])
        ax.axhline(chance, color="black", linestyle=":", linewidth=1.2, label=f"chance (1/C = {chance:.3f})")
        ax.set_xticks(np.arange(len(regimes)), regimes, rotation=20, ha="right", fontsize=8)
        name = ", ".join([*([f"bg {strength:g}"] if strength is not None else []),
                          *([f"{split} split"] if split else [])])
        ax.set_title(f"backdrop-follow{f' ({name})' if name else ''}", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(0, min(1.0, 1.1 * top + 0.02))
    axes[0].set_ylabel("share of swaps naming the backdrop's designer", fontsize=8)
    axes[0].legend(fontsize=6, loc="upper right")
    fig.subplots_adjust(left=0.1 / len(panels) + 0.03, right=0.99, top=0.9, bottom=0.2, wspace=0.08)
    return save_with_svg(fig, path)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

def data_uri(path: PathLike) -> str:
    """A PNG file as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


@dataclass
class Example:
    """One picture in the report, with its caption (e.g. a Grad-CAM example of a cell)."""

    caption: str
    path: Path


@dataclass(frozen=True)
class TablePart:
    """The columns of a table shown together on the page: ``caption`` ("" for a table shown
    whole), the header, the body and, per column, whether it is a key column (left-aligned)."""

    caption: str
    header: Sequence[str]
    body: Sequence[Sequence[str]]
    keys: Sequence[bool]


@dataclass
class Table:
    """A formatted table: text cells, the first ``key_columns`` left-aligned.

    ``groups`` splits a wide table on the page (Markdown shows it whole): each group is a
    ``(caption, column indices)`` shown as a table of its own after the first ``repeat``
    columns (default: ``key_columns``), which every group repeats, so each fits a 1280-px
    window."""

    title: str
    header: Sequence[str]
    body: Sequence[Sequence[str]]
    key_columns: int = 2
    note: str = ""
    legend: Mapping[str, str] | None = None  # header -> what it measures
    muted: Sequence[bool] | None = None  # per body row: shown greyed (e.g. a cell that did not learn)
    groups: Sequence[tuple[str, Sequence[int]]] = ()
    repeat: int | None = None

    def parts(self) -> list[TablePart]:
        """The page's tables for this table: one, or one per group."""
        if not self.groups:
            return [TablePart("", self.header, self.body, [i < self.key_columns for i in range(len(self.header))])]
        repeat = self.key_columns if self.repeat is None else self.repeat
        out = []
        for caption, indices in self.groups:
            shown = [*range(repeat), *(i for i in indices if i >= repeat)]
            out.append(TablePart(caption, [self.header[i] for i in shown],
                                 [[row[i] for i in shown] for row in self.body], [i < self.key_columns for i in shown]))
        return out


@dataclass(frozen=True)
class MethodNotes:
    """The numbers the study's method notes quote: the quality gate's factor over chance, and
    the quality of a cell whose per-image accuracy could not be read."""

    quality_factor: float
    no_data: str


TEMPLATES = Path(__file__).with_name("templates")


@functools.cache
def _templates() -> jinja2.Environment:
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, trim_blocks=True,
                                     lstrip_blocks=True, keep_trailing_newline=True,
                                     undefined=jinja2.StrictUndefined)
    environment.globals.update(data_uri=data_uri, zip=zip)
    return environment


def build_report(title: str, setup: Mapping[str, str], tables: Sequence[Table], figures: Sequence[Example],
                 examples: Mapping[str, Sequence[Example]], notes: Sequence[str] = (),
                 method: MethodNotes | None = None, headline: Table | None = None, answer: Sequence[str] = (),
                 details: Mapping[str, Sequence[Example]] | None = None) -> str:
    """The study as one self-contained HTML page, the answer first: the ``headline`` table and
    the ``answer`` sentences, the findings (``notes``), the figures, the method notes (with
    ``method``; collapsible), the setup, the tables, figures per cell (``details``: caption ->
    figures, each group collapsible) and the examples. Every image is a ``data:`` URI; the page
    loads nothing else."""
    return _templates().get_template("report.html.j2").render(
        title=title, setup=setup, tables=list(tables), figures=figures, examples=examples, notes=notes, method=method,
        headline=headline, answer=list(answer), details=dict(details or {}))
