"""Claims under a team's real conditions: a refused write, a lost answer, a reused PID, an
outage while a claim is held and while a waiter waits (a real `mlflow server` behind a loopback
proxy that cuts connections: tests/fault_proxy.py), and a holder that lost its claim.

Timings of the outage cases: the retry window FGVC_TRACKING_TIMEOUT_S is 20 s, one request may
take 2 s twice without back-off (MLFLOW_HTTP_REQUEST_*), heartbeats every second, so the stale
time is 20 + 4 + 2 = 26 s (fgvc.tracking.fencing.stale_after_s)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fault_proxy import CuttableProxy, other_host
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from server_utils import MlflowServer

from fgvc.errors import ConfigError, PermissionDenied
from fgvc.tracking import claims, fencing
from fgvc.tracking.claims import Holder, claimed, holder_alive, ledger_run
from fgvc.tracking.fencing import ClaimLost
from fgvc.tracking.liveness import host_name, start_ticks


@pytest.fixture()
def store(mlflow_store, monkeypatch):
    monkeypatch.setenv("FGVC_CLAIM_POLL_S", "0.05")
    monkeypatch.setattr(claims, "_ledgers", {})
    return mlflow_store


def _within(seconds: float, fn):
    """fn() in a daemon thread: (result or exception, elapsed); a hang fails the test."""
    outcome: dict = {}

    def work():
        try:
            outcome["value"] = fn()
        except BaseException as error:  # noqa: BLE001 (handed to the test)
            outcome["error"] = error

    began = time.monotonic()
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return outcome.get("error", outcome.get("value")), time.monotonic() - began


# --- fast cases: one process, a local store ---------------------------------------------------

def test_a_refused_claim_ends_in_one_line_naming_the_call_the_ledger_and_the_grant(store, monkeypatch):
    ledger_run(MlflowClient())  # the ledger exists (another user made it)
    refused = MlflowException("API request to endpoint /api/2.0/mlflow/runs/log-parameter failed with error code "
                              "403 != 200. Response body: 'Permission denied'")
    calls = []

    def log_param(self, *args, **kwargs):
        calls.append(args)
        raise refused

    monkeypatch.setattr(MlflowClient, "log_param", log_param)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")

    def claim():
        with claimed("analysis.x", "gradcam of models:/fgvc-fn-small/1"):
            pytest.fail("a refused claim was entered")

    error, elapsed = _within(10, claim)
    assert isinstance(error, PermissionDenied), error
    assert str(error) == (f"permission denied: user reader may not call /api/2.0/mlflow/runs/log-parameter on the "
                          f"claims ledger (experiment fgvc-claims) at {store}; ask an admin for EDIT on it "
                          f"(docs/team.md, Permissions)")
    assert len(calls) == 1 and elapsed < 5


def test_the_ledger_survives_a_create_whose_answer_was_lost_and_a_failed_delete(store, monkeypatch):
    """The create of the pointer reached the store but its answer was lost, so the retry is
    refused ('already exists'); hiding the pointer fails too. The candidate the pointer names
    must stay, and claims keep working."""
    real_create = MlflowClient.create_experiment

    def create_then_lose_the_answer(self, name, *args, **kwargs):
        real_create(self, name, *args, **kwargs)
        if name == claims.POINTER:
            raise MlflowException(f"Experiment(name={name}) already exists.")
        return self.get_experiment_by_name(name).experiment_id

    def refuse(self, *args, **kwargs):
        raise MlflowException("API request to endpoint /api/2.0/mlflow/experiments/delete failed with error code "
                              "503 != 200")

    monkeypatch.setattr(MlflowClient, "create_experiment", create_then_lose_the_answer)
    monkeypatch.setattr(MlflowClient, "delete_experiment", refuse)
    client = MlflowClient()
    ledger = ledger_run(client)
    assert client.get_run(ledger).info.lifecycle_stage == "active"
    assert client.get_experiment_by_name(claims.POINTER).tags[claims.LEDGER_TAG] == ledger
    with claimed("cell.after-a-lost-answer", client=client) as claim:
        assert claim.attempt == 1


def test_a_deleted_ledger_run_is_restored(store):
    client = MlflowClient()
    ledger = ledger_run(client)
    client.delete_run(ledger)
    claims._ledgers.clear()
    assert ledger_run(client) == ledger and client.get_run(ledger).info.lifecycle_stage == "active"
    with claimed("cell.after-a-delete", client=client) as claim:
        assert claim.attempt == 1


def test_a_reused_pid_does_not_keep_a_dead_claim_alive():
    # This process is alive, but a holder that claimed with another start time was another process.
    mine = Holder(host_name(), os.getpid(), "t", time.time(), start_ticks(os.getpid()))
    reused = Holder(host_name(), os.getpid(), "t", 1000.0, "1")
    assert holder_alive(mine, None) == (True, "")
    assert holder_alive(reused, None) == (False, f"process {os.getpid()} on {host_name()} died")
    assert Holder.parse(reused.render()) == reused
    assert Holder.parse("node-a 123 t 1000.000") == Holder("node-a", 123, "t", 1000.0)  # written before start times


def test_a_holder_elsewhere_is_taken_over_only_after_it_must_have_given_up(monkeypatch):
    for name in ("FGVC_TRACKING_TIMEOUT_S", "FGVC_CLAIM_STALE_S", "FGVC_CLAIM_HEARTBEAT_S"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.5")
    # 180 s of retries, then one request of up to 3 x 60 s plus back-off 1 + 2 (+ 2 x 0.5 jitter), two heartbeats
    assert fencing.stale_after_s() == pytest.approx(180 + 184 + 20)
    elsewhere = Holder("node-b", 123, "t", 1000.0)
    assert holder_alive(elsewhere, "running 1000.0", now=1000.0 + 300) == (True, "")  # retrying: not dead yet
    assert holder_alive(elsewhere, "running 1000.0", now=1000.0 + 390) == \
        (False, "process 123 on node-b sent no heartbeat for 390 s")
    assert holder_alive(elsewhere, "done 1099.0", now=1100.0) == (False, "done")
    monkeypatch.setenv("FGVC_CLAIM_STALE_S", "60")
    with pytest.raises(ConfigError, match=r"FGVC_CLAIM_STALE_S=60 is shorter than a holder's own give-up time 384 s"):
        fencing.stale_after_s()
    monkeypatch.setenv("FGVC_CLAIM_STALE_S", "900")
    assert fencing.stale_after_s() == 900


def test_a_holder_that_lost_its_claim_stops_in_one_line_and_writes_nothing(store, tiny_root, monkeypatch):
    """A training under a claim whose heartbeat has not been accepted for longer than the give-up
    time stops at its next write: the run keeps the epochs logged before, stays as it was
    (its new holder owns it), no model is registered, and the claim is not marked."""
    from fgvc.tasks.train import run_train
    from fgvc.training.config import TrainConfig

    monkeypatch.setenv("FGVC_TRACKING_TIMEOUT_S", "20")
    monkeypatch.setenv("FGVC_CLAIM_HEARTBEAT_S", "1000")  # one heartbeat, at the start

    class Silence:
        """After epoch 1: as if no heartbeat had been accepted for 21 s."""

        def on_epoch_end(self, record, session):
            if record.epoch == 1:
                fencing.held()[-1].confirmed = time.monotonic() - 21

    cfg = TrainConfig(arch="fn-small", data_root=str(tiny_root), epochs=3, batch_size=8, num_workers=0,
                      pretrained=False, registered_model="fgvc-fenced")
    client = MlflowClient()
    with pytest.raises(ClaimLost) as lost:
        with claimed("cell.fenced", "study cell fn-small/unmasked/seed0", client):
            run_train(cfg, callbacks=[Silence()], progress=False)
    assert str(lost.value) == ("study cell fn-small/unmasked/seed0: this process lost its claim (attempt 1): no "
                               "heartbeat accepted for 21 s (FGVC_TRACKING_TIMEOUT_S=20); another process may have "
                               "taken it over; stopped before logging epoch 2, writing nothing")
    [run] = client.search_runs([client.get_experiment_by_name("fgvc-train").experiment_id])
    assert run.info.status == "RUNNING" and "fgvc.error" not in run.data.tags
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [1]
    assert client.search_registered_models() == []
    state = client.get_run(ledger_run(client)).data.tags["cell.fenced.1"]
    assert state.startswith("running ")  # not marked failed: a lost claim is its new holder's


# --- outages, for real: an `mlflow server` behind cuttable proxies ---------------------------------

FAST_RETRIES = {"FGVC_TRACKING_TIMEOUT_S": "20", "FGVC_CLAIM_HEARTBEAT_S": "1", "FGVC_CLAIM_POLL_S": "0.5",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "2", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}
STALE_S = 20 + 2 * 2 + 2 * 1
SEED0, SEED1 = "fn-small/unmasked/seed0", "fn-small/unmasked/seed1"
CELL_WAIT = rf"study cell {SEED0}: .* is working on it .*; waiting"  # a waiter on the cell's claim
CELL = ["study", "--archs", "fn-small", "--regimes", "unmasked", "--seeds", "0", "--batch-size", "8",
        "--num-images", "4", "--num-workers", "0", "--cell", "0"]


def test_the_stated_stale_time_of_these_cases(monkeypatch):
    for name, value in FAST_RETRIES.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("FGVC_CLAIM_STALE_S", raising=False)
    assert fencing.stale_after_s() == pytest.approx(STALE_S)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("claims-server")
    with MlflowServer(workdir, f"sqlite:///{workdir / 'mlflow.db'}") as running:
        yield running


class Process:
    """`python -m fgvc.cli ...` (or `python -c script ...`) on its own "host", its stderr read
    line by line as it comes."""

    def __init__(self, argv: list[str], uri: str, host: str, cwd: Path, script: str | None = None):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri, **FAST_RETRIES, **other_host(host),
               "FGVC_CACHE_DIR": str(cwd / f"cache-{host}")}  # another machine keeps its own checkpoints
        env.pop("MLFLOW_RUN_ID", None)
        self.host = host
        program = ["-c", script] if script is not None else ["-m", "fgvc.cli"]
        self.proc = subprocess.Popen([sys.executable, *program, *argv], cwd=cwd, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def saw(self, pattern: str) -> bool:
        return any(re.search(pattern, line) for line in self.lines)

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"{self.host} did not finish in {timeout:.0f} s:\n"
                                 + "\n".join(self.lines[-40:])) from None
        self._reader.join(5)
        return code

    def errors(self) -> list[str]:
        return [line for line in self.lines if line.startswith("Error")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def _wait_until(condition, timeout: float, what: str, *processes: Process):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not any(p.proc.poll() not in (None, 0) for p in processes):
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    said = "\n".join(f"[{p.host}] {line}" for p in processes for line in p.lines[-30:])
    raise AssertionError(f"timed out waiting for {what}:\n{said}")


def _cell_runs(client: MlflowClient, cell: str) -> list:
    """The training runs of one study cell (the cases share one server)."""
    experiment = client.get_experiment_by_name("fgvc-study")
    if experiment is None:
        return []
    return [r for r in client.search_runs([experiment.experiment_id])
            if r.data.tags.get("fgvc.task") == "train" and r.data.tags.get("fgvc.study_cell") == cell]


def _training_epoch(client: MlflowClient, cell: str, epoch: int):
    for run in _cell_runs(client, cell):
        if any(m.step >= epoch for m in client.get_metric_history(run.info.run_id, "val/acc")):
            return run
    return None


HOLD = """
import logging, sys, time
logging.basicConfig(level=logging.INFO)
from fgvc.tracking.claims import claimed
from fgvc.tracking.runs import configure_tracking
configure_tracking()
with claimed(sys.argv[1], "the work") as claim:
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
print("done", flush=True)
"""


@dataclass
class Outcome:
    """What one outage case left: its processes (their stderr lines), exit codes and timings."""

    processes: dict[str, Process]
    codes: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def short_outage(server, tiny_root: Path, tmp_path: Path) -> Outcome:
    """Two processes on two hosts run the same study cell, each through its own proxy; both
    proxies cut for 10 s while one holds the claim and trains and the other waits."""
    client = MlflowClient(server.uri)
    argv = [*CELL, "--data-root", str(tiny_root), "--epochs", "6"]
    with CuttableProxy(server.port) as a, CuttableProxy(server.port) as b:
        first, second = Process(argv, a.uri, "node-a", tmp_path), Process(argv, b.uri, "node-b", tmp_path)
        try:
            _wait_until(lambda: _training_epoch(client, SEED0, 1), 120, "the first epoch", first, second)
            _wait_until(lambda: first.saw(CELL_WAIT) or second.saw(CELL_WAIT), 60, "a waiter", first, second)
            began = time.monotonic()
            a.outage(10), b.outage(10)
            codes = {"first": first.wait(240), "second": second.wait(240)}
            print(f"outage 10 s; both done {time.monotonic() - began:.0f} s after it began")
        finally:
            first.stop(), second.stop()
    return Outcome({"first": first, "second": second}, codes)


def long_outage(server, tiny_root: Path, tmp_path: Path) -> Outcome:
    """The holder's proxy is cut for the stale time + 10 s; the waiter, on another host, reaches
    the server directly."""
    client = MlflowClient(server.uri)
    argv = [*CELL, "--data-root", str(tiny_root), "--epochs", "5", "--seeds", "1"]
    with CuttableProxy(server.port) as a:
        holder = Process(argv, a.uri, "node-c", tmp_path)
        taker = None
        try:
            first = _wait_until(lambda: _training_epoch(client, SEED1, 1), 120, "the first epoch", holder)
            outage = a.outage(STALE_S + 10)
            cut = time.monotonic()
            taker = Process(argv, server.uri, "node-d", tmp_path)
            code = holder.wait(120)
            holder_s = time.monotonic() - cut
            _wait_until(lambda: taker.saw("trains"), STALE_S + 60, "the takeover", taker)
            taken_s = time.monotonic() - cut
            taker_code = taker.wait(240)
            outage.join()
        finally:
            holder.stop()
            if taker is not None:
                taker.stop()
    print(f"holder stopped {holder_s:.0f} s into the outage (retry window 20 s); taken over after {taken_s:.0f} s "
          f"(stale time {STALE_S:.1f} s)")
    return Outcome({"holder": holder, "taker": taker}, {"holder": code, "taker": taker_code},
                   {"holder": holder_s, "taken": taken_s}, {"first": first, "proxy_uri": a.uri})


def waiter_outage(server, tmp_path: Path) -> Outcome:
    """A process on another host holds the work; the waiter reaches the server through a proxy,
    cut for 10 s (it keeps waiting), then for good (it ends after its wait)."""
    holder = Process(["work.waiter-outage", "120"], server.uri, "node-e", tmp_path, script=HOLD)
    try:
        # (MLflow prints a link to the ledger run when this process is the first to create it)
        said = [holder.proc.stdout.readline().strip()]
        while said[-1] != "holding" and len(said) < 3:
            said.append(holder.proc.stdout.readline().strip())
        assert said[-1] == "holding", said
        with CuttableProxy(server.port) as proxy:
            waiter = Process(["work.waiter-outage", "0"], proxy.uri, "node-f", tmp_path, script=HOLD)
            try:
                _wait_until(lambda: waiter.saw("is working on it"), 60, "the waiter", waiter, holder)
                proxy.outage(10).join()
                time.sleep(3)
                alive = waiter.proc.poll() is None
                began = time.monotonic()
                proxy.cut()
                code = waiter.wait(60)
                ended_s = time.monotonic() - began
            finally:
                waiter.stop()
    finally:
        holder.stop()
    print(f"waiter cut off: ended {ended_s:.0f} s later (its wait: 20 s)")
    return Outcome({"waiter": waiter}, {"waiter": code}, {"ended": ended_s}, {"alive_after_short": alive})


@pytest.fixture(scope="module")
def outages(server, tiny_root, tmp_path_factory) -> dict[str, Outcome]:
    """The three outage cases, run at once against one server (each on its own cell or work,
    hosts and proxies; they mostly wait on retry windows, so together they take the time of
    the longest). Returns when all three have ended."""
    cases = {"short": lambda: short_outage(server, tiny_root, tmp_path_factory.mktemp("short")),
             "long": lambda: long_outage(server, tiny_root, tmp_path_factory.mktemp("long")),
             "waiter": lambda: waiter_outage(server, tmp_path_factory.mktemp("waiter"))}
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = {name: pool.submit(case) for name, case in cases.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.slow
def test_an_outage_shorter_than_the_retry_window_leaves_one_training_and_nothing_running(server, outages):
    """The holder pauses and goes on, the waiter rides the outage out and reuses the training."""
    client = MlflowClient(server.uri)
    case = outages["short"]
    first, second = case.processes["first"], case.processes["second"]
    log = "\n".join(first.lines + second.lines)
    assert (case.codes["first"], case.codes["second"]) == (0, 0), log[-4000:]
    assert re.search(r"tracking server http://127\.0\.0\.1:\d+ unreachable while", log), log[-4000:]  # it was felt
    [run] = _cell_runs(client, SEED0)  # one training
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == list(range(1, 7))
    # the process that waited on the cell's claim (both may have waited on the data root's claim)
    [waiter] = [p for p in (first, second) if p.saw(CELL_WAIT)]
    assert waiter.saw(f"reuses run {run.info.run_id}")
    everything = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not [r for r in everything if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_an_outage_longer_than_the_stale_time_stops_the_holder_and_the_taker_trains_once(server, outages):
    """The holder gives up after its retry window and stops in one line, writing nothing; the
    waiter takes the cell over only after the stale time and trains it."""
    client = MlflowClient(server.uri)
    case = outages["long"]
    holder, taker = case.processes["holder"], case.processes["taker"]
    holder_s, taken_s = case.seconds["holder"], case.seconds["taken"]
    assert case.codes["taker"] == 0, "\n".join(taker.lines[-40:])
    assert case.codes["holder"] == 1
    [line] = holder.errors()
    assert line.startswith(f"Error: tracking server {case.extra['proxy_uri']} unreachable for 2") or \
        "lost its claim" in line, line
    assert 20 <= holder_s < 20 + 20, holder_s  # it rode out its retry window, then stopped
    assert taken_s >= STALE_S - 1, taken_s  # nobody took over before the holder must have given up
    runs = {r.info.run_id: r for r in _cell_runs(client, SEED1)}
    assert sorted(r.info.status for r in runs.values()) == ["FINISHED", "KILLED"]
    killed = runs[case.extra["first"].info.run_id]
    assert killed.info.status == "KILLED" and "fgvc.error" not in killed.data.tags  # the holder wrote nothing
    assert "sent no heartbeat for" in killed.data.tags["fgvc.end_reason"]
    [done] = [r for r in runs.values() if r.info.status == "FINISHED"]
    assert [m.step for m in client.get_metric_history(done.info.run_id, "val/acc")] == list(range(1, 6))
    ledger = client.get_run(claims.ledger_run(client)).data
    hosts = [Holder.parse(v).host for k, v in ledger.params.items() if k.startswith("cell.")]
    assert sorted(h for h in hosts if h in ("node-c", "node-d")) == ["node-c", "node-d"]  # one attempt each


@pytest.mark.slow
def test_a_waiter_rides_out_a_short_outage_and_ends_in_one_line_after_its_stated_wait(outages):
    """Cut for 10 s, the waiter keeps waiting; cut for longer than its wait (the retry window,
    20 s), it ends with one line saying so."""
    case = outages["waiter"]
    waiter = case.processes["waiter"]
    assert case.extra["alive_after_short"], "\n".join(waiter.lines)  # still waiting after a 10 s outage
    assert case.codes["waiter"] == 1
    [line] = [x for x in waiter.lines if "TrackingUnreachable" in x]
    assert re.search(r"tracking server http://127\.0\.0\.1:\d+ unreachable for 2\d s \(.*\); gave up waiting for "
                     r"the work$", line), line
    assert 20 <= case.seconds["ended"] < 20 + 10, case.seconds["ended"]
