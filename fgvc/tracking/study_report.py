"""The study run's files: the tables (CSV, Markdown), the figures and the HTML report, and the
verdict summary that becomes the study run's description."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow.tracking import MlflowClient

from fgvc.analysis.methods import METHODS
from fgvc.analysis.methods.attribution import AttributionMethod
from fgvc.files import write_csv
from fgvc.study.config import StudyPlan
from fgvc.study.tables import columns, markdown_tables, report_tables
from fgvc.tracking.markdown import code
from fgvc.viz.report import Example, build_report, save_dose_response, save_regime_bars, save_reliance_scatter

if TYPE_CHECKING:
    from fgvc.tracking.study_run import CellResult

log = logging.getLogger("fgvc")

EXAMPLES_PER_METHOD = 2


def _download(run_id: str, artifact: str, dst: Path) -> Path | None:
    dst.mkdir(parents=True, exist_ok=True)
    try:
        return Path(MlflowClient().download_artifacts(run_id, artifact, str(dst)))
    except Exception as e:  # an example missing from one cell must not sink the report
        log.warning("study report: %s of run %s unavailable (%s)", artifact, run_id, e)
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


NOTES = (
    "Does a classifier recognise the garment, or the runway? Each cell trains one architecture on one data regime "
    "with one seed; every trained model is then probed. The verdict comes from the background-swap test, which "
    "changes the input and watches the prediction: a model reads the runway when the backdrop alone (No-FG) "
    "predicts the designer above chance and a backdrop of the right designer helps a pasted person (BG-gap > 0), "
    "both with their 95% intervals; it reads the garment when the person alone (Only-FG) suffices and neither "
    "holds. Intervals are bootstrap 95% intervals over the analysed images.",
    "Background preference (the headline of the attribution methods) is the share of attribution on the "
    "background divided by the background's share of the image: 1 means no preference, above 1 attention on the "
    "backdrop. The raw share beside it has no baseline (a uniform map already scores about the background's area "
    "share). Grad-CAM and occlusion can disagree: Grad-CAM reads gradients at one layer (a coarse map whose cells "
    "each cover figure and backdrop), occlusion measures the logit drop when a window is blanked out, i.e. use at "
    "the input's resolution; where they differ, occlusion and the swap test are the closer measures of use.",
    "Grad-CAM, occlusion and retrieval run on the validation images of the cell's own regime (masked cells on "
    "masked images); the background-swap test runs on the source images for every cell. No-FG removes the person "
    "and fills its whole bounding region from the backdrop around it, so no silhouette is left to read; "
    "Mixed-Same / Mixed-Rand paste the person on the No-FG backdrop of another image of the same / a different "
    "designer.",
)


def write_outputs(client: MlflowClient, run_id: str, plan: StudyPlan, roots: dict, image_size, num_classes: int,
                  results: list[CellResult], rows: list[dict], summary: list[dict]) -> str:
    """The study run's files; returns the Markdown verdict summary (the run's description)."""
    chance = 1.0 / num_classes
    cols = columns()
    with tempfile.TemporaryDirectory(prefix="fgvc-study-") as tmp:
        tmp = Path(tmp)
        out = tmp / "study"
        out.mkdir()
        write_csv(out / "results.csv", rows)
        write_csv(out / "summary.csv", summary)
        tables = markdown_tables(rows, summary, chance)
        (out / "results.md").write_text(f"# Background-reliance study `{run_id}`\n\n{tables}", encoding="utf-8")
        figures = [Example("Validation accuracy against background reliance, one point per cell",
                           save_reliance_scatter(out / "accuracy_vs_background_reliance.png", rows, chance)),
                   Example("Per-regime values (error bars: spread across seeds, or the 95% interval for one seed)",
                           save_regime_bars(out / "regime_bars.png", summary, cols, chance=chance))]
        if len(plan.bg_correlations) > 1:
            figures.insert(0, Example("Dose-response: each measure against the planted shortcut strength",
                                      save_dose_response(out / "dose_response.png", summary, chance)))
        setup = {"study run": run_id, "source data": ", ".join(f"{r.source} (digest {r.source_digest})"
                                                               for r in roots.values()),
                 "masked data": ", ".join(f"{r.masked} (segmenter {r.segmenter})" for r in roots.values()
                                          if r.masked) or "none",
                 "grid": f"{', '.join(plan.archs)} × {', '.join(plan.regimes)} × seeds "
                         f"{', '.join(map(str, plan.seeds))}" + (
                             f" × shortcut strengths {', '.join(f'{b:g}' for b in plan.bg_correlations)}"
                             if len(plan.bg_correlations) > 1 else ""),
                 "training": f"{plan.epochs} epochs, batch {plan.batch_size}, lr_head {plan.lr_head}; validation "
                             f"accuracy = best epoch (best/val_acc)",
                 "analysis": f"{plan.num_images} validation images per cell (seed 0); bootstrap 95% intervals",
                 "classes": f"{num_classes} (chance {chance:.3f})", "image size": f"{image_size[0]}x{image_size[1]}"}
        page = build_report(f"Background-reliance study ({plan.preset})", setup, report_tables(rows, summary, chance),
                            figures, _examples(results, plan.regimes, tmp / "downloads"), notes=NOTES)
        (out / "report.html").write_text(page, encoding="utf-8")
        client.log_artifacts(run_id, str(out), "study")
    lines = [f"Background-reliance study ({plan.preset}): {len(rows)} cells.", ""]
    lines += [f"- {code(r['run_name'])}: **{r['verdict']}** ({r['verdict_reason']})" for r in rows]
    lines += ["", "Tables: `study/results.md`, `study/results.csv`; report: `study/report.html`."]
    return "\n".join(lines)
