"""A tracking store with a trained model, for tests that need one to predict or serve."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest


@contextlib.contextmanager
def store_with_a_trained_model(tiny_root: Path, base: Path):
    """A SQLite store in ``base`` (the cwd meanwhile) holding one fn-small trained for one
    epoch on ``tiny_root`` by `fgvc train` (registered as fgvc-fn-small, version 1)."""
    from click.testing import CliRunner

    from fgvc.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{base}/mlflow.db")
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        done = CliRunner().invoke(main, ["train", "--arch", "fn-small", "--epochs", "1", "--batch-size", "8",
                                         "--num-workers", "0", "--data-root", str(tiny_root)])
        assert done.exit_code == 0, done.output
        yield base
