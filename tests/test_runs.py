"""The run lifecycle: where a run lands, and what its experiment says about itself."""

from __future__ import annotations

import logging

from mlflow.tracking import MlflowClient

from fgvc.tracking.runs import EXPERIMENT_KIND, MODEL_TRAINING, experiment_link, tracked_run


def test_an_experiment_fgvc_writes_to_is_described_and_opens_in_model_training(mlflow_store):
    with tracked_run("fgvc-train", "fn-small-unmasked", task="train", experiment_description="Trainings."):
        pass
    experiment = MlflowClient().get_experiment_by_name("fgvc-train")
    assert experiment.tags["mlflow.note.content"] == "Trainings."
    assert experiment.tags[EXPERIMENT_KIND] == MODEL_TRAINING == "custom_model_development"


def test_a_run_mlflow_run_put_in_default_says_how_to_put_it_where_it_belongs(mlflow_store, monkeypatch, caplog):
    client = MlflowClient()
    handed_over = client.create_run("0")  # `mlflow run` without --experiment-name
    monkeypatch.setenv("MLFLOW_RUN_ID", handed_over.info.run_id)
    with caplog.at_level(logging.WARNING, logger="fgvc"):
        with tracked_run("fgvc-train", "fn-small-unmasked", task="train", experiment_description="Trainings."):
            pass
    lines = [r.getMessage() for r in caplog.records if r.name == "fgvc"]
    assert lines == ["this train run is in MLflow's Default experiment; add --experiment-name fgvc-train to "
                     "`mlflow run` to keep it with the other train runs"]
    default = client.get_experiment("0")
    assert default.tags[EXPERIMENT_KIND] == MODEL_TRAINING
    assert "--experiment-name" in default.tags["mlflow.note.content"]


def test_under_mlflow_run_the_chosen_experiment_is_described_too(mlflow_store, monkeypatch, caplog):
    client = MlflowClient()
    chosen = client.create_experiment("my-study")
    monkeypatch.setenv("MLFLOW_RUN_ID", client.create_run(chosen).info.run_id)
    with caplog.at_level(logging.WARNING, logger="fgvc"):
        with tracked_run("fgvc-study", "study-quick", task="study", experiment_description="Studies."):
            pass
    assert not [r for r in caplog.records if r.name == "fgvc"]
    tags = client.get_experiment(chosen).tags
    assert tags["mlflow.note.content"] == "Studies." and tags[EXPERIMENT_KIND] == MODEL_TRAINING


def test_links_open_the_model_training_view(mlflow_store, monkeypatch):
    import mlflow

    assert experiment_link("1") is None  # a local store has no fixed address
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "http://127.0.0.1:5000/")
    assert experiment_link("1", "abc") == "http://127.0.0.1:5000/#/experiments/1/runs/abc?workflowType=machine_learning"
