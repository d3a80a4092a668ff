"""`analyze`: interpret a registered model and attach pictures and numbers to the training run
that produced it.

Artifacts go to `analysis/<method>/` of the source training run with fixed file names, so a
re-run replaces them; metrics go there as `<method>/...`. The analysis run itself is nested
under the training run, tagged with the model URI and version, and carries the same metrics.
"""

from __future__ import annotations

import csv
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from mlflow.tracking import MlflowClient

from fgvc.analysis.neighbors import embed
from fgvc.analysis.suite import (ATTRIBUTION_METHODS, METHODS, AttributionReport, attribution_report,
                                 neighbor_report, shortcut_report)
from fgvc.data.dataset import BatchLoader, ShardDataset
from fgvc.data.shards import ShardError
from fgvc.tracking.registry import ResolvedModel, load_model
from fgvc.tracking.runs import configure_tracking, log_params, tracked_run
from fgvc.viz import (save_attribution_grid, save_bar_chart, save_histogram, save_neighbor_grid,
                      save_variant_grid)

log = logging.getLogger("fgvc")

EXAMPLES = 4  # single-image example files per attribution method
SUMMARY_ROWS = 8  # rows of the per-method summary grid


@dataclass
class AnalysisData:
    """The images analysed (a seeded class-stratified subset) and their person masks."""

    root: Path
    split: str
    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor
    masks: torch.Tensor | None  # uint8 [N, H, W]
    venues: torch.Tensor | None
    names: list[str]
    mask_source: str


def load_analysis_data(root: str | Path, split: str, num_images: int, seed: int,
                       mask_root: str | Path | None = None, num_classes: int | None = None) -> AnalysisData:
    ds = ShardDataset(root, split, count=num_images, seed=seed, num_classes=num_classes)
    items = ds.gather(torch.arange(len(ds)))
    masks, source = items.get("masks"), f"{root} ({split} shards)"
    if masks is None and mask_root is not None:
        masked = ShardDataset(mask_root, split, count=num_images, seed=seed, num_classes=num_classes)
        if len(masked) != len(ds) or "masks" not in masked.keys:
            raise ShardError(f"{mask_root}/{split}: does not match {root}/{split} or has no 'masks' "
                             f"(build it with `fgvc mask --src-root {root}`)")
        other = masked.gather(torch.arange(len(masked)))
        if not torch.equal(other["labels"], items["labels"]):
            raise ShardError(f"{mask_root}/{split}: labels differ from {root}/{split}; "
                             f"a mask root must be built from the same data")
        masks, source = other["masks"], f"{mask_root} ({split} shards)"
    names = [ds.label_names.get(i, str(i)) for i in range(ds.num_classes)]
    return AnalysisData(Path(root), split, items["images"], items["labels"], masks, items.get("venues"),
                        names, source if masks is not None else "none")


def _write_csv(path: Path, columns: dict[str, list]) -> Path:
    keys = list(columns)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys)
        writer.writerows(zip(*(columns[k] for k in keys)))
    return path


def _attribution_artifacts(report: AttributionReport, data: AnalysisData, out: Path) -> None:
    names = data.names
    title = lambda i: (f"{names[int(report.labels[i])]} -> {names[int(report.predictions[i])]}"  # noqa: E731
                       + (f" | bg {report.per_image['bg_energy_fraction'][i]:.2f}"
                          if "bg_energy_fraction" in report.per_image else ""))
    rows = min(SUMMARY_ROWS, len(report.images))
    save_attribution_grid(out / "summary.png", report.images[:rows], report.maps[:rows],
                          [title(i) for i in range(rows)])
    for i in range(min(EXAMPLES, len(report.images))):
        save_attribution_grid(out / f"example_{i:02d}.png", report.images[i:i + 1], report.maps[i:i + 1],
                              [title(i)])
    if "bg_energy_fraction" in report.per_image:
        save_histogram(out / "bg_energy_fraction_hist.png", report.per_image["bg_energy_fraction"],
                       f"{report.method}: share of attribution on the background", "background energy fraction")
    columns = {"index": list(range(len(report.labels))), "label": report.labels.tolist(),
               "target": report.targets.tolist(), "prediction": report.predictions.tolist()}
    columns.update({k: [round(float(x), 6) for x in v] for k, v in report.per_image.items()})
    _write_csv(out / "per_image.csv", columns)
    torch.save({"maps": report.maps.half(), "labels": report.labels, "targets": report.targets},
               out / "maps.pt")


def _run_attribution(method: str, model, data: AnalysisData, options: dict, out: Path) -> dict:
    report = attribution_report(model, method, data.images, data.labels, data.masks,
                                target=options["target"], batch_size=options["batch_size"],
                                occlusion_window=options["window"], occlusion_stride=options["stride"],
                                occlusion_fill=options["fill"])
    _attribution_artifacts(report, data, out)
    return report.metrics


def _run_neighbors(model, data: AnalysisData, options: dict, out: Path) -> dict:
    ref = ShardDataset(data.root, options["reference_split"])
    batch = options["batch_size"] * 4
    ref_emb = embed(model, (b.images for b in BatchLoader(ref, batch, prefetch=0)))
    query_emb = embed(model, (data.images[s:s + batch] for s in range(0, len(data.images), batch)))
    ref_items = ref.gather(torch.arange(len(ref)))
    report = neighbor_report(query_emb, ref_emb, data.labels, ref.labels, k=options["k"],
                             query_venues=data.venues, ref_venues=ref_items.get("venues"),
                             exclude_same_label=options["exclude_same_designer"])
    rows = min(SUMMARY_ROWS, len(data.labels))
    save_neighbor_grid(out / "neighbors_grid.png", data.images[:rows], ref_items["images"],
                       report.indices[:rows], data.labels[:rows], ref.labels, data.names)
    _write_csv(out / "neighbors.csv", {
        "query": list(range(len(data.labels))), "label": data.labels.tolist(),
        "neighbors": [" ".join(map(str, r)) for r in report.indices.tolist()],
        "scores": [" ".join(f"{s:.4f}" for s in r) for r in report.scores.tolist()]})
    return {**report.metrics, "num_queries": float(len(data.labels)), "num_reference": float(len(ref))}


def _run_shortcut(model, data: AnalysisData, options: dict, out: Path) -> dict:
    report = shortcut_report(model, data.images, data.masks, data.labels, len(data.names),
                             seed=options["seed"], batch_size=options["batch_size"])
    save_variant_grid(out / "variants.png", report.variants, min(6, len(data.labels)))
    names = ["original", "only_fg", "no_fg", "mixed_same", "mixed_rand"]
    save_bar_chart(out / "accuracy_by_variant.png", names, [report.metrics[f"acc_{n}"] for n in names],
                   "Accuracy by background variant", chance=report.metrics["chance"])
    return report.metrics


def run_methods(model, data: AnalysisData, methods: list[str], options: dict, out: Path) -> dict[str, dict]:
    """Run each method, writing its files to `out/<method>/`; returns metrics per method."""
    results = {}
    for method in methods:
        if method in ("shortcut",) and data.masks is None:
            raise ShardError(f"{data.root}/{data.split}: the shortcut test needs person masks; the shards have "
                             f"none, so pass mask_root=<a masked root built from this data>")
        folder = out / method
        folder.mkdir(parents=True, exist_ok=True)
        log.info("analysis: %s on %d %s images", method, len(data.labels), data.split)
        if method in ATTRIBUTION_METHODS:
            results[method] = _run_attribution(method, model, data, options, folder)
        elif method == "neighbors":
            results[method] = _run_neighbors(model, data, options, folder)
        else:
            results[method] = _run_shortcut(model, data, options, folder)
    return results


def parse_methods(method: str) -> list[str]:
    """`all` = gradcam, occlusion, neighbors (the shortcut test is asked for by name, or by
    `all+shortcut`); a comma list picks several."""
    chosen = []
    for part in method.replace("+", ",").split(","):
        part = part.strip()
        if part == "all":
            chosen += ["gradcam", "occlusion", "neighbors"]
        elif part in METHODS:
            chosen.append(part)
        else:
            raise ValueError(f"unknown analysis method {part!r}; choose from {', '.join(METHODS)}, all")
    return list(dict.fromkeys(chosen))


DEFAULT_OPTIONS = dict(split="val", num_images=64, seed=0, target="predicted", batch_size=32,
                       window=32, stride=16, fill="zero", k=5, reference_split="train",
                       exclude_same_designer=False)


def run_analyze(model_uri: str, method: str = "gradcam", data_root: str | None = None,
                mask_root: str | None = None, device: str = "cpu", **overrides) -> dict[str, dict]:
    """Resolve the model, run the methods, attach the results to its training run."""
    configure_tracking()
    options = {**DEFAULT_OPTIONS, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown analysis options {sorted(unknown)}")
    methods = parse_methods(method)
    model, resolved, ckpt = load_model(model_uri, device)
    client = MlflowClient()
    source_run = client.get_run(resolved.run_id)
    root = data_root or source_run.data.params.get("data_root_abs") or source_run.data.params.get("data_root")
    if not root:
        raise ValueError(f"{resolved.uri}: its training run records no data_root; pass data_root=")
    data = load_analysis_data(root, options["split"], options["num_images"], options["seed"], mask_root,
                              num_classes=ckpt["spec"]["num_classes"])
    experiment = client.get_experiment(source_run.info.experiment_id).name
    run_name = f"analyze-{'+'.join(methods)}-{resolved.name}-v{resolved.version}"
    tags = {"fgvc.model_uri": model_uri, "fgvc.model_version": f"{resolved.name}/{resolved.version}",
            "fgvc.source_run": resolved.run_id, "mlflow.parentRunId": resolved.run_id}
    with tracked_run(experiment, run_name, tags=tags, parent_run_id=None) as run:
        log_params({"model": model_uri, "model_version": resolved.version, "method": ",".join(methods),
                    "data_root": root, "mask_source": data.mask_source, **options})
        with tempfile.TemporaryDirectory(prefix="fgvc-analysis-") as tmp:
            results = run_methods(model, data, methods, options, Path(tmp))
            for name, metrics in results.items():
                flat = {f"{name}/{k}": v for k, v in metrics.items()}
                mlflow.log_metrics(flat)
                mlflow.log_dict(metrics, f"analysis/{name}/metrics.json")
                _attach_to_training_run(client, resolved, name, flat, Path(tmp) / name)
        log.info("analysis attached to training run %s (run %s)", resolved.run_id, run.info.run_id)
    return results


def _attach_to_training_run(client: MlflowClient, resolved: ResolvedModel, method: str, metrics: dict,
                            folder: Path) -> None:
    import json

    (folder / "metrics.json").write_text(json.dumps(
        {"model": resolved.uri, **{k.split("/", 1)[1]: v for k, v in metrics.items()}}, indent=2))
    client.log_artifacts(resolved.run_id, str(folder), f"analysis/{method}")
    for key, value in metrics.items():
        client.log_metric(resolved.run_id, key, value)
