"""Claims: a piece of work (a study cell, an analysis record) done by one process at a time,
across processes and machines, through nothing but the tracking store.

The protocol uses two operations that every MLflow store (SQLite, PostgreSQL, MySQL, and an
`mlflow server` in front of one) performs atomically:
- **creating an experiment** is refused when the name exists (a unique key), and carries its
  tags in the same transaction;
- **logging a param** is write-once: the store's primary key (run, key) lets the first of two
  concurrent writers win, and MLflow refuses to change a logged value.

The ledger is one run in the experiment ``fgvc-claims``. Every process creates a candidate run,
then tries to create the (immediately deleted, so hidden) experiment ``fgvc-claims.ledger``
tagged with its candidate: the one that succeeds names the ledger, the others delete their
candidates and read the tag. A claim of work ``K`` is the param ``K.<n>`` on the ledger (attempt
``n``, value: host, pid, token and time of the claimant). The holder writes the tag ``K.<n>`` =
``running|done|failed <unix time>`` every ``FGVC_CLAIM_HEARTBEAT_S`` seconds (10) while it works.

Another process that wants ``K`` reads the newest attempt: when its holder is alive (state
``running``; on the same host its process exists, elsewhere its heartbeat is younger than
``FGVC_CLAIM_STALE_S``, 60 s) it waits; otherwise (done, failed, or dead) it claims attempt
``n + 1``: only one of several waiters gets it. So a claim is a lock that survives its holder's
death: the next attempt takes over and says whose attempt died (the caller then closes or
resumes what that attempt left). What is already done is found by the caller (a FINISHED run,
a record) before and again after claiming, so finished work is reused, never redone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fgvc.tracking.liveness import process_alive
from fgvc.tracking.runs import DESCRIPTION, TASK, describe_experiment, experiment_id

log = logging.getLogger("fgvc")

EXPERIMENT = "fgvc-claims"
POINTER = "fgvc-claims.ledger"
LEDGER_TAG = "fgvc.ledger_run"
EXPERIMENT_DESCRIPTION = ("Claims: which process does each piece of shared work (a study cell, an analysis "
                          "record). One ledger run: a param per claim attempt (its holder), a tag per attempt (its "
                          "state and last heartbeat).")
_ledgers: dict[str, str] = {}


def _seconds(name: str, default: float) -> float:
    return float(os.environ.get(name) or default)


def ledger_run(client: MlflowClient) -> str:
    """The ledger's run id, created by the first process that needs it."""
    uri = client._tracking_client.tracking_uri
    if uri in _ledgers:
        return _ledgers[uri]
    pointer = client.get_experiment_by_name(POINTER)
    if pointer is None or LEDGER_TAG not in pointer.tags:
        describe_experiment(EXPERIMENT, EXPERIMENT_DESCRIPTION)
        candidate = client.create_run(experiment_id(EXPERIMENT), run_name="claims",
                                      tags={TASK: "claims", DESCRIPTION: EXPERIMENT_DESCRIPTION}).info.run_id
        client.set_terminated(candidate, RunStatus.to_string(RunStatus.FINISHED))
        try:
            client.delete_experiment(client.create_experiment(POINTER, tags={LEDGER_TAG: candidate}))
        except MlflowException:
            client.delete_run(candidate)  # another process named the ledger first
        pointer = client.get_experiment_by_name(POINTER)
    _ledgers[uri] = pointer.tags[LEDGER_TAG]
    return _ledgers[uri]


@dataclass(frozen=True)
class Holder:
    """Who holds an attempt: parsed from the ledger param `host pid token time`."""

    host: str
    pid: int
    token: str
    since: float

    @classmethod
    def parse(cls, text: str) -> "Holder":
        host, pid, token, since = text.rsplit(" ", 3)
        return cls(host, int(pid), token, float(since))

    def render(self) -> str:
        return f"{self.host} {self.pid} {self.token} {self.since:.3f}"

    def __str__(self) -> str:
        return f"process {self.pid} on {self.host}"


def holder_alive(holder: Holder, state: str | None, now: float | None = None) -> tuple[bool, str]:
    """(alive, why not): a holder is alive while its state is `running` and, on this host, its
    process exists; on another host, while its heartbeat is fresh."""
    word, _, beat = (state or f"running {holder.since}").partition(" ")
    if word != "running":
        return False, word
    if holder.host == socket.gethostname():
        return (True, "") if process_alive(holder.pid) else (False, f"{holder} died")
    age = (now or time.time()) - float(beat or holder.since)
    stale = _seconds("FGVC_CLAIM_STALE_S", 60.0)
    return (True, "") if age < stale else (False, f"{holder} sent no heartbeat for {age:.0f} s")


@dataclass
class Claim:
    key: str
    attempt: int
    holder: Holder
    waited: bool  # another live process held the work meanwhile (it may have done it)
    replaced: str | None  # why the previous attempt ended without finishing (it died, it failed)


def _latest(client: MlflowClient, ledger: str, key: str) -> tuple[int, Holder | None, str | None]:
    data = client.get_run(ledger).data
    attempts = [int(k.rsplit(".", 1)[1]) for k in data.params if k.rsplit(".", 1)[0] == key]
    if not attempts:
        return 0, None, None
    n = max(attempts)
    return n, Holder.parse(data.params[f"{key}.{n}"]), data.tags.get(f"{key}.{n}")


def _beat(client: MlflowClient, ledger: str, name: str, state: str) -> None:
    client.set_tag(ledger, name, f"{state} {time.time():.3f}")


@contextlib.contextmanager
def claimed(key: str, what: str = "", client: MlflowClient | None = None) -> Iterator[Claim]:
    """Hold the claim of `key` while the block runs (waiting while another live process holds
    it); the block's exit marks the attempt done, or failed on an exception."""
    client = client or MlflowClient()
    ledger = ledger_run(client)
    me = Holder(socket.gethostname(), os.getpid(), uuid.uuid4().hex[:12], time.time())
    waited, said = False, False
    poll = _seconds("FGVC_CLAIM_POLL_S", 1.0)
    while True:
        n, holder, state = _latest(client, ledger, key)
        alive, why = holder_alive(holder, state) if holder else (False, "")
        if alive and holder.token != me.token:
            if not said:
                log.info("%s: %s is working on it (claim %s.%d); waiting", what or key, holder, key, n)
                said = True
            waited = True
            time.sleep(poll)
            continue
        name = f"{key}.{n + 1}"
        try:
            client.log_param(ledger, name, me.render())
        except MlflowException:
            pass  # another process took attempt n + 1 first (or the call failed): read who
        taken = client.get_run(ledger).data.params.get(name)
        if taken is not None and Holder.parse(taken).token == me.token:
            break
    replaced = why if holder is not None and why not in ("", "done") else None
    try:
        with _heartbeats(client, ledger, name):
            yield Claim(key, n + 1, me, waited, replaced)
    except BaseException:
        with contextlib.suppress(Exception):
            _beat(client, ledger, name, "failed")
        raise
    _beat(client, ledger, name, "done")


@contextlib.contextmanager
def _heartbeats(client: MlflowClient, ledger: str, name: str) -> Iterator[None]:
    stop = threading.Event()
    interval = _seconds("FGVC_CLAIM_HEARTBEAT_S", 10.0)

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):
                _beat(client, ledger, name, "running")
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"claim-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
