"""The study on several processes and machines: claims in the tracking store, identical studies
started together, a Slurm-style array of `fgvc study --cell`, the Ray executor.

The slow cases share one local-executor study of a 4-cell grid (the reference table) and
compare every other way of running the same grid against it: the same config ids, the same
validation accuracies, the same table.
"""

from __future__ import annotations

import csv
import io
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from fgvc.study.config import StudyConfig
from fgvc.tracking import claims
from fgvc.tracking.claims import Holder, claimed, holder_alive, ledger_run

GRID = ["--num-designers", "3", "--train-per-class", "8", "--val-per-class", "4", "--height", "32", "--width", "24",
        "--epochs", "1", "--batch-size", "8", "--num-images", "6", "--regimes", "unmasked,masked", "--seeds", "0,1"]
SAME = ["arch", "regime", "seed", "bg_correlation", "run_name", "chance", "verdict"]  # and every measured column


@pytest.fixture(scope="module")
def claims_store(tmp_path_factory):
    """One SQLite store for the claim cases (a new store costs seconds of migrations); each
    case claims its own keys."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('claims')}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("FGVC_CLAIM_POLL_S", "0.05")
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        patch.setattr(claims, "_ledgers", {})
        mlflow.set_tracking_uri(uri)
        yield uri


# --- claims ----------------------------------------------------------------------------------

def test_the_ledger_is_named_once_when_several_processes_need_it_together(claims_store):
    assert MlflowClient().get_experiment_by_name(claims.POINTER) is None  # the first case on this store
    found = []
    threads = [threading.Thread(target=lambda: found.append(ledger_run(MlflowClient()))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client = MlflowClient()
    assert len(set(found)) == 1
    live = client.search_runs([client.get_experiment_by_name(claims.EXPERIMENT).experiment_id])
    assert [r.info.run_id for r in live] == found[:1] and live[0].info.status == "FINISHED"
    assert client.get_experiment_by_name(claims.POINTER).lifecycle_stage == "deleted"  # hidden from the UI


def test_a_claim_is_held_by_one_holder_at_a_time_and_the_second_knows_it_waited(claims_store):
    spans: dict[str, tuple] = {}

    def work(name: str) -> None:
        with claimed("cell.k", client=MlflowClient()) as claim:
            begin = time.monotonic()
            time.sleep(0.5)
            spans[name] = (begin, time.monotonic(), claim.attempt, claim.waited)

    first = threading.Thread(target=work, args=("first",))
    first.start()
    time.sleep(0.2)
    second = threading.Thread(target=work, args=("second",))
    second.start()
    first.join()
    second.join()
    assert spans["first"][2:] == (1, False) and spans["second"][2:] == (2, True)
    assert spans["second"][0] >= spans["first"][1]  # never both at once
    ledger = MlflowClient().get_run(ledger_run(MlflowClient())).data
    assert ledger.tags["cell.k.1"].startswith("done ") and ledger.tags["cell.k.2"].startswith("done ")


def test_a_dead_holders_claim_is_taken_over_and_says_why(claims_store):
    client = MlflowClient()
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid no longer exists
    client.log_param(ledger_run(client), "cell.dead.1", Holder(socket.gethostname(), gone.pid, "x", time.time())
                     .render())
    with claimed("cell.dead", client=client) as claim:
        assert claim.attempt == 2 and not claim.waited
        assert claim.replaced == f"process {gone.pid} on {socket.gethostname()} died"


def test_a_failed_attempt_is_taken_over_at_once(claims_store):
    with pytest.raises(RuntimeError):
        with claimed("cell.f"):
            raise RuntimeError("boom")
    with claimed("cell.f") as claim:
        assert claim.attempt == 2 and claim.replaced == "failed"


def test_a_holder_elsewhere_is_alive_while_its_heartbeat_is_fresh(monkeypatch):
    monkeypatch.setenv("FGVC_CLAIM_STALE_S", "60")
    elsewhere = Holder("another-host", 123, "t", 1000.0)
    assert holder_alive(elsewhere, "running 1050.0", now=1100.0) == (True, "")
    assert holder_alive(elsewhere, "running 1030.0", now=1100.0) == \
        (False, "process 123 on another-host sent no heartbeat for 70 s")
    assert holder_alive(elsewhere, "done 1099.0", now=1100.0) == (False, "done")
