"""Where a served model runs: the GPU when one is visible, FGVC_SERVE_DEVICE to choose, a
stated batch size; the answers are the same whatever the batching."""

from __future__ import annotations

import pytest
import torch

from fgvc.errors import FgvcError
from fgvc.models import create_model
from fgvc.models.predict import BATCH_SIZE, Predictor, serving_device


@pytest.fixture()
def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_auto_serves_on_the_gpu_when_one_is_visible(one_gpu, monkeypatch):
    monkeypatch.delenv("FGVC_SERVE_DEVICE", raising=False)
    assert serving_device() == torch.device("cuda", 0)
    assert serving_device(None) == torch.device("cuda", 0)
    monkeypatch.setenv("FGVC_SERVE_DEVICE", "cpu")
    assert serving_device() == torch.device("cpu")
    assert serving_device("cuda:0") == torch.device("cuda", 0)  # an explicit device wins over the variable


def test_auto_serves_on_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("FGVC_SERVE_DEVICE", raising=False)
    assert serving_device() == torch.device("cpu")
    monkeypatch.setenv("FGVC_SERVE_DEVICE", "cuda")
    with pytest.raises(FgvcError, match=r"^FGVC_SERVE_DEVICE: cuda requested but CUDA is not available"):
        serving_device()


def test_the_predictor_defaults_to_auto_and_batches_without_changing_answers(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.manual_seed(0)
    model = create_model("fn-small", 3, pretrained=False, image_size=(32, 24))
    predictor = Predictor(model, ["a", "b", "c"])
    assert predictor.device == torch.device("cpu") and predictor.batch_size == BATCH_SIZE == 64
    images = torch.randint(0, 256, (5, 40, 30, 3), dtype=torch.uint8).numpy()
    whole = predictor.probabilities(images)
    predictor.batch_size = 2
    assert torch.allclose(predictor.probabilities(images), whole, atol=1e-6) and whole.device.type == "cpu"
