"""Shared fixtures: a tiny demo dataset and an isolated MLflow store per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from stores import make_template, new_store

# No test may reach the network: weights and hubs must come from local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FGVC_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test processes share the machine's cores: one thread each (and in the processes they
    # start), so they do not slow each other down by oversubscription.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

# The files that run longest, longest first (seconds of tests in one whole-suite run with
# `-n 2 --dist loadfile`: 289, 163, 142, 132, 118, 101, 92, 85, 81, 73, 58, 45, 32, 32). Each file runs
# in one process; a long file drawn last keeps one process busy while the other idles.
LONGEST_FIRST = ("test_cluster.py", "test_concurrency.py", "test_team.py", "test_science.py", "test_bench.py",
                 "test_mlproject.py", "test_study.py", "test_claims.py", "test_faults.py", "test_server.py",
                 "test_ddp.py", "test_train.py", "test_masking.py", "test_show_leak.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_configure(config):
    """Pin the suite to the CPU, this process and every subprocess it starts, so it passes
    unchanged on a GPU host (CUDA would change precision, memory layout, augmentation draws
    and worker counts). Only `pytest -m gpu` (tests/test_gpu.py) sees the GPUs."""
    # pytest-xdist hands out files by their number of tests unless told otherwise; the longest
    # files here have few tests, so it keeps LONGEST_FIRST's order instead.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    markexpr = config.getoption("markexpr", "") or ""
    if "gpu" not in markexpr.replace("not gpu", ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


TINY = dict(num_designers=3, train_per_class=8, val_per_class=4, height=32, width=24, shard_size=10)


@pytest.fixture(scope="session", autouse=True)
def checkpoint_cache(tmp_path_factory):
    """Training runs keep their resume checkpoints here, not in the user's cache."""
    path = tmp_path_factory.mktemp("fgvc-cache")
    os.environ["FGVC_CACHE_DIR"] = str(path)
    yield path


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A 3-designer, 32x24 runway-synth root (24 train / 12 val images, several shards)."""
    from fgvc.data.demo import DemoConfig, generate_demo

    root = tmp_path_factory.mktemp("data") / "tiny"
    generate_demo(root, DemoConfig(**TINY))
    return root


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """An empty tracking store made once per test process; `stores.new_store` copies it."""
    return make_template(tmp_path_factory.mktemp("store-template"))


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch, store_template) -> str:
    """A fresh SQLite tracking store and artifact root in tmp_path; cwd moves there too."""
    monkeypatch.chdir(tmp_path)
    uri = new_store(store_template, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    import mlflow
    from mlflow.tracking import fluent

    mlflow.set_tracking_uri(uri)
    # The experiment an earlier test set in this process belongs to its store, not this one.
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
