"""`analyze`: interpret a registered model; results are records keyed by their settings.

The record: each analysis is a run of its own (experiment ``fgvc-analysis``, or the run
``mlflow run`` created), tagged ``fgvc.task=analyze`` and, per method, with the digest of the
settings its numbers depend on (``fgvc.analysis.<method>.id``: method settings, images,
split, seed, target, model version, data digests). Its metrics are ``<method>/...``, its
files ``analysis/<method>/``; nothing in it is ever replaced.

The training run that produced the version shows the results too, so one run page holds
training and interpretation:
- files under ``analysis/<method>/<settings id>/`` (other settings never overwrite them);
- metrics ``<method>/...`` and tags ``fgvc.analysis.<method>`` (the record's run id),
  ``fgvc.analysis.<method>.id`` and ``fgvc.analysis.<method>.settings`` (readable). These
  show the FIRST analysis of each method; an analysis with other settings replaces them only
  when asked (``show_on_training_run=true``; a study does so for its cells), and then as a new
  step of the metric's history with the tags saying which settings produced the value.
So a number on the training run's page always says how it was computed, and a study's
figures stay retrievable from its own records however often a cell is analysed again.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from PIL import Image

from fgvc import mlflow_names
from fgvc.analysis.config import AnalyzeConfig, settings_id, settings_of
from fgvc.analysis.data import AnalysisData, check_fits_model, load_analysis_data
from fgvc.analysis.methods import METHODS, MethodResult
from fgvc.analysis.suite import check_inputs, run_methods
from fgvc.config import digest
from fgvc.devices import resolve_device
from fgvc.errors import FgvcError
from fgvc.tracking import fencing
from fgvc.tracking.claims import claimed
from fgvc.tracking.markdown import code
from fgvc.tracking.model_registry import ResolvedModel, load_model
from fgvc.tracking.runs import configure_tracking, log_params, tracked_run
from fgvc.tracking.search import find_runs

log = logging.getLogger("fgvc")

EXPERIMENT = mlflow_names.ANALYSIS
EXPERIMENT_DESCRIPTION = ("Analysis records: one run per `analyze`, keyed per method by the digest of its settings "
                          "(tag fgvc.analysis.<method>.id). The training runs show the results too.")


def tag(method: str, what: str = "") -> str:
    return f"fgvc.analysis.{method}" + (f".{what}" if what else "")


@dataclass
class AnalysisOutcome:
    record_run_id: str
    metrics: dict[str, dict[str, float]]  # method -> relative metric -> value
    ids: dict[str, str]  # method -> settings id
    shown: dict[str, bool] = field(default_factory=dict)  # method -> shown on the training run
    reused: dict[str, str] = field(default_factory=dict)  # method -> record run it came from


def _headline(metrics: dict[str, float]) -> list[tuple[str, float, float | None, float | None]]:
    """A method's headline numbers: every metric with an interval (``<m>_low``/``<m>_high``),
    else its means; (name, value, low, high)."""
    out: list[tuple[str, float, float | None, float | None]] = [
        (k, v, metrics[f"{k}_low"], metrics[f"{k}_high"]) for k, v in metrics.items()
        if f"{k}_low" in metrics and f"{k}_high" in metrics]
    return out or [(k, v, None, None) for k, v in metrics.items() if k.endswith(("_mean", "precision_at_1"))]


def describe_outcome(outcome: AnalysisOutcome) -> str:
    """What `analyze` prints: the record, and each method's headline numbers with their 95%
    intervals (bootstrap over the analysed images)."""
    lines = [f"analysis record run {outcome.record_run_id}:"]
    for method, metrics in outcome.metrics.items():
        where = "shown on the training run" if outcome.shown.get(method) else "record only"
        reused = f", reused record {outcome.reused[method]}" if method in outcome.reused else ""
        lines.append(f"  {method} ({where}{reused}; {int(metrics.get('num_images', 0))} images):")
        for name, value, low, high in _headline(metrics):
            interval = f" [{low:.3f}, {high:.3f}]" if low is not None else ""
            lines.append(f"    {name:<36} {value:.3f}{interval}")
    return "\n".join(lines)


def find_record(method: str, key: str) -> mlflow.entities.Run | None:
    """A finished analysis record of `method` with settings id `key`, in any experiment."""
    runs = find_runs({tag(method, "id"): key, "fgvc.task": "analyze"}, status="FINISHED", max_results=1)
    return runs[0] if runs else None


def readable(settings: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.items())


def _show(client: MlflowClient, train_run_id: str, method: str, key: str, wanted: bool | None) -> bool:
    """Whether these results become the training run's displayed ones (see the module doc)."""
    if wanted is not None:
        return wanted
    current = client.get_run(train_run_id).data.tags.get(tag(method, "id"))
    return current is None or current == key


def _attach(client: MlflowClient, train_run_id: str, method: str, key: str, settings: dict, record_id: str,
            metrics: dict[str, float], folder: Path | None, show: bool) -> None:
    if folder is not None:
        client.log_artifacts(train_run_id, str(folder), f"analysis/{method}/{key}")
    if not show:
        return
    tags = client.get_run(train_run_id).data.tags
    if tags.get(tag(method, "id")) == key:
        step = int(tags.get(tag(method, "step"), "0"))
    else:
        step = int(tags.get(tag(method, "step"), "-1")) + 1
    now = int(time.time() * 1000)
    client.log_batch(train_run_id, metrics=[Metric(f"{method}/{k}", float(v), now, step) for k, v in metrics.items()],
                     tags=[RunTag(tag(method), record_id), RunTag(tag(method, "id"), key),
                           RunTag(tag(method, "settings"), readable(settings)), RunTag(tag(method, "step"), str(step))])
    summary = folder / "summary.png" if folder is not None else None
    if summary is not None and summary.is_file():  # the UI's image grid then compares runs side by side
        with Image.open(summary) as image:
            client.log_image(train_run_id, image.convert("RGB"), key=f"{method}/examples", step=step)


def run_analyze(cfg: AnalyzeConfig, reuse: bool = False) -> AnalysisOutcome:
    """Resolve the model, run the methods, record them, show them on the training run.
    With `reuse`, a method whose record with the same settings id exists is not recomputed."""
    configure_tracking()
    client = MlflowClient()
    model, resolved, ckpt = load_model(cfg.model, resolve_device(cfg.device))
    root = analysed_root(cfg, client, resolved)
    data = load_checked_data(cfg, root, ckpt, resolved)
    settings, ids = method_settings(cfg, resolved, data)
    # Two analyses with these settings started together: one computes, the other waits and reuses.
    with claimed(f"analysis.{digest(ids)}", f"{'+'.join(cfg.method)} of {resolved.uri}", client) as claim:
        return record_analysis(cfg, client, resolved, model, data, root, settings, ids, reuse or claim.waited)


def analysed_root(cfg: AnalyzeConfig, client: MlflowClient, resolved: ResolvedModel) -> str:
    """The data root: `--data-root`, else the one the version's training run recorded."""
    params = client.get_run(resolved.run_id).data.params
    root = cfg.data_root or params.get("data_root_abs") or params.get("data_root")
    if not root:
        raise FgvcError(f"{resolved.uri}: its training run records no data_root; pass --data-root")
    return root


def load_checked_data(cfg: AnalyzeConfig, root: str, ckpt: dict, resolved: ResolvedModel) -> AnalysisData:
    """The analysed images, refused before a run exists (a refusal leaves no FAILED run) when
    they do not fit the model or lack what a method needs."""
    data = load_analysis_data(root, cfg.split, cfg.num_images, cfg.seed, cfg.mask_root,
                              num_classes=ckpt["spec"]["num_classes"])
    check_fits_model(data, ckpt["spec"], ckpt.get("label_names"), resolved.uri)
    check_inputs(data, cfg.method)
    return data


def method_settings(cfg: AnalyzeConfig, resolved: ResolvedModel, data: AnalysisData
                    ) -> tuple[dict[str, dict], dict[str, str]]:
    """Per method: the settings its numbers depend on, and their id (the record's key)."""
    context = {"model_version": resolved.uri, "data_digest": data.digest, "mask_source": data.mask_source}
    settings = {m: {**settings_of(cfg, METHODS.get(m).settings), **METHODS.get(m).fixed_settings}
                for m in cfg.method}
    return settings, {m: settings_id(settings[m], context) for m in cfg.method}


def record_analysis(cfg: AnalyzeConfig, client: MlflowClient, resolved: ResolvedModel, model, data: AnalysisData,
                    root: str, settings: dict, ids: dict, reuse: bool) -> AnalysisOutcome:
    """Reuse the records found (with `reuse`), compute the other methods in a new record run,
    and show each result on the training run (see the module doc)."""
    outcome = AnalysisOutcome("", {}, ids)
    if reuse:
        attach_reused(cfg, client, resolved, settings, outcome)
    todo = tuple(m for m in cfg.method if m not in outcome.reused)
    if not todo:
        outcome.record_run_id = next(iter(outcome.reused.values()))
        return outcome
    with tracked_run(EXPERIMENT, f"analyze-{'+'.join(todo)}-{resolved.name}-v{resolved.version}", task="analyze",
                     description=record_description(cfg, resolved, data, todo),
                     tags=record_tags(cfg, resolved, todo, settings, ids),
                     experiment_description=EXPERIMENT_DESCRIPTION) as run:
        outcome.record_run_id = run.info.run_id
        log_params({**cfg.params(), "method": ",".join(todo), "model_version": resolved.version,
                    "data_root": str(root), "mask_source": data.mask_source, "num_images_effective": len(data.labels)})
        compute_and_record(cfg, client, resolved, model, data, todo, settings, outcome)
    report_hidden(resolved, todo, outcome)
    return outcome


def attach_reused(cfg: AnalyzeConfig, client: MlflowClient, resolved: ResolvedModel, settings: dict,
                  outcome: AnalysisOutcome) -> None:
    """The methods with a finished record of the same settings id: its numbers, attached to the
    training run like new ones."""
    found = {m: r for m in cfg.method if (r := find_record(m, outcome.ids[m])) is not None}
    for m, record in found.items():
        outcome.reused[m] = record.info.run_id
        metrics = {k.split("/", 1)[1]: v for k, v in record.data.metrics.items() if k.startswith(f"{m}/")}
        attach_result(outcome, client, cfg, resolved, m, settings[m], record.info.run_id, metrics, None)


def record_description(cfg: AnalyzeConfig, resolved: ResolvedModel, data: AnalysisData, todo: tuple) -> str:
    return (f"{', '.join(todo)} of {code(resolved.uri)} (training run {code(resolved.run_id)}) on "
            f"{len(data.labels)} {cfg.split} images of {code(data.root)}; masks: {data.mask_source}.")


def record_tags(cfg: AnalyzeConfig, resolved: ResolvedModel, todo: tuple, settings: dict, ids: dict) -> dict:
    """The model analysed and, per method, its settings id (what finds the record again) and
    its settings (readable)."""
    return {"fgvc.model_uri": cfg.model, "fgvc.model_version": f"{resolved.name}/{resolved.version}",
            "fgvc.source_run": resolved.run_id, **{tag(m, "id"): ids[m] for m in todo},
            **{tag(m, "settings"): readable(settings[m]) for m in todo}}


def compute_and_record(cfg: AnalyzeConfig, client: MlflowClient, resolved: ResolvedModel, model,
                       data: AnalysisData, todo: tuple, settings: dict, outcome: AnalysisOutcome) -> None:
    """Run the methods `todo` and record each in the active record run, then show it on the
    training run."""
    with tempfile.TemporaryDirectory(prefix="fgvc-analysis-") as tmp:
        results = run_methods(model, data, cfg, Path(tmp), todo)
        for m, result in results.items():
            fencing.ensure_held(f"recording {m}")  # the analysis is claimed: still this process's
            folder = Path(tmp) / m
            log_method_result(folder, resolved, m, settings[m], outcome.ids[m], result)
            attach_result(outcome, client, cfg, resolved, m, settings[m], outcome.record_run_id, result.metrics, folder)


def log_method_result(folder: Path, resolved: ResolvedModel, method: str, settings: dict, key: str,
                      result: MethodResult) -> None:
    """`analysis/<method>/` (with metrics.json), the metrics `<method>/...` and the params
    `<method>.<info>` of the record run."""
    (folder / "metrics.json").write_text(json.dumps(
        {"model": resolved.uri, "settings": settings, "settings_id": key, "info": result.info,
         "metrics": result.metrics}, indent=2))
    mlflow.log_metrics({f"{method}/{k}": v for k, v in result.metrics.items()})
    if result.info:
        log_params({f"{method}.{k}": v for k, v in result.info.items()})
    mlflow.log_artifacts(str(folder), f"analysis/{method}")


def attach_result(outcome: AnalysisOutcome, client: MlflowClient, cfg: AnalyzeConfig, resolved: ResolvedModel,
                  method: str, settings: dict, record_id: str, metrics: dict[str, float], folder: Path | None
                  ) -> None:
    """A method's result into `outcome`, and attached to the training run (shown there when
    :func:`_show` says so)."""
    outcome.metrics[method] = metrics
    outcome.shown[method] = _show(client, resolved.run_id, method, outcome.ids[method], cfg.show_on_training_run)
    _attach(client, resolved.run_id, method, outcome.ids[method], settings, record_id, metrics, folder,
            outcome.shown[method])


def report_hidden(resolved: ResolvedModel, todo: tuple, outcome: AnalysisOutcome) -> None:
    hidden = [m for m in todo if not outcome.shown[m]]
    if hidden:
        log.info("training run %s keeps showing its earlier %s results (other settings); these are in record "
                 "run %s (pass --show-on-training-run true to show them there)", resolved.run_id,
                 ", ".join(hidden), outcome.record_run_id)
