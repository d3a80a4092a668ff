"""`train` and `promote`: what a run logs, registers, and how it fails and resumes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from fgvc.tracking import train_run
from fgvc.tracking.registry import load_model, promote
from fgvc.tracking.runs import RunFailed
from fgvc.tracking.train_run import run_train
from fgvc.training.config import TrainConfig

METRICS = ["train/loss", "train/acc", "val/loss", "val/acc", "val/top5", "val/error", "val/balanced_acc",
           "lr/backbone", "lr/head", "time/epoch_s", "throughput/train_img_s"]


def tiny_cfg(root, **overrides) -> TrainConfig:
    opts = dict(arch="fn-small", data_root=str(root), epochs=2, batch_size=8, num_workers=0, seed=0)
    opts.update(overrides)
    return TrainConfig(**opts)


def artifact_paths(run_id: str, path: str = "") -> set[str]:
    client = MlflowClient()
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifact_paths(run_id, item.path) if item.is_dir else {item.path}
    return out


def history(run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key))


def test_run_logs_params_metrics_artifacts_and_registers(tiny_root, mlflow_store):
    result = run_train(tiny_cfg(tiny_root), progress=False)
    run = MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "fn-small-unmasked-noaug"
    p = run.data.params
    assert p["arch"] == "fn-small" and p["regime"] == "unmasked-noaug"
    assert p["pretrained_effective"] == "none" and p["num_classes"] == "3"
    assert p["image_size"] == "32x24" and p["train_images"] == "24" and p["val_images"] == "12"
    assert p["lr_backbone_effective"] == "0.001" and p["weight_decay_effective"] == "0.01"
    assert len(p["dataset_digest"]) == 16 and p["torch_version"] == torch.__version__
    for key in METRICS:
        assert [s for s, _ in history(result.run_id, key)] == [1, 2], key
    val_acc = dict(history(result.run_id, "val/acc"))
    assert dict(history(result.run_id, "val/error")) == pytest.approx({k: 1 - v for k, v in val_acc.items()})
    assert result.best_val_acc == max(val_acc.values())
    # cosine schedule over 2 epochs: full rate for epoch 1, half for epoch 2
    assert dict(history(result.run_id, "lr/head")) == pytest.approx({1: 1e-3, 2: 5e-4})
    files = artifact_paths(result.run_id)
    assert {"plots/loss.png", "plots/error.png", "plots/confusion_matrix.png", "plots/per_class_accuracy.png",
            "checkpoints/best.pt", "checkpoints/last.pt", "run_summary.md"} <= files
    summary = mlflow.artifacts.load_text(f"runs:/{result.run_id}/run_summary.md")
    assert "fn-small-unmasked-noaug" in summary and f"{result.best_val_acc:.4f}" in summary
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [p["dataset_digest"]]

    version = MlflowClient().get_model_version_by_alias("fgvc-fn-small", "candidate")
    assert str(version.version) == result.model_version == "1"
    assert version.run_id == result.run_id
    assert version.tags["regime"] == "unmasked-noaug"
    assert version.tags["dataset_digest"] == p["dataset_digest"]
    assert float(version.tags["val_acc"]) == pytest.approx(result.best_val_acc)

    model, resolved, ckpt = load_model("models:/fgvc-fn-small@candidate")
    assert isinstance(model, torch.nn.Module) and not model.training
    assert resolved.run_id == result.run_id and ckpt["epoch"] == result.best_epoch
    x = torch.rand(2, 3, 32, 24)
    assert model(x).shape == (2, 3) and model.forward_features(x).shape == (2, 256)


def test_same_seed_same_metrics(tiny_root, mlflow_store):
    a = run_train(tiny_cfg(tiny_root, aug="true"), register=False, progress=False)
    b = run_train(tiny_cfg(tiny_root, aug="true"), register=False, progress=False)
    c = run_train(tiny_cfg(tiny_root, aug="true", seed=1), register=False, progress=False)
    for key in ("train/loss", "val/loss", "val/acc"):
        assert history(a.run_id, key) == history(b.run_id, key)
    assert history(a.run_id, "train/loss") != history(c.run_id, "train/loss")
    assert MlflowClient().get_run(a.run_id).data.params["regime"] == "unmasked-aug"


def _train_subprocess(root, store_dir: Path, extra_env: dict, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store_dir}/mlflow.db", **extra_env}
    cmd = [sys.executable, "-m", "fgvc.cli", "train", "--arch", "fn-small", "--data-root", str(root),
           "--epochs", "3", "--batch-size", "8", "--num-workers", "0", *args]
    return subprocess.run(cmd, cwd=store_dir, env=env, capture_output=True, text=True, timeout=600)


def test_resume_after_sigkill_equals_uninterrupted_run(tiny_root, mlflow_store, tmp_path):
    full = _train_subprocess(tiny_root, tmp_path, {}, "--registered-model", "none")
    assert full.returncode == 0, full.stderr[-2000:]
    crashed = _train_subprocess(tiny_root, tmp_path, {"FGVC_FAULT_KILL_AFTER_EPOCH": "1"},
                                "--registered-model", "none")
    assert crashed.returncode == -9
    runs = mlflow.search_runs(experiment_names=["fgvc-train"], order_by=["attributes.start_time ASC"])
    full_id, crashed_id = runs.run_id.tolist()
    assert MlflowClient().get_run(crashed_id).info.status == "RUNNING"  # nobody closed it
    resumed = _train_subprocess(tiny_root, tmp_path, {}, "--registered-model", "none", "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(mlflow.search_runs(experiment_names=["fgvc-train"])) == 2  # same run, continued
    assert MlflowClient().get_run(crashed_id).info.status == "FINISHED"
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "lr/head"):
        assert history(crashed_id, key) == history(full_id, key), key


def test_resume_refuses_a_different_class_count(tiny_root, mlflow_store, tmp_path):
    from fgvc.data.demo import DemoConfig, generate_demo

    first = run_train(tiny_cfg(tiny_root, epochs=1), register=False, progress=False)
    other = tmp_path / "four"
    generate_demo(other, DemoConfig(num_designers=4, train_per_class=4, val_per_class=2, height=32, width=24))
    with pytest.raises(ValueError, match="checkpoint has 3 classes but .*four has 4"):
        run_train(tiny_cfg(other), resume=first.run_id, progress=False)


def test_nan_loss_fails_the_run_and_keeps_the_last_good_checkpoint(tiny_root, mlflow_store, monkeypatch):
    real_fit = train_run.fit

    def poisoned_fit(model, *args, **kwargs):
        on_epoch_end = kwargs["on_epoch_end"]

        def poison(record):
            on_epoch_end(record)
            with torch.no_grad():  # after epoch 1 the weights become NaN: epoch 2's loss is NaN
                model.head.weight.fill_(float("nan"))

        return real_fit(model, *args, **{**kwargs, "on_epoch_end": poison})

    monkeypatch.setattr(train_run, "fit", poisoned_fit)
    with pytest.raises(RunFailed, match="training loss is nan at batch 0.*checkpoints/last.pt"):
        run_train(tiny_cfg(tiny_root, epochs=3), progress=False)
    run = mlflow.search_runs(experiment_names=["fgvc-train"]).iloc[0]
    assert run.status == "FAILED"
    assert "loss is nan" in run["tags.fgvc.error"]
    assert "checkpoints/last.pt" in artifact_paths(run.run_id)
    last = torch.load(mlflow.artifacts.download_artifacts(run_id=run.run_id, artifact_path="checkpoints/last.pt"),
                      weights_only=True)
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_ctrl_c_ends_the_run_killed_and_keeps_last_checkpoint(tiny_root, mlflow_store, monkeypatch):
    real_save = train_run._Checkpointer.save

    def save_then_interrupt(self, record, best):
        real_save(self, record, best)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_run._Checkpointer, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_train(tiny_cfg(tiny_root), progress=False)
    run = mlflow.search_runs(experiment_names=["fgvc-train"]).iloc[0]
    assert run.status == "KILLED"
    assert "checkpoints/last.pt" in artifact_paths(run.run_id)


def test_bad_inputs_give_clear_errors(tiny_root, mlflow_store, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown arch .resnet99.*resnet18.*timm:<name>"):
        run_train(tiny_cfg(tiny_root, arch="resnet99"), progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        run_train(tiny_cfg(tmp_path / "nowhere"), progress=False)
    with pytest.raises(ValueError, match="no unfinished run"):
        run_train(tiny_cfg(tiny_root), resume="true", progress=False)


def test_promote_moves_champion_to_the_best_version(tiny_root, mlflow_store):
    client = MlflowClient()
    for seed in (0, 1):
        run_train(tiny_cfg(tiny_root, epochs=1, seed=seed), progress=False)
    accs = {str(v.version): float(v.tags["val_acc"]) for v in client.search_model_versions("name='fgvc-fn-small'")}
    best = max(accs, key=lambda v: (accs[v], int(v)))
    assert promote("fgvc-fn-small") == best
    assert str(client.get_model_version_by_alias("fgvc-fn-small", "champion").version) == best
    assert promote("fgvc-fn-small", version="1") == "1"
    assert str(client.get_model_version_by_alias("fgvc-fn-small", "candidate").version) == "2"
    with pytest.raises(ValueError, match="no version .* dataset 0000"):
        promote("fgvc-fn-small", dataset_digest="0000")
    with pytest.raises(ValueError, match="registered models: fgvc-fn-small"):
        promote("fgvc-nope")
