"""Work split across processes under `torchrun`: the process group and the few collectives
training and masking need (DDP model wrapping and per-rank loaders: fgvc.training.ddp).

`torchrun --nproc-per-node N` starts N copies of the same command and tells each its place
through the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). Every helper here
is a no-op in a plain single process, so the loop reads the same either way.

Conventions of a DDP run:
- `batch_size` is the global batch: each rank takes `batch_size // world_size` images per step.
  Rank r reads positions r, r+W, r+2W, ... of the epoch's shuffled order, so step k of the N
  ranks together covers the same images as step k of one process with the full batch.
- Each rank gets the same number of training images per epoch: the last `len % world_size`
  images of each epoch's shuffled order are skipped (a different few every epoch), so every
  rank runs the same number of steps and no collective waits forever.
- Validation is split the same way without a shuffle and without skipping; the statistics are
  summed across ranks, so the metrics cover the split exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from fgvc.errors import ConfigError

log = logging.getLogger("fgvc")

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

# How long a collective may wait for the slowest rank. The backends' defaults (nccl 10 min,
# gloo 30 min) are shorter than work one rank does while the others wait: in masking, a rank
# whose shards are done waits at the barrier while the others still run DeepLabV3 over theirs
# (hours for a large split on CPUs); in training, ranks wait at the next collective while
# rank 0 alone logs to MLflow, uploads checkpoints and registers the model. A rank that dies
# still ends the job at once (torchrun stops the others); the timeout only bounds a hang.
PROCESS_GROUP_TIMEOUT = timedelta(hours=6)
TIMEOUT_ENV = "FGVC_PROCESS_GROUP_TIMEOUT_S"


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (a world of one without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # "nccl" | "gloo"; None: no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_ENV)


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """CUDA ranks each take the GPU of their local rank; CPU ranks share the CPU."""
    if device.type == "cuda":
        if device.index not in (None, local_rank):
            log.warning("device %s ignored under torchrun: local rank %d uses cuda:%d",
                        device, local_rank, local_rank)
        return torch.device("cuda", local_rank)
    return device


def check_ranks_fit(device: torch.device | str | None, ranks_per_node: int) -> None:
    """Refuse more CUDA ranks on a node than it has visible GPUs: each nccl rank needs a GPU of
    its own (a second rank on one GPU fails; rank N on a machine with N GPUs has no device).
    ``None`` (auto) means CUDA when it is available."""
    try:
        cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    except RuntimeError:  # not a device: resolve_device says so in the process itself
        return
    if not cuda or ranks_per_node <= 1:
        return
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if ranks_per_node > visible:
        raise ConfigError(f"{ranks_per_node} processes per node on CUDA, but {visible} GPU(s) are visible: each "
                          f"process needs a GPU of its own; use {max(visible, 1)} process(es) per node, or "
                          f"--device cpu")


def process_group_timeout() -> timedelta:
    """PROCESS_GROUP_TIMEOUT, or seconds from FGVC_PROCESS_GROUP_TIMEOUT_S."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return PROCESS_GROUP_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise ConfigError(f"{TIMEOUT_ENV}={text!r}: expected seconds > 0")
    return timedelta(seconds=seconds)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[World]:
    """Join the torchrun process group (nccl on GPUs, gloo on CPUs) and leave it on exit.

    Without torchrun (or with a world of one) no group is created and the world is this process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not launched_by_torchrun() or world_size == 1:
        yield World(device=device)
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    check_ranks_fit(device, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    timeout = process_group_timeout()
    device = rank_device(device, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    try:
        yield World(rank, world_size, local_rank, device, backend)
    finally:
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    return not is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def collective_device() -> torch.device:
    """nccl reduces tensors on this rank's GPU; gloo on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    if not is_initialized():
        return tensor
    moved = tensor.to(collective_device())
    dist.all_reduce(moved, op=getattr(dist.ReduceOp, op))
    return moved.to(tensor.device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over ranks (a new tensor on the input's device; the input itself
    when there is no process group)."""
    return _all_reduce(tensor, "SUM")


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    return _all_reduce(tensor, "MAX")


def all_ranks_true(flag: torch.Tensor) -> bool:
    """True when `flag` (a 0-d bool tensor) is true on every rank. Every rank must call it at
    the same point; all of them get the same answer, so they stop together."""
    if not is_initialized():
        return bool(flag)
    return bool(_all_reduce((~flag).to(torch.int32), "SUM") == 0)


def from_main(compute: Callable[[], Any]) -> Any:
    """Rank 0 computes (e.g. something that needs MLflow), every rank gets the value.

    An exception on rank 0 is re-raised on every rank, so no rank waits for a value that will
    never come.
    """
    if not is_initialized():
        return compute()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", compute())
        except Exception as e:
            # Only the text travels (not every exception pickles); rank 0 raises the original.
            dist.broadcast_object_list([("error", f"{type(e).__name__}: {e}")], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def exec_torchrun(nproc: int, argv: list[str], device: str | None = None) -> None:
    """Replace this process with `torchrun --standalone --nproc-per-node nproc -m fgvc.cli argv`;
    refused first when `device` (None: auto) is CUDA and the node has fewer GPUs than `nproc`."""
    check_ranks_fit(device, nproc)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "fgvc.cli", *argv]
    log.info("launching %d training processes: %s", nproc, " ".join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)
