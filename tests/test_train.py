"""`train` and `promote`: what a run logs, registers, and how it fails and resumes."""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from fgvc.errors import ConfigError, FgvcError
from fgvc.safeload import load_tensors
from fgvc.tasks import train as train_run
from fgvc.tasks.promote import promote
from fgvc.tasks.train import checkpoint_cache, run_train
from fgvc.tracking.model_registry import load_model
from fgvc.tracking.runs import RunFailed
from fgvc.training.config import TrainConfig

METRICS = ["train/loss", "train/acc", "val/loss", "val/acc", "val/top5", "val/error", "val/balanced_acc",
           "lr/backbone", "lr/head", "time/epoch_s", "throughput/train_img_s"]
BEST = ["best/val_acc", "best/val_balanced_acc", "best/val_top5", "best/val_loss", "best/epoch"]


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


def test_run_logs_params_metrics_artifacts_and_a_registered_mlflow_model(tiny_root, mlflow_store, monkeypatch):
    curves = {}
    real_curves = train_run.save_curves
    monkeypatch.setattr(train_run, "save_curves", lambda path, history, keys, *a: curves.setdefault(
        Path(path).name, set(keys)) and real_curves(path, history, keys, *a))
    result = run_train(tiny_cfg(tiny_root), progress=False)
    run = MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "fn-small-unmasked" and run.data.tags["fgvc.task"] == "train"
    assert f"{result.best_val_acc:.4f}" in run.data.tags["mlflow.note.content"]
    p = run.data.params
    assert p["arch"] == "fn-small" and p["regime"] == "unmasked" and p["aug"] == "false"
    assert p["pretrained"] == "auto" and p["pretrained_effective"] == "none" and p["num_classes"] == "3"
    assert p["image_size"] == "32x24" and p["train_images"] == "24" and p["val_images"] == "12"
    assert p["lr_backbone"] == "auto" and p["lr_backbone_effective"] == "0.001"
    assert p["weight_decay_effective"] == "0.01"
    assert len(p["dataset_digest"]) == 16 and p["torch_version"] == torch.__version__
    for key in METRICS:
        assert [s for s, _ in history(result.run_id, key)] == [1, 2], key
    for key in BEST:  # one value, at the best epoch
        assert [s for s, _ in history(result.run_id, key)] == [result.best_epoch], key
    val_acc = dict(history(result.run_id, "val/acc"))
    assert dict(history(result.run_id, "val/error")) == pytest.approx({k: 1 - v for k, v in val_acc.items()})
    assert result.best_val_acc == max(val_acc.values()) == run.data.metrics["best/val_acc"]
    # cosine schedule over 2 epochs: full rate for epoch 1, half for epoch 2
    assert dict(history(result.run_id, "lr/head")) == pytest.approx({1: 1e-3, 2: 5e-4})
    files = artifact_paths(result.run_id)
    assert {"plots/loss.png", "plots/error.png", "plots/confusion_matrix.png", "plots/per_class_accuracy.png",
            "checkpoints/best.pt", "checkpoints/last.pt", "run_summary.md", "metrics.csv"} <= files
    assert curves["error.png"] == {"train/error", "val/error"}  # the original's error plot: train and val error
    rows = list(csv.DictReader(io.StringIO(mlflow.artifacts.load_text(f"runs:/{result.run_id}/metrics.csv"))))
    assert list(rows[0])[:5] == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc"]
    assert [float(r["val_acc"]) for r in rows] == pytest.approx([v for _, v in sorted(val_acc.items())], abs=1e-6)
    summary = mlflow.artifacts.load_text(f"runs:/{result.run_id}/run_summary.md")
    assert "fn\\-small\\-unmasked" in summary and f"{result.best_val_acc:.4f}" in summary
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [p["dataset_digest"]]

    # the best checkpoint is the run's MLflow model, linked at the best epoch, and registered
    [output] = run.outputs.model_outputs
    assert output.step == result.best_epoch
    logged = mlflow.get_logged_model(output.model_id)
    assert {m.key for m in logged.metrics} >= {"best/val_acc", "best/val_balanced_acc"}
    version = MlflowClient().get_model_version_by_alias("fgvc-fn-small", "candidate")
    assert str(version.version) == result.model_version == "1" and version.run_id == result.run_id
    assert version.tags["regime"] == "unmasked" and version.tags["dataset_digest"] == p["dataset_digest"]
    assert float(version.tags["val_acc"]) == pytest.approx(result.best_val_acc)
    assert "mlflow.pyfunc.load_model('models:/fgvc-fn-small/1')" in version.description
    assert "<" not in version.description  # no placeholder the Markdown renderer would swallow

    pyfunc = mlflow.pyfunc.load_model("models:/fgvc-fn-small@candidate")
    # no input schema (MLflow would cast floats to uint8); the model checks its input itself
    assert pyfunc.metadata.get_input_schema() is None
    assert "designer" in pyfunc.metadata.get_output_schema().input_names()
    predictions = pyfunc.predict(np.zeros((2, 50, 40, 3), dtype=np.uint8), params={"top_k": 2})
    assert list(predictions["designer"]) == [predictions["top_designers"][0][0]] * 2
    assert all(len(p) == 2 and abs(sum(p) - 1) < 1 for p in predictions["top_probabilities"])

    model, resolved, ckpt = load_model("models:/fgvc-fn-small@candidate")
    assert isinstance(model, torch.nn.Module) and not model.training
    assert resolved.run_id == result.run_id and ckpt["epoch"] == result.best_epoch
    x = torch.rand(2, 3, 32, 24)
    assert model(x).shape == (2, 3) and model.forward_features(x).shape == (2, 256)


def test_training_needs_no_tracking_store(tiny_root, tmp_path, monkeypatch):
    from fgvc.training import train
    from fgvc.training.checkpoint import CheckpointWriter

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    writer = CheckpointWriter(tmp_path / "ckpt")
    outcome = train(tiny_cfg(tiny_root, epochs=1), callbacks=[writer], progress=False)
    assert outcome.best["epoch"] == 1 and outcome.regime == "unmasked" and len(outcome.history) == 1
    assert (tmp_path / "ckpt" / "best.pt").is_file() and (tmp_path / "ckpt" / "last.pt").is_file()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    assert "mlflow" not in sys.modules or mlflow.active_run() is None


def test_same_seed_same_metrics(tiny_root, mlflow_store):
    cfgs = [tiny_cfg(tiny_root, aug="heavy", registered_model=False),
            tiny_cfg(tiny_root, aug="heavy", registered_model=False),
            tiny_cfg(tiny_root, aug="heavy", seed=1, registered_model=False)]
    a, b, c = (run_train(cfg, progress=False) for cfg in cfgs)
    for key in ("train/loss", "val/loss", "val/acc"):
        assert history(a.run_id, key) == history(b.run_id, key)
    assert history(a.run_id, "train/loss") != history(c.run_id, "train/loss")
    assert MlflowClient().get_run(a.run_id).data.params["regime"] == "unmasked+aug"


KILLED_AFTER_EPOCH_1 = textwrap.dedent("""
    import os, sys
    from fgvc.tasks.train import run_train
    from fgvc.training.config import TrainConfig

    class KillAfterEpoch1:
        def on_epoch_end(self, record, session):
            if record.epoch == 1:
                os.kill(os.getpid(), 9)  # a hard crash: nothing gets to clean up

    run_train(TrainConfig(arch="fn-small", data_root=sys.argv[1], epochs=3, batch_size=8, num_workers=0,
                          registered_model=False), callbacks=[KillAfterEpoch1()], progress=False)
""")


def _train_subprocess(root, store_dir: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store_dir}/mlflow.db"}
    cmd = [sys.executable, "-m", "fgvc.cli", "train", "--arch", "fn-small", "--data-root", str(root),
           "--epochs", "3", "--batch-size", "8", "--num-workers", "0", *args]
    return subprocess.run(cmd, cwd=store_dir, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tiny_root, mlflow_store, tmp_path):
    full = _train_subprocess(tiny_root, tmp_path, "--registered-model", "none")
    assert full.returncode == 0, full.stderr[-2000:]
    script = tmp_path / "killed.py"
    script.write_text(KILLED_AFTER_EPOCH_1)
    crashed = subprocess.run([sys.executable, str(script), str(tiny_root)], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600,
                             env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    runs = mlflow.search_runs(experiment_names=["fgvc-train"], order_by=["attributes.start_time ASC"])
    full_id, crashed_id = runs.run_id.tolist()
    assert MlflowClient().get_run(crashed_id).info.status == "RUNNING"  # nobody closed it
    resumed = _train_subprocess(tiny_root, tmp_path, "--registered-model", "none", "--resume", "true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(mlflow.search_runs(experiment_names=["fgvc-train"])) == 2  # same run, continued
    assert MlflowClient().get_run(crashed_id).info.status == "FINISHED"
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "lr/head"):
        assert history(crashed_id, key) == history(full_id, key), key


def test_resume_refuses_another_class_count_or_architecture(tiny_root, mlflow_store, tmp_path):
    from fgvc.data.demo import DemoConfig, generate_demo

    first = run_train(tiny_cfg(tiny_root, epochs=1, registered_model=False), progress=False)
    other = tmp_path / "four"
    generate_demo(other, DemoConfig(num_designers=4, train_per_class=4, val_per_class=2, height=32, width=24))
    with pytest.raises(ConfigError, match="checkpoint has 3 classes but the data root has 4"):
        run_train(tiny_cfg(other, resume=first.run_id), progress=False)
    refused = f"cannot resume .*{first.run_id}.*trained arch fn-small, not --arch resnet18"
    with pytest.raises(ConfigError, match=refused):
        run_train(tiny_cfg(tiny_root, arch="resnet18", pretrained=False, resume=first.run_id), progress=False)


class PoisonAfterEpoch1:
    """After epoch 1 the weights become NaN: epoch 2's loss is NaN."""

    def on_epoch_end(self, record, session):
        if record.epoch == 1:
            with torch.no_grad():
                session.network.head.weight.fill_(float("nan"))


def test_nan_loss_fails_the_run_and_keeps_the_last_good_checkpoint(tiny_root, mlflow_store):
    with pytest.raises(RunFailed, match="training loss is nan at batch 0.*checkpoints/last.pt"):
        run_train(tiny_cfg(tiny_root, epochs=3), callbacks=[PoisonAfterEpoch1()], progress=False)
    run = mlflow.search_runs(experiment_names=["fgvc-train"]).iloc[0]
    assert run.status == "FAILED"
    assert "loss is nan" in run["tags.fgvc.error"]
    assert "checkpoints/last.pt" in artifact_paths(run.run_id)
    last = torch.load(mlflow.artifacts.download_artifacts(run_id=run.run_id, artifact_path="checkpoints/last.pt"),
                      weights_only=True)
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


class InterruptAfterEpoch:
    def __init__(self, epoch: int = 1):
        self.epoch = epoch

    def on_epoch_end(self, record, session):
        if record.epoch == self.epoch:
            raise KeyboardInterrupt


def test_ctrl_c_ends_the_run_killed_and_a_resumed_run_finishes_clean(tiny_root, mlflow_store):
    with pytest.raises(KeyboardInterrupt):
        run_train(tiny_cfg(tiny_root, registered_model=False), callbacks=[InterruptAfterEpoch()], progress=False)
    run = mlflow.search_runs(experiment_names=["fgvc-train"]).iloc[0]
    assert run.status == "KILLED" and run["tags.fgvc.end_reason"] == "interrupted (Ctrl-C)"
    assert {"checkpoints/last.pt", "plots/loss.png", "metrics.csv"} <= artifact_paths(run.run_id)
    result = run_train(tiny_cfg(tiny_root, registered_model=False, resume=True), progress=False)
    finished = MlflowClient().get_run(result.run_id)
    assert result.run_id == run.run_id and finished.info.status == "FINISHED"
    assert "fgvc.end_reason" not in finished.data.tags  # the interruption's reason does not outlive it


def test_bad_inputs_give_clear_errors(tiny_root, mlflow_store, tmp_path):
    with pytest.raises(ConfigError, match=r"--arch \(arch\): Unknown arch 'resnet99'.*resnet18.*timm:<name>"):
        tiny_cfg(tiny_root, arch="resnet99")
    with pytest.raises(FgvcError, match="does not exist"):
        run_train(tiny_cfg(tmp_path / "nowhere"), progress=False)
    with pytest.raises(ConfigError, match="no unfinished run"):
        run_train(tiny_cfg(tiny_root, resume=True), progress=False)
    assert mlflow.search_runs(search_all_experiments=True).empty  # refused before any run was made


def test_promote_keeps_the_champions_dataset_and_says_what_it_skipped(tiny_root, mlflow_store, tmp_path):
    from click.testing import CliRunner

    from fgvc.cli import main
    from fgvc.data.demo import DemoConfig, generate_demo

    client = MlflowClient()
    for seed in (0, 1):
        run_train(tiny_cfg(tiny_root, epochs=1, seed=seed), progress=False)
    accs = {str(v.version): float(v.tags["val_acc"]) for v in client.search_model_versions("name='fgvc-fn-small'")}
    best = max(accs, key=lambda v: (accs[v], int(v)))
    assert promote("fgvc-fn-small").version == best
    assert str(client.get_model_version_by_alias("fgvc-fn-small", "champion").version) == best
    assert promote("fgvc-fn-small", version="1").version == "1"
    assert str(client.get_model_version_by_alias("fgvc-fn-small", "candidate").version) == "2"

    # a newer version trained on other data (4 designers, heavy augmentation): promote stays on the
    # champion's dataset and regime
    other = tmp_path / "other"
    generate_demo(other, DemoConfig(num_designers=4, train_per_class=4, val_per_class=2, height=32, width=24))
    run_train(tiny_cfg(other, epochs=1, aug="heavy"), progress=False)
    out = CliRunner().invoke(main, ["promote", "--name", "fgvc-fn-small"])
    assert out.exit_code == 0, out.output
    line = out.output.strip()
    assert "\n" not in line and line.startswith(f"fgvc-fn-small@champion -> version {best} ")
    digest = client.get_model_version("fgvc-fn-small", "3").tags["dataset_digest"]
    assert "on the champion's dataset tiny (" in line and "the champion's regime unmasked" in line
    assert f"skipped 1 on other ({digest}) unmasked+aug" in line
    assert str(client.get_model_version_by_alias("fgvc-fn-small", "champion").version) == best

    # asked: --dataset by root name (or digest prefix) moves it
    out = CliRunner().invoke(main, ["promote", "--name", "fgvc-fn-small", "--dataset", "other"])
    assert out.exit_code == 0 and "-> version 3 " in out.output and "dataset other (" in out.output
    assert "any regime (none there is the champion's unmasked)" in out.output
    assert promote("fgvc-fn-small", dataset=digest[:8]).version == "3"
    assert promote("fgvc-fn-small", dataset="any").dataset_digest is None
    out = CliRunner().invoke(main, ["promote", "--name", "fgvc-fn-small", "--regime", "masked"])
    assert out.exit_code == 1 and "has regime masked; regimes there: unmasked+aug" in out.output
    with pytest.raises(ConfigError, match=r"no version .* dataset 0000; datasets: other \(.*tiny \("):
        promote("fgvc-fn-small", dataset="0000")
    with pytest.raises(ConfigError, match="registered models: fgvc-fn-small"):
        promote("fgvc-nope")


def test_a_run_resumed_on_another_machine_registers_its_best_epoch(tiny_root, mlflow_store):
    """Resumed where the interrupted process's local checkpoints are absent: the best epoch so
    far comes from the run's artifacts, and the registered model is that epoch's weights."""
    frozen = dict(lr_head=1e-12, lr_backbone=1e-12, weight_decay=0.0)  # epoch 2 cannot beat epoch 1
    with pytest.raises(KeyboardInterrupt):
        run_train(tiny_cfg(tiny_root, **frozen), callbacks=[InterruptAfterEpoch()], progress=False)
    run_id = mlflow.search_runs(experiment_names=["fgvc-train"]).iloc[0].run_id
    shutil.rmtree(checkpoint_cache(run_id))  # another machine: nothing on local disk
    result = run_train(tiny_cfg(tiny_root, resume=True, **frozen), progress=False)
    assert result.run_id == run_id
    metrics = MlflowClient().get_run(run_id).data.metrics
    model_dir = Path(mlflow.artifacts.download_artifacts("models:/fgvc-fn-small/1"))
    best = load_tensors(next(model_dir.rglob("best.pt")), "checkpoint")
    assert best["epoch"] == metrics["best/epoch"] == 1, (best["epoch"], metrics["best/epoch"])
    assert best["val_acc"] == pytest.approx(metrics["best/val_acc"])



@pytest.mark.parametrize(("given", "expected"), [(None, "fgvc-resnet18"), ("mine", "mine"), (False, None)])
def test_the_registered_model_a_training_becomes_a_version_of(given, expected):
    from fgvc.tasks.train import registered_model_of
    from fgvc.training import TrainConfig

    assert registered_model_of(TrainConfig(arch="resnet18", registered_model=given)) == expected


def test_a_registered_model_that_is_not_a_name_is_refused_in_one_line():
    from fgvc.training import TrainConfig

    with pytest.raises(ConfigError, match="registered_model.*must be a name"):
        TrainConfig(registered_model=True)
