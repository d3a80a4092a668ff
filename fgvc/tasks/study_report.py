"""The study's reading and writing in the tracking store, around its pure computation
(fgvc.study.results.compute):

- gather (:func:`gather`): each finished cell's training metrics, its analysis records' metrics
  and per-image tables (each record's file downloaded once) and the split its numbers are
  reported on, as plain records (fgvc.study.records.CellRecord);
- write (:func:`write_study`, :func:`finish_study`): the verdict tags and comparison metrics on
  the cells' training runs; the study run's files (the tables as CSV and Markdown, the swap test
  per designer, the figures, the HTML report); its totals as metrics and the verdict summary as
  its description.

The cells' comparison metrics are named ``across_regimes/<name>`` (CHART_SECTION) and logged at
step 0: the MLflow UI's chart view (Model training > Chart) groups a run's metrics into sections
by the name before the last ``/``, orders the sections alphabetically (metrics without a ``/``
and ``system/`` last) and draws a metric as a bar chart when no run has it at a step of 1 or
more (else a line chart over steps). So the comparison across regimes is the first section, a
bar per cell, ahead of ``best/`` (the training's best-epoch values, also at step 0 on a study's
cells: fgvc.tasks.train).

Per-image tables are read per cell (its key, ``Cell.key``), never per training run: cells with
identical training pixels share one training (the masked cells of a dose-response grid) while
each has its own analysis records. On a training run that serves one cell of the study, the
cell's tags and metrics have their plain names (``fgvc.verdict``, ``fgvc.quality``,
``fgvc.report_split``, ``fgvc.verdict_note``, ``fgvc.instruments``, ``across_regimes/<name>``). A
run shared by several cells carries each cell's under names of its own, ``<name>.<suffix>``, the
suffix naming what tells the cells apart: the shortcut strength and split (``fgvc.verdict.bg0``,
``across_regimes/bg_gap.bg0.5``, ``fgvc.verdict.bg1.show-split``; the cell key where those do not
differ), so no cell's verdict or numbers replace another's."""

from __future__ import annotations

import csv
import logging
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from fgvc.analysis.methods import METHODS
from fgvc.analysis.methods.attribution import AttributionMethod
from fgvc.data.shards import read_label_map
from fgvc.files import write_csv
from fgvc.study.records import CellRecord, CellResult, Roots, StudyContext, StudyResult
from fgvc.study.render import (
    backdrop_sentences,
    headline_table,
    interval_statement,
    markdown,
    study_tables,
    terminal_table,
)
from fgvc.study.results import StudyTables, complete
from fgvc.study.tables import ATTRIBUTION, BACKDROP_FOLLOW, DID_NOT_LEARN, NO_DATA, QUALITY_FACTOR, report_split
from fgvc.tasks.study_figures import save_designer_figures, save_figures
from fgvc.tracking.markdown import code
from fgvc.tracking.runs import DESCRIPTION, git_commit
from fgvc.viz.report import (
    Example,
    MethodNotes,
    Table,
    build_report,
)

log = logging.getLogger("fgvc")

EXAMPLES_PER_METHOD = 2
PER_IMAGE_METHODS = (*ATTRIBUTION, "shortcut")
CHART_SECTION = "across_regimes"  # the cells' comparison metrics: the chart view's first section (module docstring)
LIBRARIES = ("torch", "torchvision", "timm", "mlflow", "numpy")


# --------------------------------------------------------------------------------------------
# Gather: the finished cells as plain records
# --------------------------------------------------------------------------------------------

def _download(run_id: str, artifact: str, dst: Path, consequence: str = "") -> Path | None:
    dst.mkdir(parents=True, exist_ok=True)
    try:
        return Path(MlflowClient().download_artifacts(run_id, artifact, str(dst)))
    except Exception as e:  # an example missing from one cell must not sink the report
        log.warning("study report: %s of run %s unavailable (%s)%s", artifact, run_id,
                    (str(e).splitlines() or [type(e).__name__])[0], consequence)
        return None


def _per_image(results: Sequence[CellResult | CellRecord], tmp: Path) -> dict[tuple[str, str], dict[str, list]]:
    """(cell key, method) -> the columns of the method's per_image.csv in the cell's record,
    each record's file downloaded once (cells may share a record). A missing file is warned
    about (record and file) for each cell it leaves without: the cell's numbers that need it
    are NaN, and without an attribution table its quality is "undecided (no data)"."""
    read: dict[tuple[str, str], dict[str, list]] = {}
    out = {}
    for result in results:
        for method in PER_IMAGE_METHODS:
            if method not in result.records:
                continue
            record = result.records[method]
            if (record, method) not in read:
                path = _download(record, f"analysis/{method}/per_image.csv", tmp / record / method,
                                 f": study cell {result.cell.key} has no per-image {method} numbers")
                if path is None:
                    continue
                read[(record, method)] = _read_columns(path)
            out[(result.cell.key, method)] = read[(record, method)]
    return out


def _read_columns(path: Path) -> dict[str, list]:
    """A CSV file's columns, numbers as floats."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        table: dict[str, list] = {k: [] for k in reader.fieldnames or ()}
        for line in reader:
            for k, v in line.items():
                table[k].append(_number(v))
    return table


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def _reported_split(roots: Mapping[tuple, Roots], result: CellResult) -> str:
    return report_split(roots[result.cell.data].root(result.cell))


def _designers(roots: Mapping[tuple, Roots], result: CellResult) -> list[str]:
    """The class names of the cell's root by index (its index_to_label.json; a masked root keeps
    its source's), a missing name as its index."""
    root = roots[result.cell.data].root(result.cell)
    if root is None:  # a finished cell's root exists
        raise ValueError(f"study cell {result.cell.key}: its masked root has not been built")
    names = read_label_map(root)
    return [names.get(i, str(i)) for i in range(max(names, default=-1) + 1)]


def gather(client: MlflowClient, results: Sequence[CellResult], roots: Mapping[tuple, Roots]) -> list[CellRecord]:
    """The finished cells as plain records: the training run's metrics, the analysis records'
    metrics (as the cells returned them) and per-image tables, the reported split (test when
    the cell's root has one) and the designers' names (the per-designer numbers are computed
    from the swap records' per-image tables, fgvc.study.designers)."""
    with tempfile.TemporaryDirectory(prefix="fgvc-per-image-") as tmp:
        per_image = _per_image(results, Path(tmp))
    return [CellRecord(r.cell, r.run_id, r.status, r.model_uri, dict(client.get_run(r.run_id).data.metrics),
                       r.analyses, r.records,
                       {m: per_image[(r.cell.key, m)] for m in PER_IMAGE_METHODS if (r.cell.key, m) in per_image},
                       _reported_split(roots, r), _designers(roots, r))
            for r in results]


def complete_rows(client: MlflowClient, results: list[CellResult], rows: list[dict], roots: dict,
                  chance: float) -> tuple[list[dict], list[dict]]:
    """Rows built elsewhere taken through the same steps as a study's: their split and
    per-image tables gathered, finished (fgvc.study.results.complete), their cells tagged.
    Returns the paired regime differences and the show leak."""
    for row, result in zip(rows, results, strict=True):
        row["split"] = _reported_split(roots, result)
    with tempfile.TemporaryDirectory(prefix="fgvc-per-image-") as tmp:
        per_image = _per_image(results, Path(tmp))
    differences, leak = complete(rows, per_image, chance)
    tag_cells(client, rows)
    return differences, leak


# --------------------------------------------------------------------------------------------
# Write: the cells' tags, the study run's files, metrics and description
# --------------------------------------------------------------------------------------------

def cell_tags(row: dict) -> dict[str, str]:
    """The tags a cell run carries so the UI can filter and group by outcome."""
    return {"fgvc.verdict": row["verdict"], "fgvc.quality": row.get("quality", ""),
            "fgvc.report_split": row.get("split", "val"),
            **({"fgvc.verdict_note": row["leak_note"]} if row.get("leak_note") else {}),
            **({"fgvc.instruments": row["instruments"]} if row.get("instruments") else {})}


def chart_metrics(row: dict) -> dict[str, float]:
    """The cell's comparison numbers as ``across_regimes/<name>`` (CHART_SECTION), logged once at
    step 0 so the chart view draws them as bars across cells in its first section (module
    docstring); NaN where a cell has no such number, so every cell has the same metric names."""
    split = row.get("split", "val")
    values = {"best_val_acc": row.get("val_acc"), f"{split}_acc": row.get("acc"),
              f"{split}_acc_source_images": row.get("acc_source"),
              "no_fg_vs_chance": row.get("no_fg_vs_chance"), "bg_gap": row.get("bg_gap"),
              BACKDROP_FOLLOW: row.get(BACKDROP_FOLLOW),
              f"{BACKDROP_FOLLOW}_vs_twin": row.get(f"{BACKDROP_FOLLOW}_vs_twin")}
    for method in ATTRIBUTION:
        values[f"{method}_excess_vs_masked_twin"] = row.get(f"{method}_excess")
        values[f"{method}_bg_preference"] = row.get(f"{method}_bg_preference")
    if row.get("split_by"):  # a grid over random and show splits: the leak, random minus show
        values.update({"show_leak_acc": row.get("leak_acc"), "show_leak_bg_gap": row.get("leak_bg_gap")})
    out = {}
    for k, v in values.items():
        try:
            out[f"{CHART_SECTION}/{k}"] = math.nan if v is None else float(v)
        except (TypeError, ValueError):
            out[f"{CHART_SECTION}/{k}"] = math.nan
    return out


def name_suffixes(rows: list[dict]) -> dict[str, str]:
    """Cell key -> the suffix of its tag and metric names on its training run: "" for a run
    that serves one cell, else what tells the run's cells apart (shortcut strength, split; the
    cell key where they do not)."""
    by_run: dict[str, list[dict]] = {}
    for row in rows:
        by_run.setdefault(row["run_id"], []).append(row)
    out = {}
    for members in by_run.values():
        if len(members) == 1:
            out[members[0]["cell"]] = ""
            continue
        axes = {r["cell"]: ".".join([*([f"bg{r['bg_correlation']:g}"] if r.get("bg_correlation") is not None else []),
                                     *([f"{r['split_by']}-split"] if r.get("split_by") else [])])
                for r in members}
        distinct = len(set(axes.values())) == len(members) and all(axes.values())
        out.update({cell: suffix if distinct else cell for cell, suffix in axes.items()})
    return out


def tag_cells(client: MlflowClient, rows: list[dict]) -> None:
    """Each cell's verdict tags and comparison metrics on its training run (names: the module
    docstring)."""
    now = int(time.time() * 1000)
    suffixes = name_suffixes(rows)
    for row in rows:
        suffix = f".{suffixes[row['cell']]}" if suffixes[row["cell"]] else ""
        client.log_batch(row["run_id"],
                         metrics=[Metric(f"{k}{suffix}", v, now, 0) for k, v in chart_metrics(row).items()],
                         tags=[RunTag(f"{k}{suffix}", v) for k, v in cell_tags(row).items()])


def write_study(client: MlflowClient, study: StudyContext, tables: StudyTables, cells: Sequence[CellRecord]) -> None:
    """The cells' verdict tags and comparison metrics, and the study run's files under
    ``study/``: the tables, the figures and the report."""
    tag_cells(client, tables.rows)
    with tempfile.TemporaryDirectory(prefix="fgvc-study-") as tmp:
        out, downloads = Path(tmp) / "study", Path(tmp) / "downloads"
        out.mkdir()
        formatted = study_tables(tables)
        write_tables(out, study.run_id, tables, formatted)
        figures = [*save_figures(out, study, tables), *_sanity_figures(cells, downloads)]
        per_cell = save_designer_figures(out, tables)
        examples = _examples(cells, study.plan.regimes, downloads)
        write_report(out / "report.html", study, tables, formatted, figures, examples, per_cell)
        client.log_artifacts(study.run_id, str(out), "study")


def write_tables(out: Path, run_id: str, tables: StudyTables, formatted: Sequence[Table]) -> None:
    """results.csv, summary.csv, per_designer.csv (when the swap records have the per-designer
    columns), regime_differences.csv (when the grid has regime pairs), show_leak.csv (with the
    split axis) and results.md."""
    write_csv(out / "results.csv", tables.rows)
    write_csv(out / "summary.csv", tables.summary)
    if tables.per_designer:
        write_csv(out / "per_designer.csv", tables.per_designer)
    if tables.differences:
        write_csv(out / "regime_differences.csv", tables.differences)
    if tables.leak:
        write_csv(out / "show_leak.csv", tables.leak)
    answer = "\n".join(f"- {sentence}" for sentence in backdrop_sentences(tables.rows, tables.chance))
    intro = "\n\n".join(p for p in (markdown([headline_table(tables.rows, tables.chance)]), answer, *tables.findings)
                        if p)
    (out / "results.md").write_text(f"# Background-reliance study `{run_id}`\n\n{intro}\n\n{markdown(formatted)}",
                                    encoding="utf-8")


def write_report(path: Path, study: StudyContext, tables: StudyTables, formatted: Sequence[Table],
                 figures: Sequence[Example], examples: Mapping[str, Sequence[Example]],
                 per_cell: Mapping[str, Sequence[Example]] | None = None) -> None:
    """report.html (fgvc/viz/templates/report.html.j2): the headline table and the backdrop-follow
    sentences first, the findings, the figures, the method with the numbers it quotes, the setup,
    the tables, the per-cell figures and the examples."""
    page = build_report(f"Background-reliance study ({study.plan.preset})", _setup(study, tables), formatted,
                        figures, examples, notes=tables.findings, method=MethodNotes(QUALITY_FACTOR, NO_DATA),
                        headline=headline_table(tables.rows, tables.chance),
                        answer=backdrop_sentences(tables.rows, tables.chance), details=per_cell)
    path.write_text(page, encoding="utf-8")


def _setup(study: StudyContext, tables: StudyTables) -> dict[str, str]:
    """The report's setup list: the run, the data, the grid, training, split, analysis, gate."""
    plan, roots, split, chance = study.plan, study.roots.values(), tables.split, tables.chance
    grid = f"{', '.join(plan.archs)} × {', '.join(plan.regimes)} × seeds {', '.join(map(str, plan.seeds))}"
    if len(plan.bg_correlations) > 1:
        grid += f" × shortcut strengths {', '.join(f'{b:g}' for b in plan.bg_correlations)}"
    if plan.splits != (None,):
        grid += f" × splits {', '.join(map(str, plan.splits))} (the same images)"
    return {"study run": study.run_id,
            "source data": ", ".join(f"{r.source} (digest {r.source_digest})" for r in roots),
            "masked data": ", ".join(f"{r.masked} (segmenter {r.segmenter})" for r in roots if r.masked) or "none",
            "grid": grid,
            "planted shortcut strength": ", ".join(f"{r.demo.bg_correlation:g}" for r in roots if r.demo is not None)
            or "none planted (not demo data)",
            "training": f"{plan.epochs} epochs, batch {plan.batch_size}, lr_head {plan.lr_head}; best epoch chosen on "
                        f"val (best/val_acc)",
            "reported split": split + ("" if split == "test" else " (the roots have no test split: numbers come from "
                                                                  "the split that chose the epoch, optimistic)"),
            "analysis": f"{plan.num_images} {split} images per cell (seed 0); {interval_statement(tables.rows)}",
            "quality gate": f"accuracy's 95% interval above {QUALITY_FACTOR:g} x chance "
                            f"({QUALITY_FACTOR * chance:.3f})",
            "classes": f"{study.num_classes} (chance {chance:.3f})",
            "image size": f"{study.image_size[0]}×{study.image_size[1]} (height × width)",
            "commit": git_commit(), "libraries": _versions()}


def finish_study(client: MlflowClient, run_id: str, preset: str, tables: StudyTables, seconds: float) -> None:
    """The study run's totals as metrics (cells by status and outcome, time) and the verdict
    summary as its description."""
    totals = {"study/cells": len(tables.rows), **{f"study/cells_{k}": v for k, v in tables.statuses.items()},
              "study/cells_reading_the_runway": tables.reading_the_runway,
              "study/cells_instruments_disagree": len(tables.instruments_disagree),
              "study/cells_did_not_learn": tables.did_not_learn, "study/cells_no_data": tables.no_data,
              **({"study/verdicts_only_on_random_split": tables.only_on_random_split} if tables.leak else {}),
              "time/study_s": seconds}
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in totals.items()],
                     tags=[RunTag(DESCRIPTION, description(preset, tables))])


def description(preset: str, tables: StudyTables) -> str:
    """The study run's description (Markdown): the verdict of every cell and the findings."""
    rows = tables.rows
    lines = [f"Background-reliance study ({preset}): {len(rows)} cells"
             + (f", {tables.did_not_learn} did not learn (no verdict)" if tables.did_not_learn else "")
             + (f", {tables.no_data} without per-image data (no verdict)" if tables.no_data else "") + ".", ""]
    lines += [f"- {code(r['run_name'])}: **{r['verdict']}** ({r['verdict_reason']})" for r in rows]
    for paragraph in tables.findings:
        lines += ["", paragraph]
    lines += ["", "Tables: `study/results.md`, `study/results.csv`; report: `study/report.html`."]
    return "\n".join(lines)


def _versions() -> str:
    found = []
    for name in LIBRARIES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def _sanity_figures(results: Sequence[CellRecord], tmp: Path) -> list[Example]:
    out = []
    for result in results:
        if "sanity" in result.records:
            path = _download(result.records["sanity"], "analysis/sanity/sanity_curve.png", tmp / "sanity" /
                             result.run_id)
            if path is not None:
                out.append(Example(f"Sanity check ({result.cell.arch}, cell {result.cell.key}): rank correlation of "
                                   f"each method's maps with the trained network's, as blocks are randomised from "
                                   f"the head down; a method above the dashed line after full randomisation is "
                                   f"flagged", path))
    return out


def _examples(results: Sequence[CellRecord], regimes: tuple[str, ...], tmp: Path) -> dict[str, list[Example]]:
    """Per regime, the first cell's attribution examples (several designers, right and wrong
    predictions), plus the background-swap variants."""
    out: dict[str, list[Example]] = {}
    attribution = [m for m, method in METHODS.items() if isinstance(method, AttributionMethod) and method.in_all]
    for regime in regimes:
        first = next((r for r in results if r.cell.regime == regime), None)
        if first is None:
            continue
        items = []
        for method in attribution:
            for i in range(EXAMPLES_PER_METHOD):
                path = _download(first.records[method], f"analysis/{method}/example_{i:02d}.png",
                                 tmp / first.run_id / method)
                if path is not None:
                    items.append(Example(f"{first.cell.key}: {method} example {i + 1}", path))
        out[regime] = items
    if results and "shortcut" in results[0].records:
        path = _download(results[0].records["shortcut"], "analysis/shortcut/variants.png", tmp / "variants")
        if path is not None:
            out["Background-swap variants (source images)"] = [Example(
                "Original | Only-FG | No-FG | Mixed-Same | Mixed-Rand, as fed to every model by the shortcut test",
                path)]
    return out


# --------------------------------------------------------------------------------------------
# The terminal
# --------------------------------------------------------------------------------------------

def report_location(client: MlflowClient, run_id: str) -> str:
    """Where to open the report: a local path when the artifacts are on this machine, else a
    link to the run's artifact page in the MLflow UI."""
    uri = client.get_run(run_id).info.artifact_uri
    if uri.startswith("file://") or "://" not in uri:
        return str(Path(uri.removeprefix("file://")) / "study" / "report.html")
    tracking = mlflow.get_tracking_uri()
    if tracking.startswith("http"):
        experiment = client.get_run(run_id).info.experiment_id
        return (f"{tracking.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}/artifacts/study/report.html"
                f"?workflowType=machine_learning")
    return f"{uri}/study/report.html"


def terminal_summary(result: StudyResult) -> str:
    """What `study` prints: the verdict table and where the report is."""
    lines = [f"study run {result.run_id}: {len(result.cells)} cells in {result.seconds:.0f} s",
             terminal_table(result.rows)]
    did_not_learn = sum(r.get("quality") == DID_NOT_LEARN for r in result.rows)
    if did_not_learn:
        lines.append(f"{did_not_learn} cell(s) did not learn (no verdict)")
    no_data = [r.get("run_name", r["run_id"]) for r in result.rows if r.get("quality") == NO_DATA]
    if no_data:
        lines.append(f"{len(no_data)} cell(s) {NO_DATA}, a per-image file of their records could not be read (no "
                     f"verdict): {', '.join(no_data)}")
    lines.append(f"report: {report_location(MlflowClient(), result.run_id)}")
    return "\n".join(lines)
