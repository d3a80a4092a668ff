"""The MLproject entry points as a user runs them: `mlflow run . -e NAME --env-manager local`,
and the MLproject file against the CLI, in both directions."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import mlflow
import pytest
import yaml
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from fgvc.cli import CONFIGS, KindType, main
from fgvc.mlproject import render

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = tuple(CONFIGS)
MLPROJECT_TYPES = {"int": "int", "float": "float", "string": "string"}


def project() -> dict:
    return yaml.safe_load((REPO / "MLproject").read_text())


def test_mlproject_is_the_generated_one():
    assert (REPO / "MLproject").read_text() == render(), "regenerate with: python -m fgvc.mlproject > MLproject"


def test_every_entry_point_is_declared_with_a_thin_script():
    spec = project()
    assert spec["conda_env"] == "conda.yaml"
    assert set(spec["entry_points"]) == set(ENTRY_POINTS)
    for name in ENTRY_POINTS:
        script = REPO / "entrypoints" / f"{name}.py"
        assert f'run("{name}")' in script.read_text()


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_parameters_and_cli_options_match_in_both_directions(name):
    entry = project()["entry_points"][name]
    command = main.commands[name]
    cli = {p.name: p for p in command.params if isinstance(p, click.Option)
           and p.name not in getattr(command, "command_line_only", ())}
    # MLproject -> command line: every parameter reaches the command under its option name
    substituted = dict(re.findall(r"(--[a-z0-9-]+) \{(\w+)\}", " ".join(entry["command"].split())))
    assert set(substituted.values()) == set(entry["parameters"])
    for option, param in substituted.items():
        assert param in cli and option in cli[param].opts, (name, option)
    # command line -> MLproject: every option is a parameter of the same type and default
    assert set(cli) == set(entry["parameters"]), name
    for param, option in cli.items():
        declared = entry["parameters"][param]
        kind = option.type.kind if isinstance(option.type, KindType) else None
        assert kind is not None and declared["type"] == MLPROJECT_TYPES[kind.mlproject_type], (name, param)
        assert str(declared["default"]) == option.default or float(declared["default"]) == float(option.default), \
            (name, param, declared["default"], option.default)


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help_exits_zero_for_every_command(name):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0 and "Error" not in result.output, result.output


# Runs each entry-point script as `python entrypoints/<name>.py --help` would (as __main__), in
# one interpreter so torch and mlflow are imported once; prints {name: [exit code, stdout]}.
RUN_SCRIPTS = """
import contextlib, io, json, runpy, sys
out = {}
for path in sys.argv[1:]:
    sys.argv, buffer, code = [path, "--help"], io.StringIO(), 0
    with contextlib.redirect_stdout(buffer):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as stop:
            code = stop.code or 0
    out[path] = [code, buffer.getvalue()]
print(json.dumps(out))
"""


def test_help_exits_zero_for_every_entry_point_script():
    paths = [str(REPO / "entrypoints" / f"{name}.py") for name in ENTRY_POINTS]
    done = subprocess.run([sys.executable, "-c", RUN_SCRIPTS, *paths], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(paths)
    for path, (code, text) in results.items():
        assert code == 0 and "--" in text and "Usage:" in text, (path, code, text[-500:], done.stderr[-2000:])


def test_a_bad_number_names_the_option_and_exits_nonzero():
    result = CliRunner().invoke(main, ["train", "--lr-backbone", "abc"])
    assert result.exit_code == 2
    assert "--lr-backbone" in result.output and "'abc' is not a number" in result.output


def mlflow_run(entry: str, cwd: Path, **params) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", entry, "--env-manager", "local"]
    for key, value in params.items():
        args += ["-P", f"{key}={value}"]
    # Run variables left by earlier in-process runs must not leak into a fresh `mlflow run`.
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID",
                                                            "MLFLOW_EXPERIMENT_NAME")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{cwd}/mlflow.db", OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_the_readme_main_command_lands_in_the_described_experiment_with_a_clean_log(tmp_path):
    """The README's `mlflow run . -e train --env-manager local --experiment-name fgvc-train`,
    output to a file as a batch job keeps it: the run is in fgvc-train, described and marked
    for the Model training view; the log has no escape codes, no line twice, no Python warning."""
    from fgvc.data.demo import DemoConfig, generate_demo

    data = tmp_path / "demo"
    generate_demo(data, DemoConfig(num_designers=3, train_per_class=8, val_per_class=4, height=32, width=24))
    args = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "train", "--env-manager", "local",
            "--experiment-name", "fgvc-train"]
    for key, value in dict(arch="fn-small", data_root=data, epochs=2, batch_size=8, pretrained="false").items():
        args += ["-P", f"{key}={value}"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID",
                                                            "MLFLOW_EXPERIMENT_NAME")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db", OMP_NUM_THREADS="1")
    log_path = tmp_path / "log"
    with open(log_path, "w") as log_file:
        done = subprocess.run(args, cwd=tmp_path, env=env, stdout=log_file, stderr=subprocess.STDOUT, timeout=900)
    log = log_path.read_text()
    assert done.returncode == 0, log[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("fgvc-train")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.data.tags["fgvc.task"] for r in runs] == ["train"] and runs[0].info.status == "FINISHED"
    assert not client.search_runs(["0"])  # nothing in Default
    assert experiment.tags["mlflow.note.content"] and experiment.tags["mlflow.experimentKind"] == \
        "custom_model_development"

    assert "\x1b" not in log and "\r" not in log
    lines = [line for line in log.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), [line for line in lines if lines.count(line) > 1]
    assert not re.search(r"\.py:\d+: \w*Warning", log) and "warnings.warn" not in log
    assert "Add type hints" not in log and "already exists" not in log
    assert sum(line.startswith("epoch ") for line in lines) == 2  # a plain line per epoch instead of bars
    assert sum(f"run {runs[0].info.run_id}: best val acc" in line for line in lines) == 1


@pytest.mark.slow
def test_mlflow_run_prepare_mask_train_promote_analyze(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")  # earlier tests may have set another
    data, masked = tmp_path / "demo", tmp_path / "demo-masked"
    steps = [
        ("prepare", dict(root=data, seed=3, num_designers=3, train_per_class=20, val_per_class=10)),
        ("mask", dict(src_root=data, dst_root=masked, segmenter="groundtruth")),
        ("train", dict(arch="fn-small", data_root=masked, epochs=1, batch_size=16, aug="true")),
        ("promote", dict(name="fgvc-fn-small")),
        ("analyze", dict(model="models:/fgvc-fn-small@champion", method="gradcam", num_images=8,
                         data_root=masked)),
    ]
    for entry, params in steps:
        done = mlflow_run(entry, tmp_path, **params)
        assert done.returncode == 0, f"{entry}:\n{done.stderr[-3000:]}"

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
            if r.data.tags.get("fgvc.task") != "claims"]  # the claims ledger (fgvc.tracking.claims)
    by_task = {r.data.tags.get("fgvc.task"): r for r in runs}
    assert set(by_task) == {"prepare", "mask", "train", "promote", "analyze"}
    assert all(r.data.tags.get("mlflow.note.content") for r in runs)  # every run says what it is
    train = by_task["train"]
    assert train.info.run_name == "fn-small-masked+aug"
    assert train.data.params["aug"] == "true" and train.data.params["regime"] == "masked+aug"
    assert "aug_effective" not in train.data.params  # mlflow run's own params are the canonical ones
    assert train.data.params["train_images"] == "60"
    assert "gradcam/bg_preference_mean" in train.data.metrics
    assert by_task["promote"].info.run_name == "promote-fgvc-fn-small-champion"
    assert str(client.get_model_version_by_alias("fgvc-fn-small", "champion").version) == "1"
    assert (masked / "meta.json").exists() and (data / "index_to_label.json").exists()
