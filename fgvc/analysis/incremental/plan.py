"""Where each window changes each layer's map, and the batched blocks that recompute it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fgvc.analysis.incremental.lowering import LOCAL_OPS, Add, Conv, Dense, GlobalAvgPool, Pair, Step, UnsupportedModel

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
               full: bool = False) -> MapGeometry:
        block_h = int((region[:, 1] - region[:, 0]).max())
        block_w = int((region[:, 3] - region[:, 2]).max())
        full = full or block_h * block_w >= full_fraction * height * width
        if full:
            block_h, block_w = height, width
        top = torch.minimum(region[:, 0], torch.tensor(height - block_h))
        left = torch.minimum(region[:, 2], torch.tensor(width - block_w))
        return cls(height, width, region, (block_h, block_w), torch.stack([top, left], 1), full)

    def same_blocks(self, other: MapGeometry) -> bool:
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

    geometry: list[MapGeometry | None]  # None: a whole per-sample tensor (after pooling)
    gathers: dict[tuple[int, int], Gather]  # (step, input position) -> how it is read
    input_block_index: Tensor  # [P, h * w] flat pixel offsets of the input block
    input_in_window: Tensor  # [P, h * w] bool: pixel lies under the window
    block_rows: dict[int, Tensor]  # tensor -> [P, h * w] flat pixel offsets of its block
    macs_full: int = 0  # conv multiply-accumulates of one whole forward
    macs_incremental: int = 0  # ... of one occluded copy, computed incrementally
    last_reader: dict[int, list[int]] = field(default_factory=dict)  # step -> tensors it frees

    def map_of(self, node: int) -> MapGeometry:
        """The geometry of tensor ``node``, which is a map (it comes before the global pool)."""
        geometry = self.geometry[node]
        if geometry is None:
            raise UnsupportedModel(f"tensor {node} is one vector per image, not a map")
        return geometry


def _truncate(lo: Tensor, hi: Tensor, size: int, limit: float | None) -> tuple[Tensor, Tensor]:
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
              full_fraction: float, field_limit: float | None = None) -> Plan:
    """``boxes`` ``[P, 4]`` (top, bottom, left, right; half-open) are the occluded windows."""
    boxes = boxes.long().cpu()
    # The input block never counts as full: the first layers are where incrementality pays most.
    first = MapGeometry.around(height, width, boxes, full_fraction=2.0)
    geometry: list[MapGeometry | None] = [first]
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
            a, b = inputs
            if a is None and b is None:
                target = None
            elif a is None or b is None:
                raise UnsupportedModel("a residual sum of a map and a vector")
            else:
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
                for position, summand in enumerate((a, b)):
                    if not summand.same_blocks(target):
                        gathers[index, position] = _gather_plan(
                            summand, target, (1, 1), (1, 1), (0, 0), (1, 1), 0.0)
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
