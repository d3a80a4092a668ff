"""fgvc.tasks.mask: the `mask` entry point as an MLflow run."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient
from stores import new_store

from fgvc.data.demo import DemoConfig, generate_demo
from fgvc.data.shards import dataset_digest, read_meta
from fgvc.masking import MaskConfig, MaskError
from fgvc.tasks.mask import run_mask

TINY = DemoConfig(num_designers=3, train_per_class=8, val_per_class=4, height=32, width=24,
                  shard_size=10)


@pytest.fixture(scope="module")
def store(tmp_path_factory, store_template):
    """One tracking store and demo source for the module (creating a store takes seconds)."""
    root = tmp_path_factory.mktemp("mask_tracking")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", new_store(store_template, root))
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.chdir(root)
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        generate_demo(root / "src", TINY)
        yield root
        torch.set_num_threads(before)


def only_run(client: MlflowClient, name: str):
    experiment = client.get_experiment_by_name("fgvc-mask")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1
    return runs[0]


def test_run_logs_params_metrics_datasets_and_artifacts(store):
    # Demo person ratios lie around 0.2: this threshold makes some images fall back.
    meta = run_mask(MaskConfig(src_root=str(store / "src"), dst_root=str(store / "dst"), segmenter="groundtruth",
                               min_person_ratio=0.22, batch_size=4), progress=False)
    client = MlflowClient()
    run = only_run(client, "mask-groundtruth")
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "mask-groundtruth" and run.data.tags["fgvc.task"] == "mask"
    assert "groundtruth" in run.data.tags["mlflow.note.content"]

    p = run.data.params
    assert p["segmenter"] == "groundtruth" and p["weights"] == "source masks"
    assert float(p["min_person_ratio"]) == 0.22 and p["batch_size"] == "4"
    assert p["source_root"] == str((store / "src").resolve())
    assert p["source_digest"] == dataset_digest(store / "src")
    assert p["dst_root"] == str((store / "dst").resolve())
    assert p["device"] == "auto" and p["device_effective"] == "cpu" and p["workers"] == "1"
    assert p["splits"] == "all" and p["splits_effective"] == "train,val"
    assert p["seg_size"] == "520" and p["seg_size_effective"] == "none"  # ground truth: no segmenter input

    m = run.data.metrics
    for split in ("train", "val"):
        stats = meta["masking"]["statistics"][split]
        assert m[f"mask/{split}/images"] == stats["images"]
        assert m[f"mask/{split}/fallbacks"] == stats["fallbacks"]
        assert m[f"mask/{split}/fallback_rate"] == pytest.approx(stats["fallback_rate"])
        assert m[f"mask/{split}/person_ratio_mean"] == pytest.approx(stats["person_ratio_mean"])
        assert m[f"mask/{split}/person_ratio_median"] == pytest.approx(stats["person_ratio_median"])
        assert m[f"mask/{split}/images_per_s"] > 0
    assert m["mask/train/images"] == 24
    assert 0 < m["mask/train/fallbacks"] < 24

    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    artifacts |= {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
    assert {"meta.json", "plots/person_ratio_hist.png", "plots/mask_examples.png"} <= artifacts
    downloads = store / "downloads"
    downloads.mkdir()
    logged = json.loads(open(client.download_artifacts(run.info.run_id, "meta.json",
                                                       str(downloads))).read())
    assert logged == meta == read_meta(store / "dst")
    png = client.download_artifacts(run.info.run_id, "plots/mask_examples.png", str(downloads))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    inputs = {i.tags[0].value if i.tags else None: i.dataset for i in run.inputs.dataset_inputs}
    assert inputs["source"].digest == dataset_digest(store / "src")
    assert inputs["output"].digest == dataset_digest(store / "dst") == meta["digest"]
    assert inputs["output"].name == "dst"


def test_random_segmenter_weights_param_and_refusal_before_a_run(store):
    cfg = MaskConfig(src_root=str(store / "src"), dst_root=str(store / "dst-random"),
                     segmenter="deeplabv3_mobilenet_v3_large", seg_weights="random", seg_size=64, batch_size=8)
    run_mask(cfg, progress=False)
    client = MlflowClient()
    run = only_run(client, "mask-deeplabv3_mobilenet_v3_large")
    assert run.data.params["weights"] == "random" and run.data.params["seg_size_effective"] == "64"
    with pytest.raises(MaskError, match="overwrite"):
        run_mask(cfg, progress=False)
    only_run(client, "mask-deeplabv3_mobilenet_v3_large")  # the refusal started no run
