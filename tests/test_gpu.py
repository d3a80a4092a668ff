"""Every CUDA branch, on one GPU, in a few minutes: `pytest -m gpu` on a CUDA machine.

Skipped without CUDA; the rest of the suite is pinned to the CPU (tests/conftest.py), so these
are the only tests that see a GPU. Weights are randomly initialised (the machines that run
this are offline). TF32 is switched off where CUDA and CPU numbers are compared, so the
comparisons measure the device path (transfers, kernels, layouts), not TF32's rounding.
"""

from __future__ import annotations

import copy
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fgvc import distributed
from fgvc.data.dataset import BatchLoader, ShardDataset
from fgvc.data.demo import DemoConfig, generate_demo
from fgvc.distributed import World
from fgvc.models import create_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run `pytest -m gpu` there")]

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
# Attribution maps are min-max scaled to [0, 1]: CUDA and CPU maps of one image agree to this.
MAP_TOLERANCE = 1e-3
# Metrics computed from those maps (and bootstrap intervals over them), relative.
METRIC_TOLERANCE = 1e-2
# DeepLabV3 masks: share of pixels whose person/background call differs between the GPU
# (float resize, cuDNN) and the CPU (uint8 resize, as PIL).
MASK_PIXELS_DIFFERING = 0.05


@pytest.fixture(scope="module")
def gpu_root(tmp_path_factory):
    """4 designers, 64x48 images, 64 training and 16 validation images."""
    root = tmp_path_factory.mktemp("gpu") / "demo"
    generate_demo(root, DemoConfig(num_designers=4, train_per_class=16, val_per_class=4, height=64, width=48,
                                   shard_size=24))
    return root


@pytest.fixture()
def no_tf32():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _session(root, **options):
    from fgvc.training import TrainConfig, TrainingData, build_session

    cfg = TrainConfig(**{**dict(arch="resnet18", data_root=str(root), batch_size=16, pretrained=False,
                                device="cuda", registered_model=False), **options})
    return cfg, build_session(cfg, TrainingData.of(root), World(device=CUDA))


def test_two_epochs_of_resnet18_with_heavy_augmentation_on_the_device_in_bf16_channels_last(gpu_root):
    cfg, session = _session(gpu_root, epochs=2, aug="heavy")
    amp = "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    assert session.device_recipe == {"amp_effective": amp, "channels_last_effective": "true",
                                     "augment_path": "device", "cudnn_benchmark": "true"}
    assert torch.backends.cudnn.benchmark and session.train_loader.augment_on_device
    conv = next(p for p in session.network.parameters() if p.dim() == 4)
    assert conv.is_cuda and conv.is_contiguous(memory_format=torch.channels_last)
    history = session.run(progress=False)
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(math.isfinite(h[k]) for h in history for k in ("train/loss", "val/loss", "val/acc"))
    assert cfg.identity(CUDA) != cfg.identity(CPU)


def test_an_fp16_epoch_with_a_grad_scaler(gpu_root, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    updates = []
    update = torch.amp.GradScaler.update
    monkeypatch.setattr(torch.amp.GradScaler, "update", lambda self, *a: updates.append(1) or update(self, *a))
    _, session = _session(gpu_root, epochs=1, aug=None)
    assert session.precision.amp_dtype == torch.float16 and session.device_recipe["amp_effective"] == "float16"
    history = session.run(progress=False)
    assert len(updates) == len(session.train_loader) and math.isfinite(history[0]["train/loss"])


def test_the_loader_gathers_into_pinned_memory_and_repeats_bit_for_bit(gpu_root):
    from fgvc.training.augment import get_preset

    dataset = ShardDataset(gpu_root, "train")

    def epoch():
        loader = BatchLoader(dataset, 16, shuffle=True, seed=3, device=CUDA, transform=get_preset("heavy").batch,
                             augment_on_device=True, workers=2, prefetch=2, channels_last=True)
        loader.set_epoch(1)
        return [(b.images.clone(), b.labels.clone()) for b in loader]

    first, again = epoch(), epoch()
    assert len(first) == 4 and first[0][0].is_cuda
    assert all(torch.equal(a, b) and torch.equal(x, y) for (a, x), (b, y) in zip(first, again))

    plain = BatchLoader(dataset, 16, device=CUDA, workers=2)
    _, _, items = plain._load(0, torch.arange(16))
    assert items["images"].dtype == torch.uint8 and items["images"].is_pinned()
    on_cpu = BatchLoader(dataset, 16, device=CPU, workers=0)
    for g, c in zip(plain, on_cpu):  # uint8 copied, made float on the GPU: the CPU's bytes
        assert g.images.is_cuda and torch.equal(g.images.cpu(), c.images) and torch.equal(g.labels.cpu(), c.labels)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_nccl_with_a_world_of_one(monkeypatch):
    from fgvc.training import ddp

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    torch.cuda.set_device(CUDA)
    dist.init_process_group("nccl", rank=0, world_size=1, timeout=distributed.process_group_timeout(),
                            device_id=CUDA)
    try:
        values = torch.arange(6.0, device=CUDA)
        assert torch.equal(distributed.all_reduce_sum(values), values)
        assert distributed.all_ranks_true(torch.tensor(True, device=CUDA))
        assert not distributed.all_ranks_true(torch.tensor(False, device=CUDA))
        box = torch.arange(4, device=CUDA)
        dist.broadcast(box, src=0)
        assert box.tolist() == [0, 1, 2, 3]
        model = create_model("resnet18", 4, pretrained=False).to(CUDA)
        before = [b.clone() for b in model.buffers()]
        ddp.broadcast_buffers(model)  # flattened, one broadcast per dtype, over nccl
        assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))

        # With one rank SyncBatchNorm computes as BatchNorm (nothing to gather): this checks the
        # converted layer and DDP around it on CUDA; the cross-rank kernels need two GPUs.
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).to(CUDA)
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
        x = torch.randn(4, 3, 16, 16, device=CUDA)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = plain(xa), synced(xb)
        ya.square().sum().backward()
        yb.square().sum().backward()
        assert torch.allclose(ya, yb, atol=1e-5) and torch.allclose(xa.grad, xb.grad, atol=1e-4)

        wrapped = ddp.wrap_model(create_model("resnet18", 4, pretrained=False).to(CUDA),
                                 World(0, 1, 0, CUDA, "nccl"), sync_bn=True)
        loss = wrapped(torch.rand(4, 3, 64, 48, device=CUDA)).square().mean()
        loss.backward()
        assert all(p.grad is not None for p in wrapped.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()


def test_deeplabv3_masking_on_cuda_matches_the_cpu(gpu_root, tmp_path, no_tf32):
    from fgvc.data.shards import read_meta, read_shard, shards_of
    from fgvc.masking import mask_dataset

    options = dict(segmenter="deeplabv3_resnet101", seg_weights="random", seg_size=96, splits=("val",),
                   progress=False)
    mask_dataset(gpu_root, tmp_path / "cpu", device="cpu", **options)
    mask_dataset(gpu_root, tmp_path / "cuda", device="cuda", **options)
    assert read_meta(tmp_path / "cuda")["masking"]["resize_effective"] == "float32-cuda"
    differing = total = 0
    for a, b in zip(shards_of(tmp_path / "cpu", "val"), shards_of(tmp_path / "cuda", "val")):
        ma, mb = read_shard(a)["masks"], read_shard(b)["masks"]
        differing += int((ma != mb).sum())
        total += ma.numel()
    share = differing / total
    print(f"DeepLabV3 masks, CUDA vs CPU: {share:.4%} of pixels differ")
    assert share <= MASK_PIXELS_DIFFERING


@pytest.mark.parametrize("method", ["gradcam", "occlusion", "neighbors", "shortcut"])
def test_every_analysis_method_on_cuda_agrees_with_the_cpu(method, gpu_root, tmp_path, no_tf32):
    from fgvc.analysis.config import AnalyzeConfig
    from fgvc.analysis.data import load_analysis_data
    from fgvc.analysis.suite import run_methods

    data = load_analysis_data(gpu_root, "val", 12, 0)
    cfg = AnalyzeConfig(model="models:/x/1", num_images=12, batch_size=8, window=16, stride=8, k=3, target="label")
    torch.manual_seed(0)
    model = create_model("resnet18", 4, pretrained=False, image_size=(64, 48)).eval()
    on_cpu = run_methods(model, data, cfg, tmp_path / "cpu", (method,))[method]
    on_cuda = run_methods(copy.deepcopy(model).to(CUDA), data, cfg, tmp_path / "cuda", (method,))[method]
    if isinstance(on_cpu.payload, dict) and "maps" in on_cpu.payload:
        a, b = on_cpu.payload["maps"], on_cuda.payload["maps"]
        assert b.device == CPU and (a - b).abs().max() <= MAP_TOLERANCE
    if method == "neighbors":  # the same neighbour lists, but for a near tie in similarity
        same = (on_cpu.payload["indices"] == on_cuda.payload["indices"]).all(1).float().mean()
        assert same >= 0.9
    for key, value in on_cpu.metrics.items():
        if key != "accuracy":  # a logit tie can flip one prediction
            assert on_cuda.metrics[key] == pytest.approx(value, rel=METRIC_TOLERANCE, abs=1e-4, nan_ok=True), key


def test_the_predictor_serves_on_the_gpu(monkeypatch):
    from fgvc.models.predict import Predictor

    monkeypatch.delenv("FGVC_SERVE_DEVICE", raising=False)
    torch.manual_seed(0)
    model = create_model("fn-small", 3, pretrained=False, image_size=(32, 24))
    on_cpu = Predictor(copy.deepcopy(model), ["a", "b", "c"], device="cpu")
    served = Predictor(model, ["a", "b", "c"])
    assert served.device.type == "cuda" and next(served.model.parameters()).is_cuda
    images = torch.randint(0, 256, (5, 40, 30, 3), dtype=torch.uint8).numpy()
    probs = served.probabilities(images)
    assert probs.device == CPU and torch.allclose(probs, on_cpu.probabilities(images), atol=1e-3)
    monkeypatch.setenv("FGVC_SERVE_DEVICE", "cpu")
    assert Predictor(copy.deepcopy(model), ["a", "b", "c"]).device == CPU


def _fgvc(*args: str, cwd) -> subprocess.CompletedProcess:
    project = str(Path(__file__).resolve().parents[1])  # this checkout's fgvc, in the subprocess too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([project, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "fgvc.cli", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_fgvc_train_analyze_and_a_tiny_study_on_cuda(gpu_root, mlflow_store, tmp_path):
    import mlflow

    _fgvc("train", "--arch", "fn-small", "--data-root", str(gpu_root), "--epochs", "1", "--batch-size", "16",
          "--aug", "true", "--device", "cuda", cwd=tmp_path)
    train = mlflow.search_runs(experiment_names=["fgvc-train"], output_format="list")[0]
    assert train.data.params["device_effective"].startswith("cuda")
    assert train.data.params["augment_path"] == "device" and train.data.params["cudnn_benchmark"] == "true"
    _fgvc("analyze", "--model", "models:/fgvc-fn-small@candidate", "--method", "gradcam,occlusion,neighbors,shortcut",
          "--num-images", "8", "--device", "cuda", cwd=tmp_path)
    record = mlflow.search_runs(experiment_names=["fgvc-analysis"], output_format="list")[0]
    assert record.info.status == "FINISHED" and "gradcam/bg_preference_mean" in record.data.metrics
    _fgvc("study", "--num-designers", "3", "--train-per-class", "8", "--val-per-class", "4", "--height", "32",
          "--width", "24", "--epochs", "1", "--batch-size", "8", "--num-images", "6", "--device", "cuda",
          cwd=tmp_path)
    study = mlflow.search_runs(experiment_names=["fgvc-study"], filter_string="tags.`fgvc.task` = 'study'",
                               output_format="list")[0]
    assert study.info.status == "FINISHED"
