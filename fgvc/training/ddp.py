"""DDP pieces of a training under torchrun: the wrapped model, equal per-rank loaders and
per-rank augmentation draws (the process group itself: fgvc.distributed)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

from fgvc.data.dataset import BatchLoader
from fgvc.distributed import World, collective_device, is_initialized
from fgvc.errors import ConfigError


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself under a DDP wrapper (what the optimiser, checkpoints and hooks use)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def wrap_model(model: nn.Module, world: World, sync_bn: bool = False) -> nn.Module:
    """DDP around `model` (already on `world.device`); with `sync_bn`, BatchNorm layers first
    become SyncBatchNorm, which normalises with the statistics of the global batch."""
    if not world.is_distributed:
        return model
    if sync_bn:
        if world.device.type != "cuda":
            raise ConfigError("--sync-bn true needs CUDA: PyTorch's SyncBatchNorm does not run on the CPU "
                             "(there each process normalises over its own share of the batch; use "
                             "sync_bn=false, or a model without BatchNorm)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    Without SyncBatchNorm each rank's running statistics drift apart; evaluation then uses
    rank 0's, the ones the checkpoints hold. One broadcast per buffer dtype (a ResNet-50 has
    about 160 buffers): each flattened into one tensor, sent, and copied back.
    """
    if not is_initialized():
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in module.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for buffers in by_dtype.values():
        flat = _flatten_dense_tensors([b.detach() for b in buffers]).to(collective_device())
        dist.broadcast(flat, src=0)
        for buffer, synced in zip(buffers, _unflatten_dense_tensors(flat, buffers), strict=True):
            buffer.copy_(synced)


class EqualShareLoader(BatchLoader):
    """A training loader whose ranks all get `len(dataset) // world_size` items per epoch.

    Rank r takes positions r, r+W, ... of the shuffled order, stopping before the tail of
    `len % W` items that not every rank could share, so all ranks take the same number of
    steps (DDP's gradient all-reduce needs every rank at every step).
    """

    def order(self) -> torch.Tensor:
        return super().order()[: len(self.dataset) // self.world_size]


def per_rank_transform(transform: Callable | None, rank: int) -> Callable | None:
    """A random transform whose draws differ between ranks.

    The loader seeds the transform's generator identically on every rank (its seed also fixes
    the shared shuffle); without this, image i of every rank's batch would get the same
    augmentation.
    """
    if transform is None or rank == 0:
        return transform

    def transform_on_rank(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        base = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        return transform(images, torch.Generator().manual_seed(base + rank))

    return transform_on_rank


