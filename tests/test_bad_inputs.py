"""Every input a user can get wrong, through the command line as a user meets it: a non-zero
exit, one line naming the file or option and the rule, no traceback, no run left FAILED or
RUNNING, nothing deleted."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from stores import new_store
from test_shards import BAD_SHARDS, RunsCodeWhenLoaded, good_root

from fgvc.cli import main
from fgvc.data.demo import DemoConfig, generate_demo
from fgvc.data.shards import load_shard, shard_name, write_label_map

TINY = DemoConfig(num_designers=3, train_per_class=8, val_per_class=4, height=32, width=24, shard_size=10)
TRAIN = ["--arch", "fn-small", "--epochs", "1", "--batch-size", "8", "--num-workers", "0"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, store_template):
    """A store with one registered fn-small (run `trained`) and its data root."""
    base = tmp_path_factory.mktemp("bad-inputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        mp.setenv("MLFLOW_TRACKING_URI", new_store(store_template, base))
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        generate_demo(base / "data", TINY)
        done = CliRunner().invoke(main, ["train", *TRAIN, "--data-root", str(base / "data")])
        assert done.exit_code == 0, done.output
        yield base


def fresh_root(base: Path, name: str) -> Path:
    root = base / "cases" / name
    if root.exists():
        shutil.rmtree(root)
    generate_demo(root, TINY)
    return root


def snapshot(base: Path) -> dict[str, bytes]:
    return {str(p.relative_to(base)): p.stat().st_size for p in base.rglob("*") if p.is_file()
            and "mlruns" not in p.parts and not p.name.startswith("mlflow.db")}


def run_states() -> dict[str, str]:
    return {r.info.run_id: r.info.status for r in mlflow.search_runs(search_all_experiments=True,
                                                                    output_format="list")}


def assert_refused(args: list[str], *expected: str) -> str:
    """The command exits non-zero with one line (besides click's usage lines) holding every
    expected word, no traceback, and leaves no run behind in a wrong state."""
    before = run_states()
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    for word in expected:
        assert word in errors[0], (word, errors[0])
    after = run_states()
    new = {k: v for k, v in after.items() if k not in before}
    assert not new, f"a refused command left runs behind: {new}"
    assert {k: after[k] for k in before} == before
    return errors[0]


# ----------------------------------------------------------------------------- data roots

@pytest.mark.parametrize("case,breaks,expected", BAD_SHARDS, ids=[c[0] for c in BAD_SHARDS])
def test_malformed_shards(store, case, breaks, expected):
    root = good_root(store / "cases" / f"shard-{case.replace(' ', '_')}")
    breaks(root)
    kept = snapshot(root)
    assert_refused(["train", *TRAIN, "--data-root", str(root)], str(root / "train" / "shard_000.pt"), expected)
    assert snapshot(root) == kept


def edit_shard(root: Path, **changes) -> Path:
    path = root / "train" / shard_name(0)
    shard = load_shard(path, mmap=False)
    shard.update(changes)
    torch.save(shard, path)
    return path


def write_json(path: Path, value) -> Path:
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return path


ROOT_CASES = [
    ("shard holding code", lambda r: edit_shard(r, note=RunsCodeWhenLoaded(r / "code-ran")),
     ["shard_000.pt", "refused to load", "holds more than tensors", "would run code"]),
    ("venues of the wrong shape", lambda r: edit_shard(r, venues=torch.zeros(10, 2, dtype=torch.int64)),
     ["shard_000.pt", "'venues' must be an integer tensor [N]"]),
    ("bg_removed not bool", lambda r: edit_shard(r, bg_removed=torch.zeros(10)),
     ["shard_000.pt", "'bg_removed' must be a bool tensor [N]"]),
    ("label map as a list", lambda r: write_json(r / "index_to_label.json", ["a", "b", "c"]),
     ["index_to_label.json", "must be a JSON object", "found a JSON list"]),
    ("label map with a word key", lambda r: write_json(r / "index_to_label.json", {"0": "a", "one": "b", "2": "c"}),
     ["index_to_label.json", "key 'one' is not a class index"]),
    ("label map missing a class", lambda r: write_json(r / "index_to_label.json", {"0": "a", "1": "b"}),
     ["index_to_label.json", "must name every class 0..2", "missing [2]"]),
    ("meta.json not JSON", lambda r: write_json(r / "meta.json", "{not json"),
     ["meta.json", "is not valid JSON"]),
]


@pytest.mark.parametrize("case,breaks,expected", ROOT_CASES, ids=[c[0] for c in ROOT_CASES])
def test_bad_roots(store, case, breaks, expected):
    root = fresh_root(store, case.replace(" ", "_"))
    breaks(root)
    assert_refused(["train", *TRAIN, "--data-root", str(root)], *expected)
    assert not (root / "code-ran").exists()


def test_stray_pt_files_are_not_shards(store, caplog):
    root = fresh_root(store, "stray")
    shutil.copy(root / "train" / "shard_000.pt", root / "train" / "backup_copy.pt")
    from fgvc.data.dataset import ShardDataset

    with caplog.at_level("WARNING"):
        assert len(ShardDataset(root, "train")) == 24  # not doubled
    assert "backup_copy.pt" in caplog.text and "not named shard_NNN.pt" in caplog.text


# ------------------------------------------------------------------------------- options

OPTION_CASES = [
    (["train", "--lr-head", "-0.1"], ["--lr-head", "must be positive"]),
    (["train", "--label-smoothing", "5"], ["--label-smoothing", "must be in [0, 1)"]),
    (["train", "--lr-backbone", "abc"], ["--lr-backbone", "'abc' is not a number"]),
    (["train", "--epochs", "two"], ["--epochs", "'two' is not an integer"]),
    (["train", "--batch-size", "9", "--nproc", "2"], ["--batch-size 9", "divisible by --nproc 2"]),
    (["train", "--registered-model", "fgvc' OR 1"], ["--registered-model", "cannot hold quotes"]),
    (["train", "--arch", "resnet99"], ["--arch", "Unknown arch 'resnet99'"]),
    (["analyze", "--num-images", "0"], ["--num-images", "must be positive"]),
    (["analyze", "--method", "lime"], ["--method", "unknown analysis method 'lime'"]),
    (["analyze", "--window", "8", "--stride", "16"], ["--stride 16 is larger than --window 8"]),
    (["mask", "--min-person-ratio", "2"], ["--min-person-ratio", "must be in [0, 1]"]),
    (["study", "--regimes", "unmasked,bg-only"], ["--regimes", "'bg-only' is not one of"]),
    (["study", "--seeds", "0,0"], ["--seeds", "lists a value twice"]),
    (["prepare", "--val-fraction", "1"], ["--val-fraction", "must be in [0, 1)"]),
]


@pytest.mark.parametrize("args,expected", OPTION_CASES, ids=[" ".join(c[0]) for c in OPTION_CASES])
def test_bad_options(store, args, expected):
    assert_refused(args, *expected)


# ------------------------------------------------------------------- registry and models

def test_registry_names_with_quotes_neither_break_nor_change_a_query(store):
    assert_refused(["promote", "--name", "fgvc-fn-small' AND name LIKE '%"],
                   "no versions (or does not exist)", "registered models: fgvc-fn-small")
    assert_refused(["analyze", "--model", "models:/fgvc-fn'small@candidate"], "no registered model named")
    assert_refused(["promote", "--name", "fgvc-fn-small", "--version", "99"], "has no version 99; versions: [1]")
    assert_refused(["analyze", "--model", "models:/fgvc-fn-small@champion"],
                   "has no alias 'champion'; aliases: candidate (v1)")


def _logged_checkpoint(run_id: str) -> Path:
    """The file of the run's MLflow model that holds its weights (local store)."""
    [output] = MlflowClient().get_run(run_id).outputs.model_outputs
    location = mlflow.get_logged_model(output.model_id).artifact_location
    return Path(location.replace("file://", "")) / "artifacts" / "best.pt"


def test_checkpoints_holding_code_are_refused_in_one_line(store):
    trained = mlflow.search_runs(experiment_names=["fgvc-train"], output_format="list")[0]
    path = _logged_checkpoint(trained.info.run_id)
    original = path.read_bytes()
    witness = store / "checkpoint-code-ran"
    try:
        torch.save({"model": RunsCodeWhenLoaded(witness), "spec": {}}, path)
        assert_refused(["analyze", "--model", "models:/fgvc-fn-small/1", "--num-images", "4"],
                       "best.pt", "holds more than tensors")
    finally:
        path.write_bytes(original)
    assert not witness.exists()

    # a resume checkpoint replaced by a pickle that runs code: refused, never executed
    run = CliRunner().invoke(main, ["train", *TRAIN, "--epochs", "2", "--data-root", str(store / "data"),
                                    "--registered-model", "none", "--seed", "5"])
    assert run.exit_code == 0, run.output
    run_id = re.search(r"run ([0-9a-f]{32}): best val acc", run.output).group(1)
    local = Path(mlflow.get_run(run_id).info.artifact_uri.replace("file://", "")) / "checkpoints" / "last.pt"
    torch.save({"model": RunsCodeWhenLoaded(witness)}, local)
    assert_refused(["train", *TRAIN, "--epochs", "2", "--data-root", str(store / "data"), "--seed", "5",
                    "--resume", run_id], "last.pt", "holds more than tensors")
    assert not witness.exists()


def test_resume_with_another_architecture_is_refused_before_loading(store):
    trained = mlflow.search_runs(experiment_names=["fgvc-train"], output_format="list",
                                 filter_string="tags.`fgvc.arch` = 'fn-small'")[-1]
    message = assert_refused(["train", "--arch", "resnet18", "--pretrained", "false", "--epochs", "2",
                              "--data-root", str(store / "data"), "--resume", trained.info.run_id],
                             "trained arch fn-small, not --arch resnet18")
    assert len(message) < 400  # no state_dict key dump


def test_analysis_data_must_fit_the_model(store):
    other_size = store / "cases" / "wide"
    generate_demo(other_size, DemoConfig(num_designers=3, train_per_class=4, val_per_class=4, height=32, width=32))
    assert_refused(["analyze", "--model", "models:/fgvc-fn-small/1", "--data-root", str(other_size)],
                   "images are 32x32", "trained on 32x24")
    renamed = fresh_root(store, "renamed")
    write_label_map(renamed, ["x", "designer_01", "designer_02"])
    assert_refused(["analyze", "--model", "models:/fgvc-fn-small/1", "--data-root", str(renamed)],
                   "index_to_label.json disagrees", "class 0 is 'designer_00' for the model but 'x' in the data")


def test_background_swaps_without_masks_are_refused_before_a_run(store):
    bare = fresh_root(store, "bare")
    for path in bare.glob("*/shard_*.pt"):
        shard = load_shard(path, mmap=False)
        del shard["masks"]
        torch.save(shard, path)
    assert_refused(["analyze", "--model", "models:/fgvc-fn-small/1", "--method", "shortcut", "--data-root",
                    str(bare)], "needs person masks", "--mask-root")


# -------------------------------------------------------------------- nothing is deleted

def test_prepare_overwrite_removes_only_what_prepare_wrote(store, tmp_path):
    root = tmp_path / "P"
    (root / "src").mkdir(parents=True)
    (root / "src" / "code.py").write_text("print('mine')")
    (root / "notes.txt").write_text("mine")
    first = CliRunner().invoke(main, ["prepare", "--root", str(root), "--num-designers", "3", "--train-per-class",
                                      "4", "--val-per-class", "2"])
    assert first.exit_code == 0, first.output
    assert_refused(["prepare", "--root", str(root)], "a dataset already exists here", "--overwrite true")
    again = CliRunner().invoke(main, ["prepare", "--root", str(root), "--overwrite", "true", "--num-designers", "4",
                                      "--train-per-class", "4", "--val-per-class", "2"])
    assert again.exit_code == 0, again.output
    assert (root / "src" / "code.py").read_text() == "print('mine')" and (root / "notes.txt").exists()
    assert json.loads((root / "meta.json").read_text())["num_classes"] == 4


def test_prepare_refuses_a_source_inside_the_root(store, tmp_path):
    from PIL import Image

    root = tmp_path / "R"
    for designer in ("a", "b"):
        (root / "raw" / designer).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 30), (i * 40, 100, 50)).save(root / "raw" / designer / f"{i}.jpg")
    kept = snapshot(root)
    for overwrite in ("false", "true"):
        assert_refused(["prepare", "--source", str(root / "raw"), "--root", str(root), "--overwrite", overwrite],
                       "the source lies inside the dataset root")
    assert snapshot(root) == kept
