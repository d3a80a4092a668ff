"""Registered versions are MLflow models.

A training (or an imported checkpoint) logs its best checkpoint as an MLflow model: a
LoggedModel of the run, at the best epoch's step, with the best epoch's validation metrics
linked to it, a signature and an input example. The model's files are the checkpoint (state
dict + spec) and fgvc's code; MLflow loads it by running fgvc/tracking/pyfunc_model.py
(models-from-code), so loading never unpickles a model object. The model is then registered
as a new version of its registered model, tagged and described, and `candidate` moves to it (a
study's cells register as `fgvc-study-<arch>` and move no alias).
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
from fgvc.mlflow_names import CANDIDATE, STUDY_PREFIX
from fgvc.models.predict import Predictor
from fgvc.tracking.markdown import code

log = logging.getLogger("fgvc")

MODEL_NAME = "model"  # the LoggedModel's name within its run
CHECKPOINT_ARTIFACT = "checkpoint"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
REGISTERED_DESCRIPTION = (
    "fgvc designer classifier. Each version is an MLflow model: `mlflow.pyfunc.load_model(uri).predict(images)` "
    "takes uint8 images [N, H, W, 3] of any size (or JPEG/PNG as base64 strings in a column `image`) "
    "and returns the designer, class index and top-k "
    "probabilities per image. Aliases: `candidate` is the newest version of a user's training, `champion` "
    "the version `fgvc promote` chose (it keeps the champion's dataset and regime unless asked).")
STUDY_DESCRIPTION = (
    "Training cells of fgvc studies (tag `fgvc.study` = the study run). Kept apart from `fgvc-<arch>`, "
    "and no alias is moved, so studies never change what `fgvc-<arch>@candidate` or `@champion` load.")
RAW_PHOTO_WARNING = ("trained on background-removed images (person on black): give it background-removed "
                     "images (`fgvc mask`); on raw photos its predictions are not what it was validated on")


def requirements() -> list[str]:
    """What an environment needs to load the model (fgvc's own code travels with it)."""
    version = lambda v: v.split("+")[0]  # noqa: E731  local build tags (+cpu, +cu130)
    return [f"torch=={version(torch.__version__)}", f"torchvision=={version(torchvision.__version__)}",
            f"timm=={timm.__version__}", f"mlflow=={mlflow.__version__}", f"numpy=={np.__version__}",
            f"pandas=={pd.__version__}"]


def background_removed(regime: str) -> bool:
    from fgvc.regimes import REGIMES

    return regime in REGIMES and REGIMES.get(regime).masked


def log_model(checkpoint: Path, example: np.ndarray, step: int, metrics: dict[str, float],
              regime: str | None = None):
    """Log the checkpoint as the active run's MLflow model; returns MLflow's ModelInfo."""
    predictor = Predictor.from_checkpoint(checkpoint, quiet=True)
    output = pd.DataFrame(predictor.predict(example, top_k=5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow's notes on example formats, integer columns, type hints
        inferred = infer_signature(example, output, params={"top_k": 5})
        # No input schema: MLflow would cast what it parses to it (a float pixel silently
        # truncated to a black one); the model checks its input itself (uint8 arrays of any
        # size, or base64 JPEG/PNG in a column `image`) and refuses anything else.
        signature = ModelSignature(inputs=None, outputs=inferred.outputs, params=inferred.params)
        with Predictor.loading_quietly():
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=str(PYFUNC_CODE), artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
                code_paths=[str(Path(fgvc.__file__).parent)], signature=signature, input_example=example,
                pip_requirements=requirements(), step=step,
                metadata={"fgvc.regime": regime, "fgvc.background_removed": background_removed(regime)}
                if regime else None)
    mlflow.log_metrics(metrics, step=step, model_id=info.model_id)
    return info


def register_version(model_uri: str, name: str, tags: dict, describe, alias: str | None = CANDIDATE) -> str:
    """A new version of `name` from a logged model (`models:/<model id>`), described by
    `describe(version)`; `alias` (default `candidate`; None: none) moves to it."""
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:  # the first version of this name
        try:
            client.create_registered_model(name, description=STUDY_DESCRIPTION if name.startswith(STUDY_PREFIX)
                                           else REGISTERED_DESCRIPTION)
        except MlflowException as e:  # another process created it meanwhile
            if "ALREADY_EXISTS" not in str(e.error_code):
                raise
    model_id = model_uri.removeprefix("models:/")
    run_id = client.get_logged_model(model_id).source_run_id
    # The client call, not mlflow.register_model: that one prints "already exists" / "Created version" lines.
    version = str(client.create_model_version(name, model_uri, run_id=run_id, model_id=model_id,
                                              tags={k: str(v) for k, v in tags.items()}).version)
    client.update_model_version(name, version, description=describe(version))
    if alias:
        move_alias(client, name, alias, version)
    return version


def move_alias(client: MlflowClient, name: str, alias: str, version: str, attempts: int = 3) -> None:
    """Point `name@alias` at `version`. Two processes moving one alias at once may both find it
    missing and both insert it; a store refuses the second (SQLite's UNIQUE constraint), which
    then finds it and moves it: the later writer wins, as with any two moves."""
    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException:
            if attempt == attempts - 1:
                raise


def version_description(name: str, version: str, run_name: str, regime: str, val_acc: float,
                        data_root: str = "", study: str = "") -> str:
    uri = f"models:/{name}/{version}"
    source = f" on `{data_root}`" if data_root else ""
    notes = ""
    if background_removed(regime):
        notes += f"\n\n**Background removed**: {RAW_PHOTO_WARNING}."
    if study:
        notes += f"\n\nA cell of study run `{study}`; no alias points at it."
    return (f"{run_name}: regime {regime}{source}, best validation accuracy {val_acc:.4f}.{notes}\n\n"
            f"Load: {code(f'mlflow.pyfunc.load_model({uri!r}).predict(images)')}\n\n"
            f"Serve: {code(f'mlflow models serve -m {uri} --env-manager local')}\n\n"
            f"Analyse: {code(f'fgvc analyze --model {shlex.quote(uri)} --method all')}")
