"""The run lifecycle shared by every task: the tracking store, the run to log into, its
params, its status at the end.

Under `mlflow run` the run already exists (`MLFLOW_RUN_ID` is set) and we log into it;
standalone (`fgvc train ...`) we start one in the task family's experiment. Every run gets
`fgvc.task`, a meaningful name and a description (`mlflow.note.content`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fgvc.errors import FgvcError, TrackingUnreachable, first_line
from fgvc.files import write_failed
from fgvc.tracking import failures, fencing, liveness

log = logging.getLogger("fgvc")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DESCRIPTION = "mlflow.note.content"
TASK = "fgvc.task"
# MLflow 3's mark for an experiment of model training (not GenAI traces); its UI opens the Model
# training view for links with MODEL_TRAINING_VIEW (a plain experiment link opens a GenAI overview).
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
MODEL_TRAINING_VIEW = "?workflowType=machine_learning"
DEFAULT_EXPERIMENT_ID = "0"
_initialised: set[str] = set()


class RunFailed(FgvcError):
    """Raised inside a run to end it as FAILED with a message (e.g. a NaN loss)."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI (None for other stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across the processes of one machine, held while the block runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def configure_tracking() -> str:
    """Use MLFLOW_TRACKING_URI when set (a server, PostgreSQL), else the local default.

    A SQLite store is created and migrated under a lock file beside the database, so several
    processes started together on a new store (a study and a training, two trainings) do not
    run MLflow's schema migrations at the same time.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    failures.bound_request_retries()
    mlflow.set_tracking_uri(uri)
    database = sqlite_path(uri)
    if database is not None and uri not in _initialised:
        with file_lock(database.with_name(database.name + ".lock")):
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)  # creates and migrates the tracking tables
            client.search_registered_models(max_results=1)  # and the registry's
        _initialised.add(uri)
    return uri


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


def _end(run_id: str, status: str, fluent: bool) -> None:
    try:
        MlflowClient().set_terminated(run_id, status)
    finally:
        if fluent:
            _leave(run_id)


def _leave(run_id: str) -> None:
    """Make `run_id` no longer the fluent API's active run, without a request to the store (its
    status is written, or must not be: a run whose claim this process lost)."""
    from mlflow.tracking import fluent

    stack = fluent._active_run_stack.get()
    if stack and stack[-1].info.run_id == run_id:
        stack.pop()
        fluent._last_active_run_id.set(run_id)  # mlflow.last_active_run() still finds it
        os.environ.pop("MLFLOW_RUN_ID", None)


def _finish(client: MlflowClient, run_id: str) -> None:
    tags = client.get_run(run_id).data.tags
    for stale in ("fgvc.end_reason", "fgvc.error"):
        if stale in tags:
            client.delete_tag(run_id, stale)
    client.set_terminated(run_id, "FINISHED")


def one_line(error: BaseException) -> BaseException:
    """The one-line error a user can act on for `error` (a tracking server that refused or
    did not answer, a full disk), or `error` itself."""
    return failures.translated(error) or write_failed(error) or error


@contextlib.contextmanager
def ending(run_id: str, fluent: bool = True) -> Iterator[None]:
    """End `run_id` FINISHED on success, KILLED on Ctrl-C, FAILED on any other exception
    (re-raised, as one line when a user can act on it), recording why in `fgvc.end_reason` /
    `fgvc.error` and finalising the run's PENDING MLflow models as FAILED. A run that
    finishes after an earlier interruption loses the old reason. A run whose work was done
    under a claim this process may have lost (fgvc.tracking.fencing) is left as it is."""
    client = MlflowClient()
    try:
        yield
    except KeyboardInterrupt:
        if fencing.lost() is None:
            client.set_tag(run_id, "fgvc.end_reason", "interrupted (Ctrl-C)")
            _end_failed(client, run_id, "KILLED", fluent)
        elif fluent:
            _leave(run_id)
        raise
    except BaseException as e:
        error = one_line(e)
        if fencing.lost() is not None:  # another process may hold the work, and this run, now
            if fluent:
                _leave(run_id)
            if error is e:
                raise
            raise error from None
        if isinstance(error, TrackingUnreachable):
            failures.give_up_quickly()  # each call below is tried once
        with contextlib.suppress(Exception):
            text = first_line(error) if isinstance(error, FgvcError) else f"{type(error).__name__}: {error}"
            client.set_tag(run_id, "fgvc.error", text[:5000])
        with contextlib.suppress(Exception):
            _end_failed(client, run_id, "FAILED", fluent)
        if error is e:
            raise
        raise error from None
    else:
        try:
            fencing.ensure_held("ending the run")
            # finished work waits out a short outage before its run is closed
            failures.Patience().call("ending the run", _finish, client, run_id)
        finally:
            if fluent:
                _leave(run_id)


def _end_failed(client: MlflowClient, run_id: str, status: str, fluent: bool) -> None:
    with contextlib.suppress(Exception):
        liveness.finalise_pending_models(client, run_id, client.get_run(run_id).info.experiment_id)
    _end(run_id, status, fluent)


def experiment_id(name: str) -> str:
    """The experiment's id, created when missing (safe when two processes create it at once)."""
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def describe_experiment(name: str, text: str) -> None:
    """Give an experiment its description once (the MLflow UI shows it on its page) and mark it
    as an experiment of model training."""
    describe_experiment_id(experiment_id(name), text)


def describe_experiment_id(exp_id: str, text: str, attempts: int = 3) -> None:
    client = MlflowClient()
    for attempt in range(attempts):
        experiment = client.get_experiment(exp_id)
        try:
            if text and not experiment.tags.get(DESCRIPTION):
                client.set_experiment_tag(exp_id, DESCRIPTION, text)
            if experiment.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:
                client.set_experiment_tag(exp_id, EXPERIMENT_KIND, MODEL_TRAINING)
            return
        except Exception as e:
            # A user without EDIT on it: the description waits for one who has it; what the
            # user came to do is refused (or not) on its own.
            if failures.denied_status(e) is not None:
                log.debug("experiment %s left undescribed: %s", exp_id, str(e).splitlines()[0])
                return
            # Another process set the same tag at the same moment (a store may refuse the
            # second insert, e.g. SQLite's UNIQUE constraint): look again, set what is missing.
            if attempt == attempts - 1:
                raise


def experiment_link(exp_id: str, run_id: str | None = None) -> str | None:
    """The UI page of an experiment (or of one of its runs) on an HTTP tracking server, opened
    in the Model training view; None for a local store (its UI has no fixed address)."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    page = f"{uri.rstrip('/')}/#/experiments/{exp_id}" + (f"/runs/{run_id}" if run_id else "")
    return page + MODEL_TRAINING_VIEW


def run_link(run_id: str) -> str | None:
    """The run's UI page on an HTTP tracking server (Model training view), else None."""
    if experiment_link("0") is None:
        return None
    return experiment_link(MlflowClient().get_run(run_id).info.experiment_id, run_id)


def _check_mlflow_run_experiment(run_id: str, experiment: str, task: str, experiment_description: str) -> None:
    """Under `mlflow run` the run's experiment is the one `--experiment-name` chose: describe and
    mark it like fgvc's own, and say in one line how to leave MLflow's `Default`."""
    exp_id = MlflowClient().get_run(run_id).info.experiment_id
    if exp_id == DEFAULT_EXPERIMENT_ID:
        describe_experiment_id(exp_id, "Runs started by `mlflow run` without `--experiment-name`; fgvc's "
                                       "tasks have their own experiments (fgvc-train, fgvc-mask, ...).")
        log.warning("this %s run is in MLflow's Default experiment; add --experiment-name %s to `mlflow run` "
                    "to keep it with the other %s runs", task, experiment, task)
    else:
        describe_experiment_id(exp_id, experiment_description)


def _fallback_description(task: str, tags: dict) -> str:
    if "fgvc.study" in tags:
        return ("fgvc background-reliance study: one study run (tables, verdicts, report) and one training "
                "run per cell, tagged `fgvc.study`.")
    return f"fgvc {task} runs."


@contextlib.contextmanager
def tracked_run(experiment: str, run_name: str, task: str, description: str = "",
                tags: dict | None = None, run_id: str | None = None, parent_run_id: str | None = None,
                experiment_description: str = "") -> Iterator[mlflow.ActiveRun]:
    """Start (or continue: `run_id`, else `MLFLOW_RUN_ID` from `mlflow run`) the run to log
    into, named, tagged with the task and described; ended by :func:`ending`. A new run's
    experiment gets `experiment_description` when it has none yet."""
    with failures.acting_on(f"experiment {experiment}"):
        try:
            with _tracked_run(experiment, run_name, task, description, tags, run_id, parent_run_id,
                              experiment_description) as run:
                yield run
        except Exception as e:
            error = one_line(e)
            if error is e:
                raise
            raise error from None


@contextlib.contextmanager
def _tracked_run(experiment: str, run_name: str, task: str, description: str, tags: dict | None,
                 run_id: str | None, parent_run_id: str | None, experiment_description: str
                 ) -> Iterator[mlflow.ActiveRun]:
    configure_tracking()
    identity = dict(tags or {})
    tags = {TASK: task, "fgvc.git_commit": git_commit(), **identity, **liveness.liveness_tags()}
    if description:
        tags[DESCRIPTION] = description
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID")
    experiment_description = experiment_description or _fallback_description(task, tags)
    if run_id:
        _check_mlflow_run_experiment(run_id, experiment, task, experiment_description)
        run = mlflow.start_run(run_id=run_id, tags=tags)
        if run_name:
            mlflow.set_tag("mlflow.runName", run_name)  # `mlflow run` names its runs at random
    else:
        # By id: when two processes create the experiment at once, set_experiment hands the
        # loser the experiment without making it active, and its run would land in "Default".
        describe_experiment(experiment, experiment_description)
        run = mlflow.start_run(experiment_id=experiment_id(experiment), run_name=run_name, tags=tags,
                               parent_run_id=parent_run_id, nested=parent_run_id is not None)
    try:
        liveness.close_stale_runs(run.info.experiment_id, task, run_name, identity, run.info.run_id)
    except Exception as e:  # closing others' leftovers never stops this run
        log.debug("stale runs not checked: %s", first_line(e))
    with ending(run.info.run_id, fluent=True), liveness.heartbeat(run.info.run_id):
        yield run


def same_param_value(a: str, b: str) -> bool:
    """Two logged param strings that mean the same (`1e-3` and `0.001`, `True` and `true`)."""
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return a.lower() == b.lower() and a.lower() in ("true", "false", "none")


def _active_run_id() -> str:
    run = mlflow.active_run()
    if run is None:
        raise FgvcError("no active MLflow run to record in (start one, or pass run_id)")
    return run.info.run_id


def log_params(params: dict, run_id: str | None = None) -> None:
    """Log params to `run_id` (default: the active run); values are stringified and cut at
    MLflow's 6000-character limit.

    `mlflow run` has already logged the entry point's parameters as the user typed them; a
    param logged again with the same meaning is skipped, and one whose value differs (a
    relative path made absolute) goes under `<name>_effective`, since MLflow forbids
    changing a logged param.
    """
    client = MlflowClient()
    run_id = run_id or _active_run_id()
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


def set_tags(tags: dict, run_id: str | None = None) -> None:
    run_id = run_id or _active_run_id()
    MlflowClient().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_dataset(root: str | Path, digest: str, name: str, context: str) -> None:
    """Record a dataset root as an input of the active run (context 'training', 'output', ...).

    Two processes logging the same dataset at the same moment race on the store's unique
    key; the loser retries and then finds the dataset the other one created.
    """
    with warnings.catch_warnings():  # MLflow registers two equivalent local-file sources
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(Path(root).resolve().as_uri())
    # mlflow declares Dataset.profile abstract and MetaDataset leaves it so, but Dataset is no ABC:
    # MetaDataset(source, ...) is its documented use.
    dataset = MetaDataset(source=source, name=name, digest=digest)  # type: ignore[abstract]
    for attempt in range(5):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException as error:
            if not _duplicate_key(error) or attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


# How SQLite, PostgreSQL (also through `mlflow server`) and MySQL report a duplicate key.
_DUPLICATE_KEY = ("UNIQUE constraint", "IntegrityError", "UniqueViolation", "duplicate key value", "Duplicate entry")


def _duplicate_key(error: MlflowException) -> bool:
    return any(words in str(error) for words in _DUPLICATE_KEY)


@contextlib.contextmanager
def artifact_dir() -> Iterator[Path]:
    """A scratch directory whose files are logged by the caller, then removed."""
    with tempfile.TemporaryDirectory(prefix="fgvc-") as tmp:
        yield Path(tmp)
