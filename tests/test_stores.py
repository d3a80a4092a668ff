"""The suite's quick stores (`tests/stores.py`) are the stores MLflow creates."""

from __future__ import annotations

import contextlib
import sqlite3
import time

from mlflow.tracking import MlflowClient
from stores import new_store


def clauses(sql: str | None) -> list[str]:
    """A CREATE statement's lines in order of text: MLflow's migrations write a table's
    constraints in an order that differs from one new store to the next."""
    return sorted(line.strip().rstrip(",") for line in (sql or "").splitlines())


def dump(db) -> dict[str, list]:
    """Every table's schema and rows, the Default experiment's times left out."""
    with contextlib.closing(sqlite3.connect(db)) as con:
        tables = sorted(name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
        out = {"schema": sorted((kind, name, clauses(sql)) for kind, name, sql in
                                con.execute("SELECT type, name, sql FROM sqlite_master"))}
        for table in tables:
            rows = con.execute(f'SELECT * FROM "{table}"').fetchall()
            if table == "experiments":
                columns = [c[1] for c in con.execute('PRAGMA table_info("experiments")')]
                rows = [tuple(v for c, v in zip(columns, row, strict=True) if not c.endswith("_time")) for row in rows]
            out[table] = sorted(rows, key=repr)
    return out


def test_a_copied_store_is_the_store_mlflow_creates_in_its_place(store_template, tmp_path, monkeypatch):
    fresh, copied, elsewhere = tmp_path / "fresh", tmp_path / "copied", tmp_path / "cwd"
    fresh.mkdir()
    monkeypatch.chdir(fresh)
    before = int(time.time() * 1000)
    MlflowClient(f"sqlite:///{fresh}/mlflow.db").search_experiments()
    uri = new_store(store_template, copied)
    expected = dump(fresh / "mlflow.db")
    moved = [tuple(v.replace(str(fresh), str(copied)) if isinstance(v, str) else v for v in row)
             for row in expected["experiments"]]
    assert moved != expected["experiments"]  # the Default experiment names where it was made
    assert dump(copied / "mlflow.db") == {**expected, "experiments": moved}
    default = MlflowClient(uri).get_experiment("0")
    assert default.artifact_location == f"{copied}/mlruns/0"
    assert default.creation_time >= before and default.last_update_time >= before
    new_store(store_template, tmp_path / "other", cwd=elsewhere)
    assert MlflowClient(f"sqlite:///{tmp_path}/other/mlflow.db").get_experiment("0").artifact_location == \
        f"{elsewhere}/mlruns/0"
