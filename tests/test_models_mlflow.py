"""Registered versions are MLflow models: loaded by pyfunc anywhere, served by `mlflow models
serve`, analysed by fgvc; and the original project's checkpoints become such versions."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from stores import store_with_a_trained_model
from test_models_original import reference, save_original

from fgvc.cli import main
from fgvc.data.shards import read_label_map
from fgvc.models.predict import Predictor


@pytest.fixture(scope="module")
def registered(tiny_root, tmp_path_factory, store_template):
    """A store with an fn-small trained by fgvc and a ResNet-18 checkpoint of the original scripts."""
    base = tmp_path_factory.mktemp("models")
    with store_with_a_trained_model(tiny_root, base, store_template):
        yield base


def test_pyfunc_predicts_designers_for_images_of_any_size(registered, tiny_root):
    model = mlflow.pyfunc.load_model("models:/fgvc-fn-small@candidate")
    names = list(read_label_map(tiny_root).values())
    for shape in ((3, 32, 24, 3), (1, 100, 60, 3)):
        out = model.predict(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
        assert len(out) == shape[0] and set(out["designer"]) <= set(names)
        assert all(0 <= i < 3 for i in out["class_index"])
        assert all(abs(p[0] - q) < 1e-6 for p, q in zip(out["top_probabilities"], out["probability"], strict=True))
    with pytest.raises(Exception, match="uint8"):
        model.predict(np.zeros((1, 32, 24, 3), dtype=np.float32))


def jpeg_base64(shape=(50, 30), colour=(200, 40, 40), fmt="JPEG") -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", shape, colour).save(buffer, fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def test_pyfunc_takes_base64_photos_and_refuses_what_is_not_an_image(registered, monkeypatch):
    import pandas as pd

    model = mlflow.pyfunc.load_model("models:/fgvc-fn-small@candidate")
    photos = [jpeg_base64(), jpeg_base64((20, 40), (10, 10, 200), "PNG")]
    out = model.predict(pd.DataFrame({"image": photos}), params={"top_k": 2})
    assert len(out) == 2 and all(len(t) == 2 for t in out["top_designers"])
    same = model.predict({"image": np.array(photos[:1])})
    assert same["designer"][0] == out["designer"][0]
    # integers in 0..255 are pixels; anything else is refused with its reason, never cast
    assert len(model.predict(np.full((1, 8, 6, 3), 7, dtype=np.int64))) == 1
    refusals = [
        (np.full((1, 8, 6, 3), 0.5), "floats are refused"),
        (np.ones((1, 8, 6, 3), dtype=bool), "boolean pixels"),
        (np.full((1, 8, 6, 3), 300), "must be 0..255, found 300..300"),
        (pd.DataFrame({"image": ["not base64 at all!"]}), "image 0: not base64"),
        (pd.DataFrame({"image": [jpeg_base64()[: 200]]}), "image 0: unreadable image"),
        (pd.DataFrame({"image": ["aGVsbG8gd29ybGQ="]}), "image 0: not a JPEG/PNG/WebP image"),
    ]
    for value, reason in refusals:
        with pytest.raises(mlflow.exceptions.MlflowException, match=reason):
            model.predict(value)
    for top_k, reason in ((-3, "top_k must be an integer >= 1"), (0, "top_k must be an integer >= 1"),
                          (2.5, "top_k"), ("two", "top_k")):  # MLflow's parameter schema refuses the last two
        with pytest.raises(mlflow.exceptions.MlflowException, match=reason):
            model.predict(np.zeros((1, 8, 6, 3), dtype=np.uint8), params={"top_k": top_k})
    monkeypatch.setenv("FGVC_MAX_PIXELS", "1000")
    budget = r"50x30 pixels, over the budget of 1000 \(FGVC_MAX_PIXELS\)"
    with pytest.raises(mlflow.exceptions.MlflowException, match=budget):
        model.predict(pd.DataFrame({"image": [jpeg_base64((50, 30))]}))
    with pytest.raises(mlflow.exceptions.MlflowException, match="over the budget of 1000"):
        model.predict(np.zeros((2, 30, 30, 3), dtype=np.uint8))


def test_the_model_files_are_a_state_dict_and_a_spec(registered):
    local = mlflow.artifacts.download_artifacts("models:/fgvc-fn-small/1")
    files = {str(p.relative_to(local)) for p in __import__("pathlib").Path(local).rglob("*") if p.is_file()}
    assert "MLmodel" in files and "artifacts/best.pt" in files
    assert not any(f.endswith((".pkl", ".pickle", ".cloudpickle")) for f in files)  # no pickled model object
    ckpt = torch.load(os.path.join(local, "artifacts", "best.pt"), weights_only=True)
    assert {"model", "spec", "label_names"} <= set(ckpt)
    predictor = Predictor.from_checkpoint(os.path.join(local, "artifacts", "best.pt"))
    assert predictor.preprocess(np.zeros((2, 64, 64, 3), dtype=np.uint8)).shape == (2, 3, 32, 24)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_python_model_is_type_hinted_as_mlflow_accepts_so_it_warns_nothing():
    import runpy
    import warnings

    from fgvc.tracking import pyfunc_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runpy.run_path(pyfunc_model.__file__)  # what MLflow runs to load the model
    assert not [str(w.message) for w in caught if "type hint" in str(w.message).lower()]


def test_a_model_of_background_removed_images_warns_about_raw_photos_in_one_line(registered, tmp_path, caplog):
    import logging

    local = mlflow.artifacts.download_artifacts("models:/fgvc-fn-small/1")
    ckpt = torch.load(os.path.join(local, "artifacts", "best.pt"), weights_only=True)
    with caplog.at_level(logging.WARNING, logger="fgvc"):
        Predictor.from_checkpoint(os.path.join(local, "artifacts", "best.pt"))  # unmasked: nothing to say
        assert not caplog.records
        torch.save({**ckpt, "regime": "masked+aug"}, tmp_path / "masked.pt")
        Predictor.from_checkpoint(tmp_path / "masked.pt")
    [record] = caplog.records
    assert "trained on background-removed images" in record.getMessage() and "\n" not in record.getMessage()
    assert mlflow.models.get_model_info("models:/fgvc-fn-small/1").metadata == {
        "fgvc.regime": "unmasked", "fgvc.background_removed": False}

    # logging it as an MLflow model (MLflow loads it to check the input example) says nothing
    from fgvc.tracking.logged_model import log_model

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fgvc"), mlflow.start_run():
        info = log_model(tmp_path / "masked.pt", np.zeros((1, 40, 30, 3), dtype=np.uint8), 1, {}, "masked+aug")
    assert not [r.getMessage() for r in caplog.records if "background-removed" in r.getMessage()]
    assert info.metadata["fgvc.background_removed"] is True


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(registered):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{registered}/mlflow.db"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve",
                               "-m", "models:/fgvc-fn-small@candidate",
                               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=registered, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, server.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(1)
        images = np.random.default_rng(1).integers(0, 256, (2, 40, 30, 3), dtype=np.uint8).tolist()
        body = json.dumps({"inputs": images, "params": {"top_k": 2}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        predictions = answer["predictions"]
        assert len(predictions) == 2 and all(len(p["top_designers"]) == 2 for p in predictions)
        assert all(p["designer"].startswith("designer_") for p in predictions)

        def post(payload):
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                             data=json.dumps(payload).encode(),
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        # a photo as base64 (what `base64 -w0 photo.jpg` prints), in a column `image`
        status, answer = post({"dataframe_split": {"columns": ["image"], "data": [[jpeg_base64()]]}})
        assert status == 200 and answer["predictions"][0]["designer"].startswith("designer_")
        for payload, reason in (
                ({"dataframe_split": {"columns": ["image"], "data": [[jpeg_base64()[:100]]]}},
                 "image 0: unreadable"),
                ({"inputs": {"image": ["%%% not base64"]}}, "image 0: not base64"),
                ({"inputs": [[[[0.5, 0.5, 0.5]]]]}, "floats are refused"),
                ({"inputs": [[[[True, False, True]]]]}, "boolean pixels"),
                ({"inputs": [[[[1, 2, 999]]]]}, "must be 0..255"),
                ({"inputs": images, "params": {"top_k": -3}}, "top_k must be an integer >= 1")):
            status, answer = post(payload)
            assert status == 400 and reason in answer["message"], (reason, answer)
        assert post({"inputs": images})[0] == 200  # still serving
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        server.stdout.close()


def test_register_an_original_checkpoint_then_analyse_it(registered, tiny_root, tmp_path):
    checkpoint = save_original(tmp_path / "best_resnet18.pt", reference("resnet18", 3), 3)
    done = CliRunner().invoke(main, ["register", "--checkpoint", str(checkpoint), "--data-root", str(tiny_root)])
    assert done.exit_code == 0, done.output
    client = MlflowClient()
    version = client.get_model_version_by_alias("fgvc-resnet18", "candidate")
    run = client.get_run(version.run_id)
    assert run.data.tags["fgvc.task"] == "register" and version.tags["imported"] == "true"
    assert run.data.params["arch_effective"] == "resnet18" and run.data.params["normalization_effective"] == "imagenet"
    assert 0 <= run.data.metrics["val/acc"] <= 1 and "best/val_acc" in run.data.metrics
    files = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/confusion_matrix.png", "plots/per_class_accuracy.png"} <= files
    # the registered copy reproduces the original's logits (ImageNet normalisation inside the model)
    model = mlflow.pyfunc.load_model("models:/fgvc-resnet18@candidate").unwrap_python_model().predictor.model
    x = torch.rand(2, 3, 32, 24)
    ref = reference("resnet18", 3).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref((x - mean) / std), atol=1e-5, rtol=1e-5)
    analysed = CliRunner().invoke(main, ["analyze", "--model", "models:/fgvc-resnet18@candidate", "--method", "gradcam",
                                         "--num-images", "4"])
    assert analysed.exit_code == 0, analysed.output
    assert "gradcam/bg_preference_mean" in client.get_run(version.run_id).data.metrics


def test_register_refuses_what_does_not_fit(registered, tiny_root, tmp_path):
    wrong_classes = save_original(tmp_path / "best_fn.pt", reference("fn-small", 5), 5)
    result = CliRunner().invoke(main, ["register", "--checkpoint", str(wrong_classes), "--data-root", str(tiny_root)])
    assert result.exit_code == 1 and "has 5 classes" in result.output and "has 3" in result.output
    result = CliRunner().invoke(main, ["register", "--checkpoint", str(wrong_classes), "--arch", "resnet50",
                                       "--data-root", str(tiny_root)])
    assert result.exit_code == 1 and "FashionNet keys" in result.output and "fits fn-small" in result.output
