"""Exact incremental inference for occlusion (Krypton: Nakandala, Kumar and Papakonstantinou,
"Incremental and Approximate Inference for Faster Occlusion-based Deep CNN Explanations",
SIGMOD 2019).

An occluding window changes only a small block of the input. Through a conv or pool layer
with kernel ``k``, stride ``s`` and padding ``p`` the block of changed outputs is the set of
outputs whose receptive field meets the changed inputs: it grows by about ``k - 1`` and
shrinks by ``s`` at each layer, clipped to the map. So the unoccluded images are run once,
every intermediate activation is kept, and each occluded copy recomputes only its changed
block of each layer: the layer's input block, with its halo, is read from the kept
activation with the previous layer's recomputed block pasted in. Once a layer's changed
block covers (nearly) its whole map, the layer and everything after it run on whole maps.

The network is first lowered to a short list of steps on numbered tensors
(:func:`lower`): convolutions with eval-mode BatchNorm folded in and ReLU fused, max
pools, per-pixel affine maps and activations, residual sums, a global average pool and
the vector layers after it. Lowering knows ``nn.Sequential``, ``Conv2d``, ``BatchNorm2d``
(eval), ``ReLU`` and a few other pointwise activations, ``MaxPool2d``, ``AdaptiveAvgPool2d(1)``,
``Flatten``, ``Linear``, ``Dropout``, ``Identity``, torchvision ``ResNet`` / ``BasicBlock`` /
``Bottleneck``, FashionNet and the :class:`~fgvc.models.FGVCNet` wrapper; any other module
(or one with hooks, or an overridden ``forward``) raises :class:`UnsupportedModel`, and the
caller falls back to evaluating every occluded copy in full.

Block computations are batched: one conv call computes the same-sized block of many
(image, window) pairs. Every pair's block has the size of the largest one at that layer
(shifted inwards at the borders), so the values computed outside a pair's own changed
region are recomputed copies of the kept activation: the result is exact up to float
rounding (folded BatchNorm and a different summation order, ~1e-6 relative).

Two approximations are available for approximate occlusion: Krypton's projective-field
threshold (``field_limit``: a changed region is cut to that fraction of the map side, the
rest taken as unchanged), and ``low_precision``: each conv block is computed as the kept
output plus the conv of the input's change in bfloat16, so the rounding error scales with
the change rather than with the activation.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
import torchvision.models.resnet as tv_resnet
from torch import Tensor, nn

from fgvc.models.factory import FGVCNet
from fgvc.models.fashionnet import FashionNet

__all__ = [
    "IncrementalOcclusion",
    "Lowered",
    "LoweringCache",
    "UnsupportedModel",
    "flop_estimate",
    "lower",
    "model_state",
    "window_boxes",
]

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
    bias: Optional[Tensor]
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


Op = Union[Conv, MaxPool, Pointwise, Add, GlobalAvgPool, Dense]
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


def _own_forward(module: nn.Module, base: type, *names: str) -> bool:
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

    def last_step_makes(self, node: int, kind: type) -> Optional[Step]:
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
        if type(m) is nn.Conv2d:
            return self.conv(m, x)
        if type(m) is nn.BatchNorm2d:
            return self.batch_norm(m, x)
        if type(m) in _POINTWISE:
            if type(m) is nn.ReLU:
                step = self.last_step_makes(x, (Conv, Add))
                if step is not None:
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
        if m.training or m.running_mean is None:
            raise UnsupportedModel("BatchNorm2d that uses batch statistics")
        scale = (m.running_var.double() + m.eps).rsqrt()
        if m.weight is not None:
            scale = scale * m.weight.detach().double()
        shift = -m.running_mean.double() * scale
        if m.bias is not None:
            shift = shift + m.bias.detach().double()
        step = self.last_step_makes(x, Conv)
        if step is not None and not step.op.relu:
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

    def residual_block(self, m: nn.Module, x: int) -> int:
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

    def tensor_of(self, module: nn.Module) -> Optional[int]:
        """The tensor holding ``module``'s output, or None (never computed on its own, e.g.
        a conv whose BatchNorm was folded into it)."""
        entry = self.outputs.get(id(module))
        return entry[1] if entry is not None and entry[0] is module else None

    def run(self, x: Tensor, start: int = 0, stop: Optional[int] = None,
            tensors: Optional[list[Tensor]] = None) -> list[Tensor]:
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
        self._state: Optional[tuple] = None
        self._model: Optional[nn.Module] = None
        self._result: Union[Lowered, UnsupportedModel, None] = None

    def get(self, model: nn.Module) -> Lowered:
        """The lowered model; raises :class:`UnsupportedModel` like :func:`lower`."""
        state = model_state(model)
        if self._model is not model or self._state != state:
            try:
                self._result = lower(model)
            except UnsupportedModel as error:
                self._result = error
            self._model, self._state = model, state
        if isinstance(self._result, UnsupportedModel):
            raise self._result
        return self._result


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
# --------------------------------------------------------------------------------------------


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _project(lo: Tensor, hi: Tensor, size_out: int, kernel: int, stride: int, padding: int,
             dilation: int) -> tuple[Tensor, Tensor]:
    """Outputs ``[lo', hi')`` whose receptive field meets inputs ``[lo, hi)`` (per window).
    A window no output sees (a stride larger than the kernel) keeps one output: computing
    more than the changed region never changes the result."""
    reach = (kernel - 1) * dilation
    out_lo = torch.div(lo + padding - reach + stride - 1, stride, rounding_mode="floor")
    out_hi = torch.div(hi - 1 + padding, stride, rounding_mode="floor") + 1
    out_lo = out_lo.clamp(0, size_out - 1)
    out_hi = torch.maximum(out_hi.clamp(max=size_out), out_lo + 1)
    return out_lo, out_hi


@dataclass
class MapGeometry:
    """Where each window's changed block of one ``[C, height, width]`` tensor lies.

    ``region`` ``[P, 4]`` (top, bottom, left, right; half-open) is the exact changed
    region; ``block`` ``(h, w)`` is the one block size computed for every window, placed at
    ``start`` ``[P, 2]`` (top, left) so that it holds the region and lies inside the map.
    ``full``: the block is the whole map."""

    height: int
    width: int
    region: Tensor
    block: Pair
    start: Tensor
    full: bool

    @classmethod
    def around(cls, height: int, width: int, region: Tensor, full_fraction: float,
               full: bool = False) -> "MapGeometry":
        block_h = int((region[:, 1] - region[:, 0]).max())
        block_w = int((region[:, 3] - region[:, 2]).max())
        full = full or block_h * block_w >= full_fraction * height * width
        if full:
            block_h, block_w = height, width
        top = torch.minimum(region[:, 0], torch.tensor(height - block_h))
        left = torch.minimum(region[:, 2], torch.tensor(width - block_w))
        return cls(height, width, region, (block_h, block_w), torch.stack([top, left], 1), full)

    def same_blocks(self, other: "MapGeometry") -> bool:
        return self.block == other.block and torch.equal(self.start, other.start)


@dataclass
class Gather:
    """For every window, where each pixel of a step's input window comes from: the kept
    activation (padded by ``padding`` with ``pad_value``) or the input tensor's block.

    ``cache_index`` ``[P, h * w]``: flat offset into one padded ``[H + 2ph, W + 2pw]`` map;
    ``block_index`` ``[P, h * w]``: flat offset into the block, or -1 (read the kept map)."""

    size: Pair
    padding: Pair
    pad_value: float
    padded_pixels: int
    cache_index: Tensor
    block_index: Tensor


def _gather_plan(source: MapGeometry, target: MapGeometry, kernel: Pair, stride: Pair,
                 padding: Pair, dilation: Pair, pad_value: float) -> Gather:
    """Input windows (with halo) of ``target``'s blocks, read from ``source``."""
    size_h = (target.block[0] - 1) * stride[0] + (kernel[0] - 1) * dilation[0] + 1
    size_w = (target.block[1] - 1) * stride[1] + (kernel[1] - 1) * dilation[1] + 1
    padded_w = source.width + 2 * padding[1]
    rows = target.start[:, 0:1] * stride[0] + torch.arange(size_h)  # [P, h] padded coords
    cols = target.start[:, 1:2] * stride[1] + torch.arange(size_w)  # [P, w]
    cache_index = (rows[:, :, None] * padded_w + cols[:, None, :]).flatten(1)
    y = rows - padding[0] - source.start[:, 0:1]  # position inside the source block
    x = cols - padding[1] - source.start[:, 1:2]
    inside = ((y >= 0) & (y < source.block[0]))[:, :, None] & (
        (x >= 0) & (x < source.block[1]))[:, None, :]
    block_index = torch.where(inside, y[:, :, None] * source.block[1] + x[:, None, :], -1)
    padded_pixels = (source.height + 2 * padding[0]) * padded_w
    return Gather((size_h, size_w), padding, pad_value, padded_pixels, cache_index,
                  block_index.flatten(1))


@dataclass
class Plan:
    """Geometry of every tensor and how each step reads its inputs, for one image size and
    one set of windows."""

    geometry: list[Optional[MapGeometry]]  # None: a whole per-sample tensor (after pooling)
    gathers: dict[tuple[int, int], Gather]  # (step, input position) -> how it is read
    input_block_index: Tensor  # [P, h * w] flat pixel offsets of the input block
    input_in_window: Tensor  # [P, h * w] bool: pixel lies under the window
    block_rows: dict[int, Tensor]  # tensor -> [P, h * w] flat pixel offsets of its block
    macs_full: int = 0  # conv multiply-accumulates of one whole forward
    macs_incremental: int = 0  # ... of one occluded copy, computed incrementally
    last_reader: dict[int, list[int]] = field(default_factory=dict)  # step -> tensors it frees


def _truncate(lo: Tensor, hi: Tensor, size: int, limit: Optional[float]) -> tuple[Tensor, Tensor]:
    """Krypton's projective-field threshold: a changed region longer than ``limit`` of the
    map side is cut to that length around its centre (``None``: exact, no cut)."""
    if limit is None:
        return lo, hi
    most = max(1, math.ceil(limit * size))
    length = hi - lo
    kept = length.clamp(max=most)
    lo = lo + torch.div(length - kept, 2, rounding_mode="floor")
    return lo, lo + kept


def make_plan(steps: Sequence[Step], height: int, width: int, boxes: Tensor,
              full_fraction: float, field_limit: Optional[float] = None) -> Plan:
    """``boxes`` ``[P, 4]`` (top, bottom, left, right; half-open) are the occluded windows."""
    boxes = boxes.long().cpu()
    geometry: list[Optional[MapGeometry]] = [
        MapGeometry.around(height, width, boxes, full_fraction=2.0)  # the input block never
    ]  # counts as full: the first layers are where incrementality pays most
    gathers: dict[tuple[int, int], Gather] = {}
    block_rows: dict[int, Tensor] = {}
    macs_full = macs_incremental = 0
    for index, step in enumerate(steps):
        op, inputs = step.op, [geometry[i] for i in step.inputs]
        source = inputs[0]
        if isinstance(op, LOCAL_OPS):
            if source is None:
                raise UnsupportedModel(f"a {type(op).__name__} after the global pool")
            kernel, stride, padding, dilation = (
                op.kernel, op.stride, op.padding, op.dilation
            )
            out_h = _output_size(source.height, kernel[0], stride[0], padding[0], dilation[0])
            out_w = _output_size(source.width, kernel[1], stride[1], padding[1], dilation[1])
            if out_h < 1 or out_w < 1:
                raise UnsupportedModel("a layer's output is empty at this image size")
            top, bottom = _project(source.region[:, 0], source.region[:, 1], out_h, kernel[0],
                                   stride[0], padding[0], dilation[0])
            left, right = _project(source.region[:, 2], source.region[:, 3], out_w, kernel[1],
                                   stride[1], padding[1], dilation[1])
            top, bottom = _truncate(top, bottom, out_h, field_limit)
            left, right = _truncate(left, right, out_w, field_limit)
            target = MapGeometry.around(out_h, out_w, torch.stack([top, bottom, left, right], 1),
                                        full_fraction, full=source.full)
            if not source.full:
                gathers[index, 0] = _gather_plan(source, target, kernel, stride, padding,
                                                 dilation, op.pad_value)
            if isinstance(op, Conv):
                macs_full += out_h * out_w * op.macs_per_output()
                macs_incremental += target.block[0] * target.block[1] * op.macs_per_output()
        elif isinstance(op, Add):
            if all(g is None for g in inputs):
                target = None
            elif any(g is None for g in inputs):
                raise UnsupportedModel("a residual sum of a map and a vector")
            else:
                a, b = inputs
                if (a.height, a.width) != (b.height, b.width):
                    raise UnsupportedModel("a residual sum of maps of different sizes")
                region = torch.stack([
                    torch.minimum(a.region[:, 0], b.region[:, 0]),
                    torch.maximum(a.region[:, 1], b.region[:, 1]),
                    torch.minimum(a.region[:, 2], b.region[:, 2]),
                    torch.maximum(a.region[:, 3], b.region[:, 3]),
                ], 1)
                target = MapGeometry.around(a.height, a.width, region, full_fraction,
                                            full=a.full or b.full)
                for position, g in enumerate(inputs):
                    if not g.same_blocks(target):
                        gathers[index, position] = _gather_plan(
                            g, target, (1, 1), (1, 1), (0, 0), (1, 1), 0.0)
        elif isinstance(op, GlobalAvgPool):
            if source is None:
                raise UnsupportedModel("a global pool after the global pool")
            target = None
        elif isinstance(op, Dense):  # needs the whole per-sample tensor
            target = None
            if source is not None and not source.full:
                whole = MapGeometry.around(source.height, source.width, source.region, 0.0,
                                           full=True)
                gathers[index, 0] = _gather_plan(source, whole, (1, 1), (1, 1), (0, 0),
                                                 (1, 1), 0.0)
        else:  # Pointwise
            target = source
        geometry.append(target)
    if geometry[-1] is not None:
        raise UnsupportedModel("the model's output is a map, not one vector per image")
    for node, g in enumerate(geometry):
        if g is not None and not g.full:
            rows = g.start[:, 0:1] + torch.arange(g.block[0])
            cols = g.start[:, 1:2] + torch.arange(g.block[1])
            block_rows[node] = (rows[:, :, None] * g.width + cols[:, None, :]).flatten(1)
    first = geometry[0]
    rows = first.start[:, 0:1] + torch.arange(first.block[0])
    cols = first.start[:, 1:2] + torch.arange(first.block[1])
    input_block_index = (rows[:, :, None] * width + cols[:, None, :]).flatten(1)
    in_window = ((rows >= boxes[:, 0:1]) & (rows < boxes[:, 1:2]))[:, :, None] & (
        (cols >= boxes[:, 2:3]) & (cols < boxes[:, 3:4]))[:, None, :]
    last_read = {node: index for index, step in enumerate(steps) for node in step.inputs}
    last_reader: dict[int, list[int]] = {}
    for node, index in last_read.items():
        last_reader.setdefault(index, []).append(node)
    return Plan(geometry, gathers, input_block_index, in_window.flatten(1), block_rows,
                macs_full, macs_incremental, last_reader)


# --------------------------------------------------------------------------------------------
# Execution.
# --------------------------------------------------------------------------------------------


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


def _nhwc_rows(x: Tensor) -> Tensor:
    """``[N, C, H, W]`` -> ``[N * H * W, C]`` (a view for channels-last tensors)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


@dataclass
class KeptActivations:
    """The unoccluded pass over a group of images: every tensor, and padded channels-last
    copies (``[N * Hp * Wp, C]`` rows) made on first use by a gather. ``before_relu``:
    the pre-activation of convs with a fused ReLU, by tensor (only for ``low_precision``)."""

    images: Tensor
    baseline: Tensor
    tensors: list[Tensor]
    before_relu: dict[int, Tensor] = field(default_factory=dict)
    padded: dict[tuple, Tensor] = field(default_factory=dict)
    sums: dict[int, Tensor] = field(default_factory=dict)  # summed-area tables, float64

    @property
    def logits(self) -> Tensor:
        return self.tensors[-1]

    def linear_part(self, node: int) -> Tensor:
        """Tensor ``node`` before its fused ReLU (the tensor itself when it has none)."""
        return self.before_relu.get(node, self.tensors[node])

    def padded_rows(self, node: int, padding: Pair, value: float, linear: bool = False
                    ) -> Tensor:
        key = (node, padding, value, linear)
        if key not in self.padded:
            x = self.linear_part(node) if linear else self.tensors[node]
            n, c, h, w = x.shape
            padded = x.new_full((n, h + 2 * padding[0], w + 2 * padding[1], c), value)
            padded[:, padding[0] : padding[0] + h, padding[1] : padding[1] + w] = x.permute(
                0, 2, 3, 1)
            self.padded[key] = padded.reshape(-1, c)
        return self.padded[key]

    def summed_area(self, node: int) -> Tensor:
        """``[N, C, H + 1, W + 1]`` float64 inclusive prefix sums, zero first row/column."""
        if node not in self.sums:
            x = self.tensors[node].double()
            self.sums[node] = F.pad(x.cumsum(2).cumsum(3), (1, 0, 1, 0))
        return self.sums[node]


def _per_pair(x: Tensor, image_index: Tensor) -> Tensor:
    """``x[image_index]`` for ``[N, C, H, W]``, channels-last like the blocks."""
    return x.permute(0, 2, 3, 1)[image_index].permute(0, 3, 1, 2)


class IncrementalOcclusion:
    """Target-class scores of occluded copies, computed incrementally.

    Args:
        model: a module :func:`lower` understands (raises :class:`UnsupportedModel` otherwise).
        full_fraction: a layer whose changed block covers at least this share of its map is
            computed whole (and so is every layer after it).
        field_limit: approximate: Krypton's projective-field threshold (``None``: exact).
        low_precision: approximate: the dtype of the convs of the changes (``None``: exact).

    ``prepare(images, boxes)`` fixes the image size and the windows; ``keep(images,
    baseline)`` runs the unoccluded pass over a group of images; ``scores(kept, image_index,
    window_index, targets)`` gives the target logit of each (image, window) pair's occluded
    copy, the window's pixels replaced by the baseline's.
    """

    def __init__(self, model: nn.Module, full_fraction: float = 0.7,
                 field_limit: Optional[float] = None,
                 low_precision: Optional[torch.dtype] = None,
                 lowered: Optional[Lowered] = None) -> None:
        self.steps = (lowered or lower(model)).steps
        self.full_fraction = full_fraction
        self.field_limit = field_limit
        self.low_precision = low_precision
        self.low_weights: dict[int, Tensor] = {}
        if low_precision is not None:
            for index, step in enumerate(self.steps):
                if isinstance(step.op, Conv):
                    self.low_weights[index] = step.op.weight.to(low_precision)
        self.plan: Optional[Plan] = None

    def prepare(self, height: int, width: int, boxes: Tensor, device: torch.device) -> Plan:
        """Plan the blocks for ``height x width`` images and windows ``boxes``."""
        plan = make_plan(self.steps, height, width, boxes, self.full_fraction, self.field_limit)
        plan.input_block_index = plan.input_block_index.to(device)
        plan.input_in_window = plan.input_in_window.to(device)
        for gather in plan.gathers.values():
            gather.cache_index = gather.cache_index.to(device)
            gather.block_index = gather.block_index.to(device)
        plan.block_rows = {k: v.to(device) for k, v in plan.block_rows.items()}
        self.plan = plan
        return plan

    def keep(self, images: Tensor, baseline: Tensor) -> KeptActivations:
        x = images.contiguous(memory_format=torch.channels_last)
        kept = KeptActivations(x, baseline.contiguous(memory_format=torch.channels_last), [x])
        for index, step in enumerate(self.steps):
            inputs = [kept.tensors[i] for i in step.inputs]
            op = step.op
            if self.low_precision is not None and isinstance(op, Conv) and op.relu:
                linear = F.conv2d(inputs[0], op.weight, op.bias, op.stride, op.padding,
                                  op.dilation, op.groups)
                kept.before_relu[index + 1] = linear
                kept.tensors.append(torch.relu(linear))
            else:
                kept.tensors.append(_run_whole(op, inputs))
        return kept

    def _gather(self, kept: KeptActivations, node: int, block: Tensor, gather: Gather,
                image_index: Tensor, window_index: Tensor) -> Tensor:
        """``[n, C, h, w]`` input windows: kept map of ``node`` with ``block`` pasted in."""
        table = kept.padded_rows(node, gather.padding, gather.pad_value)
        channels = block.shape[1]
        block_pixels = block.shape[2] * block.shape[3]
        source = torch.cat([table, _nhwc_rows(block)])
        within = gather.block_index[window_index]
        pair = torch.arange(len(window_index), device=within.device)[:, None]
        index = torch.where(
            within >= 0,
            within + (table.shape[0] + pair * block_pixels),
            gather.cache_index[window_index] + image_index[:, None] * gather.padded_pixels,
        )
        rows = source.index_select(0, index.reshape(-1))
        return rows.reshape(len(window_index), *gather.size, channels).permute(0, 3, 1, 2)

    def scores(self, kept: KeptActivations, image_index: Tensor, window_index: Tensor,
               targets: Tensor) -> Tensor:
        """``[n]`` target logits of the occluded copies of pairs ``(image_index[i],
        window_index[i])``; ``image_index`` counts within ``kept``, ``targets`` ``[n]``."""
        plan = self.plan
        n = len(window_index)
        height, width = kept.images.shape[-2:]
        first = plan.geometry[0]
        pixel = plan.input_block_index[window_index] + image_index[:, None] * (height * width)
        image_rows = _nhwc_rows(kept.images).index_select(0, pixel.reshape(-1))
        base_rows = _nhwc_rows(kept.baseline).index_select(0, pixel.reshape(-1))
        covered = plan.input_in_window[window_index].reshape(-1, 1)
        x = torch.where(covered, base_rows, image_rows)
        blocks = [x.reshape(n, *first.block, -1).permute(0, 3, 1, 2)]
        for index, step in enumerate(self.steps):
            op = step.op
            if index in self.low_weights:
                blocks.append(self._conv_change(kept, index, blocks[step.inputs[0]],
                                                image_index, window_index))
                for node in plan.last_reader.get(index, ()):
                    blocks[node] = None
                continue
            inputs = []
            for position, node in enumerate(step.inputs):
                gather = plan.gathers.get((index, position))
                if gather is None:
                    inputs.append(blocks[node])
                else:
                    inputs.append(self._gather(kept, node, blocks[node], gather, image_index,
                                               window_index))
            source = plan.geometry[step.inputs[0]]
            if isinstance(op, LOCAL_OPS):
                out = op(inputs[0], padded=source.full)
            elif isinstance(op, GlobalAvgPool) and not source.full:
                out = self._pooled(kept, step.inputs[0], inputs[0], source, image_index,
                                   window_index)
            else:
                out = _run_whole(op, inputs)
            blocks.append(out)
            for node in plan.last_reader.get(index, ()):
                blocks[node] = None  # free blocks no later step reads
        return blocks[-1].gather(1, targets[:, None])[:, 0]

    def _conv_change(self, kept: KeptActivations, index: int, block: Tensor,
                     image_index: Tensor, window_index: Tensor) -> Tensor:
        """A conv block as the kept output plus the conv of the input's change, the latter in
        low precision: its rounding error scales with the change, not with the activation."""
        plan, step = self.plan, self.steps[index]
        op, node = step.op, step.inputs[0]
        source, target = plan.geometry[node], plan.geometry[index + 1]
        n = len(window_index)
        change = torch.empty(block.shape, dtype=self.low_precision, device=block.device,
                             memory_format=torch.channels_last)
        torch.sub(block, self._kept_block(kept, node, source, image_index, window_index),
                  out=change)
        gather = plan.gathers.get((index, 0))
        padding = op.padding
        if gather is not None:  # the input window: the change inside the block, else 0
            rows = torch.cat([change.new_zeros(1, change.shape[1]), _nhwc_rows(change)])
            within = gather.block_index[window_index]
            pair = torch.arange(n, device=within.device)[:, None]
            picked = torch.where(within >= 0, within + (1 + pair * block[0, 0].numel()), 0)
            change = rows.index_select(0, picked.reshape(-1)).reshape(
                n, *gather.size, -1).permute(0, 3, 1, 2)
            padding = (0, 0)
        change = F.conv2d(change, self.low_weights[index], None, op.stride, padding,
                          op.dilation, op.groups)
        out = self._kept_block(kept, index + 1, target, image_index, window_index, linear=True)
        out += change
        return out.relu_() if op.relu else out

    def _kept_block(self, kept: KeptActivations, node: int, geometry: MapGeometry,
                    image_index: Tensor, window_index: Tensor, linear: bool = False) -> Tensor:
        """``[n, C, h, w]`` the kept tensor ``node`` (before its ReLU with ``linear``) at each
        pair's block: a copy the caller may modify."""
        if geometry.full:
            tensor = kept.linear_part(node) if linear else kept.tensors[node]
            return _per_pair(tensor, image_index)
        rows = self.plan.block_rows[node][window_index] + image_index[:, None] * (
            geometry.height * geometry.width)
        table = kept.padded_rows(node, (0, 0), 0.0, linear=linear)
        return table.index_select(0, rows.reshape(-1)).reshape(
            len(window_index), *geometry.block, -1).permute(0, 3, 1, 2)

    def _pooled(self, kept: KeptActivations, node: int, block: Tensor, geometry: MapGeometry,
                image_index: Tensor, window_index: Tensor) -> Tensor:
        """Global mean of the kept map with ``block`` pasted in: the kept mean plus the
        block's difference (the kept block's sum from a summed-area table)."""
        sums = kept.summed_area(node)
        top, left = geometry.start[window_index.cpu()].to(block.device).unbind(1)
        bottom, right = top + geometry.block[0], left + geometry.block[1]
        def corner(row: Tensor, col: Tensor) -> Tensor:  # [n, C]
            return sums[image_index, :, row, col]

        kept_block = corner(bottom, right) - corner(top, right) - corner(bottom, left) + corner(
            top, left)
        total = sums[image_index, :, -1, -1]
        pixels = geometry.height * geometry.width
        mean = (total - kept_block + block.double().sum(dim=(2, 3))) / pixels
        return mean.to(block.dtype)[:, :, None, None]


def window_boxes(masks: Tensor) -> Tensor:
    """``[P, 4]`` (top, bottom, left, right) bounding boxes of ``[P, H, W]`` window masks."""
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    def bounds(line: Tensor) -> tuple[Tensor, Tensor]:
        index = torch.arange(line.shape[1], device=line.device)
        first = torch.where(line, index, line.shape[1]).min(dim=1).values
        last = torch.where(line, index, -1).max(dim=1).values + 1
        return first, last
    top, bottom = bounds(rows)
    left, right = bounds(cols)
    return torch.stack([top, bottom, left, right], 1)


def flop_estimate(model: nn.Module, height: int, width: int, window: int, stride: int,
                  full_fraction: float = 0.7, field_limit: Optional[float] = None
                  ) -> dict[str, float]:
    """Conv multiply-accumulates of one whole forward and of one incrementally computed
    occluded copy (averaged over windows is not needed: every window computes the same
    block sizes), and their ratio: the most incrementality can gain."""
    from fgvc.analysis.common import eval_mode
    from fgvc.analysis.occlusion import window_masks

    with eval_mode(model):
        steps = lower(model).steps
    boxes = window_boxes(window_masks(height, width, window, stride))
    plan = make_plan(steps, height, width, boxes, full_fraction, field_limit)
    return {
        "macs_full": float(plan.macs_full),
        "macs_incremental": float(plan.macs_incremental),
        "gain": plan.macs_full / max(plan.macs_incremental, 1),
    }
