"""Two CUDA ranks under torchrun, for tests/test_gpu.py: what each rank sees of the cross-rank
CUDA paths (fgvc.distributed's collectives, fgvc.training.ddp, SyncBatchNorm).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/gpu_two_ranks.py BACKEND CASE OUT

BACKEND
  gloo  both ranks on cuda:0. One GPU cannot hold two nccl ranks (nccl refuses a second rank on
        a device, and fgvc.distributed.check_ranks_fit refuses it first); gloo takes CUDA tensors
        for all_reduce, all_gather and broadcast (staged through host memory), DDP runs on it,
        and SyncBatchNorm has a gloo branch (all_gather where nccl uses all_gather_into_tensor).
        The group is made here, as fgvc.distributed.process_group makes it but with gloo.
  nccl  rank r on cuda:r through fgvc.distributed.process_group, as `fgvc train --nproc 2` runs
        (needs two GPUs).
CASE    tensors the test wrote with torch.save: ``values`` [K] for the collectives; the
        SyncBatchNorm case ``x`` [N, C, H, W], ``weight``, ``bias`` [C], ``grad`` (the upstream
        gradient, like x), ``eps``, ``momentum``; the DDP case ``images`` [M, 3, H, W] in [0, 1]
        and ``labels`` [M]. Rank r takes the r-th half of each batch.
OUT     each rank writes OUT/rank<r>.pt (CPU tensors, numbers and strings; weights_only).

Results compared across ranks and devices are computed with TF32 off and deterministic cuDNN.
The test compares them with a hand computation; this script asserts nothing itself.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fgvc import distributed
from fgvc.distributed import World
from fgvc.models import create_model
from fgvc.training import ddp
from fgvc.training.loop import Precision


@contextlib.contextmanager
def gloo_on_one_gpu():
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=distributed.process_group_timeout())
    try:
        yield World(rank, world_size, int(os.environ["LOCAL_RANK"]), device, "gloo")
    finally:
        dist.destroy_process_group()


def collectives(world: World, case: dict) -> dict:
    """Every rank contributes other values, so a reduction that stayed local is seen."""
    # A fresh tensor for each call: a tensor already on the collective's device is reduced in place.
    on_gpu = distributed.all_reduce_sum((case["values"] * (world.rank + 1)).to(world.device))
    on_cpu = distributed.all_reduce_sum(case["values"] * (world.rank + 1))  # to the collective's device and back
    return {"sum_gpu": on_gpu.cpu(), "sum_gpu_device": str(on_gpu.device), "sum_cpu": on_cpu,
            "sum_cpu_device": str(on_cpu.device),
            "max": float(distributed.all_reduce_max(torch.tensor(float(world.rank + 1), device=world.device))),
            "all_true": distributed.all_ranks_true(torch.tensor(True, device=world.device)),
            "one_false": distributed.all_ranks_true(torch.tensor(world.rank == 0, device=world.device))}


def buffers_broadcast(world: World) -> dict:
    """Rank-dependent buffers (every BatchNorm's own values, so a mix-up between layers shows)
    before and after ddp.broadcast_buffers."""
    model = create_model("resnet18", 4, pretrained=False).to(world.device)
    g = torch.Generator().manual_seed(100 + world.rank)
    with torch.no_grad():
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.copy_(torch.rand(buffer.shape, generator=g) + world.rank)
            else:
                buffer.fill_(3 + 7 * world.rank)
    before = [b.detach().cpu().clone() for b in model.buffers()]
    ddp.broadcast_buffers(model)
    return {"buffers_before": before, "buffers_after": [b.detach().cpu().clone() for b in model.buffers()]}


def sync_batch_norm(world: World, case: dict) -> dict:
    """One SyncBatchNorm step on this rank's half of the batch: output, gradients, running stats."""
    x = case["x"]
    half = x.shape[0] // world.world_size
    part = slice(world.rank * half, (world.rank + 1) * half)
    bn = nn.SyncBatchNorm(x.shape[1], eps=case["eps"], momentum=case["momentum"]).to(world.device)
    with torch.no_grad():
        bn.weight.copy_(case["weight"])
        bn.bias.copy_(case["bias"])
    mine = x[part].to(world.device).requires_grad_(True)
    out = bn(mine)
    (out * case["grad"][part].to(world.device)).sum().backward()
    return {"bn_out": out.detach().cpu(), "bn_input_grad": mine.grad.cpu(), "bn_weight_grad": bn.weight.grad.cpu(),
            "bn_bias_grad": bn.bias.grad.cpu(), "bn_running_mean": bn.running_mean.cpu(),
            "bn_running_var": bn.running_var.cpu(), "bn_batches": int(bn.num_batches_tracked)}


def ddp_step(world: World, case: dict, amp: bool) -> dict:
    """`fgvc train --sync-bn true` on CUDA: ddp.wrap_model around a channels-last ResNet-18, one
    forward and backward on this rank's half of ``images``, in float32 (``amp`` False: compared
    with one process over the whole batch) or with the session's autocast (``amp`` True)."""
    precision = Precision.for_device(world.device) if amp else Precision(None, channels_last=True)
    torch.manual_seed(0)
    model = create_model("resnet18", 4, pretrained=False, image_size=tuple(case["images"].shape[-2:]))
    model = model.to(world.device).to(memory_format=torch.channels_last)
    wrapped = ddp.wrap_model(model, world, sync_bn=True)
    half = case["images"].shape[0] // world.world_size
    part = slice(world.rank * half, (world.rank + 1) * half)
    images = case["images"][part].to(world.device).contiguous(memory_format=torch.channels_last)
    with precision.autocast(world.device):
        loss = nn.functional.cross_entropy(wrapped(images).float(), case["labels"][part].to(world.device))
    loss.backward()
    network = ddp.unwrap(wrapped)
    key = "ddp_amp" if amp else "ddp_fp32"
    return {f"{key}_wrapper": type(wrapped).__name__, f"{key}_precision": precision.amp_name,
            f"{key}_sync_bn_layers": sum(isinstance(m, nn.SyncBatchNorm) for m in network.modules()),
            f"{key}_plain_bn_layers": sum(type(m) is nn.BatchNorm2d for m in network.modules()),
            f"{key}_grads": [p.grad.detach().float().cpu() for p in network.parameters()],
            f"{key}_running_means": [m.running_mean.detach().cpu() for m in network.modules()
                                     if isinstance(m, nn.SyncBatchNorm)]}


def main(backend: str, case_path: str, out: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    case = torch.load(case_path, map_location="cpu", weights_only=True)
    group = gloo_on_one_gpu() if backend == "gloo" else distributed.process_group(torch.device("cuda"))
    with group as world:
        seen = {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "device": str(world.device)}
        seen.update(collectives(world, case))
        seen.update(buffers_broadcast(world))
        seen.update(sync_batch_norm(world, case))
        seen.update(ddp_step(world, case, amp=False))
        seen.update(ddp_step(world, case, amp=True))
        distributed.barrier()
    torch.save(seen, Path(out) / f"rank{world.rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:4])
