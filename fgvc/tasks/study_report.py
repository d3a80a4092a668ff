"""The study run's files: the tables (CSV, Markdown), the figures and the HTML report, and the
verdict summary that becomes the study run's description; the verdict tags and comparison
metrics on the cells' training runs.

Per-image tables are read per cell (its key, ``Cell.key``), never per training run: cells with
identical training pixels share one training (the masked cells of a dose-response grid) while
each has its own analysis records. On a training run that serves one cell of the study, the
cell's tags and metrics have their plain names (``fgvc.verdict``, ``fgvc.quality``,
``fgvc.report_split``, ``fgvc.verdict_note``, ``compare/<name>``). A run shared by several
cells carries each cell's under names of its own, ``<name>.<suffix>``, the suffix naming what
tells the cells apart: the shortcut strength and split (``fgvc.verdict.bg0``,
``compare/bg_gap.bg0.5``, ``fgvc.verdict.bg1.show-split``; the cell key where those do not
differ), so no cell's verdict or numbers replace another's."""

from __future__ import annotations

import csv
import logging
import math
import tempfile
import time
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from fgvc.analysis.methods import METHODS
from fgvc.analysis.methods.attribution import AttributionMethod
from fgvc.files import write_csv
from fgvc.study.config import StudyPlan
from fgvc.study.records import CellResult, StudyResult
from fgvc.study.leak import leak_paragraph, leak_table, show_leak
from fgvc.study.render import interval_statement, markdown_tables, report_tables, terminal_table
from fgvc.study.tables import (ATTRIBUTION, DID_NOT_LEARN, NO_DATA, QUALITY_FACTOR, add_comparisons,
                               attribution_vs_swap, columns, report_split)
from fgvc.tracking.markdown import code
from fgvc.tracking.runs import git_commit
from fgvc.viz.report import Example, build_report, save_dose_response, save_regime_bars, save_reliance_scatter

log = logging.getLogger("fgvc")

EXAMPLES_PER_METHOD = 2


def _download(run_id: str, artifact: str, dst: Path, consequence: str = "") -> Path | None:
    dst.mkdir(parents=True, exist_ok=True)
    try:
        return Path(MlflowClient().download_artifacts(run_id, artifact, str(dst)))
    except Exception as e:  # an example missing from one cell must not sink the report
        log.warning("study report: %s of run %s unavailable (%s)%s", artifact, run_id,
                    (str(e).splitlines() or [type(e).__name__])[0], consequence)
        return None


def _examples(results: list[CellResult], regimes: tuple[str, ...], tmp: Path) -> dict[str, list[Example]]:
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


PER_IMAGE_METHODS = (*ATTRIBUTION, "shortcut")
LIBRARIES = ("torch", "torchvision", "timm", "mlflow", "numpy")


def _per_image(results: list[CellResult], tmp: Path) -> dict[tuple[str, str], dict[str, list]]:
    """(cell key, method) -> the columns of the method's per_image.csv in the cell's record. A
    missing file is warned about (record and file): the cell's numbers that need it are NaN, and
    without an attribution table its quality is "undecided (no data)"."""
    out = {}
    for result in results:
        for method in PER_IMAGE_METHODS:
            if method not in result.records:
                continue
            record = result.records[method]
            path = _download(record, f"analysis/{method}/per_image.csv", tmp / record / method,
                             f": study cell {result.cell.key} has no per-image {method} numbers")
            if path is None:
                continue
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                table: dict[str, list] = {k: [] for k in reader.fieldnames or ()}
                for line in reader:
                    for k, v in line.items():
                        table[k].append(_number(v))
            out[(result.cell.key, method)] = table
    return out


def _number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


def complete_rows(client: MlflowClient, results: list[CellResult], rows: list[dict], roots: dict,
                  chance: float) -> tuple[list[dict], list[dict]]:
    """Finish the rows (split, accuracy, quality gate, excess over the masked twin, sanity
    columns, show leak) from the records' per-image files, tag and chart the cells, and return
    the paired regime differences and the show leak (fgvc.study.leak; [] without the split axis)."""
    for row, result in zip(rows, results):
        row["split"] = report_split(roots[result.cell.data].root(result.cell))
    with tempfile.TemporaryDirectory(prefix="fgvc-per-image-") as tmp:
        per_image = _per_image(results, Path(tmp))
        differences = add_comparisons(rows, per_image, chance)
        leak = show_leak(rows, per_image)
    tag_cells(client, rows)
    return differences, leak


def cell_tags(row: dict) -> dict[str, str]:
    """The tags a cell run carries so the UI can filter and group by outcome."""
    return {"fgvc.verdict": row["verdict"], "fgvc.quality": row.get("quality", ""),
            "fgvc.report_split": row.get("split", "val"),
            **({"fgvc.verdict_note": row["leak_note"]} if row.get("leak_note") else {})}


def chart_metrics(row: dict) -> dict[str, float]:
    """The cell's comparison numbers, logged once at step 0 so the chart view draws them as
    bars across cells (a metric with one step per run is a bar chart there); NaN where a cell
    has no such number, so every cell has the same metric names."""
    split = row.get("split", "val")
    values = {"compare/best_val_acc": row.get("val_acc"), f"compare/{split}_acc": row.get("acc"),
              f"compare/{split}_acc_source_images": row.get("acc_source"),
              "compare/no_fg_vs_chance": row.get("no_fg_vs_chance"), "compare/bg_gap": row.get("bg_gap")}
    for method in ATTRIBUTION:
        values[f"compare/{method}_excess_vs_masked_twin"] = row.get(f"{method}_excess")
        values[f"compare/{method}_bg_preference"] = row.get(f"{method}_bg_preference")
    if row.get("split_by"):  # a grid over random and show splits: the leak, random minus show
        values.update({"compare/show_leak_acc": row.get("leak_acc"), "compare/show_leak_bg_gap": row.get("leak_bg_gap")})
    out = {}
    for k, v in values.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            out[k] = math.nan
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


def _versions() -> str:
    found = []
    for name in LIBRARIES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def _sanity_figures(results: list[CellResult], tmp: Path) -> list[Example]:
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


NOTES = (
    "Does a classifier recognise the garment, or the runway? Each cell trains one architecture on one data regime "
    "with one seed; every trained model is then probed. The verdict comes from the background-swap test, which "
    "changes the input and watches the prediction: a model reads the runway when the backdrop alone (No-FG) "
    "predicts the designer above chance and a backdrop of the right designer helps a pasted person (BG-gap > 0), "
    "both with their 95% intervals; it reads the garment when the person alone (Only-FG) suffices and neither "
    "holds. A cell whose accuracy's interval does not clear "
    f"{QUALITY_FACTOR:g} x chance did not learn: it gets no verdict and its numbers are greyed; so does a cell "
    f"whose per-image accuracy could not be read (quality '{NO_DATA}').",
    "Attribution is read against the masked twin: the same architecture, seed and shortcut strength trained on "
    "background-removed images, explained on the same images (background-removed, as it was trained). The "
    "occlusion fill is the image's mean colour: a black fill would change nothing on the twin's black "
    "background and give it no background attribution by construction. The headline is the excess background "
    "preference, "
    "the unmasked cell's minus its twin's, with a paired bootstrap interval; above 0 means more attribution on the "
    "backdrop than a network that cannot use it. Background preference alone (share of attribution on the "
    "background over the background's share of the image, beside it as raw) has no fixed no-reliance value: a "
    "network that ignores the background does not score 1, its masked twin's score is the reference. Grad-CAM "
    "and occlusion can disagree: Grad-CAM reads gradients at one layer (a coarse map whose cells each cover "
    "figure and backdrop), occlusion measures the logit drop when a window is blanked out, i.e. use at the "
    "input's resolution. Each architecture's maps are sanity-checked by randomising the network (Adebayo et al., "
    "NeurIPS 2018): a method whose maps survive full randomisation is flagged.",
    "Grad-CAM, occlusion and retrieval run on the test images (val when a root has no test split) of the cell's "
    "own regime (masked cells on masked images); the background-swap test runs on the source images for every "
    "cell. No-FG removes the person "
    "and fills its whole bounding region from the backdrop around it, so no silhouette is left to read; "
    "Mixed-Same / Mixed-Rand paste the person on the No-FG backdrop of another image of the same / a different "
    "designer.",
)


def write_outputs(client: MlflowClient, run_id: str, plan: StudyPlan, roots: dict, image_size, num_classes: int,
                  results: list[CellResult], rows: list[dict], summary: list[dict],
                  differences: list[dict] = (), leak: list[dict] = ()) -> str:
    """The study run's files; returns the Markdown verdict summary (the run's description)."""
    chance = 1.0 / num_classes
    split = rows[0].get("split", "val") if rows else "val"
    cols = columns(split)
    relation = attribution_vs_swap(rows)
    leaked = leak_paragraph(leak)
    # the figures draw one bar (or line) per regime: a split of a show-leak grid is part of it
    plotted = [{**x, "regime": f"{x['regime']} ({x['split_by']} split)"} if x.get("split_by") else x for x in summary]
    extra = [leak_table(leak)] if leak else []
    with tempfile.TemporaryDirectory(prefix="fgvc-study-") as tmp:
        tmp = Path(tmp)
        out = tmp / "study"
        out.mkdir()
        write_csv(out / "results.csv", rows)
        write_csv(out / "summary.csv", summary)
        if differences:
            write_csv(out / "regime_differences.csv", differences)
        if leak:
            write_csv(out / "show_leak.csv", leak)
        tables = markdown_tables(rows, summary, chance, differences, extra)
        intro = "\n\n".join(p for p in (relation, leaked) if p)
        (out / "results.md").write_text(f"# Background-reliance study `{run_id}`\n\n{intro}\n\n{tables}",
                                        encoding="utf-8")
        figures = [Example(f"{split.capitalize()} accuracy against background reliance, one point per cell",
                           save_reliance_scatter(out / "accuracy_vs_background_reliance.png", rows, chance)),
                   Example("Per-regime values (error bars: spread across seeds, or the 95% interval for one seed)",
                           save_regime_bars(out / "regime_bars.png", plotted, cols, chance=chance)),
                   *_sanity_figures(results, tmp / "downloads")]
        if len(plan.bg_correlations) > 1:
            figures.insert(0, Example("Dose-response: each measure against the planted shortcut strength",
                                      save_dose_response(out / "dose_response.png", plotted, chance)))
        setup = {"study run": run_id, "source data": ", ".join(f"{r.source} (digest {r.source_digest})"
                                                               for r in roots.values()),
                 "masked data": ", ".join(f"{r.masked} (segmenter {r.segmenter})" for r in roots.values()
                                          if r.masked) or "none",
                 "grid": f"{', '.join(plan.archs)} × {', '.join(plan.regimes)} × seeds "
                         f"{', '.join(map(str, plan.seeds))}" + (
                             f" × shortcut strengths {', '.join(f'{b:g}' for b in plan.bg_correlations)}"
                             if len(plan.bg_correlations) > 1 else "") + (
                             f" × splits {', '.join(plan.splits)} (the same images)" if plan.splits != (None,) else ""),
                 "planted shortcut strength": ", ".join(
                     f"{r.demo.bg_correlation:g}" for r in roots.values() if r.demo is not None) or
                     "none planted (not demo data)",
                 "training": f"{plan.epochs} epochs, batch {plan.batch_size}, lr_head {plan.lr_head}; best epoch "
                             f"chosen on val (best/val_acc)",
                 "reported split": f"{split}" + ("" if split == "test" else " (the roots have no test split: "
                                                 "numbers come from the split that chose the epoch, optimistic)"),
                 "analysis": f"{plan.num_images} {split} images per cell (seed 0); {interval_statement(rows)}",
                 "quality gate": f"accuracy's 95% interval above {QUALITY_FACTOR:g} x chance "
                                 f"({QUALITY_FACTOR * chance:.3f})",
                 "classes": f"{num_classes} (chance {chance:.3f})",
                 "image size": f"{image_size[0]}×{image_size[1]} (height × width)",
                 "commit": git_commit(), "libraries": _versions()}
        page = build_report(f"Background-reliance study ({plan.preset})", setup,
                            report_tables(rows, summary, chance, differences, extra), figures,
                            _examples(results, plan.regimes, tmp / "downloads"),
                            notes=(*NOTES, relation, *([leaked] if leaked else [])))
        (out / "report.html").write_text(page, encoding="utf-8")
        client.log_artifacts(run_id, str(out), "study")
    did_not_learn = sum(r.get("quality") == DID_NOT_LEARN for r in rows)
    no_data = sum(r.get("quality") == NO_DATA for r in rows)
    lines = [f"Background-reliance study ({plan.preset}): {len(rows)} cells"
             + (f", {did_not_learn} did not learn (no verdict)" if did_not_learn else "")
             + (f", {no_data} without per-image data (no verdict)" if no_data else "") + ".", ""]
    lines += [f"- {code(r['run_name'])}: **{r['verdict']}** ({r['verdict_reason']})" for r in rows]
    lines += ["", relation] + (["", leaked] if leaked else [])
    lines += ["", "Tables: `study/results.md`, `study/results.csv`; report: `study/report.html`."]
    return "\n".join(lines)
