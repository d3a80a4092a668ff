"""Every analysis method runs where the model is: the analysed images, masks and labels go to
the model's device in one place, and results come back to the CPU. On a CPU-only machine a
stand-in accelerator (tests/fake_accelerator.py) makes a method that forgets to move data
fail as it would on CUDA."""

from __future__ import annotations

import pytest
import torch
from fake_accelerator import ACCELERATOR, FakeAccelerator, model_to_accelerator

from fgvc.analysis.config import AnalyzeConfig
from fgvc.analysis.data import load_analysis_data
from fgvc.analysis.methods import METHODS
from fgvc.analysis.suite import run_methods
from fgvc.models import create_model

METHOD_NAMES = tuple(sorted(METHODS.names()))


def _cfg(**over) -> AnalyzeConfig:
    return AnalyzeConfig(**{**dict(model="models:/x/1", num_images=9, batch_size=4, window=8, stride=8, k=3), **over})


def _model(num_classes: int):
    torch.manual_seed(0)
    return create_model("fn-small", num_classes, pretrained=False).eval()


def test_the_fake_accelerator_refuses_mixed_devices():
    model = model_to_accelerator(_model(3))
    with FakeAccelerator():
        assert next(model.parameters()).device == ACCELERATOR
        with pytest.raises(RuntimeError, match="same device"):
            model(torch.rand(1, 3, 32, 24))
        logits = model(torch.rand(1, 3, 32, 24).to(ACCELERATOR))
        assert logits.device == ACCELERATOR and logits.cpu().device.type == "cpu"


VARIANTS = [(name, {}) for name in METHOD_NAMES] + [
    ("gradcam", {"target": "label"}), ("occlusion", {"occlusion_mode": "approx", "fill": "blur", "stride": 4}),
    ("neighbors", {"exclude_same_designer": True})]


@pytest.mark.parametrize("method,settings", VARIANTS,
                         ids=[f"{m}-{'-'.join(map(str, s.values()))}" for m, s in VARIANTS])
def test_each_method_runs_on_the_models_device_and_returns_cpu_results(method, settings, tiny_root, tmp_path):
    data = load_analysis_data(tiny_root, "val", 9, 0)
    cfg = _cfg(**settings)
    expected = run_methods(_model(3), data, cfg, tmp_path / "cpu", (method,))[method]
    model = model_to_accelerator(_model(3))
    with FakeAccelerator():
        got = run_methods(model, data, cfg, tmp_path / "accelerator", (method,))[method]
        assert data.images.device.type == "cpu"  # the caller's data is left where it was
        for value in _tensors(got):
            assert value.device.type == "cpu"
    assert got.metrics.keys() == expected.metrics.keys()
    # approx occlusion runs in bfloat16 where the device has it natively (this CPU may, the
    # stand-in has not), so its numbers agree to bfloat16's precision only
    rel = 2e-2 if settings.get("occlusion_mode") == "approx" else 1e-4
    for key, value in expected.metrics.items():
        assert got.metrics[key] == pytest.approx(value, rel=rel, abs=1e-5, nan_ok=True), key
    assert sorted(p.name for p in (tmp_path / "accelerator" / method).iterdir()) == \
        sorted(p.name for p in (tmp_path / "cpu" / method).iterdir())


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        yield from _tensors(vars(value))
