"""The background-reliance study's figures and its self-contained HTML report.

Pure presentation: rows of numbers in, PNG files and an HTML string out. A row is a plain
dict (``arch``, ``regime``, ``seed``, ``run_id`` and the metric columns of
:data:`METRICS`); a summary row has ``<metric>_mean``, ``<metric>_std`` and ``seeds``.
Images in the report are inlined as base64 ``data:`` URIs, so the one file opens anywhere:
in a browser from disk, or in the MLflow UI's artifact view.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fgvc.viz._figure import PathLike, new_figure, save

# Column name -> (short header, what it measures). Order = table order.
METRICS: dict[str, tuple[str, str]] = {
    "val_acc": ("val acc", "validation accuracy at the best epoch, on the regime's own images"),
    "val_balanced_acc": ("val bal. acc", "mean per-designer validation accuracy at the best epoch"),
    "gradcam_bg_fraction": ("Grad-CAM bg", "share of Grad-CAM energy on the background"),
    "occlusion_bg_fraction": ("occlusion bg", "share of occlusion sensitivity on the background"),
    "no_fg_acc": ("No-FG acc", "accuracy with the person removed and the hole filled from the backdrop"),
    "no_fg_vs_chance": ("No-FG / chance", "No-FG accuracy in multiples of chance"),
    "only_fg_acc": ("Only-FG acc", "accuracy with the background set to black"),
    "bg_gap": ("BG-gap", "Mixed-Same minus Mixed-Rand accuracy"),
    "precision_at_1": ("P@1", "retrieval precision@1 in embedding space (same designer)"),
}

REGIME_COLOURS = {"unmasked": "#d73027", "unmasked+aug": "#fc8d59", "masked": "#4575b4",
                  "masked+aug": "#91bfdb"}
ARCH_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
FALLBACK_COLOURS = ("#1a9850", "#984ea3", "#a65628", "#999999")

BAR_METRICS = ("val_acc", "no_fg_acc", "bg_gap", "gradcam_bg_fraction", "occlusion_bg_fraction")


def _colour(regime: str, order: Sequence[str]) -> str:
    if regime in REGIME_COLOURS:
        return REGIME_COLOURS[regime]
    return FALLBACK_COLOURS[list(order).index(regime) % len(FALLBACK_COLOURS)]


def _value(row: Mapping, key: str) -> float:
    value = row.get(key)
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _ordered(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------

def summarize(rows: Sequence[Mapping], metrics: Sequence[str] = tuple(METRICS)) -> list[dict]:
    """One row per (arch, regime), in first-seen order: ``<metric>_mean``, ``<metric>_std``
    (sample standard deviation across seeds; 0 for a single seed) and ``seeds``.
    Missing (NaN) values are left out of each metric's mean."""
    groups: dict[tuple[str, str], list[Mapping]] = {}
    for row in rows:
        groups.setdefault((row["arch"], row["regime"]), []).append(row)
    out = []
    for (arch, regime), members in groups.items():
        summary = {"arch": arch, "regime": regime, "seeds": len(members)}
        for key in metrics:
            values = np.array([_value(r, key) for r in members], dtype=np.float64)
            values = values[np.isfinite(values)]
            summary[f"{key}_mean"] = float(values.mean()) if values.size else float("nan")
            summary[f"{key}_std"] = float(values.std(ddof=1)) if values.size > 1 else (
                0.0 if values.size else float("nan"))
        out.append(summary)
    return out


def _fmt(value, digits: int = 3) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "–" if not math.isfinite(value) else f"{value:.{digits}f}"


def mean_pm_std(summary: Mapping, key: str) -> str:
    """``0.812 ± 0.021`` (the spread shown only with more than one seed)."""
    mean, std = summary.get(f"{key}_mean"), summary.get(f"{key}_std")
    if summary.get("seeds", 1) > 1 and std is not None and math.isfinite(float(std)):
        return f"{_fmt(mean)} ± {_fmt(std)}"
    return _fmt(mean)


def markdown_tables(rows: Sequence[Mapping], summary: Sequence[Mapping], chance: float | None = None) -> str:
    """The study table in Markdown: mean ± spread per (arch, regime), then every cell."""
    headers = [METRICS[k][0] for k in METRICS]
    lines = ["## Mean ± spread across seeds", ""]
    if chance is not None:
        lines += [f"Chance level: {chance:.3f}. Spread: sample standard deviation across seeds.", ""]
    lines += ["| arch | regime | seeds | " + " | ".join(headers) + " |",
              "|---|---|---|" + "---|" * len(headers)]
    for s in summary:
        lines.append(f"| {s['arch']} | {s['regime']} | {s['seeds']} | "
                     + " | ".join(mean_pm_std(s, k) for k in METRICS) + " |")
    lines += ["", "## Cells", "", "| arch | regime | seed | run | " + " | ".join(headers) + " |",
              "|---|---|---|---|" + "---|" * len(headers)]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['regime']} | {r['seed']} | `{r['run_id']}` | "
                     + " | ".join(_fmt(r.get(k)) for k in METRICS) + " |")
    lines += ["", "Columns:", ""] + [f"- **{h}**: {what}" for h, what in METRICS.values()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------

RELIANCE_AXES = (("gradcam_bg_fraction", "Grad-CAM background energy fraction"),
                 ("occlusion_bg_fraction", "occlusion background energy fraction"),
                 ("no_fg_acc", "No-FG accuracy (background only)"))


def save_reliance_scatter(path: PathLike, rows: Sequence[Mapping], chance: float | None = None) -> Path:
    """Validation accuracy (y) against three measures of background reliance (x), one point
    per cell: colour = regime, marker = architecture; a dashed line marks chance on the
    No-FG panel. Size: 1200 x 400 px."""
    regimes = _ordered([r["regime"] for r in rows])
    archs = _ordered([r["arch"] for r in rows])
    fig = new_figure((12.0, 4.0))
    axes = fig.subplots(1, len(RELIANCE_AXES), sharey=True)
    for ax, (key, label) in zip(axes, RELIANCE_AXES):
        for row in rows:
            ax.scatter(_value(row, key), _value(row, "val_acc"), s=36,
                       color=_colour(row["regime"], regimes),
                       marker=ARCH_MARKERS[archs.index(row["arch"]) % len(ARCH_MARKERS)],
                       edgecolors="black", linewidths=0.5)
        if key == "no_fg_acc" and chance is not None:
            ax.axvline(chance, color="black", linestyle="--", linewidth=1)
            ax.text(chance, 0.02, " chance", fontsize=7, transform=ax.get_xaxis_transform())
        ax.set_xlabel(label, fontsize=8)
        ax.set_xlim(-0.02, 1.02)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy", fontsize=8)
    axes[0].set_ylim(-0.02, 1.02)
    handles = [axes[0].scatter([], [], color=_colour(g, regimes), marker="o", edgecolors="black",
                               linewidths=0.5, label=g) for g in regimes]
    handles += [axes[0].scatter([], [], color="white", marker=ARCH_MARKERS[i % len(ARCH_MARKERS)],
                                edgecolors="black", linewidths=0.8, label=a) for i, a in enumerate(archs)]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=7, frameon=False)
    fig.subplots_adjust(left=0.06, right=0.99, top=0.88, bottom=0.13, wspace=0.08)
    return save(fig, path)


def save_regime_bars(path: PathLike, summary: Sequence[Mapping], metrics: Sequence[str] = BAR_METRICS,
                     chance: float | None = None) -> Path:
    """One panel per metric: a group of bars per regime, one bar per architecture, error
    bars = spread across seeds. Size: ``300 * len(metrics)`` x 350 px."""
    regimes = _ordered([s["regime"] for s in summary])
    archs = _ordered([s["arch"] for s in summary])
    by_key = {(s["arch"], s["regime"]): s for s in summary}
    fig = new_figure((3.0 * len(metrics), 3.5))
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    width = 0.8 / max(len(archs), 1)
    positions = np.arange(len(regimes))
    shades = np.linspace(1.0, 0.55, max(len(archs), 1))
    for ax, key in zip(axes, metrics):
        for i, arch in enumerate(archs):
            means = [_value(by_key.get((arch, g), {}), f"{key}_mean") for g in regimes]
            stds = [_value(by_key.get((arch, g), {}), f"{key}_std") for g in regimes]
            colours = [np.array(_rgb(_colour(g, regimes))) * shades[i] for g in regimes]
            ax.bar(positions - 0.4 + width * (i + 0.5), np.nan_to_num(means), width,
                   yerr=np.nan_to_num(stds), color=colours, edgecolor="black", linewidth=0.4,
                   capsize=2, label=arch)
        if key in ("no_fg_acc", "only_fg_acc") and chance is not None:
            ax.axhline(chance, color="black", linestyle="--", linewidth=1)
        if key == "bg_gap":
            ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_title(METRICS[key][0], fontsize=9)
        ax.set_xticks(positions, regimes, rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    if len(archs) > 1:
        axes[0].legend(fontsize=6, title="arch (darker = later)", title_fontsize=6)
    fig.subplots_adjust(left=0.05, right=0.99, top=0.9, bottom=0.25, wspace=0.3)
    return save(fig, path)


def _rgb(hex_colour: str) -> tuple[float, float, float]:
    hex_colour = hex_colour.lstrip("#")
    return tuple(int(hex_colour[i:i + 2], 16) / 255.0 for i in (0, 2, 4))


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


STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px;
       color: #222; max-width: 1400px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; } h3 { font-size: 15px; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f2f2f2; } td.key, th.key { text-align: left; }
code { font-size: 11px; } figure { display: inline-block; margin: 4px 10px 10px 0; vertical-align: top; }
figcaption { font-size: 11px; color: #555; max-width: 420px; }
img { max-width: 100%; } .note { color: #555; font-size: 13px; max-width: 1000px; }
dl { font-size: 12px; } dt { font-weight: bold; float: left; clear: left; width: 150px; }
dd { margin-left: 160px; }
"""


def _table(header: Sequence[str], body: Sequence[Sequence[str]], key_columns: int) -> str:
    cls = lambda i: ' class="key"' if i < key_columns else ""  # noqa: E731
    out = ["<table>", "<tr>" + "".join(f"<th{cls(i)}>{html.escape(h)}</th>" for i, h in enumerate(header))
           + "</tr>"]
    for row in body:
        out.append("<tr>" + "".join(f"<td{cls(i)}>{html.escape(str(v))}</td>" for i, v in enumerate(row))
                   + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _figure(path: PathLike, caption: str) -> str:
    return (f'<figure><img src="{data_uri(path)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def build_report(title: str, setup: Mapping[str, str], rows: Sequence[Mapping], summary: Sequence[Mapping],
                 figures: Sequence[Example], examples: Mapping[str, Sequence[Example]],
                 notes: Sequence[str] = (), chance: float | None = None) -> str:
    """The study as one self-contained HTML page: setup, the mean ± spread table, figures,
    every cell, and attribution examples per regime. Every image is a ``data:`` URI; the page
    loads nothing else."""
    headers = [METRICS[k][0] for k in METRICS]
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{html.escape(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
             f"<h1>{html.escape(title)}</h1>"]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    parts.append("<h2>Setup</h2><dl>" + "".join(
        f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in setup.items()) + "</dl>")
    parts.append("<h2>Mean ± spread across seeds</h2>")
    if chance is not None:
        parts.append(f'<p class="note">Chance level {chance:.3f}. Spread: sample standard deviation '
                     f"across seeds (shown with more than one seed).</p>")
    parts.append(_table(["arch", "regime", "seeds", *headers],
                        [[s["arch"], s["regime"], s["seeds"], *(mean_pm_std(s, k) for k in METRICS)]
                         for s in summary], key_columns=2))
    parts.append("<dl>" + "".join(f"<dt>{html.escape(h)}</dt><dd>{html.escape(what)}</dd>"
                                  for h, what in METRICS.values()) + "</dl>")
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [_figure(f.path, f.caption) for f in figures]
    parts.append(f"<h2>Cells ({len(rows)})</h2>")
    parts.append(_table(["arch", "regime", "seed", "run", "status", *headers],
                        [[r["arch"], r["regime"], r["seed"], r["run_id"], r.get("status", ""),
                          *(_fmt(r.get(k)) for k in METRICS)] for r in rows], key_columns=5))
    if examples:
        parts.append("<h2>Examples</h2>")
        for group, items in examples.items():
            parts.append(f"<h3>{html.escape(group)}</h3>")
            parts += [_figure(e.path, e.caption) for e in items]
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"
