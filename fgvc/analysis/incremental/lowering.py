"""Lowering a network to a short list of steps on numbered tensors (see the package docstring)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeGuard, TypeVar

import torch
import torch.nn.functional as F
import torchvision.models.resnet as tv_resnet
from torch import Tensor, nn

from fgvc.models.factory import FGVCNet
from fgvc.models.fashionnet import FashionNet

Pair = tuple[int, int]


class UnsupportedModel(Exception):
    """The model holds a module incremental inference does not understand."""


# --------------------------------------------------------------------------------------------
# Steps of a lowered network. Tensor 0 is the input image; step i writes tensor i + 1.
# --------------------------------------------------------------------------------------------


@dataclass
class Conv:
    """``conv2d`` (BatchNorm folded into ``weight``/``bias``), optionally followed by ReLU."""

    weight: Tensor  # [C_out, C_in / groups, kh, kw]
    bias: Tensor | None
    stride: Pair
    padding: Pair
    dilation: Pair
    groups: int
    relu: bool = False
    pad_value: float = 0.0

    @property
    def kernel(self) -> Pair:
        return (self.weight.shape[2], self.weight.shape[3])

    def __call__(self, x: Tensor, padded: bool = True) -> Tensor:
        padding = self.padding if padded else (0, 0)
        out = F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)
        return out.relu_() if self.relu else out

    def macs_per_output(self) -> int:
        """Multiply-accumulates per output pixel."""
        c_out, c_in, kh, kw = self.weight.shape
        return c_out * c_in * kh * kw


@dataclass
class MaxPool:
    kernel: Pair
    stride: Pair
    padding: Pair
    dilation: Pair
    pad_value: float = float("-inf")

    def __call__(self, x: Tensor, padded: bool = True) -> Tensor:
        padding = self.padding if padded else (0, 0)
        return F.max_pool2d(x, self.kernel, self.stride, padding, self.dilation)


@dataclass
class Pointwise:
    """A per-pixel map (activation, per-channel affine): changes nothing outside a block.
    Computes ``fn(x, *tensors)``."""

    fn: Callable[..., Tensor]
    name: str
    tensors: tuple[Tensor, ...] = ()

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x, *self.tensors)


@dataclass
class Add:
    """Residual sum of two tensors of the same shape, optionally followed by ReLU."""

    relu: bool = False


@dataclass
class GlobalAvgPool:
    """Mean over H, W (``AdaptiveAvgPool2d(1)``): ``[N, C, H, W] -> [N, C, 1, 1]``."""


@dataclass
class Dense(Pointwise):
    """A layer on whole per-sample tensors (after the global pool: Flatten, Linear, ...)."""


Op = Conv | MaxPool | Pointwise | Add | GlobalAvgPool | Dense
LOCAL_OPS = (Conv, MaxPool)


@dataclass
class Step:
    op: Op
    inputs: tuple[int, ...]


# --------------------------------------------------------------------------------------------
# Lowering: modules -> steps.
# --------------------------------------------------------------------------------------------

_POINTWISE = {
    nn.ReLU: lambda m: torch.relu,
    nn.ReLU6: lambda m: lambda x: F.relu6(x),
    nn.LeakyReLU: lambda m: lambda x: F.leaky_relu(x, m.negative_slope),
    nn.SiLU: lambda m: F.silu,
    nn.GELU: lambda m: lambda x: F.gelu(x, approximate=m.approximate),
    nn.Sigmoid: lambda m: torch.sigmoid,
    nn.Tanh: lambda m: torch.tanh,
}
_PASS_THROUGH = (nn.Identity, nn.Dropout)  # Dropout is the identity in eval mode


def _pair(value) -> Pair:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def _own_forward(module: nn.Module, base: type[ModuleT], *names: str) -> TypeGuard[ModuleT]:
    """``module`` computes what ``base`` computes: none of these methods is overridden."""
    return isinstance(module, base) and all(
        getattr(type(module), name) is getattr(base, name) for name in names
    )


class _Lowering:
    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.shared: set[int] = set()  # tensors read by more than one later step
        self.outputs: dict[int, tuple[nn.Module, int]] = {}  # id(module) -> (module, tensor)

    def add(self, op: Op, *inputs: int) -> int:
        self.steps.append(Step(op, tuple(inputs)))
        return len(self.steps)

    def last_step_makes(self, node: int, kind: type | tuple[type, ...]) -> Step | None:
        """The step writing ``node`` when it is the newest step and of ``kind``. Lowered
        modules only ever hand their output on, so the newest tensor has no other reader
        yet and its step may absorb a BatchNorm or ReLU."""
        if (node == len(self.steps) and node > 0 and node not in self.shared
                and isinstance(self.steps[-1].op, kind)):
            # the tensor's value changes: modules that produced it no longer do
            self.outputs = {k: v for k, v in self.outputs.items() if v[1] != node}
            return self.steps[-1]
        return None

    def module(self, m: nn.Module, x: int) -> int:
        """Lower ``m`` applied to tensor ``x``; returns its output tensor (the last call's,
        for a module called twice, as a forward hook would see it)."""
        out = self._lower_module(m, x)
        self.outputs[id(m)] = (m, out)
        return out

    def _lower_module(self, m: nn.Module, x: int) -> int:
        if m._forward_hooks or m._forward_pre_hooks:
            raise UnsupportedModel(f"{type(m).__name__} has hooks")
        lowered = self._lower_container(m, x)
        return lowered if lowered is not None else self._lower_layer(m, x)

    def _lower_container(self, m: nn.Module, x: int) -> int | None:
        """A network or block whose forward is known: its children in order; None otherwise."""
        if isinstance(m, FGVCNet) and _own_forward(
            m, FGVCNet, "forward", "forward_features", "forward_head", "normalize"
        ):
            x = self.add(Pointwise(lambda t, mean, std: (t - mean) / std, "normalize",
                                   (m.input_mean.detach(), m.input_std.detach())), x)
            return self.module(m.head, self.module(m.body, x))
        if isinstance(m, tv_resnet.ResNet) and _own_forward(
            m, tv_resnet.ResNet, "forward", "_forward_impl"
        ):
            for child in (m.conv1, m.bn1, m.relu, m.maxpool, m.layer1, m.layer2, m.layer3,
                          m.layer4, m.avgpool):
                x = self.module(child, x)
            x = self.add(Dense(lambda t: torch.flatten(t, 1), "flatten"), x)
            return self.module(m.fc, x)
        if isinstance(m, FashionNet) and _own_forward(
            m, FashionNet, "forward", "forward_features", "forward_feature_maps", "forward_head"
        ):
            for child in [m.stem, *m.stages, m.global_pool, m.drop, m.head]:
                x = self.module(child, x)
            return x
        if isinstance(m, (tv_resnet.BasicBlock, tv_resnet.Bottleneck)):
            return self.residual_block(m, x)
        if _own_forward(m, nn.Sequential, "forward"):
            for child in m:
                x = self.module(child, x)
            return x
        return None

    def _lower_layer(self, m: nn.Module, x: int) -> int:
        """One layer with an incremental rule."""
        if type(m) is nn.Conv2d:
            return self.conv(m, x)
        if type(m) is nn.BatchNorm2d:
            return self.batch_norm(m, x)
        if type(m) in _POINTWISE:
            if type(m) is nn.ReLU:
                step = self.last_step_makes(x, (Conv, Add))
                if step is not None:
                    assert isinstance(step.op, (Conv, Add))  # the kind asked for
                    step.op.relu = True
                    return x
            return self.add(Pointwise(_POINTWISE[type(m)](m), type(m).__name__), x)
        if type(m) in _PASS_THROUGH:
            return x
        if type(m) is nn.MaxPool2d:
            if m.ceil_mode or m.return_indices:
                raise UnsupportedModel("MaxPool2d with ceil_mode or return_indices")
            return self.add(
                MaxPool(_pair(m.kernel_size), _pair(m.stride or m.kernel_size),
                        _pair(m.padding), _pair(m.dilation)),
                x,
            )
        if type(m) is nn.AdaptiveAvgPool2d and _pair(m.output_size) == (1, 1):
            return self.add(GlobalAvgPool(), x)
        if type(m) is nn.Flatten:
            start, end = m.start_dim, m.end_dim
            return self.add(Dense(lambda t: t.flatten(start, end), "flatten"), x)
        if type(m) is nn.Linear:
            if m.bias is None:
                return self.add(Dense(F.linear, "linear", (m.weight.detach(),)), x)
            return self.add(Dense(F.linear, "linear", (m.weight.detach(), m.bias.detach())), x)
        raise UnsupportedModel(f"no incremental rule for {type(m).__name__}")

    def conv(self, m: nn.Conv2d, x: int) -> int:
        if m.padding_mode != "zeros" or isinstance(m.padding, str) and m.padding != "valid":
            raise UnsupportedModel(f"Conv2d with padding={m.padding!r}, mode {m.padding_mode}")
        padding = (0, 0) if isinstance(m.padding, str) else _pair(m.padding)
        bias = None if m.bias is None else m.bias.detach()
        return self.add(
            Conv(m.weight.detach(), bias, _pair(m.stride), padding, _pair(m.dilation), m.groups),
            x,
        )

    def batch_norm(self, m: nn.BatchNorm2d, x: int) -> int:
        if m.training or m.running_mean is None or m.running_var is None:
            raise UnsupportedModel("BatchNorm2d that uses batch statistics")
        scale = (m.running_var.double() + m.eps).rsqrt()
        if m.weight is not None:
            scale = scale * m.weight.detach().double()
        shift = -m.running_mean.double() * scale
        if m.bias is not None:
            shift = shift + m.bias.detach().double()
        step = self.last_step_makes(x, Conv)
        if step is not None and isinstance(step.op, Conv) and not step.op.relu:
            conv = step.op
            dtype = conv.weight.dtype
            bias = shift if conv.bias is None else conv.bias.double() * scale + shift
            conv.weight = (conv.weight.double() * scale[:, None, None, None]).to(dtype)
            conv.bias = bias.to(dtype)
            return x
        dtype = m.running_mean.dtype
        scale, shift = scale.to(dtype)[None, :, None, None], shift.to(dtype)[None, :, None, None]
        return self.add(Pointwise(lambda t, a, b: torch.addcmul(b, t, a), "batchnorm",
                                  (scale, shift)), x)

    def residual_block(self, m: tv_resnet.BasicBlock | tv_resnet.Bottleneck, x: int) -> int:
        bottleneck = isinstance(m, tv_resnet.Bottleneck)
        base = tv_resnet.Bottleneck if bottleneck else tv_resnet.BasicBlock
        if not _own_forward(m, base, "forward") or type(m.relu) is not nn.ReLU:
            raise UnsupportedModel(f"{type(m).__name__} with its own forward")
        self.shared.add(x)  # read by the main branch and the shortcut
        out = self.module(m.relu, self.module(m.bn1, self.module(m.conv1, x)))
        out = self.module(m.bn2, self.module(m.conv2, out))
        if bottleneck:
            out = self.module(m.bn3, self.module(m.conv3, self.module(m.relu, out)))
        identity = x if m.downsample is None else self.module(m.downsample, x)
        return self.add(Add(relu=True), out, identity)


@dataclass
class Lowered:
    """A lowered network: ``steps`` compute tensor ``i + 1`` from earlier tensors; tensor 0
    is the input image, the last one the output."""

    steps: list[Step]
    outputs: dict[int, tuple[nn.Module, int]]

    def tensor_of(self, module: nn.Module) -> int | None:
        """The tensor holding ``module``'s output, or None (never computed on its own, e.g.
        a conv whose BatchNorm was folded into it)."""
        entry = self.outputs.get(id(module))
        return entry[1] if entry is not None and entry[0] is module else None

    def run(self, x: Tensor, start: int = 0, stop: int | None = None,
            tensors: list[Tensor] | None = None) -> list[Tensor]:
        """Tensors ``0..stop`` (default: all) for input ``x`` ``[B, 3, H, W]``. With ``start``
        and ``tensors`` (tensors ``0..start`` already computed), only the steps writing
        tensors ``start + 1..stop`` run."""
        tensors = [x] if tensors is None else list(tensors[: start + 1])
        for step in self.steps[start:stop]:
            tensors.append(_run_whole(step.op, [tensors[i] for i in step.inputs]))
        return tensors


def model_state(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is replaced or modified in place, a submodule
    is swapped, or a hook is added or removed: when a lowering must be redone."""
    tensors = tuple((t.data_ptr(), t._version)
                    for t in itertools.chain(model.parameters(), model.buffers()))
    modules = tuple((type(m), len(m._forward_hooks), len(m._forward_pre_hooks))
                    for m in model.modules())
    return tensors, modules


class LoweringCache:
    """The last lowering of one model, redone when :func:`model_state` changes."""

    def __init__(self) -> None:
        self._state: tuple | None = None
        self._model: nn.Module | None = None
        self._result: Lowered | UnsupportedModel | None = None

    def get(self, model: nn.Module) -> Lowered:
        """The lowered model; raises :class:`UnsupportedModel` like :func:`lower`."""
        state = model_state(model)
        result = self._result
        if result is None or self._model is not model or self._state != state:
            try:
                result = lower(model)
            except UnsupportedModel as error:
                result = error
            self._model, self._state, self._result = model, state, result
        if isinstance(result, UnsupportedModel):
            raise result
        return result


def lower(model: nn.Module) -> Lowered:
    """The steps computing ``model`` (in eval mode) on tensor 0, the input image; the last
    step's tensor is the output. Raises :class:`UnsupportedModel` naming the first module
    it does not understand. Weights are read as they are now (BatchNorm folded, conv weights
    channels-last), so lower again after the model changes."""
    if torch.nn.modules.module._global_forward_hooks or (
        torch.nn.modules.module._global_forward_pre_hooks
    ):
        raise UnsupportedModel("global module hooks are registered")
    lowering = _Lowering()
    with torch.no_grad():
        lowering.module(model, 0)
    steps = lowering.steps
    if not steps:
        raise UnsupportedModel("the model is the identity")
    for step in steps:
        if isinstance(step.op, Conv):
            step.op.weight = step.op.weight.contiguous(memory_format=torch.channels_last)
    return Lowered(steps, lowering.outputs)


# --------------------------------------------------------------------------------------------
# Geometry: which block of each tensor every window changes.

def _run_whole(op: Op, inputs: list[Tensor]) -> Tensor:
    """One step on whole tensors (the unoccluded pass, and layers past the full switch)."""
    if isinstance(op, LOCAL_OPS):
        return op(inputs[0])
    if isinstance(op, Add):
        out = inputs[0] + inputs[1]
        return out.relu_() if op.relu else out
    if isinstance(op, GlobalAvgPool):
        return inputs[0].mean(dim=(2, 3), keepdim=True)
    return op(inputs[0])
