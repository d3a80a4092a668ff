"""One study cell (train + its analyses) as a plain function of one job: the same runner serves
every executor (this process, `fgvc study --cell`, a Ray task), and nothing in it knows which.

A cell is found again by what was asked of its training (`fgvc.request_id`: the training config
without the device recipe, the same from any machine; `fgvc.config_id` for runs logged before
that tag, equal on the CPU) and the pixels it trains on (`fgvc.pixels_digest`; also
`fgvc.dataset_digest` for runs logged before that tag existed), so two cells whose training
images are identical (the masked roots of a dose-response study) share one training, and a
CPU node collects cells trained on GPUs. What a training ran on is recorded beside it
(`fgvc.device_recipe`, and `fgvc.config_id`, which adds the recipe to the request). Training is
claimed (fgvc.tracking.claims) under that identity, so of any number of attempts (retries, two
identical studies, a Slurm array run twice) one trains while the others wait and reuse its
run; an attempt that died leaves a run that the next attempt resumes from its checkpoint when
it ran with this machine's device recipe (a GPU never continues a CPU run, nor the other way
round), or closes as KILLED, saying why in `fgvc.end_reason`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from fgvc.analysis.config import AnalyzeConfig
from fgvc.analysis.methods import METHODS
from fgvc.config import digest
from fgvc.errors import ConfigError
from fgvc.mlflow_names import registered_name, study_registered_name
from fgvc.study.config import Cell, StudyPlan
from fgvc.study.records import CellResult, Roots
from fgvc.study.tables import STUDY_OCCLUSION_FILL, report_split, runs_sanity
from fgvc.tasks.analyze import run_analyze
from fgvc.tasks.train import checkpoint_cache, run_train
from fgvc.tracking.claims import Claim, claimed
from fgvc.tracking.runs import configure_tracking, experiment_id
from fgvc.tracking.search import find_runs
from fgvc.training.config import TrainConfig

log = logging.getLogger("fgvc")

ATTRIBUTION_AND_RETRIEVAL = tuple(METHODS.where(lambda m: m.in_all))
PIXELS = "fgvc.pixels_digest"
REQUEST = "fgvc.request_id"


def train_config(plan: StudyPlan, cell: Cell, roots: Roots, resume: bool | str = False) -> TrainConfig:
    """The cell's training: the same TrainConfig a single `fgvc train` with these options builds."""
    return TrainConfig(arch=cell.arch, pretrained=plan.pretrained, data_root=str(roots.root(cell)),
                       aug=cell.spec.augment, epochs=plan.epochs, batch_size=plan.batch_size, lr_head=plan.lr_head,
                       seed=cell.seed, num_workers=plan.num_workers, device=plan.device,
                       registered_model=plan.registered_model or study_registered_name(registered_name(cell.arch)),
                       resume=resume)


def analysis_configs(plan: StudyPlan, cell: Cell, roots: Roots, model_uri: str,
                     image_size: tuple[int, int]) -> list[AnalyzeConfig]:
    """The cell's analyses: attribution and neighbours on its own regime's images, the
    background swaps on the source images, on the test split when the root has one. The
    occlusion window defaults to a third of the shorter image side, the stride to half the
    window; the fill is the image's mean colour (see fgvc.study.tables.STUDY_OCCLUSION_FILL)."""
    window = plan.occlusion_window or max(4, round(min(image_size) / 3))
    stride = min(plan.occlusion_stride or max(1, window // 2), window)
    common: dict[str, Any] = dict(model=model_uri, num_images=plan.num_images, seed=0, window=window, stride=stride,
                  fill=STUDY_OCCLUSION_FILL, show_on_training_run=True, device=plan.device)
    own = roots.built(cell)[0]
    configs = [AnalyzeConfig(method=ATTRIBUTION_AND_RETRIEVAL, data_root=str(own), mask_root=roots.mask_root_for(own),
                             split=report_split(own), **common),
               AnalyzeConfig(method=("shortcut",), data_root=str(roots.source),
                             mask_root=roots.mask_root_for(roots.source), split=report_split(roots.source), **common)]
    if runs_sanity(plan.cells(), cell):  # the maps' sanity check, once per architecture
        configs.append(configs[0].replace(method=("sanity",), show_on_training_run=False))
    return configs


@dataclass(frozen=True)
class CellJob:
    """What a cell needs, picklable (a Ray task receives it): paths are absolute, the tracking
    URI explicit. `study_run_id` None: a cell run on its own (`fgvc study --cell`); `collect`:
    only find the finished training, never train."""

    plan: StudyPlan
    cell: Cell
    roots: Roots
    study_run_id: str | None
    experiment: str
    image_size: tuple[int, int]
    tracking_uri: str
    collect: bool = False
    progress: bool = False


def cell_runs(client: MlflowClient, experiment: str, request_id: str, roots: Roots, cell: Cell) -> list:
    """The cell's training runs on any device, newest first: by the request id (or, for runs
    logged before it was tagged, the config id, which equals it on the CPU), and by the pixels
    they trained on (or the root's digest, for runs logged before pixel digests were tagged)."""
    runs = {}
    for asked in (REQUEST, "fgvc.config_id"):
        for tag, value in ((PIXELS, roots.pixels(cell)), ("fgvc.dataset_digest", roots.digest(cell))):
            for run in find_runs({asked: request_id, tag: str(value)}, [experiment]):
                runs[run.info.run_id] = run
    return sorted(runs.values(), key=lambda r: r.info.start_time, reverse=True)


def finished_run(runs: list):
    return next((r for r in runs if r.info.status == "FINISHED" and "fgvc.model_version" in r.data.tags), None)


def _resumable(client: MlflowClient, run) -> bool:
    uploaded = any(a.path == "checkpoints/last.pt" for a in client.list_artifacts(run.info.run_id, "checkpoints"))
    return uploaded or (checkpoint_cache(run.info.run_id) / "last.pt").is_file()


def _train(client: MlflowClient, job: CellJob, experiment: str, tags: dict, claim: Claim) -> tuple[str, str]:
    """Train the cell (this process holds its claim): resume the newest attempt that left a
    checkpoint of this root, close every other attempt still marked RUNNING (its process died:
    no live process holds the claim)."""
    cell, roots = job.cell, job.roots
    cfg = train_config(job.plan, cell, roots)
    runs = [r for r in cell_runs(client, experiment, cfg.request_id(), roots, cell) if r.info.status != "FINISHED"]
    here = cfg.identity()  # the request and this machine's device recipe: what a resume must match
    interrupted = next((r for r in runs if r.data.tags.get("fgvc.dataset_digest") == roots.digest(cell)
                        and r.data.tags.get("fgvc.config_id") == here and _resumable(client, r)), None)
    for run in runs:
        if run.data.tags.get("fgvc.config_id") != here:
            log.info("study: %s: run %s ran with another device recipe (%s); it is not resumed here", cell.key,
                     run.info.run_id, run.data.tags.get("fgvc.device_recipe", "not recorded"))
    why = claim.replaced or "its process ended without closing it"
    for run in runs:
        if run.info.status == "RUNNING" and run is not interrupted:
            client.set_tag(run.info.run_id, "fgvc.end_reason", f"{why}; study cell attempt {claim.attempt} took over")
            client.set_terminated(run.info.run_id, "KILLED")
    log.info("study: %s %s", cell.key, f"resumes run {interrupted.info.run_id} ({why})" if interrupted else "trains")
    if interrupted is not None:
        cfg = cfg.replace(resume=interrupted.info.run_id)
        mlflow.set_experiment(experiment_id=experiment)  # resuming continues a run of this experiment
    result = run_train(cfg, progress=job.progress, experiment=job.experiment, tags=tags)
    if result is None:  # a cell trains in one process (nproc 1), which is the main rank
        raise RuntimeError(f"study cell {cell.key}: the training returned no result")
    run_id = result.run_id
    if interrupted is not None:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in {
            **tags, "fgvc.resumed_after": f"{why}; study cell attempt {claim.attempt} resumed it"}.items()])
    return run_id, "resumed" if interrupted else "trained"


def run_cell(job: CellJob) -> CellResult:
    """Train (or find, or resume) one cell and run its analyses (or reuse their records)."""
    client = _connect(job.tracking_uri)
    run_id, status = _training_run(client, job)
    model_uri = f"models:/{client.get_run(run_id).data.tags['fgvc.model_version']}"
    analyses, records = _analyses(job, model_uri)
    log.info("study: %s done (%s, run %s)", job.cell.key, status, run_id)
    return CellResult(job.cell, run_id, status, model_uri, analyses, records)


def _connect(tracking_uri: str) -> MlflowClient:
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    os.environ.pop("MLFLOW_RUN_ID", None)  # a cell's runs are its own, never the study run
    configure_tracking()
    return MlflowClient()


def _run_tags(job: CellJob) -> dict[str, str]:
    """What the cell's training run carries: the cell, its pixels, its study, its grid axes."""
    cell = job.cell
    tags = {"fgvc.study_cell": cell.key, PIXELS: job.roots.built(cell)[1],
            **({"fgvc.study": job.study_run_id} if job.study_run_id else {})}
    if cell.bg_correlation is not None:
        tags["fgvc.bg_correlation"] = f"{cell.bg_correlation:g}"
    if cell.split is not None:
        tags["fgvc.split_by"] = cell.split
    return tags


def _training_run(client: MlflowClient, job: CellJob) -> tuple[str, str]:
    """(run id, status) of the cell's finished training: found finished ("reused"), or trained
    or resumed here while this process holds the cell's claim, and named after the cell."""
    cell, roots = job.cell, job.roots
    experiment = experiment_id(job.experiment)
    request = train_config(job.plan, cell, roots).request_id()  # resolves no device: --collect runs anywhere
    finished = finished_run(cell_runs(client, experiment, request, roots, cell))
    if finished is None and job.collect:
        raise ConfigError(f"study cell {cell.key} has no finished training run yet; run `fgvc study --cell "
                          f"{cell.key}` (with the same options) first")
    tags = _run_tags(job)
    if finished is None:
        # the claim's key is the request's: a CPU and a GPU attempt of one cell never train it both
        with claimed(f"cell.{digest({'config_id': request, 'pixels': roots.built(cell)[1]})}",
                     f"study cell {cell.key}", client) as claim:
            finished = finished_run(cell_runs(client, experiment, request, roots, cell))  # done while we waited?
            trained = _train(client, job, experiment, tags, claim) if finished is None else None
        if trained is not None:
            client.set_tag(trained[0], "mlflow.runName", cell.run_name)
            return trained
    return _reuse(client, job, finished, tags), "reused"


def _reuse(client: MlflowClient, job: CellJob, finished, tags: dict[str, str]) -> str:
    """A finished training found again takes the cell's tags and name, unless it trained on
    another root of identical pixels: a training shared with such a cell keeps its name and
    study tags."""
    run_id = finished.info.run_id
    log.info("study: %s reuses run %s", job.cell.key, run_id)
    own = finished.data.tags.get("fgvc.dataset_digest") == job.roots.digest(job.cell)
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items() if own or k == PIXELS])
    if own:
        client.set_tag(run_id, "mlflow.runName", job.cell.run_name)
    return run_id


def _analyses(job: CellJob, model_uri: str) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """The cell's analyses (fgvc.tasks.analyze, reusing records of the same settings): method ->
    metrics, and method -> record run id."""
    analyses, records = {}, {}
    for analysis in analysis_configs(job.plan, job.cell, job.roots, model_uri, job.image_size):
        if job.collect:  # the records exist (the cell's own task made them): reusing them needs no GPU
            analysis = analysis.replace(device="cpu")
        outcome = run_analyze(analysis, reuse=True)
        analyses.update(outcome.metrics)
        records.update({m: outcome.reused.get(m, outcome.record_run_id) for m in outcome.metrics})
    return analyses, records
