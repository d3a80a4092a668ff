"""Process groups and GPUs: more CUDA ranks per node than visible GPUs are refused in one line
before anything starts, and every group is created with a stated timeout."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from fgvc import distributed
from fgvc.errors import ConfigError


@pytest.fixture()
def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.fixture()
def torchrun_rank_1_of_2(monkeypatch):
    for name, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)


def test_two_cuda_ranks_on_one_gpu_are_refused_before_the_group_exists(one_gpu, torchrun_rank_1_of_2, monkeypatch):
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("group created"))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail(f"rank moved to {d}"))
    with pytest.raises(ConfigError, match=r"^2 processes per node on CUDA, but 1 GPU\(s\) are visible") as e:
        with distributed.process_group(torch.device("cuda")):
            pass
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("device", [None, "cuda", "cuda:0"])
def test_launching_more_cuda_ranks_than_gpus_is_refused_before_torchrun(one_gpu, monkeypatch, device):
    monkeypatch.setattr(distributed.os, "execv", lambda *a: pytest.fail("torchrun launched"))
    with pytest.raises(ConfigError, match="use 1 process"):
        distributed.exec_torchrun(2, ["mask"], device)


def test_cpu_ranks_and_enough_gpus_pass(one_gpu, monkeypatch):
    distributed.check_ranks_fit("cpu", 4)
    distributed.check_ranks_fit("cuda", 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    distributed.check_ranks_fit(None, 2)


def test_the_group_gets_a_timeout_long_enough_for_the_slowest_rank(torchrun_rank_1_of_2, monkeypatch):
    seen = {}

    def init(backend, **kwargs):
        seen.update(kwargs, backend=backend)
        raise RuntimeError("stop here")

    monkeypatch.setattr(dist, "init_process_group", init)
    with pytest.raises(RuntimeError, match="stop here"):
        with distributed.process_group(torch.device("cpu")):
            pass
    assert seen["backend"] == "gloo" and seen["timeout"] == distributed.PROCESS_GROUP_TIMEOUT
    assert seen["timeout"] >= timedelta(hours=1)  # above nccl's 10 minutes and gloo's 30
    monkeypatch.setenv("FGVC_PROCESS_GROUP_TIMEOUT_S", "90")
    with pytest.raises(RuntimeError, match="stop here"):
        with distributed.process_group(torch.device("cpu")):
            pass
    assert seen["timeout"] == timedelta(seconds=90)
    monkeypatch.setenv("FGVC_PROCESS_GROUP_TIMEOUT_S", "soon")
    with pytest.raises(ConfigError, match="FGVC_PROCESS_GROUP_TIMEOUT_S='soon'"):
        with distributed.process_group(torch.device("cpu")):
            pass
