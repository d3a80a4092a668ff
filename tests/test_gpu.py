"""Every CUDA branch, on one GPU, in a few minutes: `pytest -m gpu tests/test_gpu.py` on a CUDA machine.

Skipped without CUDA; the rest of the suite is pinned to the CPU (tests/conftest.py hides the
GPUs unless the run selects `-m gpu`), so these are the only tests that see a GPU. Models are
randomly initialised (the machines that run this are offline), except in the DeepLabV3 test
that needs real weights: it runs only when they are in the torch hub cache and says where
otherwise. Each test checks what its CUDA branch must do and would fail if that branch were
broken: data left on the CPU, channels-last or autocast not applied, augmentation not run on
the device, a collective that stays local, SyncBatchNorm normalising one rank's share only.

Comparisons. Every comparison is between two different computations (the GPU against the CPU,
or against a hand computation in float64 on the CPU, or two ranks against one process), and
each is guarded against being vacuous: the compared values must differ from each other by far
more than the tolerance wherever a broken path would put them (images differ, masks are
neither empty nor full, probabilities spread). Comparisons run under the `cross_device` fixture:
TF32 off for matmuls and cuDNN (TF32 rounds float32 inputs to 10 mantissa bits, ~1e-3 relative),
`torch.backends.cudnn.deterministic = True` and `benchmark = False` (no autotuned algorithm
choice that differs run to run); every test leaves these flags as it found them
(`build_session` turns `benchmark` on for the process, as `fgvc train` does).

Tolerances (float32 unless said):
  PIXEL_RTOL            2**-23: uint8 -> float on the GPU equals the CPU's to one ulp (CUDA
                        divides by a scalar as a multiplication by its reciprocal)
  AUGMENT_TOLERANCE     1e-3 absolute on [0, 1] pixels (a quarter of one grey level): the CPU
                        path's augmentation recipe run on the GPU against the CPU, same draws
  MAP_TOLERANCE         1e-3 absolute on attribution maps min-max scaled to [0, 1]
  METRIC_TOLERANCE      1e-2 relative on metrics computed from those maps
  PROB_TOLERANCE        1e-3 absolute on served probabilities that spread over > PROB_SPREAD_MIN
  BN_TOLERANCE          1e-4 absolute and relative: SyncBatchNorm (float32, CUDA) against the
                        float64 hand computation; STAT_TOLERANCE 1e-5 for its running statistics
  GRAD_TOLERANCE        0.02 of the gradient's norm: two DDP ranks against one float64 process
  MASK_PIXELS_DIFFERING 0.05 of pixels (real DeepLabV3 weights), RANDOM_MASK_PIXELS_DIFFERING
                        0.01 (random weights, calibrated person logit): GPU against CPU masks
  PERSON_IOU_MIN        0.5: DeepLabV3's person mask against the drawn figure's known mask
  Pearson >= 0.95       approximate (bfloat16) occlusion against exact occlusion, per image
The module's constants say why each value is what it is. Repeat runs (the GPU augmentation
recipe, the sanity check's randomisation) must give the same bits under these settings.
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
PROJECT = Path(__file__).resolve().parents[1]

# One float32 ulp, relative: x / 255 on the CPU and x * fl(1 / 255) on the GPU differ by one ulp
# for about half the grey levels; anything else (no /255, a channel mix-up) is off by far more.
PIXEL_RTOL = 2.0 ** -23
# The same draws on both devices; only float rounding differs (antialiased resize, the blur's
# convolution, reductions in the contrast jitter): ~1e-6. A quarter of a grey level leaves
# ample room, and a wrong crop, flip, jitter order or erase moves pixels by many grey levels
# (the augmentation changes pixels by 0.14-0.18 on average here).
AUGMENT_TOLERANCE = 1e-3
# Attribution maps are min-max scaled to [0, 1]: CUDA and CPU maps of one image agree to this.
MAP_TOLERANCE = 1e-3
# Metrics computed from those maps (and bootstrap intervals over them), relative.
METRIC_TOLERANCE = 1e-2
# Served probabilities: float32 logits of a few units differ by ~1e-5 between the devices; the
# head is scaled so that the probabilities of different images differ by > PROB_SPREAD_MIN,
# so images that went wrong on the way to the GPU cannot pass as right.
PROB_TOLERANCE = 1e-3
PROB_SPREAD_MIN = 0.2
# SyncBatchNorm in float32 on CUDA against the float64 hand computation: outputs and gradients
# of order 1 agree to ~1e-6; normalising a rank's half of the batch by its own statistics is off
# by > 0.1 (checked on the case itself).
BN_TOLERANCE = 1e-4
# Running statistics: the biased and the unbiased variance differ by var / (n - 1) (~4e-3 here).
STAT_TOLERANCE = 1e-5
# Gradients of DDP + SyncBatchNorm over two ranks against one float64 process over the whole
# batch: the distance of all parameters' gradients together, as a share of their norm. Float32
# is 5e-6 (channels-last) to 5e-3 (contiguous) off float64 for this ResNet-18 and batch on the
# CPU (BatchNorm bias gradients are sums that nearly cancel); ranks normalising their own
# halves are 1.5 off (every parameter's gradient by 13% or more of its norm).
GRAD_TOLERANCE = 0.02
# DeepLabV3 masks: share of pixels whose person/background call differs between the GPU (float
# resize, cuDNN) and the CPU (uint8 resize, as PIL), with the real weights ...
MASK_PIXELS_DIFFERING = 0.05
# ... and with random weights and the person logit offset (see calibrated_random_segmenter):
# on the CPU the two resize paths alone flip 0.05-0.06% of the pixels of these images.
RANDOM_MASK_PIXELS_DIFFERING = 0.01
PERSON_SHARE = 0.4  # of the pixels called person by the calibrated random segmenter
# Person IoU of DeepLabV3 (real weights) against the demo figure's ground-truth mask: 0.5 is
# PASCAL VOC's overlap criterion, and above what any mask that ignores the image reaches (a
# mask calling every pixel person scores the person's share of the image, 0.2-0.35 here; an
# empty one 0). Not measured here (no weights offline): the test prints both devices' IoU.
PERSON_IOU_MIN = 0.5


def _backend_flags() -> tuple[bool, bool, bool, bool]:
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)


def _set_backend_flags(matmul_tf32: bool, cudnn_tf32: bool, deterministic: bool, benchmark: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul_tf32, cudnn_tf32
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, benchmark


CROSS_DEVICE_FLAGS = (False, False, True, False)  # no TF32 (matmul, cuDNN); deterministic; no autotuning


@pytest.fixture(autouse=True)
def backend_flags_restored():
    """Each test leaves TF32, cuDNN determinism and autotuning as it found them."""
    before = _backend_flags()
    yield
    _set_backend_flags(*before)


@pytest.fixture()
def cross_device():
    """The settings of every comparison between two computations (module docstring)."""
    before = _backend_flags()
    _set_backend_flags(*CROSS_DEVICE_FLAGS)
    yield
    _set_backend_flags(*before)


def assert_still_cross_device() -> None:
    """Called after a comparison's computations: nothing in between changed the settings."""
    assert _backend_flags() == CROSS_DEVICE_FLAGS, f"settings changed during the comparison: {_backend_flags()}"


@pytest.fixture(scope="module")
def gpu_root(tmp_path_factory):
    """4 designers, 64x48 images, 64 training and 16 validation images."""
    root = tmp_path_factory.mktemp("gpu") / "demo"
    generate_demo(root, DemoConfig(num_designers=4, train_per_class=16, val_per_class=4, height=64, width=48,
                                   shard_size=24))
    return root


# --- training on the device: placement, layout, autocast, augmentation ---------------------------

class DevicePathProbe:
    """Records every forward of a network: where its input was, whether it was channels-last,
    whether CUDA autocast was on and with which dtype, and the dtype its first convolution
    produced (bfloat16/float16 only if autocast really ran the convolution)."""

    def __init__(self, network: nn.Module):
        self.inputs: list[dict] = []
        self.conv_dtypes: list[torch.dtype] = []
        conv = next(m for m in network.modules() if isinstance(m, nn.Conv2d))
        self.handles = [network.register_forward_pre_hook(self._input),
                        conv.register_forward_hook(lambda module, args, out: self.conv_dtypes.append(out.dtype))]

    def _input(self, module, args) -> None:
        x = args[0]
        self.inputs.append({"device": x.device.type, "training": module.training,
                            "channels_last": x.is_contiguous(memory_format=torch.channels_last),
                            "autocast": torch.is_autocast_enabled("cuda"),
                            "autocast_dtype": torch.get_autocast_dtype("cuda")})

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def assert_device_path(self, amp: torch.dtype, train_calls: int) -> None:
        assert sum(i["training"] for i in self.inputs) == train_calls, self.inputs
        for seen in self.inputs:
            assert seen["device"] == "cuda", "a batch reached the network on the CPU"
            assert seen["channels_last"], "a batch reached the network without channels-last"
            assert seen["autocast"] and seen["autocast_dtype"] == amp, seen
        assert self.conv_dtypes and all(d == amp for d in self.conv_dtypes), self.conv_dtypes


def _session(root, **options):
    from fgvc.training import TrainConfig, TrainingData, build_session

    cfg = TrainConfig(**{**dict(arch="resnet18", data_root=str(root), batch_size=16, pretrained=False,
                                device="cuda", registered_model=False), **options})
    return cfg, build_session(cfg, TrainingData.of(root), World(device=CUDA))


def test_two_epochs_of_resnet18_with_heavy_augmentation_on_the_device_in_bf16_channels_last(gpu_root):
    """The CUDA training path: model and batches on the GPU, channels-last, bf16 autocast (or
    float16 where bf16 is not native), augmentation batched on the GPU, cuDNN autotuning."""
    cfg, session = _session(gpu_root, epochs=2, aug="heavy")
    amp = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    assert session.device_recipe == {"amp_effective": str(amp).replace("torch.", ""), "channels_last_effective": "true",
                                     "augment_path": "device", "cudnn_benchmark": "true"}
    assert torch.backends.cudnn.benchmark and session.train_loader.augment_on_device
    assert session.train_loader.workers == session.val_loader.workers == 2  # num_workers=auto beside a GPU
    conv = next(p for p in session.network.parameters() if p.dim() == 4)
    assert conv.is_cuda and conv.is_contiguous(memory_format=torch.channels_last)

    augmented = []  # (device, dtype) of every batch the augmentation got
    transform = session.train_loader.transform

    def augment_and_record(images, generator):
        augmented.append((images.device.type, images.dtype))
        return transform(images, generator)

    session.train_loader.transform = augment_and_record
    probe = DevicePathProbe(session.network)
    try:
        history = session.run(progress=False)
    finally:
        probe.close()
    steps = len(session.train_loader)  # 64 images, batch 16: 4 a epoch
    assert augmented == [("cuda", torch.uint8)] * (2 * steps), "the augmentation did not run on the GPU"
    probe.assert_device_path(amp, train_calls=2 * steps)
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(math.isfinite(h[k]) for h in history for k in ("train/loss", "val/loss", "val/acc"))
    assert cfg.identity(CUDA) != cfg.identity(CPU)


def test_an_fp16_epoch_with_a_grad_scaler(gpu_root, monkeypatch):
    """Where bfloat16 is not native: float16 autocast with a GradScaler stepping every batch."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    updates = []
    update = torch.amp.GradScaler.update
    monkeypatch.setattr(torch.amp.GradScaler, "update", lambda self, *a: updates.append(1) or update(self, *a))
    _, session = _session(gpu_root, epochs=1, aug=None)
    assert session.precision.amp_dtype == torch.float16 and session.device_recipe["amp_effective"] == "float16"
    probe = DevicePathProbe(session.network)
    try:
        history = session.run(progress=False)
    finally:
        probe.close()
    assert len(updates) == len(session.train_loader) and math.isfinite(history[0]["train/loss"])
    probe.assert_device_path(torch.float16, train_calls=len(session.train_loader))


# --- the loader: pinned gathers, the device copy, augmentation on the device ---------------------

def test_the_loader_gathers_into_pinned_memory_augments_on_the_gpu_and_repeats_bit_for_bit(gpu_root, cross_device):
    """BatchLoader's CUDA branches: the augmentation on the device (the GPU recipe, repeatable;
    the CPU recipe, against the CPU), the augmentation in loader threads then pinned and copied,
    and plain uint8 batches gathered into pinned memory and made float on the GPU."""
    from fgvc.training.augment import get_preset

    dataset = ShardDataset(gpu_root, "train")
    augmented_on = []

    def epoch(device, transform, on_device, channels_last=False):
        def recorded(images, generator):
            augmented_on.append(images.device.type)
            return transform(images, generator)

        loader = BatchLoader(dataset, 16, shuffle=True, seed=3, device=device,
                             transform=None if transform is None else recorded, augment_on_device=on_device,
                             workers=2, prefetch=2, channels_last=channels_last)
        loader.set_epoch(1)
        return [(b.images.clone(), b.labels.clone()) for b in loader]

    # The GPU recipe (HeavyAugment.batch, what `fgvc train` runs on CUDA): made on the GPU,
    # channels-last, and the same bits again from the same seed and epoch.
    first = epoch(CUDA, get_preset("heavy").batch, True, channels_last=True)
    assert augmented_on == ["cuda"] * 4
    again = epoch(CUDA, get_preset("heavy").batch, True, channels_last=True)
    assert len(first) == 4 and all(x.is_cuda and x.is_contiguous(memory_format=torch.channels_last) for x, _ in first)
    assert all(torch.equal(a, b) and torch.equal(x, y) for (a, x), (b, y) in zip(first, again, strict=True))

    # The CPU path's recipe (same draws from the CPU generator) run on the GPU against the CPU.
    augmented_on.clear()
    on_gpu = epoch(CUDA, get_preset("heavy"), True)
    on_cpu = epoch(CPU, get_preset("heavy"), False)
    assert augmented_on == ["cuda"] * 4 + ["cpu"] * 4
    plain = epoch(CPU, None, False)
    for (g, gl), (c, cl), (p, _) in zip(on_gpu, on_cpu, plain, strict=True):
        assert g.is_cuda and torch.equal(gl.cpu(), cl)
        assert (c - p).abs().mean() > 0.05  # the augmentation changes the images: the comparison can fail
        assert (g.cpu() - c).abs().max() <= AUGMENT_TOLERANCE

    # The recipe in the loader threads for a GPU (augment_on_device off): made on the CPU, pinned,
    # copied: the CPU loader's bits exactly.
    augmented_on.clear()
    via_threads = epoch(CUDA, get_preset("heavy"), False)
    assert augmented_on == ["cpu"] * 4
    assert all(g.is_cuda and torch.equal(g.cpu(), c) for (g, _), (c, _) in zip(via_threads, on_cpu, strict=True))
    _, _, items = BatchLoader(dataset, 16, device=CUDA, transform=get_preset("heavy"), workers=0)._load(
        0, torch.arange(16))
    assert items["images"].dtype == torch.float32 and items["images"].is_pinned()

    loader = BatchLoader(dataset, 16, device=CUDA, workers=2)
    _, _, items = loader._load(0, torch.arange(16))
    assert items["images"].dtype == torch.uint8 and items["images"].is_pinned()
    on_cpu = BatchLoader(dataset, 16, device=CPU, workers=0)
    count = 0
    for g, c in zip(loader, on_cpu, strict=True):  # uint8 copied, made float on the GPU: the CPU's values
        assert g.images.is_cuda and g.labels.is_cuda and torch.equal(g.labels.cpu(), c.labels)
        torch.testing.assert_close(g.images.cpu(), c.images, rtol=PIXEL_RTOL, atol=0.0)
        count += 1
    assert count == len(on_cpu) == 4
    assert_still_cross_device()


# --- collectives, buffers and SyncBatchNorm: one rank here, two under torchrun ---------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync_bn_case() -> dict:
    """A batch of 8 whose second half (the second rank's) has other per-channel statistics,
    BatchNorm's affine parameters, an upstream gradient; values for the collectives; images and
    labels for a DDP step (their second half brighter and less contrasted)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 6, 5, generator=g)
    x[4:] = x[4:] * 2.0 + torch.tensor([1.5, -1.0, 0.5, 2.0]).view(1, 4, 1, 1)
    images = torch.rand(8, 3, 64, 48, generator=g)
    images[4:] = images[4:] * 0.5 + 0.5
    return {"values": torch.arange(1.0, 7.0), "x": x, "weight": 1 + 0.5 * torch.randn(4, generator=g),
            "bias": torch.randn(4, generator=g), "grad": torch.randn(x.shape, generator=g), "eps": 1e-5,
            "momentum": 0.3, "images": images, "labels": torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])}


def hand_batch_norm(x, weight, bias, grad, eps: float, momentum: float) -> dict:
    """BatchNorm's training step over the whole batch with plain float64 tensor ops: normalised
    by the batch mean and biased variance per channel; running mean and unbiased variance
    folded in with `momentum` from their initial 0 and 1; gradients of sum(out * grad)."""
    x64 = x.double().requires_grad_(True)
    w64, b64 = weight.double().requires_grad_(True), bias.double().requires_grad_(True)
    n = x.numel() // x.shape[1]
    per_channel = (1, -1, 1, 1)
    mean = x64.sum(dim=(0, 2, 3)) / n
    centred = x64 - mean.view(per_channel)
    var = (centred * centred).sum(dim=(0, 2, 3)) / n
    out = centred / torch.sqrt(var + eps).view(per_channel) * w64.view(per_channel) + b64.view(per_channel)
    (out * grad.double()).sum().backward()
    return {"out": out.detach(), "input_grad": x64.grad, "weight_grad": w64.grad, "bias_grad": b64.grad,
            "running_mean": momentum * mean.detach(),
            "running_var": (1 - momentum) + momentum * var.detach() * n / (n - 1)}


def _close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    torch.testing.assert_close(actual.double().cpu(), expected.double(), rtol=tolerance, atol=tolerance,
                               msg=lambda m: f"{what}: {m}")


def test_nccl_with_a_world_of_one(monkeypatch, cross_device):
    """The nccl branches in one process: collectives on the rank's GPU (a CPU tensor goes there
    and back), buffers flattened per dtype and copied back, SyncBatchNorm on CUDA (at one rank
    PyTorch computes it as BatchNorm: checked against the hand computation), ddp.wrap_model
    with sync_bn. What only two ranks can show is in the next test."""
    from fgvc.training import ddp

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    torch.cuda.set_device(CUDA)
    dist.init_process_group("nccl", rank=0, world_size=1, timeout=distributed.process_group_timeout(),
                            device_id=CUDA)
    try:
        assert distributed.collective_device() == CUDA
        # With one rank a sum is its input: what can go wrong here is where it happens and where
        # the result lands (nccl refuses CPU tensors; the result must come back to the input's device).
        values = torch.arange(1.0, 7.0, device=CUDA)
        expected = values.clone()
        total = distributed.all_reduce_sum(values)
        assert total.device == CUDA and torch.equal(total, expected)
        on_cpu = distributed.all_reduce_sum(expected.cpu())
        assert on_cpu.device == CPU and torch.equal(on_cpu, expected.cpu())
        assert float(distributed.all_reduce_max(torch.tensor(2.5, device=CUDA))) == 2.5
        assert distributed.all_ranks_true(torch.tensor(True, device=CUDA))
        assert not distributed.all_ranks_true(torch.tensor(False, device=CUDA))

        # Buffers of their own (not BatchNorm's initial zeros and ones, alike in every layer):
        # the flatten/broadcast/unflatten round trip must put each value back where it was.
        model = create_model("resnet18", 4, pretrained=False).to(CUDA)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for k, buffer in enumerate(model.buffers()):
                buffer.copy_(torch.rand(buffer.shape, generator=g) if buffer.is_floating_point()
                             else torch.full(buffer.shape, k))
        before = [b.clone() for b in model.buffers()]
        ddp.broadcast_buffers(model)
        assert all(torch.equal(a, b) for a, b in zip(before, model.buffers(), strict=True))

        case = sync_bn_case()
        hand = hand_batch_norm(case["x"], case["weight"], case["bias"], case["grad"], case["eps"], case["momentum"])
        bn = nn.SyncBatchNorm(4, eps=case["eps"], momentum=case["momentum"]).to(CUDA)
        with torch.no_grad():
            bn.weight.copy_(case["weight"])
            bn.bias.copy_(case["bias"])
        x = case["x"].to(CUDA).requires_grad_(True)
        out = bn(x)
        (out * case["grad"].to(CUDA)).sum().backward()
        _close(out.detach(), hand["out"], BN_TOLERANCE, "output")
        _close(x.grad, hand["input_grad"], BN_TOLERANCE, "input gradient")
        _close(bn.weight.grad, hand["weight_grad"], BN_TOLERANCE, "weight gradient")
        _close(bn.bias.grad, hand["bias_grad"], BN_TOLERANCE, "bias gradient")
        _close(bn.running_mean, hand["running_mean"], STAT_TOLERANCE, "running mean")
        _close(bn.running_var, hand["running_var"], STAT_TOLERANCE, "running variance")

        plain = create_model("resnet18", 4, pretrained=False).to(CUDA)
        batch_norms = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
        wrapped = ddp.wrap_model(plain, World(0, 1, 0, CUDA, "nccl"), sync_bn=True)
        assert isinstance(wrapped, nn.parallel.DistributedDataParallel) and wrapped.device_ids == [0]
        assert sum(isinstance(m, nn.SyncBatchNorm) for m in wrapped.modules()) == batch_norms > 0
        loss = wrapped(torch.rand(4, 3, 64, 48, device=CUDA)).square().mean()
        loss.backward()
        assert all(p.grad is not None and p.grad.is_cuda and torch.isfinite(p.grad).all()
                   for p in wrapped.parameters() if p.requires_grad)
        assert_still_cross_device()
    finally:
        dist.destroy_process_group()


TWO_RANKS = [
    pytest.param("gloo", id="gloo-both-ranks-on-one-gpu"),
    pytest.param("nccl", id="nccl-a-gpu-per-rank", marks=pytest.mark.skipif(
        torch.cuda.device_count() < 2,
        reason="nccl needs a GPU per rank (it refuses two ranks on one device, and fgvc refuses to start them); "
               "the gloo case runs the same checks on one GPU")),
]


@pytest.mark.parametrize("backend", TWO_RANKS)
def test_two_ranks_sum_broadcast_and_normalise_over_the_global_batch(backend, tmp_path):
    """Two processes under torchrun (tests/gpu_two_ranks.py), each holding half of every batch:
    the collectives combine both ranks, broadcast_buffers gives rank 1 rank 0's buffers,
    SyncBatchNorm's output, gradients and running statistics are the hand computation over
    the whole batch, and DDP + SyncBatchNorm (wrap_model with sync_bn) gives both ranks the
    gradients of one process over the whole batch."""
    case = sync_bn_case()
    hand = hand_batch_norm(case["x"], case["weight"], case["bias"], case["grad"], case["eps"], case["momentum"])
    own_half = hand_batch_norm(case["x"][:4], case["weight"], case["bias"], case["grad"][:4], case["eps"],
                               case["momentum"])
    assert (own_half["out"] - hand["out"][:4]).abs().max() > 100 * BN_TOLERANCE  # a local BatchNorm fails

    torch.manual_seed(0)
    reference = create_model("resnet18", 4, pretrained=False, image_size=(64, 48)).double().train()
    nn.functional.cross_entropy(reference(case["images"].double()), case["labels"]).backward()
    reference_grads = torch.cat([p.grad.flatten() for p in reference.parameters()])
    reference_means = [m.running_mean for m in reference.modules() if isinstance(m, nn.BatchNorm2d)]

    torch.save(case, tmp_path / "case.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")]),
           "FGVC_PROCESS_GROUP_TIMEOUT_S": "120", "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(PROJECT / "tests" / "gpu_two_ranks.py"), backend, str(tmp_path / "case.pt"),
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    assert any(not torch.equal(a, b)
               for a, b in zip(ranks[0]["buffers_before"], ranks[1]["buffers_before"], strict=True))
    for r, seen in enumerate(ranks):
        device = "cuda:0" if backend == "gloo" else f"cuda:{r}"
        assert (seen["backend"], seen["world_size"], seen["device"]) == (backend, 2, device)
        # rank r contributed values * (r + 1): the sum is 3x, neither rank's own values
        assert torch.equal(seen["sum_gpu"], case["values"] * 3) and seen["sum_gpu_device"] == device
        assert torch.equal(seen["sum_cpu"], case["values"] * 3) and seen["sum_cpu_device"] == "cpu"
        assert seen["max"] == 2.0 and seen["all_true"] is True and seen["one_false"] is False
        assert all(torch.equal(a, b) for a, b in zip(seen["buffers_after"], ranks[0]["buffers_before"], strict=True))

        half = slice(4 * r, 4 * r + 4)
        _close(seen["bn_out"], hand["out"][half], BN_TOLERANCE, f"rank {r} output")
        _close(seen["bn_input_grad"], hand["input_grad"][half], BN_TOLERANCE, f"rank {r} input gradient")
        _close(seen["bn_running_mean"], hand["running_mean"], STAT_TOLERANCE, f"rank {r} running mean")
        _close(seen["bn_running_var"], hand["running_var"], STAT_TOLERANCE, f"rank {r} running variance")
        assert seen["bn_batches"] == 1

        for key in ("ddp_fp32", "ddp_amp"):
            assert seen[f"{key}_wrapper"] == "DistributedDataParallel"
            assert seen[f"{key}_sync_bn_layers"] == 20 and seen[f"{key}_plain_bn_layers"] == 0  # ResNet-18's 20
            assert all(torch.isfinite(g).all() for g in seen[f"{key}_grads"])
        assert seen["ddp_fp32_precision"] == "off" and seen["ddp_amp_precision"] in ("bfloat16", "float16")
        grads = torch.cat([g.double().flatten() for g in seen["ddp_fp32_grads"]])
        error = float((grads - reference_grads).norm() / reference_grads.norm())
        assert error <= GRAD_TOLERANCE, f"rank {r}: gradient {error:.2e} of its norm off one process over the batch"
        for k, (mean, expected) in enumerate(zip(seen["ddp_fp32_running_means"], reference_means, strict=True)):
            _close(mean, expected, BN_TOLERANCE, f"rank {r} DDP running mean {k}")
    # Weight and bias gradients stay per rank in SyncBatchNorm (DDP averages them): they add up.
    _close(ranks[0]["bn_weight_grad"] + ranks[1]["bn_weight_grad"], hand["weight_grad"], BN_TOLERANCE, "weight grad")
    _close(ranks[0]["bn_bias_grad"] + ranks[1]["bn_bias_grad"], hand["bias_grad"], BN_TOLERANCE, "bias grad")
    # Under autocast, too, DDP leaves both ranks the same gradients and SyncBatchNorm the same statistics.
    for a, b in zip(ranks[0]["ddp_amp_grads"], ranks[1]["ddp_amp_grads"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(ranks[0]["ddp_amp_running_means"], ranks[1]["ddp_amp_running_means"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# --- masking: DeepLabV3 on the GPU ---------------------------------------------------------------

def _masks(root: Path, split: str = "val") -> torch.Tensor:
    from fgvc.data.shards import read_shard, shards_of

    return torch.cat([read_shard(p)["masks"] for p in shards_of(root, split)])


def _source_images(root: Path) -> torch.Tensor:
    from fgvc.data.shards import read_shard, shards_of

    return torch.cat([read_shard(p)["images"] for p in shards_of(root, "val")])


def mask_dataset_with(src: Path, dst: Path, segmenter, device: str, **options) -> torch.Tensor:
    """mask_dataset on `device`; the person masks it wrote."""
    from fgvc.masking import mask_dataset

    mask_dataset(src, dst, segmenter=segmenter, device=device, **options)
    return _masks(dst)


def calibrated_random_segmenter(images: torch.Tensor, seg_size: int):
    """DeepLabV3-ResNet101 with random weights (fixed seed) whose person logit is offset so that
    PERSON_SHARE of the pixels of `images` are person on the CPU. Random weights alone call no
    pixel person on these images: both devices' masks would be empty and agree whatever the
    device path did. With the offset the mask follows the image (a different share per image)."""
    from fgvc.masking.segmenters import VOC_PERSON, build_segmenter, preprocess

    segmenter = build_segmenter("deeplabv3_resnet101", seg_weights="random", seg_size=seg_size, device="cpu")
    with torch.inference_mode():
        logits = segmenter.model(preprocess(images, seg_size, segmenter.channels_last))["out"]
    others = torch.cat([logits[:, :VOC_PERSON], logits[:, VOC_PERSON + 1:]], dim=1).amax(dim=1)
    margin = (logits[:, VOC_PERSON] - others).flatten().double()
    with torch.no_grad():
        segmenter.model.classifier[-1].bias[VOC_PERSON] -= float(torch.quantile(margin, 1 - PERSON_SHARE))
    return segmenter


def test_deeplabv3_masking_on_cuda_matches_the_cpu(gpu_root, tmp_path, cross_device):
    """The masking pipeline's CUDA branch (pinned shards, float resize on the GPU, channels-last
    DeepLabV3 on cuDNN, masks back to the CPU) against its CPU branch, on masks that depend on
    the image."""
    from fgvc.data.shards import read_meta

    segmenter = calibrated_random_segmenter(_source_images(gpu_root), seg_size=96)
    options = {"splits": ("val",), "progress": False}
    on_cpu = mask_dataset_with(gpu_root, tmp_path / "cpu", copy.deepcopy(segmenter), "cpu", **options)
    on_cuda = mask_dataset_with(gpu_root, tmp_path / "cuda", copy.deepcopy(segmenter), "cuda", **options)
    assert read_meta(tmp_path / "cuda")["masking"]["resize_effective"] == "float32-cuda"
    assert read_meta(tmp_path / "cpu")["masking"]["resize_effective"] == "uint8-cpu"
    shares = on_cpu.float().mean(dim=(1, 2))
    assert 0.2 < shares.mean() < 0.6 and shares.max() - shares.min() > 0.1, shares  # neither empty nor constant
    share = float((on_cpu != on_cuda).float().mean())
    print(f"DeepLabV3 (random, calibrated) masks, CUDA vs CPU: {share:.4%} of pixels differ")
    assert share <= RANDOM_MASK_PIXELS_DIFFERING
    assert_still_cross_device()


@pytest.fixture(scope="module")
def figure_root(tmp_path_factory):
    """8 runway-synth looks at 256x192: the drawn figures DeepLabV3 should find."""
    root = tmp_path_factory.mktemp("figures") / "demo"
    generate_demo(root, DemoConfig(num_designers=4, train_per_class=1, val_per_class=2, height=256, width=192,
                                   shard_size=8, looks_per_show=1))
    return root


def _person_iou(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """Intersection over union of the person pixels of all images together (VOC's per-class IoU)."""
    p, t = predicted.bool(), truth.bool()
    return float((p & t).sum()) / max(float((p | t).sum()), 1.0)


@pytest.mark.parametrize("name", ["deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large"])
def test_deeplabv3_with_its_weights_finds_the_drawn_person_on_cuda(name, figure_root, tmp_path, cross_device):
    """Real DeepLabV3 weights, read the project's way (the torch hub cache, offline), on images
    whose person mask is known: the demo generator drew the figure, and the `groundtruth`
    segmenter writes that mask (the shards' `masks`) into a masked root of its own. The GPU's
    person mask must overlap it (PERSON_IOU_MIN) and agree with the CPU's."""
    from fgvc.masking import cached_weights_path
    from fgvc.masking.segmenters import SEGMENTERS

    weights = cached_weights_path(name)
    if not weights.is_file():
        pytest.skip(f"{name}: no weights at {weights} (torch hub's cache under $TORCH_HOME; tests never "
                    f"download): put {SEGMENTERS.get(name).url} there, or run `fgvc mask --segmenter {name}` "
                    f"once with a network")
    options = {"splits": ("val",), "progress": False}
    truth = mask_dataset_with(figure_root, tmp_path / "groundtruth", "groundtruth", "cpu", **options)
    assert torch.equal(truth, _masks(figure_root))  # the generator's own masks
    on_cuda = mask_dataset_with(figure_root, tmp_path / "cuda", name, "cuda", **options)
    on_cpu = mask_dataset_with(figure_root, tmp_path / "cpu", name, "cpu", **options)
    iou_cuda, iou_cpu = _person_iou(on_cuda, truth), _person_iou(on_cpu, truth)
    differing = float((on_cpu != on_cuda).float().mean())
    print(f"{name}: person IoU with the drawn figure: CUDA {iou_cuda:.3f}, CPU {iou_cpu:.3f}; "
          f"{differing:.4%} of pixels differ between them")
    assert iou_cpu >= PERSON_IOU_MIN, (
        f"on the CPU too {name} finds the drawn figure only at IoU {iou_cpu:.3f}: the weights or the data, "
        f"not the CUDA branch")
    assert iou_cuda >= PERSON_IOU_MIN, f"CUDA person IoU {iou_cuda:.3f} (CPU {iou_cpu:.3f})"
    assert differing <= MASK_PIXELS_DIFFERING
    assert_still_cross_device()


# --- analysis and serving on the GPU against the CPU ----------------------------------------------

@pytest.mark.parametrize("method", ["gradcam", "occlusion", "neighbors", "shortcut"])
def test_every_analysis_method_on_cuda_agrees_with_the_cpu(method, gpu_root, tmp_path, cross_device):
    """run_methods with a CUDA model (data moved there once, results back once) against the
    same model on the CPU."""
    from fgvc.analysis.config import AnalyzeConfig
    from fgvc.analysis.data import load_analysis_data
    from fgvc.analysis.suite import run_methods

    data = load_analysis_data(gpu_root, "val", 12, 0)
    cfg = AnalyzeConfig(model="models:/x/1", num_images=12, batch_size=8, window=16, stride=8, k=3, target="label")
    torch.manual_seed(0)
    model = create_model("resnet18", 4, pretrained=False, image_size=(64, 48)).eval()
    on_cpu = run_methods(model, data, cfg, tmp_path / "cpu", (method,))[method]
    on_cuda_model = copy.deepcopy(model).to(CUDA)
    on_cuda = run_methods(on_cuda_model, data, cfg, tmp_path / "cuda", (method,))[method]
    assert next(on_cuda_model.parameters()).is_cuda
    if isinstance(on_cpu.payload, dict) and "maps" in on_cpu.payload:
        a, b = on_cpu.payload["maps"], on_cuda.payload["maps"]
        assert a.flatten(1).std(dim=1).max() > 0.1  # maps with structure: a wrong map cannot pass
        assert b.device == CPU and (a - b).abs().max() <= MAP_TOLERANCE
    if method == "neighbors":  # the same neighbour lists, but for a near tie in similarity
        same = (on_cpu.payload["indices"] == on_cuda.payload["indices"]).all(1).float().mean()
        assert same >= 0.9
    compared = 0
    for key, value in on_cpu.metrics.items():
        if key != "accuracy":  # a logit tie can flip one prediction
            assert on_cuda.metrics[key] == pytest.approx(value, rel=METRIC_TOLERANCE, abs=1e-4, nan_ok=True), key
            compared += 1
    assert compared >= 5
    assert_still_cross_device()


def test_the_sanity_check_on_cuda_randomises_a_copy_and_leaves_the_gpu_random_state(gpu_root, tmp_path,
                                                                                      cross_device):
    """The sanity method on a CUDA model (targets predicted there): the randomised copy's layers
    are re-initialised from the GPU's generator inside a fork of its random state, so the
    caller's GPU random state and model are left as they were, and a rerun randomises alike."""
    from fgvc.analysis.config import AnalyzeConfig
    from fgvc.analysis.data import load_analysis_data
    from fgvc.analysis.suite import run_methods

    data = load_analysis_data(gpu_root, "val", 6, 0)
    cfg = AnalyzeConfig(model="models:/x/1", num_images=6, batch_size=8, window=16, stride=8)
    torch.manual_seed(0)
    model = create_model("resnet18", 4, pretrained=False, image_size=(64, 48)).eval().to(CUDA)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    torch.cuda.manual_seed(1234)
    state = torch.cuda.get_rng_state(CUDA)
    first = run_methods(model, data, cfg, tmp_path / "first", ("sanity",))["sanity"]
    assert torch.equal(torch.cuda.get_rng_state(CUDA), state), "the GPU's random state moved"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items()), "the analysed model changed"
    curves = first.payload["curves"]
    assert {"gradcam", "occlusion"} <= set(curves)
    for name, curve in curves.items():
        last = curve.per_image[-1]
        assert (last[~last.isnan()] < 0.999).any(), f"{name}: the randomised GPU model gives the same maps"
    again = run_methods(model, data, cfg, tmp_path / "again", ("sanity",))["sanity"]
    assert again.metrics == pytest.approx(first.metrics, nan_ok=True)
    assert_still_cross_device()


def _blob_images(count: int, height: int = 64, width: int = 48) -> torch.Tensor:
    """Dark images with one bright Gaussian blob each (tests/test_analysis_occlusion.py's)."""
    g = torch.Generator().manual_seed(5)
    ys, xs = torch.arange(height).view(-1, 1).float(), torch.arange(width).view(1, -1).float()
    images = []
    for _ in range(count):
        cy, cx = torch.rand(2, generator=g) * torch.tensor([height - 20.0, width - 20.0]) + 10
        blob = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * 7.0 ** 2))
        images.append(0.1 + 0.8 * blob.expand(3, -1, -1))
    return torch.stack(images)


def _brightness_model() -> nn.Module:
    """Logit 0 grows with the bright area (tests/test_analysis_occlusion.py's): occlusion maps
    show the blob, so approximate and exact maps can be held to a correlation."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        model[0].weight.fill_(1 / 27)
        model[0].bias.fill_(-0.3)
        model[3].weight.fill_(1 / 36)
        model[3].bias.zero_()
        model[7].weight.copy_(torch.tensor([[1.0] * 4, [-1.0] * 4]))
        model[7].bias.zero_()
        bn = model[1]
        bn.running_mean.copy_(torch.rand(4, generator=g) * 0.4 - 0.2)
        bn.running_var.copy_(torch.rand(4, generator=g) * 1.5 + 0.5)
        bn.weight.copy_(torch.rand(4, generator=g) + 0.5)
        bn.bias.copy_(torch.rand(4, generator=g) * 0.4 - 0.2)
    return model.eval()


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double() - a.double().mean(), b.flatten().double() - b.double().mean()
    return float((a @ b) / (a.norm() * b.norm()))


def test_occlusion_approx_on_cuda_convolves_the_changes_in_bfloat16(cross_device):
    """Approximate occlusion's CUDA branch: bfloat16 for the incremental convolutions where the
    GPU has it natively, its maps against exact float32 occlusion on the GPU (>= 0.95 Pearson
    per image, the bound the CPU's bfloat16 path meets in tests/test_analysis_occlusion.py)."""
    from fgvc.analysis.occlusion import Occlusion

    model, images = _brightness_model().to(CUDA), _blob_images(3).to(CUDA)
    exact = Occlusion(model, window=16, stride=4).attribute(images, 0)
    approx = Occlusion(model, window=16, stride=4, mode="approx").attribute(images, 0)
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert approx.engine == "incremental" and ("bfloat16" in approx.approximation) == native, approx.approximation
    for a, e in zip(approx.raw, exact.raw, strict=True):
        assert float(e.std()) > 0 and _pearson(a, e) >= 0.95
    assert_still_cross_device()


def test_the_predictor_serves_on_the_gpu(monkeypatch, cross_device):
    """Predictor's CUDA branch (images fitted on the CPU, forward passes on the GPU, one copy
    back) against the same model served on the CPU."""
    from fgvc.models.predict import Predictor

    monkeypatch.delenv("FGVC_SERVE_DEVICE", raising=False)
    torch.manual_seed(0)
    model = create_model("fn-small", 3, pretrained=False, image_size=(32, 24)).eval()
    g = torch.Generator().manual_seed(1)
    colours = (torch.rand(6, 1, 1, 3, generator=g) * 255).expand(6, 40, 30, 3)
    noise = torch.randint(-20, 21, (6, 40, 30, 3), generator=g)
    images = (colours + noise).clamp(0, 255).to(torch.uint8).numpy()
    on_cpu = Predictor(copy.deepcopy(model), ["a", "b", "c"], device="cpu")
    # A random head gives every image ~1/3 for each designer (logits ~1e-3 apart). Both copies
    # get a head that centres the features and scales them, so the logits differ by a few units
    # between images (the probabilities then spread) and stay centred (no class takes all).
    with torch.no_grad():
        features = model.forward_features(on_cpu.preprocess(images)).double()
        weight = model.head.weight.double()
        weight *= 4.0 / float(((features - features.mean(dim=0)) @ weight.T).std())
        for m in (model, on_cpu.model):
            m.head.weight.copy_(weight)
            m.head.bias.copy_(-(weight @ features.mean(dim=0)))
    served = Predictor(model, ["a", "b", "c"])
    assert served.device.type == "cuda" and next(served.model.parameters()).is_cuda
    expected = on_cpu.probabilities(images)
    assert float((expected.max(dim=0).values - expected.min(dim=0).values).max()) > PROB_SPREAD_MIN
    probs = served.probabilities(images)
    assert probs.device == CPU and (probs - expected).abs().max() <= PROB_TOLERANCE
    assert_still_cross_device()
    monkeypatch.setenv("FGVC_SERVE_DEVICE", "cpu")
    assert Predictor(copy.deepcopy(model), ["a", "b", "c"]).device == CPU


# --- the commands on CUDA ------------------------------------------------------------------------

def _fgvc(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "fgvc.cli", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=240, check=False)
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
