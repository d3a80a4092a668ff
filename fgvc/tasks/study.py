"""`study`: the background-reliance study as one parent run with a child run per cell.

Each cell is an ordinary training run (`run_train`) in the study's experiment, tagged
``fgvc.study`` = the study run (not nested under it: the MLflow UI charts only top-level runs
by default, so nesting would hide the cells), so every cell has the same param and metric
names and the chart and compare views line them up, one line per cell. On each trained model the study
runs the attribution methods and neighbours on the validation images of the cell's own
regime, and the background-swap test on the source images (it needs real backdrops). Those
are analysis records (fgvc.tasks.analyze, experiment fgvc-analysis: they take no
slot in the study's chart view) and the study shows them on each cell's run. The table is
built from the records, so the study's numbers are the ones on the cells' pages.

Re-running a study reuses finished cells (``fgvc.request_id``, the digest of the training
config without the device recipe, so from any machine, and the digest of the pixels they train
on) and analysis records with the same settings id; a cell whose training was interrupted
resumes from its last checkpoint on a machine of the same device recipe. So an interrupted
study continues where it stopped. A cell is one call of `fgvc.tasks.study_cell.run_cell`, mapped
over the cells by an executor (this process, or Ray tasks: fgvc.study.executors); cells and
records are claimed in the tracking store, so concurrent attempts do each once.

When the cells have run, the study reads them back as plain records (gather:
fgvc.tasks.study_report), computes its rows, summary, differences, show leak and verdicts in one
pure step (fgvc.study.results.compute) and writes them: the cells' tags, the study run's files,
metrics and description (fgvc.tasks.study_report).

The parent is driven through the client: the cells' own runs use the fluent API and must not
find the parent active.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlsplit

from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from fgvc.data.shards import validate_root
from fgvc.errors import ConfigError
from fgvc.study.config import Cell, StudyConfig, StudyPlan
from fgvc.study.executors import RayExecutor, run_local
from fgvc.study.records import CellResult, Roots, StudyContext, StudyResult
from fgvc.study.results import compute
from fgvc.tasks.study_cell import CellJob, run_cell
from fgvc.tasks.study_report import finish_study, gather, write_study
from fgvc.tasks.study_roots import prepare_roots
from fgvc.tracking import failures
from fgvc.tracking.runs import (
    DESCRIPTION,
    TASK,
    configure_tracking,
    describe_experiment,
    ending,
    experiment_id,
    git_commit,
    log_params,
)

log = logging.getLogger("fgvc")

EXPERIMENT_DESCRIPTION = ("Background-reliance studies: a study run per study (tables, figures, report.html, the "
                          "verdicts in its description) and a training run per cell, tagged fgvc.study with its "
                          "study run; open 'Model training' and use Chart or Compare to see the cells side by side.")


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
    with failures.acting_on(f"experiment {plan.experiment}"):  # a refusal names it, in one line
        describe_experiment(plan.experiment, EXPERIMENT_DESCRIPTION)
        run = client.create_run(experiment_id(plan.experiment), run_name=name)
    return run.info.run_id, plan.experiment


def worker_tracking_uri() -> str:
    """The tracking URI as another process (a Ray worker, elsewhere) must see it: a local
    SQLite path made absolute."""
    uri = configure_tracking()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


SECRET_WORDS = ("PASSWORD", "TOKEN", "SECRET", "KEY")


def worker_env(environ: Mapping[str, str], uri: str) -> dict[str, str]:
    """What a study hands its Ray workers (Ray's runtime environment, shown in its dashboard and
    job records): the tracking URI, the MLflow HTTP request settings and the non-secret FGVC_*
    settings; never a credential (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN, AWS_*, any name with
    PASSWORD, TOKEN, SECRET or KEY in it). The workers read credentials from their own
    environment: the one `ray start` ran in on each node, or ~/.mlflow/credentials there. A URI
    with a password in it is refused."""
    address = urlsplit(uri)
    if address.password is not None:
        where = ("MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" if address.scheme.startswith("http")
                 else "the database's own password file (e.g. ~/.pgpass)")
        raise ConfigError(f"--executor ray: the tracking URI carries a password, which Ray would show in its "
                          f"dashboard and job records; give {address.scheme}://{address.hostname}"
                          f"{f':{address.port}' if address.port else ''}{address.path} and put the credentials in "
                          f"{where} in the workers' own environment (where `ray start` runs on each node)")
    allowed = {k: v for k, v in environ.items()
               if k.startswith(("MLFLOW_HTTP_REQUEST_", "FGVC_")) and not any(w in k.upper() for w in SECRET_WORDS)}
    return {**allowed, "MLFLOW_TRACKING_URI": uri}


def executor_of(cfg: StudyConfig, progress: bool):
    """The map that runs the cells: in this process, or one Ray task per cell."""
    if cfg.executor == "local":
        return run_local
    return RayExecutor(cfg.ray_address, cfg.gpus_per_cell, cfg.cpus_per_cell,
                       worker_env(os.environ, worker_tracking_uri()), progress, cfg.device)


def select_cell(plan: StudyPlan, which: str) -> Cell:
    """A cell by its key, or by its index in `--list-cells` (a scheduler's array index)."""
    cells = plan.cells()
    if which.isdigit():
        if int(which) >= len(cells):
            raise ConfigError(f"--cell {which}: the study has {len(cells)} cells (0 to {len(cells) - 1})")
        return cells[int(which)]
    found = next((c for c in cells if c.key == which), None)
    if found is None:
        raise ConfigError(f"--cell {which!r} is not a cell of this study; `fgvc study --list-cells` (with the same "
                          f"options) lists them")
    return found


def run_study_cell(cfg: StudyConfig, which: str, progress: bool = True) -> CellResult:
    """One cell on its own (`fgvc study --cell KEY`): a scheduler's array task. The study run
    and its table come later from `--collect`."""
    plan = cfg.plan()
    cell = select_cell(plan, which)
    with _without_env_run():
        uri = worker_tracking_uri()
        roots = prepare_roots(plan, cell.bg_correlation, progress, cell.split)
        info = validate_root(roots.source)
        describe_experiment(plan.experiment, EXPERIMENT_DESCRIPTION)
        return run_cell(CellJob(plan, cell, roots, None, plan.experiment, info.image_size, uri, progress=progress))


def run_study(cfg: StudyConfig, progress: bool = True, collect: bool = False) -> StudyResult:
    """Mask (once per source), train and analyse every cell, and write the table, figures and
    report to the study run; FINISHED on success, KILLED on Ctrl-C, FAILED on an error.
    `collect`: train nothing; build the study from cells that finished elsewhere."""
    configure_tracking()
    client = MlflowClient()
    plan = cfg.plan()
    start = time.perf_counter()
    executor = run_local if collect else executor_of(cfg, progress)
    with _without_env_run() as env_run_id:
        uri = worker_tracking_uri()
        run_id, experiment_name = _start_parent(client, plan, env_run_id)
        experiment = client.get_run(run_id).info.experiment_id
        with ending(run_id, fluent=False):
            _record_request(client, run_id, cfg, plan)
            roots = {(b, split): prepare_roots(plan, b, progress, split, collect) for b, split in plan.data()}
            study = _record_data(run_id, experiment_name, plan, roots)
            results = _run_cells(executor, study, uri, collect, progress and executor is run_local)
            cells = gather(client, results, roots)
            tables = compute(cells, study.chance)
            write_study(client, study, tables, cells)
            seconds = time.perf_counter() - start
            finish_study(client, run_id, plan.preset, tables, seconds)
    log.info("study %s: %d cells (%s) in %.0f s; report: study/report.html", run_id, len(results),
             ", ".join(f"{v} {k}" for k, v in tables.statuses.items() if v), seconds)
    return StudyResult(run_id, experiment, results, tables.rows, tables.summary, seconds)


def _record_request(client: MlflowClient, run_id: str, cfg: StudyConfig, plan: StudyPlan) -> None:
    """The study run's task, commit, a description saying it runs, and the options asked."""
    client.log_batch(run_id, tags=[RunTag(TASK, "study"), RunTag("fgvc.git_commit", git_commit()),
                                   RunTag(DESCRIPTION, f"Background-reliance study ({plan.preset}), "
                                                       f"{len(plan.cells())} cells: running.")])
    log_params(cfg.params(), run_id)


def _record_data(run_id: str, experiment: str, plan: StudyPlan, roots: dict[tuple, Roots]) -> StudyContext:
    """The study's resolved grid and data as the study run's params; the study's context."""
    first = roots[plan.data()[0]]
    info = validate_root(first.source)
    log_params({"experiment": experiment, "cells": len(plan.cells()), "epochs_effective": plan.epochs,
                "archs_effective": ",".join(plan.archs), "regimes_effective": ",".join(plan.regimes),
                "seeds_effective": ",".join(map(str, plan.seeds)), "num_images_effective": plan.num_images,
                "splits_effective": ",".join(s or "as prepared" for s in plan.splits),
                "data_root_effective": ",".join(str(r.source) for r in roots.values()),
                "dataset_digest": ",".join(r.source_digest for r in roots.values()),
                "segmenter_effective": first.segmenter or "none", "num_classes": info.num_classes,
                "image_size": f"{info.image_size[0]}x{info.image_size[1]}",
                **({f"demo.{k}": v for k, v in asdict(first.demo).items()} if first.demo else {})}, run_id)
    return StudyContext(run_id, experiment, plan, roots, info.image_size, info.num_classes)


def _run_cells(executor, study: StudyContext, uri: str, collect: bool, progress: bool) -> list[CellResult]:
    """Every cell of the grid through the executor, in grid order."""
    cells = study.plan.cells()
    jobs = [CellJob(study.plan, cell, study.roots[cell.data], study.run_id, study.experiment, study.image_size, uri,
                    collect=collect, progress=progress) for cell in cells]

    def on_done(index: int, result: CellResult) -> None:
        log.info("study: cell %d/%d %s: %s (run %s)", index + 1, len(cells), result.cell.key, result.status,
                 result.run_id)

    return executor(run_cell, jobs, on_done)
