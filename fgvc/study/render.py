"""The study's tables as a reader sees them: the report's headline (:func:`headline_table`, one
line per cell) and its sentences (:func:`backdrop_sentences`, :func:`instruments_paragraph`),
the report's and results.md's tables (summary, show leak, regime differences, cells) and the
terminal's verdict lines, from the rows and summaries of fgvc.study.tables (all of a study's at
once: :func:`study_tables`, from fgvc.study.results). Wide tables carry column groups
(fgvc.viz.report.Table.groups), so the report shows each as narrower tables that fit a 1280-px
window."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from fgvc.analysis.sanity import FLAG_THRESHOLD
from fgvc.study.leak import leak_table
from fgvc.study.pairing import DIFFERENCE_MEASURES, fmt, interval_text
from fgvc.study.results import StudyTables
from fgvc.study.tables import (
    BACKDROP_FOLLOW,
    DID_NOT_LEARN,
    INSTRUMENTS_DISAGREE,
    LEARNED,
    NO_DATA,
    QUALITY_FACTOR,
    TableColumn,
    columns,
)
from fgvc.viz.report import Table

# The order of the column groups on the page (fgvc.study.tables.GROUPS)
GROUP_ORDER = ("accuracy", "swap test", "attribution", "retrieval")


def cell_text(row: Mapping, column: TableColumn) -> str:
    """A cell of the per-cell table: the value, with its 95% interval when it has one; a
    sanity column that reaches the flag threshold says so."""
    text = interval_text(row, column.name) if column.interval else fmt(row.get(column.name))
    if column.name.endswith("_sanity") and float(row.get(column.name, math.nan)) >= FLAG_THRESHOLD:
        text = f"FLAGGED {text}"
    return text


def summary_text(summary: Mapping, column: TableColumn) -> str:
    """A cell of the summary table: with several seeds, mean ± sample std [seed-level 95%
    t-interval]; with one seed, the value [bootstrap interval over images]."""
    mean, std = summary.get(f"{column.name}_mean"), summary.get(f"{column.name}_std")
    spread = interval_text({column.name: mean, f"{column.name}_low": summary.get(f"{column.name}_low"),
                        f"{column.name}_high": summary.get(f"{column.name}_high")}, column.name)
    if std is not None and math.isfinite(float(std)):
        return f"{fmt(mean)} ± {fmt(std)}" + (spread[len(fmt(mean)):] if column.interval else "")
    return spread if column.interval else fmt(mean)


def _axes(rows: Sequence[Mapping]) -> list[tuple[str, str]]:
    """The grid's optional axes present in ``rows``: (header, row key)."""
    axes = [("bg corr.", "bg_correlation"), ("split", "split_by")]
    return [(header, key) for header, key in axes if any(r.get(key) is not None for r in rows)]


def _axis_values(row: Mapping, axes: Sequence[tuple[str, str]]) -> list[str]:
    return [fmt(row[key], 2) if key == "bg_correlation" else str(row[key]) for _, key in axes]


def _keys(row: Mapping, axes: Sequence[tuple[str, str]]) -> list[str]:
    return [row["arch"], row["regime"], *_axis_values(row, axes)]


# (header, row key, what): the show leak of a grid over random and show splits (fgvc.study.leak)
_LEAK_WHAT = ("on the random split minus on the show split of the same images, unpaired bootstrap 95% interval; > 0: "
              "the random split rewards remembering the show")
LEAK_COLUMNS = (("show leak, Δ acc", "leak_acc", f"accuracy on the cell's own analysed images {_LEAK_WHAT}"),
                ("show leak, Δ BG-gap", "leak_bg_gap", f"BG-gap (background-swap test) {_LEAK_WHAT}"))


def _leak(rows: Sequence[Mapping]) -> list[str]:
    """The show-leak headers when the rows carry it, else []."""
    return [header for header, _, _ in LEAK_COLUMNS] if any("leak_acc" in r for r in rows) else []


def _leak_cells(row: Mapping, leak: Sequence[str]) -> list[str]:
    return [interval_text(row, key, sign=True) for _, key, _ in LEAK_COLUMNS] if leak else []


def shown_verdict(row: Mapping) -> str:
    """The verdict as the tables show it: "holds only on the random split" added where the
    show split of a show-leak grid does not share it (fgvc.study.leak)."""
    return f"{row['verdict']}; {row['leak_note']}" if row.get("leak_note") else row["verdict"]


def interval_statement(rows: Sequence[Mapping]) -> str:
    """What the intervals cover, said once for the report."""
    seeds = len({r.get("seed") for r in rows})
    if seeds <= 1:
        return ("One seed: every interval is a bootstrap 95% interval over the analysed images only; it does not "
                "cover training randomness (another seed can move a value by more than its interval).")
    return (f"{seeds} seeds: per cell, bootstrap 95% intervals over images; in the summary, mean ± sample standard "
            f"deviation across seeds [seed-level 95% t-interval, which covers training randomness]; regime "
            f"differences and the show leak: crossed bootstrap (every seed analyses the same images, so each "
            f"replicate draws the images once for all seeds, and the seeds).")


def _column_groups(first: int, cols: Sequence[TableColumn]) -> list[tuple[str, list[int]]]:
    """The groups (GROUP_ORDER) of a table's measured columns ``cols``, which start at index
    ``first``: (group, column indices), empty groups left out."""
    groups: dict[str, list[int]] = {g: [] for g in GROUP_ORDER}
    for i, column in enumerate(cols):
        groups.setdefault(column.group or "accuracy", []).append(first + i)
    return [(name, indices) for name, indices in groups.items() if indices]


def _summary_groups(repeat: int, first: int, cols: Sequence[TableColumn]) -> list[tuple[str, list[int]]]:
    """The summary's column groups: its verdict columns with the accuracy group, then the others."""
    groups = _column_groups(first, cols)
    if groups and groups[0][0] == "accuracy":
        return [("accuracy", [*range(repeat, first), *groups[0][1]]), *groups[1:]]
    return [("verdict", list(range(repeat, first))), *groups]


INSTRUMENTS_WHAT = ("whether the swap test's verdict and an attribution method's excess over the masked twin point "
                    "opposite ways: 'instruments disagree (<method>)' when the verdict reads the runway while the "
                    "excess interval lies below 0, or reads the garment while it lies above 0; the swap test measures "
                    "use, attribution where the evidence sits (attention), so they can differ")


def percent(value, digits: int = 0) -> str:
    """A share as a percentage (``62``), – for NaN."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "–" if not math.isfinite(value) else f"{100 * value:.{digits}f}"


def percent_interval(row: Mapping, name: str, sign: bool = False, unit: str = " %") -> str:
    """``row[name]`` as a percentage with its 95% interval, ``62 % [50, 74]``."""
    value, low, high = (row.get(f"{name}{end}", math.nan) for end in ("", "_low", "_high"))
    text = ("+" if sign and float(value) > 0 else "") + percent(value) + unit
    if all(math.isfinite(float(x)) for x in (low, high)):
        text += f" [{('+' if sign and float(low) > 0 else '') + percent(low)}, " \
                f"{('+' if sign and float(high) > 0 else '') + percent(high)}]"
    return text


def backdrop_sentences(rows: Sequence[Mapping], chance: float) -> list[str]:
    """One sentence per unmasked cell: how often it names the backdrop's designer on Mixed-Rand,
    beside chance and its masked twin's rate, with the paired interval of the difference."""
    out = []
    for row in rows:
        if row.get("twin", "") == "" or not math.isfinite(float(row.get(BACKDROP_FOLLOW, math.nan))):
            continue  # a masked cell (no twin of its own), or a record without the rate
        swaps = row.get("backdrop_swaps")
        text = (f"{row.get('run_name', row['cell'])} ({shown_verdict(row)}): it names the backdrop's designer in "
                f"{percent_interval(row, BACKDROP_FOLLOW)} of {f'{swaps} ' if swaps else ''}swaps; chance "
                f"{percent(chance)} %")
        if math.isfinite(float(row.get(f"{BACKDROP_FOLLOW}_twin", math.nan))):
            text += (f"; its masked twin {percent_interval(row, f'{BACKDROP_FOLLOW}_twin')} (difference "
                     f"{percent_interval(row, f'{BACKDROP_FOLLOW}_vs_twin', sign=True, unit=' points')}, paired "
                     f"on the same swaps)")
        else:
            text += f"; masked twin: {row.get('twin') or 'none'}"
        out.append(text + ".")
    return out


def headline_table(rows: Sequence[Mapping], chance: float) -> Table:
    """The report's first table, one line per cell: verdict, accuracy, No-FG / chance,
    backdrop-follow beside chance and the masked twin's (with the paired difference), and
    whether the instruments disagree."""
    split = _split(rows)
    header = ["cell", "verdict", f"{split} acc", "No-FG / chance", f"backdrop-follow (chance {chance:.3f})",
              "masked twin's backdrop-follow", "− twin's (paired)", "instruments"]
    body = [[r.get("run_name", r["cell"]), shown_verdict(r), interval_text(r, "acc"),
             interval_text(r, "no_fg_vs_chance"), interval_text(r, BACKDROP_FOLLOW),
             interval_text(r, f"{BACKDROP_FOLLOW}_twin") if r.get("twin") else "",
             interval_text(r, f"{BACKDROP_FOLLOW}_vs_twin", sign=True) if r.get("twin") else "",
             r.get("instruments", "")] for r in rows]
    return Table("The answer, one line per cell", header, body, key_columns=2,
                 muted=[r.get("quality") in (DID_NOT_LEARN, NO_DATA) for r in rows],
                 note=(f"95% intervals. Verdict from the background-swap test (it changes the input and watches the "
                       f"prediction). No-FG / chance: accuracy from the backdrop alone in multiples of chance "
                       f"({chance:.3f}); 1 = no information in the backdrop. Backdrop-follow: on Mixed-Rand (the "
                       f"person on another designer's backdrop), the share predicted as the backdrop's designer; "
                       f"chance "
                       f"{chance:.3f}; a garment reader stays below it. − twin's: minus the masked twin's rate on the "
                       f"same swaps, paired bootstrap. Greyed: did not learn (no verdict)."))


def _split(rows: Sequence[Mapping]) -> str:
    splits = list(dict.fromkeys(r.get("split", "val") for r in rows))
    return "/".join(splits) or "val"


def report_tables(rows: Sequence[Mapping], summary: Sequence[Mapping], chance: float,
                  differences: Sequence[Mapping] = (), extra: Sequence[Table] = ()) -> list[Table]:
    """The summary, ``extra`` tables (the show leak), the paired regime differences (when the
    grid has pairs) and the per-cell table, formatted. Rows of cells that did not learn are
    marked ``muted`` (shown greyed)."""
    split = _split(rows)
    cols = columns(split)
    axes = _axes(rows)
    keys = ["arch", "regime", *(header for header, _ in axes)]
    leak = _leak(rows)
    legend = {c.header: c.what for c in cols}
    legend["verdict"] = ("reads the runway: No-FG above chance and BG-gap above 0 (95% intervals); reads the "
                         "garment: Only-FG above chance, neither of the first two; else undecided; no verdict when "
                         f"the cell did not learn ({split} accuracy's interval not above {QUALITY_FACTOR:g} x chance) "
                         f"or has no per-image {split} accuracy to judge that by (no data)")
    seeds = len({r.get("seed") for r in rows})
    note = (f"Chance level {chance:.3f}; reported numbers on the {split} split (the best epoch is chosen on val). "
            f"{interval_statement(rows)}")
    title = "Summary (one seed)" if seeds <= 1 else f"Summary across {seeds} seeds"
    legend.update({header: what for header, _, what in LEAK_COLUMNS if header in leak})
    legend["instruments"] = INSTRUMENTS_WHAT
    summary_header = [*keys, "seeds", "verdict", "did not learn", *leak, *(c.header for c in cols)]
    summary_table = Table(title, summary_header,
                          [[*_keys(s, axes), str(s["seeds"]), s["verdict"], str(s.get("did_not_learn", 0)),
                            *_leak_cells(s, leak), *(summary_text(s, c) for c in cols)]
                           for s in summary],
                          key_columns=len(keys) + 3, note=note, legend=legend,
                          muted=[s.get("did_not_learn", 0) + s.get("no_data", 0) == s["seeds"] for s in summary],
                          groups=_summary_groups(len(keys), len(keys) + 3 + len(leak), cols), repeat=len(keys))
    tables = [summary_table, *extra]
    if differences:
        tables.append(_differences_table(differences, axes, split, seeds))
    tables.append(_cells_table(rows, keys, axes, leak, cols))
    return tables


def _differences_table(differences: Sequence[Mapping], axes, split: str, seeds: int) -> Table:
    """The paired regime differences, per image on the same source images of each seed."""
    headers = [f"Δ {header}" for _, header, _ in DIFFERENCE_MEASURES]
    methods = list(dict.fromkeys(d.get("interval", "") for d in differences if d.get("interval")))
    return Table(
        "Paired regime differences (same source images)",
        ["arch", *(header for header, _ in axes), "comparison", "seeds", "images", *headers],
        [[d["arch"], *_axis_values(d, axes), d["comparison"], str(d["seeds"]), str(d.get("images", "")),
          *(interval_text(d, name, sign=True) for name, _, _ in DIFFERENCE_MEASURES)] for d in differences],
        key_columns=3 + len(axes),
        note=(f"First regime minus second, per image on the same source {split} images of each seed; 95% "
              f"interval: {'; '.join(methods) or 'bootstrap over images'}"
              + (" (every seed analyses the same images, so the image term does not average out over seeds)"
                 if seeds > 1 else "")
              + ". An interval that excludes 0 is a difference between regimes. BG-gap per image is Mixed-Same "
                "minus Mixed-Rand correctness; backdrop-follow per Mixed-Rand swap whose backdrop is another "
                "designer's, 1 when the model names the backdrop's designer."),
        muted=[d.get("did_not_learn", 0) + d.get("no_data", 0) > 0 for d in differences])


def _cells_table(rows: Sequence[Mapping], keys: list[str], axes, leak: list[str], cols) -> Table:
    """One row per cell: its run, quality, verdict, twin, instruments and every measured column."""
    first = len(keys) + 7 + len(leak)  # the cells table's first measured column
    cells_header = [*keys, "seed", "run", "status", "quality", "verdict", "masked twin", "instruments", *leak,
                    *(c.header for c in cols)]
    return Table(f"Cells ({len(rows)})", cells_header,
                 [[*_keys(r, axes), str(r["seed"]), r["run_id"], r.get("status", ""),
                   r.get("quality", LEARNED), shown_verdict(r), r.get("twin", ""), r.get("instruments", ""),
                   *_leak_cells(r, leak), *(cell_text(r, c) for c in cols)]
                  for r in rows], key_columns=len(keys) + 7,
                 muted=[r.get("quality") in (DID_NOT_LEARN, NO_DATA) for r in rows],
                 note=f"Greyed rows did not learn, or their quality is '{NO_DATA}' (a per-image file of "
                      f"their records could not be read): their reliance numbers are shown but carry no "
                      f"verdict.",
                 groups=[("the cell", list(range(len(keys) + 1, first))), *_column_groups(first, cols)],
                 repeat=len(keys) + 1)


def study_tables(results: StudyTables) -> list[Table]:
    """A study's tables as the report and results.md show them: :func:`report_tables` with the
    show leak (when the grid has the split axis) after the summary."""
    extra = [leak_table(results.leak)] if results.leak else []
    return report_tables(results.rows, results.summary, results.chance, results.differences, extra)


def markdown_tables(rows: Sequence[Mapping], summary: Sequence[Mapping], chance: float,
                    differences: Sequence[Mapping] = (), extra: Sequence[Table] = ()) -> str:
    """The report's tables in Markdown (study/results.md); the values of muted rows in italics."""
    return markdown(report_tables(rows, summary, chance, differences, extra))


def markdown(tables: Sequence[Table]) -> str:
    """Formatted tables in Markdown: title, note, header, body (the values of muted rows in
    italics) and the columns' legend."""
    lines = []
    for table in tables:
        lines += [f"## {table.title}", ""] + ([table.note, ""] if table.note else [])
        lines += ["| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
        muted = list(table.muted or [False] * len(table.body))
        for row, grey in zip(table.body, muted, strict=True):
            cells = [str(v).replace("|", "\\|") for v in row]
            lines.append("| " + " | ".join(f"_{c}_" if grey and i >= table.key_columns and c not in ("", "–") else c
                                           for i, c in enumerate(cells)) + " |")
        if table.legend:
            lines += ["", "Columns:", ""] + [f"- **{h}**: {w}" for h, w in table.legend.items()]
        lines.append("")
    return "\n".join(lines)


def terminal_table(rows: Sequence[Mapping]) -> str:
    """The verdicts as plain text for the terminal: one line per cell."""
    split = _split(rows)
    head = ("cell", f"{split} acc", "quality", "verdict", "backdrop-follow", "− twin's", "gradcam excess",
            "occlusion excess")
    body = [(r.get("run_name", r.get("run_id", "")), interval_text(r, "acc"), r.get("quality", LEARNED),
             shown_verdict(r) + (f"; {r['instruments']}" if str(r.get("instruments", "")).startswith(
                 INSTRUMENTS_DISAGREE) else ""),
             interval_text(r, BACKDROP_FOLLOW), interval_text(r, f"{BACKDROP_FOLLOW}_vs_twin", sign=True),
             interval_text(r, "gradcam_excess"), interval_text(r, "occlusion_excess")) for r in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(head, *body, strict=True)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
                     for line in (head, *body))
