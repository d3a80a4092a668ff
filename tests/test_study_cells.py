"""A study cell's identity: what was asked (`fgvc.request_id`) finds it from any machine; what it
ran on (`fgvc.device_recipe`, and `fgvc.config_id`, which adds the recipe) is recorded beside
it and decides only whether an interrupted training may be continued here.

No GPU here: `as_on_a_gpu` makes training runs record a CUDA machine's recipe (bfloat16
autocast, channels-last, cuDNN autotuning) while the training itself runs on the CPU."""

from __future__ import annotations

import logging

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from fgvc.config import config_id
from fgvc.study.config import StudyConfig
from fgvc.training.config import TrainConfig, augment_path

torch.set_num_threads(1)

CUDA = torch.device("cuda")


def as_on_a_gpu(monkeypatch) -> None:
    """Every training records the recipe a CUDA device gives it, in its params, its
    `fgvc.device_recipe` and its `fgvc.config_id`, as a run on a GPU node does."""
    cpu_recipe = TrainConfig.device_recipe

    def gpu_recipe(cfg: TrainConfig, device=None) -> dict[str, str]:
        return {"amp_effective": "bfloat16", "channels_last_effective": "true",
                "augment_path": augment_path(cfg.aug, CUDA), "cudnn_benchmark": "true"}

    def gpu_identity(cfg: TrainConfig, device=None) -> str:
        cpu = cpu_recipe(cfg, torch.device("cpu"))
        return config_id(cfg, {k: v for k, v in gpu_recipe(cfg).items() if v != cpu[k]})

    monkeypatch.setattr(TrainConfig, "device_recipe", gpu_recipe)
    monkeypatch.setattr(TrainConfig, "identity", gpu_identity)


def grid(tiny_root, **changes) -> StudyConfig:
    return StudyConfig(**{**dict(data_root=str(tiny_root), regimes=("unmasked", "masked"), epochs=1, batch_size=8,
                                 num_images=6), **changes})


@pytest.mark.slow
def test_cells_trained_on_gpu_nodes_are_collected_on_a_cpu_node(tiny_root, mlflow_store, monkeypatch):
    """docs/team.md's Slurm array: each cell a task on a GPU node, then `--collect` (with the same
    options, --device cuda included) on a node without a GPU: it finds every cell and builds the
    table from them, training nothing."""
    from fgvc.tasks.study import run_study, run_study_cell

    cfg = grid(tiny_root, device="cuda")
    with monkeypatch.context() as gpu_node:
        as_on_a_gpu(gpu_node)
        tasks = [run_study_cell(cfg.replace(device=None), str(i), progress=False) for i in range(2)]
    assert [t.status for t in tasks] == ["trained", "trained"]
    client = MlflowClient()
    for task in tasks:
        tags = client.get_run(task.run_id).data.tags
        assert tags["fgvc.device_recipe"] == ("amp_effective=bfloat16, channels_last_effective=true, "
                                              "augment_path=none, cudnn_benchmark=true")
        assert tags["fgvc.config_id"] != tags["fgvc.request_id"]  # the recipe is part of what a resume matches
        # what was asked is the same from any machine, and equals a CPU run's config id
        asked = TrainConfig(arch="fn-small", data_root=str(tiny_root), epochs=1, batch_size=8, seed=0,
                            registered_model="fgvc-study-fn-small")
        assert tags["fgvc.request_id"] == asked.request_id() == asked.identity(torch.device("cpu"))

    collected = run_study(cfg, progress=False, collect=True)  # this machine has no CUDA (CUDA_VISIBLE_DEVICES="")
    assert [c.status for c in collected.cells] == ["reused", "reused"]
    assert [c.run_id for c in collected.cells] == [t.run_id for t in tasks]
    assert [r["cell"] for r in collected.rows] == ["fn-small/unmasked/seed0", "fn-small/masked/seed0"]
    table = mlflow.artifacts.load_text(f"runs:/{collected.run_id}/study/results.csv").splitlines()
    assert len(table) == 3 and all(t.run_id in "\n".join(table) for t in tasks)
    for task, row in zip(tasks, collected.rows, strict=True):
        assert row["val_acc"] == client.get_run(task.run_id).data.metrics["best/val_acc"]
    assert client.get_run(collected.run_id).info.status == "FINISHED"


class InterruptAfterEpoch1:
    def on_epoch_end(self, record, session):
        if record.epoch == 1:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_an_interrupted_gpu_training_is_found_but_not_continued_on_the_cpu(tiny_root, mlflow_store, monkeypatch,
                                                                          caplog):
    """The cell's interrupted run (GPU recipe, a checkpoint after epoch 1) is found by what was
    asked, but a CPU attempt does not continue it (other autocast, memory layout, kernels): it
    trains the cell anew and says why."""
    from fgvc.tasks import study_cell
    from fgvc.tasks.study import run_study_cell

    cfg = grid(tiny_root, regimes=("unmasked",), epochs=2)
    real_run_train = study_cell.run_train
    with monkeypatch.context() as gpu_node:
        as_on_a_gpu(gpu_node)
        gpu_node.setattr(study_cell, "run_train",
                         lambda c, **kw: real_run_train(c, callbacks=[InterruptAfterEpoch1()], **kw))
        with pytest.raises(KeyboardInterrupt):
            run_study_cell(cfg, "0", progress=False)
    client = MlflowClient()
    [interrupted] = mlflow.search_runs(experiment_names=["fgvc-study"], output_format="list")
    assert interrupted.info.status == "KILLED" and "bfloat16" in interrupted.data.tags["fgvc.device_recipe"]

    with caplog.at_level(logging.INFO, logger="fgvc"):
        result = run_study_cell(cfg, "0", progress=False)
    assert result.status == "trained" and result.run_id != interrupted.info.run_id
    assert f"run {interrupted.info.run_id} ran with another device recipe" in caplog.text
    assert [m.step for m in client.get_metric_history(result.run_id, "val/acc")] == [1, 2]  # from the start
    assert client.get_run(interrupted.info.run_id).info.status == "KILLED"
    assert client.get_run(result.run_id).data.tags["fgvc.request_id"] == interrupted.data.tags["fgvc.request_id"]


def test_collect_builds_no_data_and_a_masked_cell_nobody_trained_is_named(tiny_root, mlflow_store, tmp_path,
                                                                          caplog):
    """Collecting masks nothing (masking could need a GPU the collecting node lacks): a masked
    root the cells' tasks never built is named in a warning, and its cells have no training."""
    import shutil

    from fgvc.errors import ConfigError
    from fgvc.tasks.study import run_study
    from fgvc.tasks.study_roots import prepare_roots

    shutil.copytree(tiny_root, tmp_path / "fresh")
    plan = grid(tmp_path / "fresh").plan()
    caplog.set_level("WARNING", logger="fgvc")
    roots = prepare_roots(plan, None, False, collect=True)
    assert roots.masked is None and not (tmp_path / "fresh-masked").exists()
    assert f"{tmp_path / 'fresh-masked'} is missing; the cells that need it have not run yet" in caplog.text
    masked_only = grid(tmp_path / "fresh", regimes=("masked",))
    with pytest.raises(ConfigError, match=r"^study cell fn-small/masked/seed0 has no finished training run yet"):
        run_study(masked_only, progress=False, collect=True)
    assert not (tmp_path / "fresh-masked").exists()
