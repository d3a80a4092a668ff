"""A stand-in accelerator for CPU-only machines: catches code that forgets to move data.

Tensors "on the accelerator" are CPU tensors of the marker class ``OnAccelerator``; they
report ``device == meta`` (the accelerator's name here). Inside ``FakeAccelerator()``, every
torch call follows CUDA's rule: tensors of more than zero dimensions on the accelerator and
on the CPU never meet in one op (``RuntimeError: Expected all tensors to be on the same
device``); ``.to(meta)`` / ``device=meta`` puts a tensor there and ``.cpu()`` / ``.to("cpu")``
brings it back; ``.numpy()`` of an accelerator tensor is refused. The arithmetic is the
CPU's, so results can be compared with a plain CPU run.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

ACCELERATOR = torch.device("meta")


class OnAccelerator(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func == torch.Tensor.device.__get__:
            return ACCELERATOR
        with FakeAccelerator():  # outside the mode too, ops keep the device rules
            return func(*args, **(kwargs or {}))

    def __deepcopy__(self, memo):
        """A copy stays on the accelerator (as `copy.deepcopy` of a CUDA model does), a
        parameter stays a parameter."""
        if id(self) in memo:
            return memo[id(self)]
        with torch._C.DisableTorchFunctionSubclass():
            data = self.detach().clone()
        copied = data.as_subclass(OnAccelerator)
        if isinstance(self, nn.Parameter):
            copied = nn.Parameter(copied, self.requires_grad)
        memo[id(self)] = copied
        return copied


def _to_cpu(t):
    return t.as_subclass(torch.Tensor) if isinstance(t, OnAccelerator) else t


def _to_accelerator(t):
    return t.as_subclass(OnAccelerator) if isinstance(t, torch.Tensor) and not isinstance(t, OnAccelerator) else t


def _is_accelerator(device) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device).type == ACCELERATOR.type


# Calls that legitimately take tensors on two devices (a copy between them).
CROSS_DEVICE = {torch._has_compatible_shallow_copy_type, torch.Tensor.to, torch.Tensor.copy_}


class FakeAccelerator(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == torch.Tensor.device.__get__:
            return ACCELERATOR if isinstance(args[0], OnAccelerator) else func(*args)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on = any(isinstance(t, OnAccelerator) for t in tensors)
        if on and func not in CROSS_DEVICE and any(not isinstance(t, OnAccelerator) and t.dim() > 0
                                                   for t in tensors):
            raise RuntimeError(f"{getattr(func, '__name__', func)}: Expected all tensors to be on the same device, "
                               f"but found at least two devices, {ACCELERATOR} and cpu!")
        if on and func is torch.Tensor.numpy:
            raise TypeError(f"can't convert {ACCELERATOR} device type tensor to numpy")
        target = kwargs.get("device")
        if func is torch.Tensor.to:
            for a in args[1:]:
                if isinstance(a, (str, torch.device)):
                    target = a
                elif isinstance(a, torch.Tensor):
                    target = ACCELERATOR if isinstance(a, OnAccelerator) else "cpu"
        with torch._C.DisableTorchFunctionSubclass():
            if func is torch.Tensor.cpu:
                return _to_cpu(func(*args, **kwargs))
            if isinstance(target, (str, torch.device)):
                there = _is_accelerator(target)
                if there:
                    kwargs = {k: ("cpu" if _is_accelerator(v) else v) for k, v in kwargs.items()}
                    args = tuple("cpu" if _is_accelerator(a) else (_to_cpu(a) if i else a) for i, a in enumerate(args))
                out = func(*args, **kwargs)
                return tree_map(_to_accelerator if there else _to_cpu, out)
            out = func(*args, **kwargs)
        return tree_map(_to_accelerator, out) if on else out


def model_to_accelerator(model: nn.Module) -> nn.Module:
    """Put every parameter and buffer of ``model`` on the accelerator (in place)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = nn.Parameter(p.detach().as_subclass(OnAccelerator), p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = b.as_subclass(OnAccelerator)
    return model
