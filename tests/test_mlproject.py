"""The MLproject entry points as a user runs them: `mlflow run . -e NAME --env-manager local`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from fgvc.cli import main

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ("prepare", "mask", "train", "analyze", "promote", "study")


def project() -> dict:
    return yaml.safe_load((REPO / "MLproject").read_text())


def test_every_entry_point_is_declared_with_a_thin_script():
    spec = project()
    assert spec["conda_env"] == "conda.yaml"
    for name in ENTRY_POINTS:
        assert name in spec["entry_points"], name
        script = REPO / "entrypoints" / f"{name}.py"
        assert f'run("{name}")' in script.read_text()


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_point_parameters_are_cli_options(name):
    entry = project()["entry_points"][name]
    command = " ".join(entry["command"].split())
    options = re.findall(r"(--[a-z0-9-]+) \{(\w+)\}", command)
    assert {p for _, p in options} == set(entry["parameters"]), "every parameter reaches the command"
    help_text = CliRunner().invoke(main, [name, "--help"], terminal_width=200).output
    for option, _ in options:
        assert option in help_text, f"{name}: {option} is not an option of `fgvc {name}`"


def mlflow_run(entry: str, cwd: Path, **params) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local"]
    for key, value in params.items():
        args += ["-P", f"{key}={value}"]
    # Run variables left by earlier in-process runs must not leak into a fresh `mlflow run`.
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID",
                                                            "MLFLOW_EXPERIMENT_NAME")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{cwd}/mlflow.db", OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_mlflow_run_prepare_mask_train_promote_analyze(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")  # earlier tests may have set another
    data, masked = tmp_path / "demo", tmp_path / "demo-masked"
    steps = [
        ("prepare", dict(root=data, seed=3)),
        ("mask", dict(src_root=data, dst_root=masked, segmenter="groundtruth")),
        ("train", dict(arch="fn-small", data_root=masked, epochs=1, train_count=60, val_count=30,
                       batch_size=16, aug="true")),
        ("promote", dict(name="fgvc-fn-small")),
        ("analyze", dict(model="models:/fgvc-fn-small@champion", method="gradcam", num_images=8,
                         data_root=data)),
    ]
    for entry, params in steps:
        done = mlflow_run(entry, tmp_path, **params)
        assert done.returncode == 0, f"{entry}:\n{done.stderr[-3000:]}"

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    by_name = {r.info.run_name: r for r in runs}
    train = by_name["fn-small-masked-aug"]
    assert train.data.params["aug"] == "true" and train.data.params["regime"] == "masked-aug"
    assert train.data.params["train_images"] == "60"
    assert "gradcam/bg_energy_fraction_mean" in train.data.metrics
    assert str(client.get_model_version_by_alias("fgvc-fn-small", "champion").version) == "1"
    assert any(r.data.params.get("segmenter") == "groundtruth" for r in runs)
    assert (masked / "meta.json").exists() and (data / "index_to_label.json").exists()
