"""The one device resolver: ``None`` (auto) or a device string -> a ``torch.device``; where a
model lives and how data follows it there; and the one way to run a block of torch ops on a
given number of intra-op threads."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import torch

from fgvc.errors import ConfigError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``: the GPU of this process's local rank when CUDA is present (torchrun sets
    LOCAL_RANK), else the CPU. A CUDA device asked for on a machine without CUDA is refused."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device: {device!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device: {device} requested but CUDA is not available on this machine")
    return resolved


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); the CPU for a model without either."""
    for tensor in model.parameters():
        return tensor.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def to_device(value: Any, device: str | torch.device) -> Any:
    """``value`` with every tensor in it on ``device``: a tensor, or dicts, lists, tuples and
    dataclass instances of them (a new container; other objects are returned as they are)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(to_device(v, device) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: to_device(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@contextlib.contextmanager
def intra_op_threads(count: int):
    """Run torch ops of the calling thread on `count` intra-op threads, then restore.

    Torch's thread count is per OS thread here (OpenMP), so this touches neither the training
    thread nor other loader threads."""
    before = torch.get_num_threads()
    if before == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
