"""What a training writes besides its metrics (fgvc.tasks.train): metrics.csv, run_summary.md
(also the run's description) and its best checkpoint logged as the run's MLflow model and
registered."""

from __future__ import annotations

import csv
import io
import shlex
from pathlib import Path

import mlflow
import numpy as np
import torch

from fgvc.config import render_params
from fgvc.mlflow_names import CANDIDATE
from fgvc.tracking.logged_model import background_removed, log_model, register_version, version_description
from fgvc.tracking.markdown import code, text
from fgvc.training.session import Session


def metrics_csv(history: list[dict]) -> str:
    """One row per epoch: the original scripts' columns first, then every logged metric."""
    original = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")
    ours = [k for k in history[0] if k != "epoch"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*original, *ours])
    for h in history:
        writer.writerow([h["epoch"], *(f"{h[k]:.6f}" for k in ("train/loss", "train/acc", "val/loss", "val/acc")),
                         *(f"{h[k]:.6g}" for k in ours)])
    return out.getvalue()


def summary_markdown(name: str, session: Session, best: dict, version: str | None, reg_name: str | None,
                     alias: str | None = "candidate") -> str:
    """run_summary.md, also the run's description: what the original readme.txt said, and more."""
    cfg, data = session.cfg, session.data
    params = render_params(cfg)
    lines = [f"# {text(name)}", "",
             f"Designer classification on {code(str(data.root))} (dataset digest {code(data.digest)}, "
             f"regime **{text(session.regime)}**, {data.num_classes} designers, images "
             f"{data.image_size[0]}x{data.image_size[1]}).", "",
             f"Best epoch {best['epoch']}: val accuracy **{best['val/acc']:.4f}** (balanced "
             f"{best['val/balanced_acc']:.4f}, top-5 {best['val/top5']:.4f}; chance {1 / data.num_classes:.4f}). "
             f"The `best/...` metrics are these best-epoch values; `val/...` are per epoch.", "",
             "## Configuration", "", "| param | value |", "|---|---|"]
    lines += [f"| {text(k)} | {code(v)} |" for k, v in params.items()]
    lines += ["", "## Epochs", "",
              "| epoch | train loss | train acc | val loss | val acc | val top5 | lr backbone | lr head | s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for h in session.history:
        lines.append(f"| {h['epoch']} | {h['train/loss']:.4f} | {h['train/acc']:.4f} | {h['val/loss']:.4f} | "
                     f"{h['val/acc']:.4f} | {h['val/top5']:.4f} | {h['lr/backbone']:.2e} | "
                     f"{h['lr/head']:.2e} | {h['time/epoch_s']:.1f} |")
    if version:
        uri = f"models:/{reg_name}/{version}"
        lines += ["", "## Registry", "",
                  f"Registered as {code(uri)}{f' (alias `{alias}`)' if alias else ''}. Load it with "
                  f"`mlflow.pyfunc.load_model({uri!r})`; analyse it with:", "",
                  f"    fgvc analyze --model {shlex.quote(uri)} --method all",
                  f"    mlflow run . -e analyze --env-manager local -P model={uri}"]
    lines += ["", "Artifacts: `plots/` (loss, error, confusion matrix, per-class accuracy), `metrics.csv`, "
              "`checkpoints/best.pt` and `checkpoints/last.pt` (state_dict + model spec; last.pt also the "
              "optimiser state for resuming)."]
    return "\n".join(lines) + "\n"


def input_example(session, count: int = 2) -> np.ndarray:
    """The first validation images as uint8 [N, H, W, 3]: the model's input example."""
    items = session.val_set.gather(torch.arange(min(count, len(session.val_set))))
    return items["images"].permute(0, 2, 3, 1).contiguous().numpy()


def log_and_register(best_checkpoint: Path, name: str, metrics: dict[str, float], session, run_id: str,
                     study: str | None = None, alias: str | None = CANDIDATE, metrics_step: int | None = None) -> str:
    """Log the training's best checkpoint as its MLflow model (at the best epoch's step), with
    `metrics` (the best epoch's validation metrics) linked to it at `metrics_step` (default: the
    best epoch's; 0 on a study's cell, :func:`best_step`), and register it: `alias` (`candidate`;
    None for a study's cell) moves to it. `study`: the study run id, if any."""
    best = session.best
    step = best["epoch"] if metrics_step is None else metrics_step
    info = log_model(best_checkpoint, input_example(session), best["epoch"], metrics if step == best["epoch"] else {},
                     session.regime)
    if step != best["epoch"]:
        mlflow.log_metrics(metrics, step=step, model_id=info.model_id)
    tags = {"regime": session.regime, "dataset_digest": session.data.digest, "val_acc": f"{best['val/acc']:.6f}",
            "val_balanced_acc": f"{best['val/balanced_acc']:.6f}", "arch": session.cfg.arch,
            "best_epoch": best["epoch"], "data_root": str(session.data.root), "run_id": run_id,
            "image_size": f"{session.data.image_size[0]}x{session.data.image_size[1]}",
            "background_removed": str(background_removed(session.regime)).lower()}
    if study:
        tags["fgvc.study"] = study
    run_name = mlflow.get_run(run_id).info.run_name
    return register_version(info.model_uri, name, tags, lambda version: version_description(
        name, version, run_name, session.regime, best["val/acc"], Path(session.data.root).name, study or ""),
        alias=alias)
