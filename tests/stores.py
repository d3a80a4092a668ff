"""Tracking stores for the tests: an empty one in a moment, and one with a trained model.

MLflow creates a new SQLite store by running its schema migrations, 1-2 s of CPU on this
machine; the suite makes hundreds of stores' worth of tests. :func:`make_template` creates one
empty store per test process, and :func:`new_store` copies it: the same file MLflow would have
written (schema, migration version, the Default experiment), with the Default experiment's
artifact location and times set as a store created there and then would have them
(`tests/test_stores.py` compares the two). Tests about store creation itself (several
processes creating one store at once) keep creating theirs.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

DB = "mlflow.db"


def make_template(folder: Path) -> Path:
    """An empty, migrated SQLite store ``folder/mlflow.db`` created by MLflow with ``folder``
    as the working directory (where the Default experiment's artifacts would go)."""
    from mlflow.tracking import MlflowClient

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        MlflowClient(f"sqlite:///{folder / DB}").search_experiments()
    return folder / DB


def new_store(template: Path, folder: Path, cwd: Path | None = None) -> str:
    """The URI of a new empty store ``folder/mlflow.db``: a copy of ``template`` whose Default
    experiment is rewritten as MLflow writes it for a store created now by a process working in
    ``cwd`` (default: ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / DB
    if db.exists():
        raise FileExistsError(f"{db} exists: a new store must not replace one")
    shutil.copyfile(template, db)
    now = int(time.time() * 1000)
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        [(location,)] = con.execute("SELECT artifact_location FROM experiments WHERE experiment_id = 0").fetchall()
        prefix = str(template.parent)
        if not location.startswith(prefix):
            raise AssertionError(f"the template's Default experiment is at {location}, not under {prefix}")
        con.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
                    "WHERE experiment_id = 0", (str(cwd or folder) + location[len(prefix):], now, now))
    return f"sqlite:///{db}"


@contextlib.contextmanager
def store_with_a_trained_model(tiny_root: Path, base: Path, template: Path):
    """A SQLite store in ``base`` (the cwd meanwhile) holding one fn-small trained for one
    epoch on ``tiny_root`` by `fgvc train` (registered as fgvc-fn-small, version 1)."""
    from click.testing import CliRunner

    from fgvc.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        mp.setenv("MLFLOW_TRACKING_URI", new_store(template, base))
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        done = CliRunner().invoke(main, ["train", "--arch", "fn-small", "--epochs", "1", "--batch-size", "8",
                                         "--num-workers", "0", "--data-root", str(tiny_root)])
        assert done.exit_code == 0, done.output
        yield base
