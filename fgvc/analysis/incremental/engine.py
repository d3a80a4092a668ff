"""The incremental occlusion engine: kept activations and the changed blocks of each copy."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fgvc.analysis.incremental.lowering import LOCAL_OPS, Conv, GlobalAvgPool, Lowered, Pair, _run_whole, lower
from fgvc.analysis.incremental.plan import Gather, MapGeometry, Plan, make_plan
from fgvc.analysis.incremental.windows import window_masks

# --------------------------------------------------------------------------------------------



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
                 field_limit: float | None = None,
                 low_precision: torch.dtype | None = None,
                 lowered: Lowered | None = None) -> None:
        self.steps = (lowered or lower(model)).steps
        self.full_fraction = full_fraction
        self.field_limit = field_limit
        self.low_precision = low_precision
        self.low_weights: dict[int, Tensor] = {}
        if low_precision is not None:
            for index, step in enumerate(self.steps):
                if isinstance(step.op, Conv):
                    self.low_weights[index] = step.op.weight.to(low_precision)
        self.plan: Plan | None = None

    def _planned(self) -> Plan:
        if self.plan is None:
            raise RuntimeError("IncrementalOcclusion.prepare() must plan the windows first")
        return self.plan

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
        plan = self._planned()
        n = len(window_index)
        height, width = kept.images.shape[-2:]
        first = plan.map_of(0)
        pixel = plan.input_block_index[window_index] + image_index[:, None] * (height * width)
        image_rows = _nhwc_rows(kept.images).index_select(0, pixel.reshape(-1))
        base_rows = _nhwc_rows(kept.baseline).index_select(0, pixel.reshape(-1))
        covered = plan.input_in_window[window_index].reshape(-1, 1)
        x = torch.where(covered, base_rows, image_rows)
        # Block of tensor i (the changed block of each pair), dropped after its last reader.
        blocks = {0: x.reshape(n, *first.block, -1).permute(0, 3, 1, 2)}
        for index, step in enumerate(self.steps):
            op = step.op
            if index in self.low_weights:
                blocks[index + 1] = self._conv_change(kept, index, blocks[step.inputs[0]], image_index,
                                                      window_index)
                for node in plan.last_reader.get(index, ()):
                    del blocks[node]
                continue
            inputs = []
            for position, node in enumerate(step.inputs):
                gather = plan.gathers.get((index, position))
                if gather is None:
                    inputs.append(blocks[node])
                else:
                    inputs.append(self._gather(kept, node, blocks[node], gather, image_index,
                                               window_index))
            if isinstance(op, LOCAL_OPS):
                out = op(inputs[0], padded=plan.map_of(step.inputs[0]).full)
            elif isinstance(op, GlobalAvgPool) and not (source := plan.map_of(step.inputs[0])).full:
                out = self._pooled(kept, step.inputs[0], inputs[0], source, image_index, window_index)
            else:
                out = _run_whole(op, inputs)
            blocks[index + 1] = out
            for node in plan.last_reader.get(index, ()):
                del blocks[node]  # free blocks no later step reads
        return blocks[len(self.steps)].gather(1, targets[:, None])[:, 0]

    def _conv_change(self, kept: KeptActivations, index: int, block: Tensor,
                     image_index: Tensor, window_index: Tensor) -> Tensor:
        """A conv block as the kept output plus the conv of the input's change, the latter in
        low precision: its rounding error scales with the change, not with the activation."""
        plan, step = self._planned(), self.steps[index]
        op, node = step.op, step.inputs[0]
        assert isinstance(op, Conv)  # only convs have low-precision weights
        source, target = plan.map_of(node), plan.map_of(index + 1)
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
        rows = self._planned().block_rows[node][window_index] + image_index[:, None] * (
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
                  full_fraction: float = 0.7, field_limit: float | None = None
                  ) -> dict[str, float]:
    """Conv multiply-accumulates of one whole forward and of one incrementally computed
    occluded copy (averaged over windows is not needed: every window computes the same
    block sizes), and their ratio: the most incrementality can gain."""
    from fgvc.analysis.common import eval_mode

    with eval_mode(model):
        steps = lower(model).steps
    boxes = window_boxes(window_masks(height, width, window, stride))
    plan = make_plan(steps, height, width, boxes, full_fraction, field_limit)
    return {
        "macs_full": float(plan.macs_full),
        "macs_incremental": float(plan.macs_incremental),
        "gain": plan.macs_full / max(plan.macs_incremental, 1),
    }
