"""Is the process behind a RUNNING run still alive? Heartbeats, and closing stale runs.

Every run fgvc starts carries ``fgvc.process`` (``host:pid:start``, the process's start time
in clock ticks since boot, so a reused PID is not mistaken for it) and ``fgvc.heartbeat``
(UTC time, ISO 8601), renewed every ``HEARTBEAT_S`` by a daemon thread while the run lives.
A RUNNING run is stale when its process is gone from this host, or, seen from another host,
when its heartbeat is older than ``FGVC_STALE_AFTER_S`` (default 600 s, ten missed beats).

When the same work starts again (same task, run name and identity tags), a stale run is
closed as KILLED with ``fgvc.end_reason`` saying why, and its PENDING MLflow models are
finalised as FAILED; the command says so in one line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import socket
import threading
from collections.abc import Iterator

from mlflow.entities import LoggedModelStatus, RunTag
from mlflow.tracking import MlflowClient

from fgvc.tracking import fencing
from fgvc.tracking.search import find_runs

log = logging.getLogger("fgvc")

PROCESS, HEARTBEAT, END_REASON = "fgvc.process", "fgvc.heartbeat", "fgvc.end_reason"
HEARTBEAT_S = 60.0
STALE_ENV = "FGVC_STALE_AFTER_S"
# Tags that describe a run without identifying its work.
_NOT_IDENTITY = {PROCESS, HEARTBEAT, "fgvc.git_commit", "mlflow.note.content", "mlflow.runName", END_REASON,
                 "fgvc.error"}


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields after the command name (state first); None without /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def host_name() -> str:
    """This machine's name in run and claim liveness: ``FGVC_HOSTNAME`` when set (containers that
    share one hostname), else the hostname."""
    return os.environ.get("FGVC_HOSTNAME") or socket.gethostname()


def start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot ("?" when unknown): with the PID, it
    names one process (a PID is reused after its process ends)."""
    fields = _stat(pid)
    return fields[19] if fields and len(fields) > 19 else "?"


def process_alive(pid: int) -> bool:
    """A process that exists and is not a zombie (killed, not yet reaped by its parent)."""
    fields = _stat(pid)
    if fields is not None:
        return fields[0] not in ("Z", "X")
    return _signalable(pid)


def this_process() -> str:
    return f"{host_name()}:{os.getpid()}:{start_ticks(os.getpid())}"


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def liveness_tags() -> dict[str, str]:
    return {PROCESS: this_process(), HEARTBEAT: now_iso()}


def run_stale_after_s() -> float:
    try:
        return float(os.environ.get(STALE_ENV) or 600)
    except ValueError:
        return 600.0


def why_stale(tags: dict[str, str]) -> str | None:
    """Why the process of a RUNNING run with these tags is gone; None while it may live."""
    process = tags.get(PROCESS)
    if not process:
        return None  # not started by this version of fgvc: nothing to judge by
    host, _, rest = process.partition(":")
    pid_text, _, start = rest.partition(":")
    beat = tags.get(HEARTBEAT, "")
    if host == host_name() and pid_text.isdigit():
        pid = int(pid_text)
        if not process_alive(pid):
            return f"its process {pid} on {host} has exited (last heartbeat {beat or 'never'})"
        if start not in ("", "?") and start_ticks(pid) not in (start, "?"):
            return f"its process {pid} on {host} has exited (the PID now belongs to another process)"
        return None
    try:
        age = (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(beat)).total_seconds()
    except ValueError:
        return None
    if age > run_stale_after_s():
        return f"its process {pid_text} on {host} sent no heartbeat for {age:.0f} s (last {beat}; {STALE_ENV})"
    return None


def _signalable(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    return True


def finalise_pending_models(client: MlflowClient, run_id: str, experiment_id: str) -> list[str]:
    """Mark the run's PENDING MLflow models FAILED (a process that died while logging one)."""
    done = []
    with contextlib.suppress(Exception):
        for model in client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'"):
            if model.status == LoggedModelStatus.PENDING:
                client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
                done.append(model.model_id)
    return done


def close_stale_runs(experiment_id: str, task: str, run_name: str, tags: dict, current_run_id: str) -> list[str]:
    """Close RUNNING runs of the same work whose process is gone: KILLED, with the reason."""
    client = MlflowClient()
    identity = {k: str(v) for k, v in tags.items() if k not in _NOT_IDENTITY}
    closed = []
    for run in find_runs({"fgvc.task": task}, [experiment_id], status="RUNNING", max_results=200):
        other = run.data.tags
        if run.info.run_id == current_run_id or other.get("mlflow.runName") != run_name:
            continue
        if any(other.get(k) != v for k, v in identity.items()):
            continue
        reason = why_stale(other)
        if reason is None:
            continue
        client.log_batch(run.info.run_id, tags=[RunTag(END_REASON, f"{reason}; closed when run {current_run_id} "
                                                                   f"started the same work")])
        finalise_pending_models(client, run.info.run_id, experiment_id)
        client.set_terminated(run.info.run_id, "KILLED")
        resume = (f"; to continue it instead, run the same `fgvc train` with `--resume {run.info.run_id}`"
                  if task == "train" else "")
        log.warning("run %s (%s) was left RUNNING: %s; closed it as KILLED%s", run.info.run_id, run_name, reason,
                    resume)
        closed.append(run.info.run_id)
    return closed


@contextlib.contextmanager
def heartbeat(run_id: str, interval_s: float = HEARTBEAT_S) -> Iterator[None]:
    """Renew the run's heartbeat every `interval_s` while the block runs (failures ignored:
    an unreachable server is the training's business, not the heartbeat's)."""
    stop = threading.Event()
    client = MlflowClient()  # the store of this run, whatever the thread sees later
    claims = list(fencing.held())  # the claims the work of this run is done under

    def beat() -> None:
        while not stop.wait(interval_s):
            if any(claim.lost() for claim in claims):
                return  # the run belongs to the claim's new holder now
            with contextlib.suppress(Exception):
                client.set_tag(run_id, HEARTBEAT, now_iso())

    thread = threading.Thread(target=beat, name=f"fgvc-heartbeat-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
