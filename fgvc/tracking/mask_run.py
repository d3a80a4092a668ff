"""The `mask` entry point as an MLflow run: build the background-removed dataset and record it.

Experiment ``fgvc-mask``, run ``mask-<segmenter>`` (or the run ``mlflow run`` created). Logged:
params (segmenter, effective weights, threshold, sizes, source root and digest, destination,
device, workers), metrics per split (``mask/<split>/images``, ``fallbacks``, ``fallback_rate``,
``person_ratio_mean``, ``person_ratio_median``, ``images_per_s``), the source and output roots
as run inputs (contexts "source" and "output"), ``meta.json`` and two plots
(``plots/person_ratio_hist.png``, ``plots/mask_examples.png``).

Under torchrun only rank 0 talks to MLflow; the other ranks just do their share of shards.
"""

from __future__ import annotations

from pathlib import Path

import mlflow

from fgvc.masking import DEFAULT_MIN_PERSON_RATIO, Segmenter, execute, plan_masking
from fgvc.masking.plots import pick_examples, plot_mask_examples, plot_person_ratio_hist
from fgvc.tracking.runs import artifact_dir, git_commit, log_dataset, log_params, tracked_run

EXPERIMENT = "fgvc-mask"
EXAMPLES = 8


def run_mask(src_root: str | Path = "data/demo", dst_root: str | Path = "data/demo-masked",
             segmenter: str | Segmenter = "deeplabv3_resnet101", seg_weights: str | Path | None = None,
             min_person_ratio: float = DEFAULT_MIN_PERSON_RATIO, seg_size: int = 520,
             batch_size: int = 16, device: str = "auto", workers: int = 1, overwrite: bool = False,
             progress: bool = True) -> dict:
    """Mask ``src_root`` into ``dst_root`` inside a tracked run; returns the written meta.json
    (``{}`` on torchrun ranks other than 0, which leave meta.json to rank 0).

    Refusals (unsafe or complete destination, bad source shard, missing weights) are raised
    before a run is started.
    """
    plan = plan_masking(src_root, dst_root, segmenter, seg_weights, min_person_ratio, seg_size,
                        batch_size, device, workers, overwrite=overwrite)
    if plan.rank != 0:
        execute(plan, progress=progress)
        return {}
    tags = {"fgvc.task": "mask", "fgvc.git_commit": git_commit()}
    with tracked_run(EXPERIMENT, f"mask-{plan.segmenter_name}", tags=tags):
        log_params(plan.describe())
        log_dataset(plan.src, plan.source_digest, name=plan.src.name, context="source")
        report = execute(plan, progress=progress)
        meta = report.meta
        metrics = {"mask/skipped_shards": report.skipped_shards}
        for split, stats in meta["masking"]["statistics"].items():
            for key in ("images", "fallbacks", "fallback_rate", "person_ratio_mean",
                        "person_ratio_median"):
                metrics[f"mask/{split}/{key}"] = stats[key]
            rate = report.images_per_s(split)
            if rate is not None:
                metrics[f"mask/{split}/images_per_s"] = rate
        if report.images_per_s() is not None:
            metrics["mask/images_per_s"] = report.images_per_s()
        mlflow.log_metrics(metrics)
        with artifact_dir() as tmp:
            plot_person_ratio_hist(report.person_ratios, plan.min_person_ratio,
                                   tmp / "person_ratio_hist.png")
            plot_mask_examples(pick_examples(plan.src, plan.dst, EXAMPLES), tmp / "mask_examples.png")
            mlflow.log_artifacts(str(tmp), artifact_path="plots")
        mlflow.log_artifact(str(plan.dst / "meta.json"))
        log_dataset(plan.dst, meta["digest"], name=plan.dst.name, context="output")
    return meta
