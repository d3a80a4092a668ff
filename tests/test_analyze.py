"""`analyze`: model resolution, data defaults, results attached to the training run."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from fgvc.tracking.analyze_run import load_analysis_data, parse_methods, run_analyze
from fgvc.tracking.registry import resolve_version
from fgvc.tracking.train_run import run_train
from fgvc.training.config import TrainConfig


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    """One registered fn-small (1 epoch) in a module-wide store."""
    store = tmp_path_factory.mktemp("store")
    mp = pytest.MonkeyPatch()
    mp.chdir(store)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    result = run_train(TrainConfig(arch="fn-small", data_root=str(tiny_root), epochs=1, batch_size=8,
                                   num_workers=0), progress=False)
    yield result
    mp.undo()


def artifacts(run_id, path):
    return sorted(a.path for a in MlflowClient().list_artifacts(run_id, path))


def test_methods_parse():
    assert parse_methods("all") == ["gradcam", "occlusion", "neighbors"]
    assert parse_methods("all+shortcut") == ["gradcam", "occlusion", "neighbors", "shortcut"]
    assert parse_methods("occlusion,gradcam") == ["occlusion", "gradcam"]
    with pytest.raises(ValueError, match="unknown analysis method 'lime'"):
        parse_methods("lime")


def test_resolution_errors_list_what_exists(trained):
    assert resolve_version("fgvc-fn-small@candidate").run_id == trained.run_id
    assert resolve_version("models:/fgvc-fn-small/1").version == "1"
    with pytest.raises(ValueError, match="no registered model named 'fgvc-nope'; registered models: fgvc-fn-small"):
        resolve_version("models:/fgvc-nope@champion")
    with pytest.raises(ValueError, match=r"has no alias 'champion'; aliases: candidate \(v1\)"):
        resolve_version("models:/fgvc-fn-small@champion")
    with pytest.raises(ValueError, match=r"has no version 7; versions: \[1\]"):
        resolve_version("models:/fgvc-fn-small/7")
    with pytest.raises(ValueError, match="not understood"):
        resolve_version("runs:/abc/model")


def test_version_without_spec_is_refused(trained, tmp_path):
    client = MlflowClient()
    client.create_registered_model("bare")
    with mlflow.start_run() as run:
        torch.save({"state_dict": {}}, tmp_path / "best.pt")
        mlflow.log_artifact(str(tmp_path / "best.pt"), "checkpoints")
    client.create_model_version("bare", f"runs:/{run.info.run_id}/checkpoints", run_id=run.info.run_id)
    with pytest.raises(ValueError, match="lacks the model spec"):
        run_analyze("models:/bare/1", "gradcam")


def test_all_methods_attach_pictures_and_numbers_to_the_training_run(trained):
    results = run_analyze("models:/fgvc-fn-small@candidate", "all+shortcut", num_images=9, batch_size=4,
                          window=16, stride=8)
    assert set(results) == {"gradcam", "occlusion", "neighbors", "shortcut"}
    train_run = MlflowClient().get_run(trained.run_id)
    metrics = train_run.data.metrics
    for key in ("gradcam/bg_energy_fraction_mean", "gradcam/bg_preference_mean", "gradcam/deletion_auc_mean",
                "gradcam/insertion_auc_mean", "occlusion/bg_energy_fraction_mean", "neighbors/precision_at_1",
                "neighbors/recall_at_k", "neighbors/map_at_r", "neighbors/same_venue_other_label_fraction_at_k",
                "shortcut/acc_no_fg", "shortcut/bg_gap", "shortcut/chance"):
        assert key in metrics, key
    assert 0 <= metrics["gradcam/bg_energy_fraction_mean"] <= 1
    assert metrics["shortcut/chance"] == pytest.approx(1 / 3)
    assert metrics["gradcam/num_images"] == 9 and metrics["neighbors/num_reference"] == 24
    assert {"analysis/gradcam/summary.png", "analysis/gradcam/example_00.png", "analysis/gradcam/per_image.csv",
            "analysis/gradcam/bg_energy_fraction_hist.png", "analysis/gradcam/metrics.json"} <= set(
        artifacts(trained.run_id, "analysis/gradcam"))
    assert "analysis/neighbors/neighbors_grid.png" in artifacts(trained.run_id, "analysis/neighbors")
    assert {"analysis/shortcut/variants.png", "analysis/shortcut/accuracy_by_variant.png"} <= set(
        artifacts(trained.run_id, "analysis/shortcut"))
    saved = json.loads(mlflow.artifacts.load_text(f"runs:/{trained.run_id}/analysis/gradcam/metrics.json"))
    assert saved["bg_energy_fraction_mean"] == pytest.approx(metrics["gradcam/bg_energy_fraction_mean"])
    assert saved["model"] == "models:/fgvc-fn-small/1"

    # the analysis run is nested under the training run and tagged with the model
    runs = mlflow.search_runs(experiment_ids=[train_run.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{trained.run_id}'")
    assert len(runs) == 1
    assert runs.iloc[0]["tags.fgvc.model_uri"] == "models:/fgvc-fn-small@candidate"
    assert runs.iloc[0]["tags.fgvc.model_version"] == "fgvc-fn-small/1"
    assert runs.iloc[0]["metrics.gradcam/bg_energy_fraction_mean"] == pytest.approx(
        metrics["gradcam/bg_energy_fraction_mean"])


def test_rerun_replaces_artifacts_and_is_deterministic(trained):
    run_analyze("fgvc-fn-small@candidate", "gradcam", num_images=6, batch_size=3)
    first = artifacts(trained.run_id, "analysis/gradcam")
    value = MlflowClient().get_run(trained.run_id).data.metrics["gradcam/bg_energy_fraction_mean"]
    run_analyze("fgvc-fn-small@candidate", "gradcam", num_images=6, batch_size=3)
    assert artifacts(trained.run_id, "analysis/gradcam") == first
    assert MlflowClient().get_run(trained.run_id).data.metrics["gradcam/bg_energy_fraction_mean"] == value


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
