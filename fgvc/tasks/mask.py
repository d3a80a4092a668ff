"""The `mask` entry point as an MLflow run: build the background-removed dataset and record it.

Experiment ``fgvc-mask``, run ``mask-<segmenter>`` (or the run ``mlflow run`` created). Logged:
params (the config, effective weights, source root and digest, world size), metrics per split
(``mask/<split>/images``, ``fallbacks``, ``fallback_rate``, ``person_ratio_mean``,
``person_ratio_median``, ``images_per_s``), the source and output roots as run inputs
(contexts "source" and "output"), ``meta.json`` and two plots
(``plots/person_ratio_hist.png``, ``plots/mask_examples.png``).

Under torchrun (``--workers N``) every rank masks its share of the shards; only rank 0 talks
to MLflow.
"""

from __future__ import annotations

import mlflow

from fgvc import distributed, mlflow_names
from fgvc.devices import resolve_device
from fgvc.masking import MaskConfig, MaskPlan, Segmenter, plan_masking
from fgvc.masking.examples import pick_examples
from fgvc.masking.job import MaskReport, execute
from fgvc.tracking.markdown import code
from fgvc.tracking.runs import artifact_dir, log_dataset, log_params, tracked_run
from fgvc.viz.masking import plot_mask_examples, plot_person_ratio_hist

EXPERIMENT_DESCRIPTION = ("Background removal by `mask`: person segmentation of a dataset root into its masked copy "
                          "(fallback rates, person coverage, examples).")
EXPERIMENT = mlflow_names.MASK
EXAMPLES = 8


def run_mask(cfg: MaskConfig, progress: bool = True, segmenter: Segmenter | None = None) -> dict:
    """Mask ``cfg.src_root`` into ``cfg.dst_root`` inside a tracked run; returns the written
    meta.json (``{}`` on torchrun ranks other than 0). Refusals (unsafe or complete
    destination, bad source shard, missing weights) are raised before a run is started.
    ``segmenter`` injects a segmenter instance instead of building ``cfg.segmenter``."""
    with distributed.process_group(resolve_device(cfg.device)) as world:
        plan = plan_of(cfg, world, segmenter)
        if not world.is_main:
            execute(plan, progress=False)
            return {}
        with tracked_run(EXPERIMENT, f"mask-{plan.segmenter_name}", task="mask", description=describe_masking(plan),
                         experiment_description=EXPERIMENT_DESCRIPTION):
            log_params({**cfg.params(), **plan.describe()})
            log_dataset(plan.src, plan.source_digest, name=plan.src.name, context="source")
            report = execute(plan, progress=progress)
            mlflow.log_metrics(masking_metrics(report))
            log_plots(plan, report)
            mlflow.log_artifact(str(plan.dst / "meta.json"))
            assert report.meta is not None  # rank 0, the main rank, writes meta.json
            log_dataset(plan.dst, report.meta["digest"], name=plan.dst.name, context="output")
        return report.meta


def plan_of(cfg: MaskConfig, world: distributed.World, segmenter: Segmenter | None) -> MaskPlan:
    """Every check before a byte is written (fgvc.masking.plan), on every rank."""
    return plan_masking(cfg.src_root, cfg.dst_root, segmenter or cfg.segmenter, seg_weights=cfg.seg_weights,
                        min_person_ratio=cfg.min_person_ratio, seg_size=cfg.seg_size, batch_size=cfg.batch_size,
                        device=cfg.device, world=world, overwrite=cfg.overwrite, splits=cfg.splits)


def describe_masking(plan: MaskPlan) -> str:
    return (f"Background removal of {code(plan.src)} into {code(plan.dst)} with segmenter "
            f"{code(plan.segmenter_name)} ({', '.join(plan.splits)}).")


def masking_metrics(report: MaskReport) -> dict[str, float]:
    """`mask/skipped_shards`, per split `mask/<split>/...` and `mask/images_per_s`."""
    assert report.meta is not None  # rank 0's report (meta.json)
    metrics: dict[str, float] = {"mask/skipped_shards": report.skipped_shards}
    for split, stats in report.meta["masking"]["statistics"].items():
        for key in ("images", "fallbacks", "fallback_rate", "person_ratio_mean", "person_ratio_median"):
            metrics[f"mask/{split}/{key}"] = stats[key]
        rate = report.images_per_s(split)
        if rate is not None:
            metrics[f"mask/{split}/images_per_s"] = rate
    overall = report.images_per_s()
    if overall is not None:
        metrics["mask/images_per_s"] = overall
    return metrics


def log_plots(plan: MaskPlan, report: MaskReport) -> None:
    """`plots/person_ratio_hist.png` and `plots/mask_examples.png`."""
    with artifact_dir() as tmp:
        plot_person_ratio_hist(report.person_ratios, plan.min_person_ratio, tmp / "person_ratio_hist.png")
        plot_mask_examples(pick_examples(plan.src, plan.dst, EXAMPLES), tmp / "mask_examples.png")
        mlflow.log_artifacts(str(tmp), artifact_path="plots")
