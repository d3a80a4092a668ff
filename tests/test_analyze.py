"""`analyze`: model resolution, data defaults, records keyed by settings, what the training
run shows."""

from __future__ import annotations

import csv
import io
import json

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from stores import new_store

from fgvc.analysis.config import AnalyzeConfig
from fgvc.analysis.data import load_analysis_data
from fgvc.analysis.methods import METHODS
from fgvc.config import parse_value
from fgvc.errors import ConfigError, FgvcError
from fgvc.tasks.analyze import run_analyze
from fgvc.tasks.train import run_train
from fgvc.tracking.model_registry import resolve_version
from fgvc.training.config import TrainConfig


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory, store_template):
    """One registered fn-small (1 epoch) in a module-wide store."""
    store = tmp_path_factory.mktemp("store")
    mp = pytest.MonkeyPatch()
    mp.chdir(store)
    mp.setenv("MLFLOW_TRACKING_URI", new_store(store_template, store))
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    result = run_train(TrainConfig(arch="fn-small", data_root=str(tiny_root), epochs=1, batch_size=8,
                                   num_workers=0), progress=False)
    yield result
    mp.undo()


def artifacts(run_id, path):
    client = MlflowClient()
    out = []
    for item in client.list_artifacts(run_id, path):
        out += artifacts(run_id, item.path) if item.is_dir else [item.path]
    return sorted(out)


def analyze(**options) -> AnalysisOutcome:  # noqa: F821
    return run_analyze(AnalyzeConfig(model="models:/fgvc-fn-small@candidate", **options))


def test_methods_parse_from_the_registry():
    parse = lambda text: parse_value(AnalyzeConfig, "method", text)  # noqa: E731
    assert parse("all") == METHODS.where(lambda m: m.in_all) == ("gradcam", "occlusion", "neighbors")
    assert parse("all+shortcut") == ("gradcam", "occlusion", "neighbors", "shortcut")
    assert parse("occlusion,gradcam") == ("occlusion", "gradcam")
    with pytest.raises(ConfigError, match="unknown analysis method 'lime'"):
        parse("lime")


def test_resolution_errors_list_what_exists(trained):
    assert resolve_version("fgvc-fn-small@candidate").run_id == trained.run_id
    assert resolve_version("models:/fgvc-fn-small/1").version == "1"
    with pytest.raises(ConfigError, match="no registered model named 'fgvc-nope'; registered models: fgvc-fn-small"):
        resolve_version("models:/fgvc-nope@champion")
    with pytest.raises(ConfigError, match=r"has no alias 'champion'; aliases: candidate \(v1\)"):
        resolve_version("models:/fgvc-fn-small@champion")
    with pytest.raises(ConfigError, match=r"has no version 7; versions: \[1\]"):
        resolve_version("models:/fgvc-fn-small/7")
    with pytest.raises(ConfigError, match="not understood"):
        resolve_version("runs:/abc/model")


def test_version_without_spec_is_refused(trained, tmp_path):
    client = MlflowClient()
    client.create_registered_model("bare")
    with mlflow.start_run() as run:
        torch.save({"state_dict": {}}, tmp_path / "best.pt")
        mlflow.log_artifact(str(tmp_path / "best.pt"), "checkpoints")
    client.create_model_version("bare", f"runs:/{run.info.run_id}/checkpoints", run_id=run.info.run_id)
    with pytest.raises(FgvcError, match="not an fgvc checkpoint"):
        run_analyze(AnalyzeConfig(model="models:/bare/1"))


def test_all_methods_make_one_record_and_show_on_the_training_run(trained):
    outcome = analyze(method=("gradcam", "occlusion", "neighbors", "shortcut"), num_images=9, batch_size=4,
                      window=16, stride=8)
    assert set(outcome.metrics) == {"gradcam", "occlusion", "neighbors", "shortcut"}
    client = MlflowClient()
    record = client.get_run(outcome.record_run_id)
    assert record.data.tags["fgvc.task"] == "analyze" and record.data.tags["fgvc.source_run"] == trained.run_id
    assert client.get_experiment(record.info.experiment_id).name == "fgvc-analysis"
    # 32x24 images: stage3's map is 4x3 and stage2's 8x6; stage1's 16x12 is the deepest with >= 7 cells
    assert record.data.params["gradcam.layer"] == "body.stage1" and record.data.params["gradcam.map_size"] == "16x12"
    train_run = client.get_run(trained.run_id)
    metrics = train_run.data.metrics
    for key in ("gradcam/bg_preference_mean", "gradcam/bg_preference_mean_low", "gradcam/bg_energy_fraction_mean",
                "gradcam/deletion_auc_mean", "occlusion/bg_preference_mean", "neighbors/precision_at_1",
                "neighbors/map_at_r", "neighbors/same_venue_other_label_fraction_at_k", "shortcut/acc_no_fg",
                "shortcut/acc_no_fg_low", "shortcut/bg_gap_high", "shortcut/chance"):
        assert key in metrics and key in record.data.metrics, key
        assert metrics[key] == record.data.metrics[key]
    assert metrics["shortcut/chance"] == pytest.approx(1 / 3)
    assert metrics["gradcam/num_images"] == 9 and metrics["neighbors/num_reference"] == 24
    assert metrics["shortcut/acc_no_fg_low"] <= metrics["shortcut/acc_no_fg"] <= metrics["shortcut/acc_no_fg_high"]
    for method, key in outcome.ids.items():
        assert train_run.data.tags[f"fgvc.analysis.{method}"] == outcome.record_run_id
        assert train_run.data.tags[f"fgvc.analysis.{method}.id"] == key
    assert "window=16" in train_run.data.tags["fgvc.analysis.occlusion.settings"]
    gradcam_files = artifacts(trained.run_id, f"analysis/gradcam/{outcome.ids['gradcam']}")
    expected = ("summary.png", "example_00.png", "per_image.csv", "bg_preference_hist.png", "metrics.json")
    assert {f"analysis/gradcam/{outcome.ids['gradcam']}/{f}" for f in expected} <= set(gradcam_files)
    saved = json.loads(mlflow.artifacts.load_text(f"runs:/{outcome.record_run_id}/analysis/gradcam/metrics.json"))
    assert saved["metrics"]["bg_preference_mean"] == pytest.approx(metrics["gradcam/bg_preference_mean"])
    assert saved["model"] == "models:/fgvc-fn-small/1" and saved["settings_id"] == outcome.ids["gradcam"]
    rows = list(csv.DictReader(io.StringIO(mlflow.artifacts.load_text(
        f"runs:/{outcome.record_run_id}/analysis/gradcam/per_image.csv"))))
    assert {"dataset_index", "designer", "predicted", "correct", "bg_preference"} <= set(rows[0])
    assert all(r["designer"].startswith("designer_") for r in rows)


def test_other_settings_never_replace_what_the_training_run_shows(trained):
    client = MlflowClient()
    first = analyze(method=("occlusion",), num_images=6, window=8, stride=8)
    before = client.get_run(trained.run_id).data
    shown, settings = before.metrics["occlusion/bg_preference_mean"], before.tags["fgvc.analysis.occlusion.settings"]
    other = analyze(method=("occlusion",), num_images=5, window=16, stride=8)
    assert other.ids["occlusion"] != first.ids["occlusion"] and not other.shown["occlusion"]
    after = client.get_run(trained.run_id).data
    assert after.metrics["occlusion/bg_preference_mean"] == shown  # unchanged
    assert after.tags["fgvc.analysis.occlusion.settings"] == settings and "num_images=5" not in settings
    assert client.get_run(other.record_run_id).data.metrics["occlusion/bg_preference_mean"] == \
        other.metrics["occlusion"]["bg_preference_mean"]  # the new numbers live in their own record
    # every settings' files stay on the training run, side by side
    folders = {p.split("/")[2] for p in artifacts(trained.run_id, "analysis/occlusion")}
    assert {first.ids["occlusion"], other.ids["occlusion"]} <= folders
    # asked explicitly, the training run shows the new settings, as a new step of the metric
    pinned = run_analyze(AnalyzeConfig(model="models:/fgvc-fn-small@candidate", method=("occlusion",), num_images=5,
                                       window=16, stride=8, show_on_training_run=True))
    train_run = client.get_run(trained.run_id)
    assert pinned.shown["occlusion"] and "num_images=5" in train_run.data.tags["fgvc.analysis.occlusion.settings"]
    assert train_run.data.metrics["occlusion/bg_preference_mean"] == pinned.metrics["occlusion"]["bg_preference_mean"]
    history = client.get_metric_history(trained.run_id, "occlusion/bg_preference_mean")
    assert shown in [m.value for m in history] and len({m.step for m in history}) >= 2


def test_same_settings_give_the_same_numbers_and_are_reused_on_request(trained):
    a = analyze(method=("gradcam",), num_images=6, batch_size=3)
    b = analyze(method=("gradcam",), num_images=6, batch_size=3)
    assert a.ids == b.ids and a.metrics == b.metrics and a.record_run_id != b.record_run_id
    reused = run_analyze(AnalyzeConfig(model="models:/fgvc-fn-small@candidate", method=("gradcam",), num_images=6),
                         reuse=True)
    assert reused.reused["gradcam"] in (a.record_run_id, b.record_run_id)


def test_masks_come_from_a_mask_root_when_the_shards_have_none(tiny_root, tmp_path):
    from fgvc.data.shards import make_shard, read_label_map, shards_of, write_label_map, write_shard

    bare = tmp_path / "bare"
    for split in ("train", "val"):
        for path in shards_of(tiny_root, split):
            shard = torch.load(path, weights_only=True)
            write_shard(bare / split / path.name, make_shard(shard["images"], shard["labels"], 3))
    write_label_map(bare, read_label_map(tiny_root))
    assert load_analysis_data(bare, "val", 6, 0).masks is None
    data = load_analysis_data(bare, "val", 6, 0, mask_root=tiny_root)
    assert data.masks is not None and data.masks.shape == (6, 32, 24)
    assert torch.equal(data.masks, load_analysis_data(tiny_root, "val", 6, 0).masks)


def test_examples_alternate_right_and_wrong_across_designers():
    from fgvc.analysis.methods.attribution import caption, example_indices

    labels, predicted = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 1, 0, 2, 2])
    chosen = example_indices(labels, predicted, 4)
    assert [bool(labels[i] == predicted[i]) for i in chosen] == [True, False, True, False]
    assert len({int(labels[i]) for i in chosen}) >= 2
    assert example_indices(labels, labels, 3) == [0, 2, 4]  # all right: one per designer

    class Data:
        def designer(self, i):
            return ["Dior", "Prada"][i]

    assert caption(Data(), 0, 1, 1.25) == "WRONG  true: Dior / predicted: Prada\nbackground preference 1.25"
    assert caption(Data(), 1, 1) == "true: Prada / predicted: Prada"
