"""What the device changes about a training is part of its identity and of its checkpoints:
CPU config ids stay as they were, a GPU recipe gets its own id, and a resume across a change
of recipe is refused in one line."""

from __future__ import annotations

import pytest
import torch

from fgvc.config import config_id
from fgvc.errors import ConfigError
from fgvc.training import TrainConfig
from fgvc.training.checkpoint import CheckpointWriter, check_resumable, read_checkpoint
from fgvc.training.session import train

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.fixture()
def native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


@pytest.mark.parametrize("options", [{}, {"aug": "heavy"}, {"amp": True, "channels_last": True}])
def test_cpu_config_ids_are_the_digest_of_the_options_alone(options):
    cfg = TrainConfig(**options)
    assert cfg.identity(CPU) == config_id(cfg)  # the ids CPU runs and study cells always had


def test_the_gpu_recipe_is_logged_concretely_and_changes_the_id(native_bf16):
    cfg = TrainConfig(aug="heavy")
    assert cfg.device_recipe(CPU) == {"amp_effective": "off", "channels_last_effective": "false",
                                      "augment_path": "cpu", "cudnn_benchmark": "false"}
    assert cfg.device_recipe(CUDA) == {"amp_effective": "bfloat16", "channels_last_effective": "true",
                                       "augment_path": "device", "cudnn_benchmark": "true"}
    assert cfg.identity(CUDA) != cfg.identity(CPU)
    assert cfg.identity(torch.device("cuda", 1)) == cfg.identity(CUDA)  # which GPU does not matter
    plain = TrainConfig(aug=None, amp=False, channels_last=False)  # even then: cuDNN's own kernels
    assert plain.identity(CUDA) != plain.identity(CPU)


def test_fp16_where_bf16_is_only_emulated(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert TrainConfig().device_recipe(CUDA)["amp_effective"] == "float16"


def test_a_cpu_run_is_not_resumed_with_a_gpu_recipe(tiny_root, tmp_path, native_bf16):
    cfg = TrainConfig(arch="fn-small", data_root=str(tiny_root), epochs=1, batch_size=8, aug="heavy",
                      pretrained=False, device="cpu")
    train(cfg, [CheckpointWriter(tmp_path)], progress=False)
    last = read_checkpoint(tmp_path / "last.pt")
    assert last["device_recipe"] == cfg.device_recipe(CPU)
    check_resumable(last, "last.pt", "fn-small", 3, last["dataset_digest"], cfg.device_recipe(CPU))
    with pytest.raises(ConfigError, match=r"^cannot resume last.pt: this device changes how it trains "
                                          r"\(amp_effective off -> bfloat16, .*augment_path cpu -> device") as e:
        check_resumable(last, "last.pt", "fn-small", 3, last["dataset_digest"], cfg.device_recipe(CUDA))
    assert "\n" not in str(e.value)
