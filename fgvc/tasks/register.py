"""`register`: an original project's checkpoint as a tracked, registered fgvc model.

One run (task `register`, experiment fgvc-train, so it sits beside the trainings it compares
with) holds the params, the validation metrics under the training runs' names (`val/...` at
step 0 and `best/...`), the confusion and per-class plots, the fgvc checkpoint and the MLflow
model; the version is registered like a trained one, so `analyze --model models:/...@candidate`
works on it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow

from fgvc.mlflow_names import registered_name
from fgvc.regimes import regime_of
from fgvc.tasks.train import EXPERIMENT, EXPERIMENT_DESCRIPTION
from fgvc.tracking.logged_model import log_model, register_version, version_description
from fgvc.tracking.markdown import code
from fgvc.tracking.runs import artifact_dir, log_dataset, log_params, tracked_run
from fgvc.training.imported import Imported, RegisterConfig, example_images, fgvc_checkpoint, import_checkpoint
from fgvc.training.loop import EvalResult
from fgvc.viz.training_plots import save_confusion, save_per_class

log = logging.getLogger("fgvc")


def run_register(cfg: RegisterConfig) -> tuple[str, str, str]:
    """Import, evaluate, record and register; returns (run id, registered name, version)."""
    imported = import_checkpoint(cfg)  # every refusal happens before the run exists
    data, val = imported.data, imported.val
    name = cfg.registered_model or registered_name(imported.arch)
    regime = regime_of(data.masked, None)
    run_name = f"{imported.arch}-imported-{Path(cfg.checkpoint).stem}"
    with tracked_run(EXPERIMENT, run_name, task="register", description=describe_import(cfg, imported),
                     tags=import_tags(cfg, imported, regime), experiment_description=EXPERIMENT_DESCRIPTION) as run:
        log_params(import_params(cfg, imported, regime))
        log_dataset(data.root, data.digest, name=data.root.name, context="eval")
        metrics = validation_metrics(val)
        mlflow.log_metrics(metrics, step=0)
        with artifact_dir() as tmp:
            best = log_checkpoint_and_plots(imported, tmp)
            version = register_imported(imported, best, metrics, name, regime, run_name, run.info.run_id)
        mlflow.set_tag("fgvc.model_version", f"{name}/{version}")
        log.debug("registered %s version %s from %s (val acc %.4f)", name, version, cfg.checkpoint, val.acc)
        return run.info.run_id, name, version


def describe_import(cfg: RegisterConfig, imported: Imported) -> str:
    return (f"Checkpoint {code(cfg.checkpoint)} of the original scripts, imported as {imported.arch} "
            f"(normalisation {imported.normalization}) and evaluated on {code(imported.data.root)}: val accuracy "
            f"{imported.val.acc:.4f}.")


def import_tags(cfg: RegisterConfig, imported: Imported, regime: str) -> dict:
    return {"fgvc.regime": regime, "fgvc.arch": imported.arch, "fgvc.dataset_digest": imported.data.digest,
            "fgvc.imported_from": str(Path(cfg.checkpoint).resolve())}


def import_params(cfg: RegisterConfig, imported: Imported, regime: str) -> dict:
    """The config's params and what the import found and evaluated on."""
    data = imported.data
    return {**cfg.params(), "arch_effective": imported.arch, "normalization_effective": imported.normalization,
            "regime": regime, "num_classes": data.num_classes, "dataset_digest": data.digest,
            "image_size": f"{data.image_size[0]}x{data.image_size[1]}", "val_images": imported.val.images,
            "data_root_abs": str(data.root.resolve()), "input_mean": imported.model.spec.mean,
            "input_std": imported.model.spec.std}


def validation_metrics(val: EvalResult) -> dict[str, float]:
    """The training runs' validation metrics, `val/...`."""
    return {"val/acc": val.acc, "val/balanced_acc": val.balanced_acc, "val/top5": val.top5,
            "val/loss": val.loss, "val/error": 1 - val.acc}


def log_checkpoint_and_plots(imported: Imported, tmp: Path) -> Path:
    """`checkpoints/best.pt` (the fgvc checkpoint, written under `tmp`) and the confusion and
    per-class plots; returns the checkpoint's path."""
    data, val = imported.data, imported.val
    best = fgvc_checkpoint(imported, tmp / "best.pt")
    mlflow.log_artifact(str(best), "checkpoints")
    save_confusion(tmp / "confusion_matrix.png", val.confusion, data.label_names, "Confusion matrix (val)")
    save_per_class(tmp / "per_class_accuracy.png", val.per_class_acc, data.label_names,
                   imported.val_set.class_counts(), "Per-class accuracy (val)")
    mlflow.log_artifact(str(tmp / "confusion_matrix.png"), "plots")
    mlflow.log_artifact(str(tmp / "per_class_accuracy.png"), "plots")
    return best


def register_imported(imported: Imported, best: Path, metrics: dict[str, float], name: str, regime: str,
                      run_name: str, run_id: str) -> str:
    """The checkpoint as the run's MLflow model (the `best/...` metrics linked at step 0),
    registered like a trained version (tagged `imported`)."""
    data, val = imported.data, imported.val
    info = log_model(best, example_images(imported.val_set), 0,
                     {f"best/{k.replace('/', '_')}": v for k, v in metrics.items()})
    version_tags = {"regime": regime, "dataset_digest": data.digest, "val_acc": f"{val.acc:.6f}",
                    "val_balanced_acc": f"{val.balanced_acc:.6f}", "arch": imported.arch, "best_epoch": 0,
                    "data_root": str(data.root), "run_id": run_id, "imported": "true",
                    "image_size": f"{data.image_size[0]}x{data.image_size[1]}"}
    return register_version(info.model_uri, name, version_tags, lambda v: version_description(
        name, v, run_name, regime, val.acc))
