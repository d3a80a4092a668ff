"""Registered versions are MLflow models.

A training (or an imported checkpoint) logs its best checkpoint as an MLflow model: a
LoggedModel of the run, at the best epoch's step, with the best epoch's validation metrics
linked to it, a signature and an input example. The model's files are the checkpoint (state
dict + spec) and fgvc's code; MLflow loads it by running fgvc/tracking/pyfunc_model.py
(models-from-code), so loading never unpickles a model object. The model is then registered
as a new version of its registered model, tagged and described, and `candidate` moves to it.
"""

from __future__ import annotations

import logging
import shlex
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import timm
import torch
import torchvision
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.tracking import MlflowClient

import fgvc
from fgvc.models.predict import Predictor
from fgvc.tracking.markdown import code

log = logging.getLogger("fgvc")

CANDIDATE, CHAMPION = "candidate", "champion"
MODEL_NAME = "model"  # the LoggedModel's name within its run
CHECKPOINT_ARTIFACT = "checkpoint"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
REGISTERED_DESCRIPTION = (
    "fgvc designer classifier. Each version is an MLflow model: `mlflow.pyfunc.load_model(uri).predict(images)` "
    "takes uint8 images [N, H, W, 3] of any size (or JPEG/PNG as base64 strings in a column `image`) and returns the designer, class index and top-k "
    "probabilities per image. Aliases: `candidate` is the newest version, `champion` the best version "
    "of one dataset (moved by `fgvc promote`).")


def requirements() -> list[str]:
    """What an environment needs to load the model (fgvc's own code travels with it)."""
    version = lambda v: v.split("+")[0]  # noqa: E731  local build tags (+cpu, +cu130)
    return [f"torch=={version(torch.__version__)}", f"torchvision=={version(torchvision.__version__)}",
            f"timm=={timm.__version__}", f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}",
            f"pandas=={pd.__version__}"]


def log_model(checkpoint: Path, example: np.ndarray, step: int, metrics: dict[str, float]):
    """Log the checkpoint as the active run's MLflow model; returns MLflow's ModelInfo."""
    predictor = Predictor.from_checkpoint(checkpoint)
    output = pd.DataFrame(predictor.predict(example, top_k=5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow's notes on example formats, integer columns, type hints
        inferred = infer_signature(example, output, params={"top_k": 5})
        # No input schema: MLflow would cast what it parses to it (a float pixel silently
        # truncated to a black one); the model checks its input itself (uint8 arrays of any
        # size, or base64 JPEG/PNG in a column `image`) and refuses anything else.
        signature = ModelSignature(inputs=None, outputs=inferred.outputs, params=inferred.params)
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=str(PYFUNC_CODE), artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
            code_paths=[str(Path(fgvc.__file__).parent)], signature=signature, input_example=example,
            pip_requirements=requirements(), step=step)
    mlflow.log_metrics(metrics, step=step, model_id=info.model_id)
    return info


def register(model_uri: str, name: str, tags: dict, describe) -> str:
    """A new version of `name` from a logged model, described by `describe(version)`;
    `candidate` moves to it."""
    client = MlflowClient()
    try:
        client.create_registered_model(name, description=REGISTERED_DESCRIPTION)
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
            raise
    version = str(mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()}).version)
    client.update_model_version(name, version, description=describe(version))
    client.set_registered_model_alias(name, CANDIDATE, version)
    return version


def version_description(name: str, version: str, run_name: str, regime: str, val_acc: float) -> str:
    uri = f"models:/{name}/{version}"
    return (f"{run_name}: regime {regime}, best validation accuracy {val_acc:.4f}.\n\n"
            f"Load: {code(f'mlflow.pyfunc.load_model({uri!r}).predict(images)')}\n\n"
            f"Serve: {code(f'mlflow models serve -m {uri} --env-manager local')}\n\n"
            f"Analyse: {code(f'fgvc analyze --model {shlex.quote(uri)} --method all')}")


def example_images(session, count: int = 2) -> np.ndarray:
    """The first validation images as uint8 [N, H, W, 3]: the model's input example."""
    items = session.val_set.gather(torch.arange(min(count, len(session.val_set))))
    return items["images"].permute(0, 2, 3, 1).contiguous().numpy()


def log_and_register(best_checkpoint: Path, name: str, metrics: dict[str, float], session, run_id: str) -> str:
    """Log the training's best checkpoint as its MLflow model, with `metrics` (the best epoch's
    validation metrics) linked to it at the best epoch's step, and register it."""
    best = session.best
    info = log_model(best_checkpoint, example_images(session), best["epoch"], metrics)
    tags = {"regime": session.regime, "dataset_digest": session.data.digest, "val_acc": f"{best['val/acc']:.6f}",
            "val_balanced_acc": f"{best['val/balanced_acc']:.6f}", "arch": session.cfg.arch,
            "best_epoch": best["epoch"], "data_root": str(session.data.root), "run_id": run_id,
            "image_size": f"{session.data.image_size[0]}x{session.data.image_size[1]}"}
    run_name = mlflow.get_run(run_id).info.run_name
    return register(info.model_uri, name, tags, lambda version: version_description(
        name, version, run_name, session.regime, best["val/acc"]))
