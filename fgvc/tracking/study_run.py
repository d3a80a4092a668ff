"""`study`: the background-reliance study as one parent run with a child run per cell.

A cell is one architecture trained on one data regime with one seed. Regimes:

- ``unmasked``: the source images;
- ``masked``: the background-removed root built by `mask` (built once, when missing);
- ``unmasked+aug`` / ``masked+aug``: the same with the heavy augmentation recipe.

Each cell is an ordinary training run (`run_train`), created in the study's experiment with
``mlflow.parentRunId`` = the study run, so every child carries the same param and metric
names and the MLflow UI's comparison lines them up. On each trained model the study runs
``analyze all`` (Grad-CAM, occlusion, neighbours) on the images of the cell's own regime and
the ``shortcut`` test on the *source* images (the background swaps need real backdrops);
both attach their metrics to the cell's run. The parent run gets ``study/results.csv``,
``study/summary.csv``, ``study/results.md``, two figures and ``study/report.html``.

Re-running a study reuses finished cells, found in the study's experiment by their
training-config digest (tag ``fgvc.config_id``) and dataset digest (``fgvc.dataset_digest``);
a cell whose run was interrupted resumes from its last checkpoint; a reused cell moves under
the new study run. So an interrupted study continues where it stopped.

The parent is driven through the client, not the fluent API: the cells' own runs (training,
analysis, masking) are started with the fluent API and must not find the parent active.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from fgvc.data.dataset import ShardDataset
from fgvc.data.demo import DemoConfig
from fgvc.data.shards import dataset_digest, read_meta, validate_root
from fgvc.tracking.analyze_run import run_analyze
from fgvc.tracking.mask_run import run_mask
from fgvc.tracking.prepare_run import ensure_demo
from fgvc.tracking.runs import configure_tracking, git_commit, same_param_value
from fgvc.tracking.train_run import run_train
from fgvc.training.config import DEFAULT_DATA_ROOT, TrainConfig
from fgvc.viz.report import (METRICS, Example, build_report, markdown_tables, save_regime_bars,
                             save_reliance_scatter, summarize)

log = logging.getLogger("fgvc")

EXPERIMENT = "fgvc-study"
REGIMES = ("unmasked", "masked", "unmasked+aug", "masked+aug")
DEFAULT_SEGMENTER = "deeplabv3_resnet101"

# Metric on the cell's run -> column of the study table.
COLUMN_SOURCES = {
    "val_acc": "best/val_acc",
    "gradcam_bg_fraction": "gradcam/bg_energy_fraction_mean",
    "occlusion_bg_fraction": "occlusion/bg_energy_fraction_mean",
    "no_fg_acc": "shortcut/acc_no_fg",
    "no_fg_vs_chance": "shortcut/no_fg_vs_chance",
    "only_fg_acc": "shortcut/acc_only_fg",
    "bg_gap": "shortcut/bg_gap",
    "precision_at_1": "neighbors/precision_at_1",
}
ANALYSIS_DONE = ("gradcam/bg_energy_fraction_mean", "occlusion/bg_energy_fraction_mean",
                 "neighbors/precision_at_1", "shortcut/acc_no_fg", "shortcut/bg_gap")
EXAMPLES_PER_METHOD = 2

PRESETS: dict[str, dict] = {
    # A few minutes on a 2-core CPU: one small network, every regime, one seed, a small demo.
    # Wide 48x64 frames give the last stage a 6x8 map (Grad-CAM's resolution) with columns
    # beside the figure; at 48x32 the map is 6x4 and every cell overlaps the figure.
    "quick": dict(archs=("fn-small",), regimes=REGIMES, seeds=(0,), epochs=5, batch_size=16,
                  num_images=24, occlusion_window=16, occlusion_stride=16,
                  demo=DemoConfig(num_designers=6, train_per_class=30, val_per_class=10, height=48,
                                  width=64)),
    # The study of the design: every standard network, three seeds, the default demo.
    "full": dict(archs=("resnet18", "resnet34", "fn-small", "fn-medium"), regimes=REGIMES,
                 seeds=(0, 1, 2), epochs=8, batch_size=64, num_images=64, demo=DemoConfig()),
}


@dataclass
class StudyConfig:
    """Every knob of a study. Build it with `from_preset`, which fills what is not given from
    a preset; the field defaults are the quick grid with automatic occlusion sizes."""

    preset: str = "quick"
    archs: tuple[str, ...] = PRESETS["quick"]["archs"]
    regimes: tuple[str, ...] = REGIMES
    seeds: tuple[int, ...] = (0,)
    epochs: int = PRESETS["quick"]["epochs"]
    batch_size: int = PRESETS["quick"]["batch_size"]
    lr_head: float = 1e-3
    pretrained: str = "auto"
    data_root: str | None = None  # None: the demo root of `demo` (generated when missing)
    masked_root: str | None = None  # None: <data_root>-masked
    segmenter: str = "auto"  # auto: groundtruth when the source shards carry masks
    demo: DemoConfig = field(default_factory=lambda: PRESETS["quick"]["demo"])
    num_images: int = PRESETS["quick"]["num_images"]  # per analysis; seeded, the same for every cell
    analysis_seed: int = 0
    occlusion_window: int | None = None  # None: a third of the shorter image side
    occlusion_stride: int | None = None  # None: half the window
    device: str = "auto"
    num_workers: int = 0
    registered_model: str | None = None  # None: fgvc-<arch>
    experiment: str = EXPERIMENT  # standalone runs; under `mlflow run` the run's own experiment

    def __post_init__(self):
        self.archs = tuple(self.archs)
        self.regimes = tuple(self.regimes)
        self.seeds = tuple(int(s) for s in self.seeds)
        unknown = [r for r in self.regimes if r not in REGIMES]
        if unknown:
            raise ValueError(f"unknown regime(s) {', '.join(map(repr, unknown))}; choose from {', '.join(REGIMES)}")
        for name in ("archs", "regimes", "seeds"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"a study needs at least one of {name}")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a value twice: {list(values)}")
        for name in ("epochs", "batch_size", "num_images"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_preset(cls, preset: str = "quick", demo: dict | None = None, **overrides) -> "StudyConfig":
        """The preset's grid and sizes, with every non-None override applied; `demo` overrides
        single fields of the preset's demo data (num_designers, height, ...)."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        values = dict(PRESETS[preset])
        values.update({k: v for k, v in overrides.items() if v is not None})
        demo_overrides = {k: v for k, v in (demo or {}).items() if v is not None}
        if demo_overrides:
            values["demo"] = dataclasses.replace(values["demo"], **demo_overrides)
        return cls(preset=preset, **values)

    def cells(self) -> list["Cell"]:
        """The grid in a fixed order: architecture, then regime, then seed."""
        return [Cell(a, r, s) for a in self.archs for r in self.regimes for s in self.seeds]

    def describe(self) -> dict:
        """Flat params for the study run."""
        out = {k: ("auto" if v is None else v) for k, v in asdict(self).items() if k not in ("demo", "experiment")}
        for key in ("archs", "regimes", "seeds"):
            out[key] = ",".join(map(str, out[key]))
        return out


@dataclass(frozen=True)
class Cell:
    arch: str
    regime: str
    seed: int

    @property
    def masked(self) -> bool:
        return self.regime.startswith("masked")

    @property
    def aug(self) -> bool:
        return self.regime.endswith("+aug")

    @property
    def key(self) -> str:
        return f"{self.arch}/{self.regime}/seed{self.seed}"

    @property
    def run_name(self) -> str:
        return f"{self.arch.replace('timm:', '')}-{self.regime}-s{self.seed}"


@dataclass
class StudyData:
    """Where each regime's images come from, and the roots' digests."""

    source: Path
    source_digest: str
    source_has_masks: bool
    masked: Path | None
    masked_digest: str | None
    segmenter: str | None
    image_size: tuple[int, int]
    num_classes: int
    demo: DemoConfig | None

    def root(self, cell: Cell) -> Path:
        return self.masked if cell.masked else self.source

    def digest(self, cell: Cell) -> str:
        return self.masked_digest if cell.masked else self.source_digest

    def mask_root_for(self, root: Path) -> str | None:
        """A root with person masks for `root`'s images, when its own shards have none."""
        if root == self.source and not self.source_has_masks and self.masked is not None:
            return str(self.masked)
        return None


@dataclass
class CellResult:
    cell: Cell
    run_id: str
    status: str  # trained | resumed | reused
    model_uri: str


@dataclass
class StudyResult:
    run_id: str
    experiment_id: str
    cells: list[CellResult]
    rows: list[dict]
    summary: list[dict]
    seconds: float


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
    digest = hashlib.sha256(json.dumps(asdict(demo), sort_keys=True).encode()).hexdigest()[:8]
    return Path(f"{DEFAULT_DATA_ROOT}-{digest}")


def _ensure_demo_root(root: Path, demo: DemoConfig) -> None:
    if (root / "meta.json").exists():
        found = read_meta(root).get("generator")
        wanted = json.loads(json.dumps(asdict(demo)))
        if found != wanted:
            raise ValueError(f"{root} holds demo data generated with {found}, not the requested {wanted}; "
                             f"pass another data_root or remove {root}")
    else:
        ensure_demo(root, demo)


def prepare_data(cfg: StudyConfig, progress: bool = True) -> StudyData:
    """Resolve (and if needed generate) the source root; build the masked root when a masked
    regime needs it, or when the source has no person masks for the shortcut test."""
    demo = None
    if cfg.data_root is None:
        demo = cfg.demo
        source = demo_root_for(demo)
        _ensure_demo_root(source, demo)
    else:
        source = Path(cfg.data_root)
        if not (source / "meta.json").exists():
            if os.path.normpath(cfg.data_root) == os.path.normpath(DEFAULT_DATA_ROOT):
                demo = DemoConfig()
                ensure_demo(source, demo)
            else:
                raise ValueError(f"{source}: dataset root does not exist (run `fgvc prepare --root "
                                 f"{source}`, or leave data_root unset for the demo data)")
    source = source.resolve()
    info = validate_root(source)
    source_digest = dataset_digest(source)
    has_masks = "masks" in ShardDataset(source, "val").keys
    need_masked = any(r.startswith("masked") for r in cfg.regimes) or not has_masks
    masked = masked_digest = segmenter = None
    if need_masked:
        masked = Path(cfg.masked_root) if cfg.masked_root else source.parent / f"{source.name}-masked"
        segmenter = cfg.segmenter if cfg.segmenter != "auto" else ("groundtruth" if has_masks else DEFAULT_SEGMENTER)
        if not (masked / "meta.json").exists():
            log.info("study: masking %s into %s (segmenter %s)", source, masked, segmenter)
            run_mask(source, masked, segmenter=segmenter, device=cfg.device, progress=progress)
        meta = read_meta(masked)
        built_from = meta.get("source_digest")
        if built_from not in (None, source_digest):
            raise ValueError(f"{masked} was masked from a dataset with digest {built_from}, not {source} "
                             f"({source_digest}); pass masked_root=<a new folder>")
        segmenter = (meta.get("masking") or {}).get("segmenter") or meta.get("segmenter") or segmenter
        masked = masked.resolve()
        masked_digest = dataset_digest(masked)
    return StudyData(source, source_digest, has_masks, masked, masked_digest, segmenter,
                     tuple(info.image_size), info.num_classes, demo)


def analysis_options(cfg: StudyConfig, image_size: tuple[int, int]) -> dict:
    """Options of both analyses; the occlusion window defaults to a third of the shorter side."""
    window = cfg.occlusion_window or max(4, round(min(image_size) / 3))
    stride = cfg.occlusion_stride or max(1, window // 2)
    return dict(num_images=cfg.num_images, seed=cfg.analysis_seed, window=window, stride=stride,
                batch_size=32, k=5, target="predicted")


# --------------------------------------------------------------------------------------------
# The parent run, through the client
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


def _log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    """Like `runs.log_params` for a run that is not the active one: a param `mlflow run`
    already logged with another value (`auto`) goes under `<name>_effective`."""
    existing = client.get_run(run_id).data.params
    out = []
    for key, value in params.items():
        text = str(value)[:6000]
        if key in existing:
            if same_param_value(existing[key], text):
                continue
            key = f"{key}_effective"
            if key in existing:
                continue
        out.append(Param(key, text))
    for start in range(0, len(out), 100):
        client.log_batch(run_id, params=out[start:start + 100])


def _start_parent(client: MlflowClient, cfg: StudyConfig, env_run_id: str | None) -> tuple[str, str]:
    """(run id, experiment name) of the study run: the one `mlflow run` made, or a new one."""
    name = f"study-{cfg.preset}"
    if env_run_id:
        run = client.get_run(env_run_id)
        client.set_tag(env_run_id, "mlflow.runName", name)  # `mlflow run` names its runs at random
        return env_run_id, client.get_experiment(run.info.experiment_id).name
    experiment = client.get_experiment_by_name(cfg.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.experiment)
    run = client.create_run(experiment_id, run_name=name)
    return run.info.run_id, cfg.experiment


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------

def train_config(cfg: StudyConfig, cell: Cell, data: StudyData) -> TrainConfig:
    return TrainConfig(arch=cell.arch, pretrained=cfg.pretrained, data_root=str(data.root(cell)),
                       aug="true" if cell.aug else "false", epochs=cfg.epochs, batch_size=cfg.batch_size,
                       lr_head=cfg.lr_head, seed=cell.seed, num_workers=cfg.num_workers, device=cfg.device)


def _analysis_key(options: dict, data: StudyData) -> str:
    text = json.dumps({**options, "source_digest": data.source_digest}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cell_runs(client: MlflowClient, experiment_id: str, config_id: str, digest: str) -> list:
    return client.search_runs(
        [experiment_id],
        f"tags.`fgvc.config_id` = '{config_id}' and tags.`fgvc.dataset_digest` = '{digest}'",
        order_by=["attributes.start_time DESC"], max_results=50)


def _has_last_checkpoint(client: MlflowClient, run_id: str) -> bool:
    return any(a.path == "checkpoints/last.pt" for a in client.list_artifacts(run_id, "checkpoints"))


def _run_cell(client: MlflowClient, cfg: StudyConfig, cell: Cell, data: StudyData, parent_id: str,
              experiment: str, experiment_id: str, options: dict, progress: bool) -> CellResult:
    train_cfg = train_config(cfg, cell, data)
    tags = {"fgvc.study": parent_id, "fgvc.study_cell": cell.key, "fgvc.study_regime": cell.regime,
            "mlflow.parentRunId": parent_id}
    runs = _cell_runs(client, experiment_id, train_cfg.identity(), data.digest(cell))
    finished = next((r for r in runs if r.info.status == "FINISHED" and "fgvc.model_version" in r.data.tags), None)
    interrupted = next((r for r in runs if r.info.status in ("RUNNING", "KILLED")
                        and _has_last_checkpoint(client, r.info.run_id)), None) if finished is None else None
    if finished is not None:
        run_id, status = finished.info.run_id, "reused"
        log.info("study: %s reuses run %s", cell.key, run_id)
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    else:
        status = "resumed" if interrupted is not None else "trained"
        log.info("study: %s %s", cell.key, f"resumes run {interrupted.info.run_id}" if interrupted else "trains")
        if interrupted is not None:  # resuming refuses a run outside the fluent API's current experiment
            mlflow.set_experiment(experiment_id=experiment_id)
        result = run_train(train_cfg, resume=interrupted.info.run_id if interrupted else "false",
                           registered_model=cfg.registered_model, progress=progress,
                           experiment=experiment, parent_run_id=parent_id, tags=tags)
        run_id = result.run_id
    client.set_tag(run_id, "mlflow.runName", cell.run_name)
    run = client.get_run(run_id)
    model_uri = f"models:/{run.data.tags['fgvc.model_version']}"

    key = _analysis_key(options, data)
    done = run.data.tags.get("fgvc.study_analysis") == key and all(m in run.data.metrics for m in ANALYSIS_DONE)
    if not done:
        own, device = data.root(cell), str(train_cfg.resolve_device())
        run_analyze(model_uri, "all", data_root=str(own), mask_root=data.mask_root_for(own), device=device,
                    **options)
        run_analyze(model_uri, "shortcut", data_root=str(data.source), mask_root=data.mask_root_for(data.source),
                    device=device, **options)
        client.set_tag(run_id, "fgvc.study_analysis", key)
    return CellResult(cell, run_id, status, model_uri)


def cell_row(client: MlflowClient, result: CellResult) -> dict:
    """The study-table row of a finished cell, read back from its run."""
    run = client.get_run(result.run_id)
    metrics = run.data.metrics
    row = {"arch": result.cell.arch, "regime": result.cell.regime, "seed": result.cell.seed,
           "run_id": result.run_id, "status": result.status, "model": result.model_uri}
    for column, key in COLUMN_SOURCES.items():
        row[column] = metrics.get(key, float("nan"))
    best_epoch = metrics.get("best/epoch")
    history = {m.step: m.value for m in client.get_metric_history(result.run_id, "val/balanced_acc")}
    row["val_balanced_acc"] = history.get(int(best_epoch), float("nan")) if best_epoch is not None else float("nan")
    row["chance"] = metrics.get("shortcut/chance", float("nan"))
    return {k: row[k] for k in ("arch", "regime", "seed", "run_id", "status", "model", *METRICS, "chance")}


# --------------------------------------------------------------------------------------------
# Outputs of the study run
# --------------------------------------------------------------------------------------------

def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) and math.isfinite(v) else
                                 ("" if isinstance(v, float) else v)) for k, v in row.items()})
    return path


def _download(run_id: str, artifact: str, dst: Path) -> Path | None:
    dst.mkdir(parents=True, exist_ok=True)
    try:
        return Path(MlflowClient().download_artifacts(run_id, artifact, str(dst)))
    except Exception as e:  # an example missing from one cell must not sink the report
        log.warning("study report: %s of run %s unavailable (%s)", artifact, run_id, e)
        return None


def _examples(results: list[CellResult], regimes: tuple[str, ...], tmp: Path) -> dict[str, list[Example]]:
    """Per regime, the first cell's Grad-CAM and occlusion examples (the analysis subset is
    seeded, so every regime shows the same validation images), plus the shortcut variants."""
    out: dict[str, list[Example]] = {}
    for regime in regimes:
        first = next((r for r in results if r.cell.regime == regime), None)
        if first is None:
            continue
        items = []
        for method in ("gradcam", "occlusion"):
            for i in range(EXAMPLES_PER_METHOD):
                path = _download(first.run_id, f"analysis/{method}/example_{i:02d}.png", tmp / first.run_id / method)
                if path is not None:
                    items.append(Example(f"{first.cell.key}: {method} example {i}", path))
        out[regime] = items
    if results:
        path = _download(results[0].run_id, "analysis/shortcut/variants.png", tmp / "variants")
        if path is not None:
            out["Background-swap variants (source images)"] = [Example(
                "Original | Only-FG | No-FG | Mixed-Same | Mixed-Rand, as fed to every model by the "
                "shortcut test", path)]
    return out


NOTES = (
    "Does a classifier recognise the garment, or the runway? Each cell trains one architecture on "
    "one data regime with one seed; every trained model is then probed. Background reliance shows "
    "as attribution energy on the background (Grad-CAM, occlusion), as accuracy from the background "
    "alone (No-FG, above chance) and as a positive BG-gap.",
    "Grad-CAM, occlusion and retrieval run on the validation images of the cell's own regime (masked "
    "cells on masked images); the shortcut test runs on the source images for every cell. No-FG "
    "removes the person and fills the hole row by row by mirroring the backdrop next to it, so no "
    "silhouette is left to read; Mixed-Same / Mixed-Rand paste the person on the No-FG backdrop of "
    "another image of the same / a different designer.",
)


def write_outputs(client: MlflowClient, run_id: str, cfg: StudyConfig, data: StudyData,
                  results: list[CellResult], rows: list[dict], summary: list[dict]) -> None:
    chance = 1.0 / data.num_classes
    with tempfile.TemporaryDirectory(prefix="fgvc-study-") as tmp:
        tmp = Path(tmp)
        out = tmp / "study"
        out.mkdir()
        _write_csv(out / "results.csv", rows)
        _write_csv(out / "summary.csv", summary)
        (out / "results.md").write_text(f"# Background-reliance study `{run_id}`\n\n"
                                        + markdown_tables(rows, summary, chance))
        figures = [
            Example("Validation accuracy against background reliance, one point per cell",
                    save_reliance_scatter(out / "accuracy_vs_background_reliance.png", rows, chance)),
            Example("Per-regime means (error bars: spread across seeds)",
                    save_regime_bars(out / "regime_bars.png", summary, chance=chance)),
        ]
        setup = {
            "study run": run_id, "source data": f"{data.source} (digest {data.source_digest})",
            "masked data": f"{data.masked} (digest {data.masked_digest}, segmenter {data.segmenter})"
            if data.masked else "none",
            "grid": f"{', '.join(cfg.archs)} × {', '.join(cfg.regimes)} × seeds {', '.join(map(str, cfg.seeds))}",
            "training": f"{cfg.epochs} epochs, batch {cfg.batch_size}, lr_head {cfg.lr_head}, "
                        f"pretrained {cfg.pretrained}",
            "analysis": f"{cfg.num_images} validation images (seed {cfg.analysis_seed})",
            "classes": f"{data.num_classes} (chance {chance:.3f})",
            "image size": f"{data.image_size[0]}x{data.image_size[1]}",
        }
        report = build_report(f"Background-reliance study ({cfg.preset})", setup, rows, summary, figures,
                              _examples(results, cfg.regimes, tmp / "downloads"), notes=NOTES, chance=chance)
        (out / "report.html").write_text(report, encoding="utf-8")
        client.log_artifacts(run_id, str(out), "study")


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------

def run_study(cfg: StudyConfig, progress: bool = True) -> StudyResult:
    """Mask (once), train and analyse every cell, and write the table, figures and report to
    the study run; FINISHED on success, KILLED on Ctrl-C, FAILED on an error (re-raised)."""
    configure_tracking()
    client = MlflowClient()
    start = time.perf_counter()
    with _without_env_run() as env_run_id:
        run_id, experiment = _start_parent(client, cfg, env_run_id)
        experiment_id = client.get_run(run_id).info.experiment_id
        try:
            client.log_batch(run_id, tags=[RunTag("fgvc.task", "study"), RunTag("fgvc.git_commit", git_commit())])
            _log_params(client, run_id, cfg.describe())
            data = prepare_data(cfg, progress)
            options = analysis_options(cfg, data.image_size)
            params = {"experiment": experiment, "data_root": str(data.source), "dataset_digest": data.source_digest,
                      "masked_root": str(data.masked) if data.masked else "none",
                      "masked_dataset_digest": data.masked_digest or "none",
                      "segmenter": data.segmenter or "none", "num_classes": data.num_classes,
                      "image_size": f"{data.image_size[0]}x{data.image_size[1]}",
                      "occlusion_window": options["window"], "occlusion_stride": options["stride"],
                      "cells": len(cfg.cells())}
            if data.demo is not None:
                params.update({f"demo.{k}": v for k, v in asdict(data.demo).items()})
            _log_params(client, run_id, params)
            results = []
            for index, cell in enumerate(cfg.cells(), start=1):
                log.info("study: cell %d/%d %s", index, len(cfg.cells()), cell.key)
                results.append(_run_cell(client, cfg, cell, data, run_id, experiment, experiment_id,
                                         options, progress))
            rows = [cell_row(client, r) for r in results]
            summary = summarize(rows)
            write_outputs(client, run_id, cfg, data, results, rows, summary)
            seconds = time.perf_counter() - start
            counts = {s: sum(r.status == s for r in results) for s in ("trained", "resumed", "reused")}
            now = int(time.time() * 1000)
            totals = {"study/cells": len(results), **{f"study/cells_{k}": v for k, v in counts.items()},
                      "time/study_s": seconds}
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in totals.items()])
        except KeyboardInterrupt:
            client.set_tag(run_id, "fgvc.end_reason", "interrupted (Ctrl-C)")
            client.set_terminated(run_id, "KILLED")
            raise
        except BaseException as e:
            with contextlib.suppress(Exception):
                client.set_tag(run_id, "fgvc.error", f"{type(e).__name__}: {e}"[:5000])
                client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
    log.info("study %s: %d cells (%s) in %.0f s; report: study/report.html", run_id, len(results),
             ", ".join(f"{v} {k}" for k, v in counts.items() if v), seconds)
    return StudyResult(run_id, experiment_id, results, rows, summary, seconds)
