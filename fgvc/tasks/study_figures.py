"""The study's figures (fgvc.tasks.study_report writes them): backdrop-follow per regime, accuracy
against background reliance, the per-regime bars, the dose-response curves, and per unmasked
cell the designers read most and the No-FG confusion."""

from __future__ import annotations

import math
from pathlib import Path

from fgvc.study.records import StudyContext
from fgvc.study.results import StudyTables
from fgvc.study.tables import BACKDROP_FOLLOW
from fgvc.viz import save_confusion_matrix
from fgvc.viz.plots import save_designer_bars
from fgvc.viz.report import (
    Example,
    save_backdrop_follow_bars,
    save_dose_response,
    save_regime_bars,
    save_reliance_scatter,
)

TOP_DESIGNERS = 10  # designers per panel of the per-designer figure


def save_figures(out: Path, study: StudyContext, tables: StudyTables) -> list[Example]:
    """The dose-response curves (with several shortcut strengths), accuracy against background
    reliance per cell, and the per-regime bars."""
    chance = tables.chance
    # the figures draw one bar (or line) per regime: a split of a show-leak grid is part of it
    plotted = [{**x, "regime": f"{x['regime']} ({x['split_by']} split)"} if x.get("split_by") else x
               for x in tables.summary]
    figures = [Example(f"{tables.split.capitalize()} accuracy against background reliance, one point per cell",
                       save_reliance_scatter(out / "accuracy_vs_background_reliance.png", tables.rows, chance)),
               Example("Per-regime values (error bars: spread across seeds, or the 95% interval for one seed)",
                       save_regime_bars(out / "regime_bars.png", plotted, tables.columns, chance=chance))]
    if any(math.isfinite(float(s.get(f"{BACKDROP_FOLLOW}_mean", math.nan))) for s in tables.summary):
        figures.insert(0, Example(
            "Backdrop-follow per regime: how often the model names the backdrop's designer on Mixed-Rand (the person "
            "on another designer's backdrop); error bars: the 95% interval (one seed: bootstrap over the swaps; "
            "several: seed-level t-interval); dotted: chance, 1/C",
            save_backdrop_follow_bars(out / "backdrop_follow.png", tables.summary, chance)))
    if len(study.plan.bg_correlations) > 1:
        figures.insert(0, Example("Dose-response: each measure against the planted shortcut strength",
                                  save_dose_response(out / "dose_response.png", plotted, chance)))
    return figures


def save_designer_figures(out: Path, tables: StudyTables) -> dict[str, list[Example]]:
    """Per unmasked cell with swap-test data, beside its masked twin: the designers whose
    backdrops it reads most (designers/<run name>.png) and its No-FG confusion
    (no_fg_confusion/<run name>.png). Returns the report's groups of these figures."""
    rows = {r["cell"]: r for r in tables.rows}
    by_run_name = {r["run_name"]: r for r in tables.rows}
    designer_rows: dict[str, list[dict]] = {}
    for entry in tables.per_designer:
        designer_rows.setdefault(entry["cell"], []).append(entry)
    bars, confusions = [], []
    for key, row in rows.items():
        if not row.get("twin") or key not in designer_rows:
            continue  # a masked cell, or one whose swap record has no per-designer columns
        twin = by_run_name.get(row["twin"])
        twin_rows = designer_rows.get(twin["cell"], []) if twin else []
        name = row["run_name"]
        bars.append(Example(
            f"{name}: the designers whose backdrops it reads most (No-FG accuracy: the designer's backdrop alone; "
            f"backdrop-follow: the designer's backdrop under another designer's person), beside its masked twin "
            f"{row['twin'] if twin else '(none in the grid)'}; n = images / swaps; dotted: chance",
            save_designer_bars(out / "designers" / f"{name}.png", designer_rows[key], twin_rows, tables.chance,
                               title=name, twin_title=row["twin"] if twin else "", top=TOP_DESIGNERS)))
        if key in tables.confusions:
            names = tables.designers.get(key, [])
            matrix = tables.confusions[key]
            confusions.append(Example(
                f"{name}: No-FG confusion, whose backdrops are taken for whose (row: the backdrop's designer; column: "
                f"the designer predicted from the backdrop alone)",
                save_confusion_matrix(out / "no_fg_confusion" / f"{name}.png", matrix, names,
                                      f"{name}: No-FG confusion\n(the backdrop alone, "
                                      f"{sum(map(sum, matrix))} images)", row_label="backdrop's designer",
                                      column_label="predicted on No-FG", share_label="share of the backdrop's images",
                                      row_counts=True)))
    out_groups = {}
    if bars:
        out_groups[f"Per designer: the backdrops read most ({len(bars)} unmasked cells)"] = bars
    if confusions:
        out_groups[f"No-FG confusion ({len(confusions)} unmasked cells)"] = confusions
    return out_groups
