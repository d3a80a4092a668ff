"""Several processes on one local SQLite store at once: nothing crashes, nothing is lost.

Three trainings started together on a store that does not exist yet (creation and migration
are serialised by a lock file beside the database), on an existing store (the same dataset
input logged at the same moment), two analyses of one model version, and a study while a
single training logs to the same store.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from stores import new_store

from fgvc.tracking.runs import log_dataset

TRAIN = ["--arch", "fn-small", "--epochs", "1", "--batch-size", "8", "--num-workers", "0"]
RUN_DONE = re.compile(r"run ([0-9a-f]{32}): best val acc")


def start(args: list[str], cwd: Path, uri: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri}
    env.pop("MLFLOW_RUN_ID", None)
    return subprocess.Popen([sys.executable, "-m", "fgvc.cli", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen]) -> list[str]:
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(out + err)
    return outputs


def train_together(root: Path, cwd: Path, uri: str, count: int) -> list[str]:
    outputs = finish([start(["train", *TRAIN, "--data-root", str(root), "--seed", str(seed)], cwd, uri)
                      for seed in range(count)])
    return [RUN_DONE.search(out).group(1) for out in outputs]


def assert_intact(uri: str, run_ids: list[str]) -> None:
    client = MlflowClient(uri)
    for run_id in run_ids:
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run_id, "val/acc")] == [1]
    assert sorted(int(v.version) for v in client.search_model_versions("name='fgvc-fn-small'")) == \
        list(range(1, len(run_ids) + 1))


@pytest.mark.slow
def test_three_trainings_on_a_new_store_all_finish(tiny_root, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_ids = train_together(tiny_root, tmp_path, uri, 3)
    assert len(set(run_ids)) == 3
    assert_intact(uri, run_ids)
    tables = {name for (name,) in sqlite3.connect(tmp_path / "mlflow.db").execute(
        "select name from sqlite_master where type = 'table'")}
    assert not {t for t in tables if t.startswith("_alembic_tmp")}  # no half-done migration left


@pytest.mark.slow
def test_three_trainings_on_an_existing_store_log_one_dataset(tiny_root, tmp_path, store_template):
    uri = new_store(store_template, tmp_path)
    run_ids = train_together(tiny_root, tmp_path, uri, 3)
    assert_intact(uri, run_ids)
    client = MlflowClient(uri)
    digests = {d.dataset.digest for r in run_ids for d in client.get_run(r).inputs.dataset_inputs}
    assert len(digests) == 1


@pytest.mark.slow
def test_two_analyses_of_one_version_and_a_study_beside_a_training(tiny_root, tmp_path, store_template):
    uri = new_store(store_template, tmp_path)
    [trained] = train_together(tiny_root, tmp_path, uri, 1)
    analyses = [start(["analyze", "--model", "models:/fgvc-fn-small/1", "--method", "gradcam,occlusion",
                       "--num-images", "6", "--window", "8", "--stride", "8", "--seed", str(seed)], tmp_path, uri)
                for seed in (0, 1)]
    finish(analyses)
    client = MlflowClient(uri)
    records = client.search_runs([client.get_experiment_by_name("fgvc-analysis").experiment_id])
    assert len(records) == 2 and {r.info.status for r in records} == {"FINISHED"}
    for record in records:
        assert {"gradcam/bg_preference_mean", "occlusion/bg_preference_mean"} <= set(record.data.metrics)
    shown = client.get_run(trained).data.tags["fgvc.analysis.gradcam"]
    assert shown in {r.info.run_id for r in records}  # the training run shows exactly one of them

    study = start(["study", "--num-designers", "3", "--train-per-class", "8", "--val-per-class", "4", "--height",
                   "32", "--width", "24", "--epochs", "1", "--batch-size", "8", "--num-images", "6", "--regimes",
                   "unmasked,masked"], tmp_path, uri)
    single = start(["train", *TRAIN, "--data-root", str(tiny_root), "--seed", "7"], tmp_path, uri)
    study_out, single_out = finish([study, single])
    assert "study run" in study_out and RUN_DONE.search(single_out)
    parent = client.search_runs([client.get_experiment_by_name("fgvc-study").experiment_id],
                                "tags.`fgvc.task` = 'study'")[0]
    assert parent.info.status == "FINISHED" and parent.data.metrics["study/cells"] == 2


# What each store says when another process inserted the same dataset a moment before.
DUPLICATE_DATASET = {
    "sqlite": "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name, "
              "datasets.digest",
    "postgresql via mlflow server": "BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates "
                                    'unique constraint "dataset_pk"',
    "mysql": "(pymysql.err.IntegrityError) (1062, \"Duplicate entry '1-tiny-3740718bd666e018' for key "
             "'datasets.PRIMARY'\")",
}


@pytest.mark.parametrize("store", sorted(DUPLICATE_DATASET))
def test_logging_a_dataset_another_process_just_created_succeeds(store, mlflow_store, tmp_path, monkeypatch):
    real, calls = mlflow.log_input, []

    def racing(dataset, context=None):
        calls.append(context)
        if len(calls) == 1:
            raise MlflowException(DUPLICATE_DATASET[store])
        return real(dataset, context=context)

    monkeypatch.setattr(mlflow, "log_input", racing)
    with mlflow.start_run() as run:
        log_dataset(tmp_path, "3740718bd666e018", name="tiny", context="training")
    inputs = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert len(calls) == 2
    assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [("tiny", "3740718bd666e018")]


def test_logging_a_dataset_does_not_retry_other_errors(mlflow_store, tmp_path, monkeypatch):
    calls = []

    def broken(dataset, context=None):
        calls.append(context)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: run not found")

    monkeypatch.setattr(mlflow, "log_input", broken)
    with mlflow.start_run(), pytest.raises(MlflowException, match="run not found"):
        log_dataset(tmp_path, "3740718bd666e018", name="tiny", context="training")
    assert len(calls) == 1
