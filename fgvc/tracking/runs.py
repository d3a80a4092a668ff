"""Run lifecycle shared by every entry point: the tracking store, the run to log to, statuses.

Under `mlflow run` the run already exists (`MLFLOW_RUN_ID` is set) and we log into it;
standalone (`fgvc train ...`) we start a run in the task family's experiment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset

log = logging.getLogger("fgvc")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def configure_tracking() -> str:
    """Use MLFLOW_TRACKING_URI when set (a server, PostgreSQL), else the local default."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    return uri


class RunFailed(RuntimeError):
    """Raised inside a run to end it as FAILED with a message (e.g. a NaN loss)."""


@contextlib.contextmanager
def tracked_run(experiment: str, run_name: str, tags: dict | None = None,
                run_id: str | None = None, parent_run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start or resume the run to log into and end it with the right status.

    FINISHED on success, KILLED on Ctrl-C, FAILED on any other exception (re-raised).
    `run_id` resumes an existing run (training resume); otherwise `MLFLOW_RUN_ID` from
    `mlflow run` is used when present.
    """
    configure_tracking()
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        run = mlflow.start_run(run_id=run_id, tags=tags)
    else:
        # By id: when two processes create the experiment at once, set_experiment hands the
        # loser the experiment without making it active, and its run would land in "Default".
        experiment_id = mlflow.set_experiment(experiment).experiment_id
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags,
                               parent_run_id=parent_run_id, nested=parent_run_id is not None)
    if os.environ.get("MLFLOW_RUN_ID") == run.info.run_id and run_name:
        mlflow.set_tag("mlflow.runName", run_name)  # `mlflow run` names its runs at random
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.set_tag("fgvc.end_reason", "interrupted (Ctrl-C)")
        mlflow.end_run("KILLED")
        raise
    except BaseException as e:
        with contextlib.suppress(Exception):
            mlflow.set_tag("fgvc.error", f"{type(e).__name__}: {e}"[:5000])
        mlflow.end_run("FAILED")
        raise
    else:
        mlflow.end_run("FINISHED")


def git_commit() -> str:
    """The checkout's commit (with '-dirty' when modified), or 'unknown' outside git."""
    try:
        here = Path(__file__).resolve().parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def same_param_value(a: str, b: str) -> bool:
    """Two logged param strings that mean the same (`1e-3` and `0.001`, `True` and `true`)."""
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return a.lower() == b.lower() and a.lower() in ("true", "false", "none")


def log_params(params: dict) -> None:
    """Log params, stringifying values (MLflow refuses values over 6000 characters).

    `mlflow run` has already logged the entry point's parameters as typed (`1e-3`, `data/x`);
    a param logged again with the same meaning is skipped, and one whose resolved value
    differs (a relative path made absolute) goes under `<name>_effective`, since MLflow
    forbids changing a logged param.
    """
    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params if run else {}
    out = {}
    for key, value in params.items():
        text = str(value)[:6000]
        if key in existing:
            if same_param_value(existing[key], text):
                continue
            key = f"{key}_effective"
            if key in existing and existing[key] == text:
                continue
        out[key] = text
    if out:
        mlflow.log_params(out)


def log_dataset(root: str | Path, digest: str, name: str, context: str) -> None:
    """Record a dataset root as a run input (context 'training', 'eval', 'output', ...)."""
    with warnings.catch_warnings():  # MLflow registers two equivalent local-file sources
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(Path(root).resolve().as_uri())
    mlflow.log_input(MetaDataset(source=source, name=name, digest=digest), context=context)


def log_text_artifact(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


@contextlib.contextmanager
def artifact_dir() -> Iterator[Path]:
    """A scratch directory whose files are logged by the caller, then removed."""
    with tempfile.TemporaryDirectory(prefix="fgvc-") as tmp:
        yield Path(tmp)
