"""`study`: the background-reliance study as one parent run with a child run per cell.

Each cell is an ordinary training run (`run_train`) in the study's experiment, tagged
``fgvc.study`` = the study run (not nested under it: the MLflow UI charts only top-level runs
by default, so nesting would hide the cells), so every cell has the same param and metric
names and the chart and compare views line them up, one line per cell. On each trained model the study
runs the attribution methods and neighbours on the validation images of the cell's own
regime, and the background-swap test on the source images (it needs real backdrops). Those
are analysis records (fgvc.tracking.analyze_run, experiment fgvc-analysis: they take no
slot in the study's chart view) and the study shows them on each cell's run. The table is
built from the records, so the study's numbers are the ones on the cells' pages.

Re-running a study reuses finished cells (training-config digest ``fgvc.config_id`` and
dataset digest ``fgvc.dataset_digest``) and analysis records with the same settings id; a
cell whose training was interrupted resumes from its last checkpoint. So an interrupted study
continues where it stopped.

The parent is driven through the client: the cells' own runs use the fluent API and must not
find the parent active.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from fgvc.analysis.config import AnalyzeConfig
from fgvc.analysis.methods import METHODS
from fgvc.config import digest
from fgvc.data.dataset import ShardDataset
from fgvc.data.demo import DemoConfig
from fgvc.data.roots import DEFAULT_DATA_ROOT, ensure_demo, resolve_root
from fgvc.data.shards import dataset_digest, read_meta, validate_root
from fgvc.errors import ConfigError
from fgvc.masking import MaskConfig
from fgvc.study.config import PRESETS, Cell, StudyConfig, StudyPlan
from fgvc.study.tables import (DID_NOT_LEARN, RUNWAY, STUDY_OCCLUSION_FILL, cell_values, report_split, runs_sanity,
                               summarize, verdict, verdict_reason)
from fgvc.tracking.analyze_run import run_analyze
from fgvc.tracking.mask_run import run_mask
from fgvc.tracking.study_report import complete_rows, write_outputs
from fgvc.tracking.runs import (DESCRIPTION, TASK, configure_tracking, describe_experiment, ending, experiment_id,
                                git_commit, log_params)
from fgvc.tracking.train_run import checkpoint_cache, run_train
from fgvc.training.config import TrainConfig

log = logging.getLogger("fgvc")

EXPERIMENT_DESCRIPTION = ("Background-reliance studies: a study run per study (tables, figures, report.html, the "
                          "verdicts in its description) and a training run per cell, tagged fgvc.study with its "
                          "study run; open 'Model training' and use Chart or Compare to see the cells side by side.")
DEFAULT_SEGMENTER = "deeplabv3_resnet101"
ATTRIBUTION_AND_RETRIEVAL = tuple(METHODS.where(lambda m: m.in_all))


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

def demo_root_for(demo: DemoConfig) -> Path:
    """`data/demo` for the default demo, `data/demo-<preset>` for a preset's, else
    `data/demo-<digest of the config>`: one root per distinct demo configuration."""
    if demo == DemoConfig():
        return Path(DEFAULT_DATA_ROOT)
    for name, preset in PRESETS.items():
        if preset["demo"] == demo:
            return Path(f"{DEFAULT_DATA_ROOT}-{name}")
    return Path(f"{DEFAULT_DATA_ROOT}-{digest({k: repr(v) for k, v in asdict(demo).items()})[:8]}")


@dataclass
class Roots:
    """Where one shortcut strength's regimes get their images, and the roots' digests."""

    source: Path
    source_digest: str
    source_has_masks: bool
    masked: Path | None
    masked_digest: str | None
    segmenter: str | None
    demo: DemoConfig | None

    def root(self, cell: Cell) -> Path:
        return self.masked if cell.spec.masked else self.source

    def digest(self, cell: Cell) -> str:
        return self.masked_digest if cell.spec.masked else self.source_digest

    def mask_root_for(self, root: Path) -> str | None:
        """A root with person masks for `root`'s images, when its own shards have none."""
        if root == self.source and not self.source_has_masks and self.masked is not None:
            return str(self.masked)
        return None


def prepare_roots(plan: StudyPlan, bg_correlation: float | None, progress: bool) -> Roots:
    """Resolve (and if needed generate) the source root; build the masked root when a masked
    regime needs it, or when the source has no person masks for the shortcut test."""
    demo = None
    if plan.data_root is None:
        demo = plan.demo_for(bg_correlation)
        source = ensure_demo(demo_root_for(demo), demo)
    else:
        source = resolve_root(plan.data_root)
    info = validate_root(source)
    source_digest = dataset_digest(source)
    has_masks = info.has_masks or "masks" in ShardDataset(source, "val").keys
    masked = masked_digest = segmenter = None
    if any(c.spec.masked for c in plan.cells()) or not has_masks:
        masked = Path(plan.masked_root) if plan.masked_root and bg_correlation is None else \
            source.parent / f"{source.name}-masked"
        segmenter = plan.segmenter or ("groundtruth" if has_masks else DEFAULT_SEGMENTER)
        if not (masked / "meta.json").exists():
            log.info("study: masking %s into %s (segmenter %s)", source, masked, segmenter)
            run_mask(MaskConfig(src_root=str(source), dst_root=str(masked), segmenter=segmenter, device=plan.device),
                     progress=progress)
        meta = read_meta(masked)
        if meta.get("source_digest") not in (None, source_digest):
            raise ConfigError(f"{masked} was masked from a dataset with digest {meta['source_digest']}, not "
                              f"{source} ({source_digest}); pass --masked-root <a new folder>")
        segmenter = (meta.get("masking") or {}).get("segmenter") or segmenter
        masked_digest = dataset_digest(masked)
    return Roots(source, source_digest, has_masks, masked, masked_digest, segmenter, demo)


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------

def train_config(plan: StudyPlan, cell: Cell, roots: Roots, resume: bool | str = False) -> TrainConfig:
    """The cell's training: the same TrainConfig a single `fgvc train` with these options builds."""
    return TrainConfig(arch=cell.arch, pretrained=plan.pretrained, data_root=str(roots.root(cell)),
                       aug=cell.spec.augment, epochs=plan.epochs, batch_size=plan.batch_size, lr_head=plan.lr_head,
                       seed=cell.seed, num_workers=plan.num_workers, device=plan.device,
                       registered_model=plan.registered_model, resume=resume)


def analysis_configs(plan: StudyPlan, cell: Cell, roots: Roots, model_uri: str,
                     image_size: tuple[int, int]) -> list[AnalyzeConfig]:
    """The cell's analyses: attribution and neighbours on its own regime's images, the
    background swaps on the source images, on the test split when the root has one. The
    occlusion window defaults to a third of the shorter image side, the stride to half the
    window; the fill is the image's mean colour (see fgvc.study.tables.STUDY_OCCLUSION_FILL)."""
    window = plan.occlusion_window or max(4, round(min(image_size) / 3))
    stride = min(plan.occlusion_stride or max(1, window // 2), window)
    common = dict(model=model_uri, num_images=plan.num_images, seed=0, window=window, stride=stride,
                  fill=STUDY_OCCLUSION_FILL, show_on_training_run=True, device=plan.device)
    own = roots.root(cell)
    configs = [AnalyzeConfig(method=ATTRIBUTION_AND_RETRIEVAL, data_root=str(own), mask_root=roots.mask_root_for(own),
                             split=report_split(own), **common),
               AnalyzeConfig(method=("shortcut",), data_root=str(roots.source),
                             mask_root=roots.mask_root_for(roots.source), split=report_split(roots.source), **common)]
    if runs_sanity(plan.cells(), cell):  # the maps' sanity check, once per architecture
        configs.append(configs[0].replace(method=("sanity",), show_on_training_run=False))
    return configs


@dataclass
class CellResult:
    cell: Cell
    run_id: str
    status: str  # trained | resumed | reused
    model_uri: str
    analyses: dict[str, dict[str, float]]  # method -> metrics of its record
    records: dict[str, str]  # method -> record run id


def _cell_runs(client: MlflowClient, experiment: str, config_id: str, digest: str) -> list:
    return client.search_runs([experiment], f"tags.`fgvc.config_id` = '{config_id}' and "
                                            f"tags.`fgvc.dataset_digest` = '{digest}'",
                              order_by=["attributes.start_time DESC"], max_results=50)


def _resumable(client: MlflowClient, run_id: str) -> bool:
    uploaded = any(a.path == "checkpoints/last.pt" for a in client.list_artifacts(run_id, "checkpoints"))
    return uploaded or (checkpoint_cache(run_id) / "last.pt").is_file()


def _run_cell(client: MlflowClient, plan: StudyPlan, cell: Cell, roots: Roots, parent_id: str,
              experiment_name: str, experiment: str, image_size: tuple[int, int], progress: bool) -> CellResult:
    tags = {"fgvc.study": parent_id, "fgvc.study_cell": cell.key}
    if cell.bg_correlation is not None:
        tags["fgvc.bg_correlation"] = f"{cell.bg_correlation:g}"
    cfg = train_config(plan, cell, roots)
    runs = _cell_runs(client, experiment, cfg.identity(), roots.digest(cell))
    finished = next((r for r in runs if r.info.status == "FINISHED" and "fgvc.model_version" in r.data.tags), None)
    interrupted = None if finished else next(
        (r for r in runs if r.info.status in ("RUNNING", "KILLED", "FAILED") and _resumable(client, r.info.run_id)),
        None)
    if finished is not None:
        run_id, status = finished.info.run_id, "reused"
        log.info("study: %s reuses run %s", cell.key, run_id)
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    else:
        status = "resumed" if interrupted else "trained"
        log.info("study: %s %s", cell.key, f"resumes run {interrupted.info.run_id}" if interrupted else "trains")
        if interrupted is not None:
            cfg = cfg.replace(resume=interrupted.info.run_id)
            mlflow.set_experiment(experiment_id=experiment)  # resuming continues a run of this experiment
        run_id = run_train(cfg, progress=progress, experiment=experiment_name, tags=tags).run_id
        if interrupted is not None:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    client.set_tag(run_id, "mlflow.runName", cell.run_name)
    model_uri = f"models:/{client.get_run(run_id).data.tags['fgvc.model_version']}"
    analyses, records = {}, {}
    for analysis in analysis_configs(plan, cell, roots, model_uri, image_size):
        outcome = run_analyze(analysis, reuse=True)
        analyses.update(outcome.metrics)
        records.update({m: outcome.reused.get(m, outcome.record_run_id) for m in outcome.metrics})
    return CellResult(cell, run_id, status, model_uri, analyses, records)


def cell_row(client: MlflowClient, result: CellResult, chance: float) -> dict:
    """The study-table row of a finished cell: best-epoch metrics from its training run, every
    analysis number from the records the study computed (or reused)."""
    metrics = client.get_run(result.run_id).data.metrics
    row = {"arch": result.cell.arch, "regime": result.cell.regime, "bg_correlation": result.cell.bg_correlation,
           "seed": result.cell.seed, "run_name": result.cell.run_name, "run_id": result.run_id,
           "status": result.status, "model": result.model_uri,
           "chance": chance, **cell_values(metrics, result.analyses)}
    row["verdict"] = verdict(row, chance)
    row["verdict_reason"] = verdict_reason(row, chance)
    return row


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _without_env_run() -> Iterator[str | None]:
    """`mlflow run` hands its run to the process as MLFLOW_RUN_ID; the fluent API would adopt
    it for every run started inside (the cells). It is the study run, so hide it meanwhile."""
    saved = os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        yield saved
    finally:
        if saved is not None:
            os.environ["MLFLOW_RUN_ID"] = saved


def _start_parent(client: MlflowClient, plan: StudyPlan, env_run_id: str | None) -> tuple[str, str]:
    """(run id, experiment name) of the study run: the one `mlflow run` made, or a new one."""
    name = f"study-{plan.preset}"
    if env_run_id:
        client.set_tag(env_run_id, "mlflow.runName", name)  # `mlflow run` names its runs at random
        return env_run_id, client.get_experiment(client.get_run(env_run_id).info.experiment_id).name
    describe_experiment(plan.experiment, EXPERIMENT_DESCRIPTION)
    run = client.create_run(experiment_id(plan.experiment), run_name=name)
    return run.info.run_id, plan.experiment


@dataclass
class StudyResult:
    run_id: str
    experiment_id: str
    cells: list[CellResult]
    rows: list[dict]
    summary: list[dict]
    seconds: float


def run_study(cfg: StudyConfig, progress: bool = True) -> StudyResult:
    """Mask (once per source), train and analyse every cell, and write the table, figures and
    report to the study run; FINISHED on success, KILLED on Ctrl-C, FAILED on an error."""
    configure_tracking()
    client = MlflowClient()
    plan = cfg.plan()
    start = time.perf_counter()
    with _without_env_run() as env_run_id:
        run_id, experiment_name = _start_parent(client, plan, env_run_id)
        experiment = client.get_run(run_id).info.experiment_id
        with ending(run_id, fluent=False):
            client.log_batch(run_id, tags=[RunTag(TASK, "study"), RunTag("fgvc.git_commit", git_commit()),
                                           RunTag(DESCRIPTION, f"Background-reliance study ({plan.preset}), "
                                                               f"{len(plan.cells())} cells: running.")])
            log_params(cfg.params(), run_id)
            roots = {b: prepare_roots(plan, b, progress) for b in plan.bg_correlations}
            first = roots[plan.bg_correlations[0]]
            info = validate_root(first.source)
            log_params({"experiment": experiment_name, "cells": len(plan.cells()), "epochs_effective": plan.epochs,
                        "archs_effective": ",".join(plan.archs), "regimes_effective": ",".join(plan.regimes),
                        "seeds_effective": ",".join(map(str, plan.seeds)), "num_images_effective": plan.num_images,
                        "data_root_effective": ",".join(str(r.source) for r in roots.values()),
                        "dataset_digest": ",".join(r.source_digest for r in roots.values()),
                        "segmenter_effective": first.segmenter or "none", "num_classes": info.num_classes,
                        "image_size": f"{info.image_size[0]}x{info.image_size[1]}",
                        **({f"demo.{k}": v for k, v in asdict(first.demo).items()} if first.demo else {})}, run_id)
            results = []
            cells = plan.cells()
            for index, cell in enumerate(cells, start=1):
                log.info("study: cell %d/%d %s", index, len(cells), cell.key)
                results.append(_run_cell(client, plan, cell, roots[cell.bg_correlation], run_id, experiment_name,
                                         experiment, info.image_size, progress))
            chance = 1.0 / info.num_classes
            rows = [cell_row(client, r, chance) for r in results]
            differences = complete_rows(client, results, rows, roots, chance)
            summary = summarize(rows)
            description = write_outputs(client, run_id, plan, roots, info.image_size, info.num_classes, results,
                                        rows, summary, differences)
            seconds = time.perf_counter() - start
            counts = {s: sum(r.status == s for r in results) for s in ("trained", "resumed", "reused")}
            now = int(time.time() * 1000)
            totals = {"study/cells": len(results), **{f"study/cells_{k}": v for k, v in counts.items()},
                      "study/cells_reading_the_runway": sum(r["verdict"] == RUNWAY for r in rows),
                      "study/cells_did_not_learn": sum(r.get("quality") == DID_NOT_LEARN for r in rows),
                      "time/study_s": seconds}
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in totals.items()],
                             tags=[RunTag(DESCRIPTION, description)])
    log.info("study %s: %d cells (%s) in %.0f s; report: study/report.html", run_id, len(results),
             ", ".join(f"{v} {k}" for k, v in counts.items() if v), seconds)
    return StudyResult(run_id, experiment, results, rows, summary, seconds)
