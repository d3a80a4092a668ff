"""Claims: a piece of work (a study cell, an analysis record) done by one process at a time,
across processes and machines, through nothing but the tracking store.

The protocol uses two operations that every MLflow store (SQLite, PostgreSQL, MySQL, and an
`mlflow server` in front of one) performs atomically:
- **creating an experiment** is refused when the name exists (a unique key), and carries its
  tags in the same transaction;
- **logging a param** is write-once: the store's primary key (run, key) lets the first of two
  concurrent writers win, and MLflow refuses to change a logged value.

The ledger is one run in the experiment ``fgvc-claims``. Every process that finds no ledger
creates a candidate run, then tries to create the (immediately deleted, so hidden) experiment
``fgvc-claims.ledger`` tagged with its candidate: the experiment names the ledger, and only a
candidate it does not name is ever deleted (a create whose answer was lost and was retried
finds its own candidate named). A claim of work ``K`` is the param ``K.<n>`` on the ledger
(attempt ``n``; value: host, pid and process start time, token and time of the claimant). The
holder writes the tag ``K.<n>`` = ``running|done|failed <unix time>`` every
``FGVC_CLAIM_HEARTBEAT_S`` seconds (10) while it works.

Another process that wants ``K`` reads the newest attempt: while its holder is alive (state
``running`` and, on the same host, its process exists with the same start time; elsewhere, its
heartbeat is younger than the stale time, :func:`fgvc.tracking.fencing.stale_after_s`) it
waits; otherwise (done, failed, or dead) it claims attempt ``n + 1``: only one of several
waiters gets it. The stale time is longer than the holder's own give-up time, and a holder that
cannot renew its heartbeat stops writing before then (fgvc.tracking.fencing), so a live holder
is never taken over. What is already done is found by the caller (a FINISHED run, a record)
before and again after claiming, so finished work is reused, never redone.

Failures: a write the server refuses (401, 403) ends the command in one line naming the
operation, the ledger and the grant needed; an unreachable server is waited out for
``FGVC_TRACKING_TIMEOUT_S`` (with a log line), by holders and waiters alike, then ends in one
line. Marking an attempt done or failed is retried the same way and never fails finished work:
when it cannot be written, other processes find the work done after the stale time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from fgvc import mlflow_names
from fgvc.errors import FgvcError, first_line
from fgvc.tracking import failures, fencing
from fgvc.tracking.failures import Patience
from fgvc.tracking.liveness import host_name, process_alive, start_ticks
from fgvc.tracking.runs import DESCRIPTION, TASK, describe_experiment, experiment_id

log = logging.getLogger("fgvc")

EXPERIMENT = mlflow_names.CLAIMS
POINTER = "fgvc-claims.ledger"
LEDGER_TAG = "fgvc.ledger_run"
LEDGER = f"the claims ledger (experiment {EXPERIMENT})"
EXPERIMENT_DESCRIPTION = ("Claims: which process does each piece of shared work (a study cell, an analysis "
                          "record). One ledger run: a param per claim attempt (its holder), a tag per attempt (its "
                          "state and last heartbeat).")
_ledgers: dict[str, str] = {}


def ledger_run(client: MlflowClient) -> str:
    """The ledger's run id, created by the first process that needs it (and restored if it was
    deleted by hand)."""
    uri = client._tracking_client.tracking_uri
    if uri in _ledgers:
        return _ledgers[uri]
    with failures.acting_on(LEDGER):
        pointer = client.get_experiment_by_name(POINTER)
        if pointer is None or LEDGER_TAG not in pointer.tags:
            _name_ledger(client)
            pointer = client.get_experiment_by_name(POINTER)
            if pointer is None:
                raise FgvcError(f"{LEDGER}: the experiment {POINTER} that names it was deleted meanwhile")
        ledger = pointer.tags[LEDGER_TAG]
        if client.get_run(ledger).info.lifecycle_stage == "deleted":
            client.restore_run(ledger)
            log.warning("the claims ledger run %s had been deleted; restored it", ledger)
    _ledgers[uri] = ledger
    return ledger


def _name_ledger(client: MlflowClient) -> None:
    """Create a candidate ledger run and try to name it; delete it only when another one is named."""
    describe_experiment(EXPERIMENT, EXPERIMENT_DESCRIPTION)
    candidate = client.create_run(experiment_id(EXPERIMENT), run_name="claims",
                                  tags={TASK: "claims", DESCRIPTION: EXPERIMENT_DESCRIPTION}).info.run_id
    client.set_terminated(candidate, RunStatus.to_string(RunStatus.FINISHED))
    try:
        created = client.create_experiment(POINTER, tags={LEDGER_TAG: candidate})
    except MlflowException as error:
        if failures.denied_status(error) is not None:
            raise
        created = None  # named by another process, or by this one's create whose answer was lost
    if created is None:
        pointer = client.get_experiment_by_name(POINTER)
        if pointer is None or LEDGER_TAG not in pointer.tags:
            raise FgvcError(f"{LEDGER}: could not create the experiment {POINTER} that names it, and none exists")
        if pointer.tags[LEDGER_TAG] != candidate:
            with contextlib.suppress(Exception):
                client.delete_run(candidate)  # another process named the ledger first
            return
        created = pointer.experiment_id
    try:  # ours: hide the pointer (a deleted experiment keeps its name and tags; the UI does not list it)
        client.delete_experiment(created)
    except MlflowException as error:
        log.debug("experiment %s left visible: %s", POINTER, first_line(error))


@dataclass(frozen=True)
class Holder:
    """Who holds an attempt: parsed from the ledger param `host pid[:start] token time`
    (`start`: the process's start time in clock ticks, so a reused PID is not mistaken for it)."""

    host: str
    pid: int
    token: str
    since: float
    start: str = ""

    @classmethod
    def parse(cls, text: str) -> Holder:
        host, pid, token, since = text.rsplit(" ", 3)
        number, _, start = pid.partition(":")
        return cls(host, int(number), token, float(since), start)

    def render(self) -> str:
        pid = f"{self.pid}:{self.start}" if self.start else str(self.pid)
        return f"{self.host} {pid} {self.token} {self.since:.3f}"

    def __str__(self) -> str:
        return f"process {self.pid} on {self.host}"


def holder_alive(holder: Holder, state: str | None, now: float | None = None) -> tuple[bool, str]:
    """(alive, why not): a holder is alive while its state is `running` and, on this host, its
    process exists (with the start time it claimed with); on another host, while its heartbeat
    is younger than the stale time."""
    word, _, beat = (state or f"running {holder.since}").partition(" ")
    if word != "running":
        return False, word
    if holder.host == host_name():
        if not process_alive(holder.pid) or holder.start and start_ticks(holder.pid) not in (holder.start, "?"):
            return False, f"{holder} died"
        return True, ""
    age = (now or time.time()) - float(beat or holder.since)
    stale = fencing.stale_after_s()
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


def _param(client: MlflowClient, ledger: str, name: str) -> str | None:
    return client.get_run(ledger).data.params.get(name)


def _beat(client: MlflowClient, ledger: str, name: str, state: str) -> None:
    client.set_tag(ledger, name, f"{state} {time.time():.3f}")


def _me() -> Holder:
    return Holder(host_name(), os.getpid(), uuid.uuid4().hex[:12], time.time(), start_ticks(os.getpid()))


def _acquire(client: MlflowClient, ledger: str, key: str, what: str, patience: Patience) -> tuple[Claim, float]:
    """Wait while a live process holds `key`, then claim the next attempt; returns the claim
    and when its claim was sent (monotonic: the first confirmation of the fence)."""
    me, waited, said = _me(), False, False
    poll = fencing.poll_s()
    while True:
        n, holder, state = patience.call(f"reading the claim of {what}", _latest, client, ledger, key)
        alive, why = holder_alive(holder, state) if holder else (False, "")
        if alive and holder is not None and holder.token != me.token:
            if not said:
                log.info("%s: %s is working on it (claim %s.%d); waiting", what, holder, key, n)
                said = True
            waited = True
            time.sleep(poll)
            continue
        name = f"{key}.{n + 1}"
        sent = time.monotonic()
        refused = None
        try:
            patience.call(f"claiming {what}", client.log_param, ledger, name, me.render())
        except MlflowException as error:
            if failures.denied_status(error) is not None:
                raise
            refused = error  # another process took attempt n + 1 first, or the store refused: read who
        taken = patience.call(f"reading the claim of {what}", _param, client, ledger, name)
        if taken is not None and Holder.parse(taken).token == me.token:
            replaced = why if holder is not None and why not in ("", "done") else None
            return Claim(key, n + 1, me, waited, replaced), sent
        if taken is None and refused is not None:
            raise FgvcError(f"{what}: the tracking server refused the claim {name} on {LEDGER} "
                            f"(run {ledger}): {first_line(refused)}")


@contextlib.contextmanager
def claimed(key: str, what: str = "", client: MlflowClient | None = None) -> Iterator[Claim]:
    """Hold the claim of `key` while the block runs (waiting while another live process holds
    it); the block's exit marks the attempt done, or failed on an exception. The block is
    fenced (fgvc.tracking.fencing): results are written only while the claim is surely held."""
    client = client or MlflowClient()
    what = what or key
    patience = Patience(kept=f"gave up waiting for {what}")
    with failures.acting_on(LEDGER):
        ledger = patience.call("reading the claims ledger", ledger_run, client)
        claim, sent = _acquire(client, ledger, key, what, patience)
    held = fencing.Held(key, claim.attempt, what, confirmed=sent)
    name = f"{key}.{claim.attempt}"
    stack = fencing.held()
    stack.append(held)
    state = "failed"
    try:
        with _heartbeats(client, ledger, name, held):
            yield claim
        state = "done"
    finally:
        stack.remove(held)
        if held.lost() is None:  # a lost claim belongs to its new holder: write nothing
            _mark(client, ledger, name, state, what)


def _mark(client: MlflowClient, ledger: str, name: str, state: str, what: str) -> None:
    """Mark an attempt done or failed, waiting out an outage; never raises (the work is over)."""
    try:
        budget = 0.0 if failures.gave_up() else None  # after a long outage: one try
        Patience(kept="", budget_s=budget).call(f"marking the claim of {what} {state}", _beat, client, ledger, name,
                                                state)
    except Exception as error:  # noqa: BLE001 (the work's own outcome is what the caller sees)
        log.warning("%s: could not mark claim %s %s (%s); other processes take it as ended after %.0f s without "
                    "heartbeat", what, name, state, first_line(error), fencing.stale_after_s())


@contextlib.contextmanager
def _heartbeats(client: MlflowClient, ledger: str, name: str, held: fencing.Held) -> Iterator[None]:
    """Renew the claim every FGVC_CLAIM_HEARTBEAT_S while the block runs: each accepted
    heartbeat confirms the fence; a newer attempt on the ledger marks the claim taken over."""
    stop = threading.Event()
    interval = fencing.heartbeat_s()
    key, attempt = name.rsplit(".", 1)
    newer = f"{key}.{int(attempt) + 1}"

    def beat() -> None:
        failing = False
        while not stop.is_set():
            sent = time.monotonic()
            try:
                _beat(client, ledger, name, "running")
                held.confirmed = sent
                taken = client.get_run(ledger).data.params.get(newer)
                if taken is not None:
                    held.taken_by = str(Holder.parse(taken))
                if failing:
                    log.info("%s: heartbeat of claim %s accepted again", held.what, name)
                failing = False
            except Exception as error:  # noqa: BLE001 (the fence decides what a missing heartbeat means)
                if not failing:
                    log.warning("%s: heartbeat of claim %s not accepted (%s); retrying; without one for %.0f s "
                                "this process stops writing", held.what, name, first_line(error),
                                fencing.give_up_after_s())
                failing = True
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"claim-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)  # a heartbeat stuck in a request must not hold the work's end up
