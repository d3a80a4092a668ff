"""Occlusion sensitivity (Zeiler & Fergus, ECCV 2014, arXiv:1311.2901).

A square window slides over the image; the pixels under it are replaced by a baseline and
the drop of the target logit (unoccluded minus occluded) is recorded. A pixel's attribution
is the mean drop over all windows covering it, 0 where no window covers it.

Window placement follows Captum's ``Occlusion``: windows start at ``0, stride, 2*stride, ...``
along each axis, ``ceil((size - window) / stride) + 1`` positions, and the last one is cut
at the image border when it would overflow. With the same window, stride and baseline the
exact maps equal ``captum.attr.Occlusion(model).attribute(x, sliding_window_shapes=(3, w, w),
strides=(3, s, s), baselines=b, target=t)[:, 0]``.

How the occluded copies are evaluated (``engine``):

- ``"incremental"``: :mod:`fgvc.analysis.incremental` runs each image once and recomputes,
  for each window, only the block of each layer the window can change (Krypton, SIGMOD
  2019). Exact; used by ``"auto"`` whenever the model is built from layers it understands.
- ``"batched"``: every occluded copy is evaluated in full, many copies per forward pass.

``mode="approx"`` evaluates fewer windows (coarse-to-fine; see :class:`Occlusion`) and says
so on the result, so a caller can record the map as approximate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from fgvc.analysis.common import (
    AttributionResult,
    TargetsLike,
    check_target_count,
    default_blur_sigma,
    eval_mode,
    gaussian_blur,
    normalize_per_image,
    resolve_targets,
)
from fgvc.analysis.incremental import (
    IncrementalOcclusion,
    KeptActivations,
    LoweringCache,
    UnsupportedModel,
    window_boxes,
)
from fgvc.analysis.incremental.windows import window_masks, window_starts
from fgvc.errors import ConfigError

Fill = Literal["zero", "mean", "blur"]
Mode = Literal["exact", "approx"]
Engine = Literal["auto", "incremental", "batched"]


@dataclass
class OcclusionResult(AttributionResult):
    """:class:`AttributionResult` plus how the map was made.

    Attributes:
        mode: ``"exact"`` (every window evaluated) or ``"approx"``.
        approximation: for ``"approx"``, the approximation and its parameters in words
            (log it with the map); ``None`` for exact maps.
        engine: ``"incremental"`` or ``"batched"``: how occluded copies were evaluated.
        evaluated_fraction: share of (image, window) pairs evaluated exactly (1.0 when exact).
    """

    mode: str = "exact"
    approximation: str | None = None
    engine: str = "batched"
    evaluated_fraction: float = 1.0


class _BatchedScorer:
    """Target logits of occluded copies, each copy evaluated in full."""

    name = "batched"

    def __init__(self, model: nn.Module, masks: Tensor) -> None:
        self.model = model
        self.masks = masks

    def keep(self, images: Tensor, baseline: Tensor, logits: Tensor):
        return images, baseline, logits

    @staticmethod
    def logits(kept) -> Tensor:
        return kept[2]

    def scores(self, kept, image_index: Tensor, window_index: Tensor, targets: Tensor) -> Tensor:
        images, baseline, _ = kept
        occluded = torch.where(
            self.masks[window_index, None], baseline[image_index], images[image_index]
        )
        return self.model(occluded).gather(1, targets[:, None])[:, 0]


class _IncrementalScorer:
    name = "incremental"

    def __init__(self, engine: IncrementalOcclusion) -> None:
        self.engine = engine

    def keep(self, images: Tensor, baseline: Tensor, logits: Tensor) -> KeptActivations:
        return self.engine.keep(images, baseline)

    @staticmethod
    def logits(kept: KeptActivations) -> Tensor:
        return kept.logits

    def scores(self, kept, image_index, window_index, targets) -> Tensor:
        return self.engine.scores(kept, image_index, window_index, targets)


Scorer = _BatchedScorer | _IncrementalScorer


def _cell(known: list[int], size: int) -> tuple[Tensor, Tensor]:
    """For each of ``size`` grid indices, the evaluated indices (positions in ``known``,
    sorted, first 0 and last ``size - 1``) just below and above it."""
    if len(known) == 1:
        zero = torch.zeros(size, dtype=torch.long)
        return zero, zero
    upper = torch.searchsorted(torch.tensor(known), torch.arange(size)).clamp(1, len(known) - 1)
    return upper - 1, upper


def _interpolate_axis(values: Tensor, known: list[int], size: int, dim: int) -> Tensor:
    """Linear interpolation along ``dim`` from the entries at indices ``known`` of ``values``
    to all ``size`` indices."""
    lower, upper = _cell(known, size)
    lower, upper = lower.to(values.device), upper.to(values.device)
    known_t = torch.tensor(known, device=values.device)
    lo, hi = known_t[lower], known_t[upper]
    weight = ((torch.arange(size, device=values.device) - lo) / (hi - lo).clamp(min=1)).to(values.dtype)
    a, b = values.index_select(dim, lower), values.index_select(dim, upper)
    shape = [1] * values.dim()
    shape[dim] = size
    weight = weight.reshape(shape)
    return a * (1 - weight) + b * weight


class Occlusion:
    """Occlusion sensitivity with a sliding square window.

    Args:
        model: ``forward(x [B, 3, H, W] in [0, 1]) -> logits [B, C]``.
        window: window side in pixels (clipped to the image size).
        stride: step between window positions in pixels.
        fill: baseline written under the window: ``"zero"`` (black), ``"mean"`` (the
            image's own per-channel mean) or ``"blur"`` (a Gaussian-blurred copy of the
            image, sigma = :func:`~fgvc.analysis.common.default_blur_sigma`).
        batch_size: occluded copies evaluated per pass (copies of several images and
            windows share one pass).
        mode: ``"exact"`` (default) or ``"approx"``, which trades exactness for speed in up
            to three ways, each set by one argument below (ignored in exact mode).
        engine: ``"auto"`` (incremental when the model is understood, else batched),
            ``"incremental"`` (refuse other models) or ``"batched"``.
        full_fraction: incremental engine: a layer whose changed block covers at least this
            share of its map is computed whole.
        field_limit: approx: Krypton's projective-field threshold: a window's changed
            region in any layer is cut to this fraction of the map side around its centre
            (the activations beyond it are taken as unchanged); ``None``: no cut.
        low_precision: approx, incremental engine: each conv block is computed as the kept
            (unoccluded, float) output plus the conv of the input's change in bfloat16, where
            the hardware runs bfloat16 natively; the rounding error then scales with the
            change, not with the activation.
        coarse_step: approx: coarse-to-fine: evaluate every ``coarse_step``-th window
            position along each axis (always including the last), estimate the other
            windows' drops by bilinear interpolation over the window grid, then evaluate the
            ``refine_fraction`` of the remaining windows of each image whose estimate is
            least certain (largest spread of the evaluated drops at the corners of its grid
            cell). ``1``: every window is evaluated.
        refine_fraction: approx: see ``coarse_step``.
    """

    def __init__(
        self,
        model: nn.Module,
        window: int = 32,
        stride: int = 16,
        fill: Fill = "zero",
        batch_size: int = 256,
        mode: Mode = "exact",
        engine: Engine = "auto",
        full_fraction: float = 0.7,
        field_limit: float | None = 0.7,
        low_precision: bool = True,
        coarse_step: int = 1,
        refine_fraction: float = 0.25,
    ) -> None:
        if window < 1 or stride < 1 or batch_size < 1:
            raise ConfigError(
                f"occlusion window, stride and batch_size must be positive, got window={window}, "
                f"stride={stride}, batch_size={batch_size}"
            )
        if fill not in ("zero", "mean", "blur"):
            raise ConfigError(f"occlusion fill must be 'zero', 'mean' or 'blur', got {fill!r}")
        if mode not in ("exact", "approx"):
            raise ConfigError(f"occlusion mode must be 'exact' or 'approx', got {mode!r}")
        if engine not in ("auto", "incremental", "batched"):
            raise ConfigError(
                f"occlusion engine must be 'auto', 'incremental' or 'batched', got {engine!r}"
            )
        if not 0.0 < full_fraction <= 1.0 or field_limit is not None and not 0.0 < field_limit <= 1.0:
            raise ConfigError(
                "occlusion full_fraction and field_limit must lie in (0, 1], got "
                f"full_fraction={full_fraction}, field_limit={field_limit}"
            )
        if coarse_step < 1 or not 0.0 <= refine_fraction <= 1.0:
            raise ConfigError(
                "occlusion coarse_step must be >= 1 and refine_fraction in [0, 1], got "
                f"coarse_step={coarse_step}, refine_fraction={refine_fraction}"
            )
        self.model = model
        self.window = window
        self.stride = stride
        self.fill = fill
        self.batch_size = batch_size
        self.mode = mode
        self.engine = engine
        self.full_fraction = full_fraction
        self.field_limit = field_limit
        self.low_precision = low_precision
        self.coarse_step = coarse_step
        self.refine_fraction = refine_fraction
        self._lowering = LoweringCache()

    @property
    def approximation(self) -> str | None:
        """The approximation in words (``None`` in exact mode): log it with the maps.
        Which parts apply to one run is on its result (bfloat16 needs hardware support,
        the projective-field threshold the incremental engine)."""
        if self.mode == "exact":
            return None
        return self._describe(self.field_limit, self.low_precision)

    def _describe(self, field_limit: float | None, low_precision: bool) -> str:
        parts = []
        if field_limit is not None:
            parts.append(f"projective-field threshold {field_limit:g}")
        if low_precision:
            parts.append("bfloat16 conv of the changes")
        if self.coarse_step > 1:
            parts.append(
                f"coarse-to-fine: every {self.coarse_step}th window per axis evaluated, "
                f"{self.refine_fraction:.0%} of the rest refined, others interpolated"
            )
        return "approx: " + ("; ".join(parts) if parts else "none (every window exact)")

    def baseline(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` values written under the window."""
        if self.fill == "zero":
            return torch.zeros_like(images)
        if self.fill == "mean":
            return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
        return gaussian_blur(images, default_blur_sigma(*images.shape[-2:]))

    def _low_precision_dtype(self, device: torch.device) -> torch.dtype | None:
        """bfloat16 where it runs natively (emulated bfloat16 is slower than float32)."""
        if self.mode != "approx" or not self.low_precision:
            return None
        try:
            if device.type == "cuda":
                native = torch.cuda.is_bf16_supported(including_emulation=False)
            elif device.type == "cpu":
                native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
            else:
                native = False
        except (AttributeError, RuntimeError, TypeError):  # a build without the query
            native = False
        return torch.bfloat16 if native else None

    def _scorer(self, masks: Tensor, boxes: Tensor, images: Tensor) -> tuple[Scorer, str | None]:
        """The scorer and, in approx mode, what it approximates."""
        dtype = self._low_precision_dtype(images.device)
        approx = self.mode == "approx"
        if self.engine != "batched":
            field_limit = self.field_limit if approx else None
            try:
                engine = IncrementalOcclusion(self.model, self.full_fraction, field_limit, dtype,
                                              lowered=self._lowering.get(self.model))
                dtype = dtype if engine.low_weights else None
                height, width = images.shape[-2:]
                engine.prepare(height, width, boxes, images.device)
                return _IncrementalScorer(engine), (
                    self._describe(field_limit, dtype is not None) if approx else None)
            except UnsupportedModel as error:
                if self.engine == "incremental":
                    raise ConfigError(
                        f"occlusion engine 'incremental' cannot run this model: {error}; "
                        "use engine='auto' or 'batched'"
                    ) from None
        # low precision only works on changes (incremental): the batched engine stays exact
        return _BatchedScorer(self.model, masks), (
            self._describe(None, False) if approx else None)

    def _chunks(self, image_index: Tensor, window_index: Tensor):
        """Equal chunks of at most ``batch_size`` pairs: no small, slow tail batch."""
        total = len(image_index)
        if total == 0:
            return
        size = -(-total // -(-total // self.batch_size))
        for start in range(0, total, size):
            yield image_index[start : start + size], window_index[start : start + size]

    def _score_pairs(self, scorer: Scorer, kept, image_index: Tensor, window_index: Tensor,
                     targets: Tensor, dtype: torch.dtype) -> Tensor:
        out = [targets.new_zeros(0, dtype=dtype)]
        for images_part, windows_part in self._chunks(image_index, window_index):
            scores = scorer.scores(kept, images_part, windows_part, targets[images_part])
            out.append(scores.to(dtype))
        return torch.cat(out)

    def attribute(self, images: Tensor, targets: TargetsLike = None) -> OcclusionResult:
        """Explain ``images`` ``[B, 3, H, W]`` for ``targets`` (``None``: predicted class).

        ``raw`` is the mean logit drop per pixel (logit units)."""
        batch, _, height, width = images.shape
        check_target_count(targets, batch)  # before the expensive passes
        device = images.device
        masks = window_masks(height, width, self.window, self.stride).to(device)
        rows = len(window_starts(height, self.window, self.stride))
        positions = masks.shape[0]
        with eval_mode(self.model), torch.inference_mode():
            baseline = self.baseline(images)
            scorer, approximation = self._scorer(masks, window_boxes(masks), images)
            logits = torch.cat([
                self.model(images[start : start + self.batch_size])
                for start in range(0, batch, self.batch_size)
            ])
            resolved = resolve_targets(targets, logits)
            drops = torch.zeros(batch, positions, dtype=logits.dtype, device=device)
            evaluated = 0
            group = max(1, self.batch_size // positions)
            for start in range(0, batch, group):
                part = slice(start, min(start + group, batch))
                kept = scorer.keep(images[part], baseline[part], logits[part])
                part_targets = resolved[part]
                reference = scorer.logits(kept).gather(1, part_targets[:, None]).to(logits.dtype)
                if self.mode == "exact" or self.coarse_step == 1:
                    drops[part], count = self._exact(scorer, kept, part_targets, reference,
                                                     positions)
                else:
                    drops[part], count = self._approx(scorer, kept, part_targets, reference,
                                                      rows, positions // rows)
                evaluated += count
            cover = masks.flatten(1).to(drops.dtype)
            counts = cover.sum(dim=0)
            summed = drops @ cover
            raw = torch.where(counts > 0, summed / counts.clamp(min=1), torch.zeros_like(summed))
            raw = raw.reshape(batch, height, width)
        # cloned outside inference mode so callers get ordinary tensors
        raw, logits = raw.clone(), logits.clone()
        return OcclusionResult(
            raw=raw,
            maps=normalize_per_image(raw),
            targets=resolved.clone(),
            logits=logits,
            probs=logits.softmax(dim=1),
            mode=self.mode,
            approximation=approximation,
            engine=scorer.name,
            evaluated_fraction=evaluated / (batch * positions),
        )

    def _exact(self, scorer: Scorer, kept, targets: Tensor, reference: Tensor,
               positions: int) -> tuple[Tensor, int]:
        count = len(targets)
        device = targets.device
        image_index = torch.arange(count, device=device).repeat_interleave(positions)
        window_index = torch.arange(positions, device=device).repeat(count)
        scores = self._score_pairs(scorer, kept, image_index, window_index, targets,
                                   reference.dtype)
        return reference - scores.reshape(count, positions), count * positions

    def _approx(self, scorer: Scorer, kept, targets: Tensor, reference: Tensor, rows: int,
                cols: int) -> tuple[Tensor, int]:
        count, device = len(targets), targets.device
        coarse_rows = sorted(set(range(0, rows, self.coarse_step)) | {rows - 1})
        coarse_cols = sorted(set(range(0, cols, self.coarse_step)) | {cols - 1})
        grid = torch.zeros(rows, cols, dtype=torch.bool)
        grid[torch.tensor(coarse_rows)[:, None], torch.tensor(coarse_cols)[None, :]] = True
        coarse = grid.flatten().nonzero()[:, 0].to(device)
        image_index = torch.arange(count, device=device).repeat_interleave(len(coarse))
        window_index = coarse.repeat(count)
        scores = self._score_pairs(scorer, kept, image_index, window_index, targets,
                                   reference.dtype)
        known = (reference - scores.reshape(count, len(coarse))).reshape(
            count, len(coarse_rows), len(coarse_cols)).cpu()
        estimate = _interpolate_axis(_interpolate_axis(known, coarse_cols, cols, 2),
                                     coarse_rows, rows, 1)
        drops = estimate.reshape(count, rows * cols).to(device)
        remaining = (~grid).flatten().nonzero()[:, 0].to(device)
        refine = round(self.refine_fraction * len(remaining))
        evaluated = count * len(coarse)
        if refine > 0:
            doubt = self._doubt(known, coarse_rows, coarse_cols, rows, cols).to(device)
            pick = doubt[:, remaining].topk(refine, dim=1).indices
            window_index = remaining[pick].flatten()
            image_index = torch.arange(count, device=device).repeat_interleave(refine)
            scores = self._score_pairs(scorer, kept, image_index, window_index, targets,
                                       reference.dtype)
            drops[image_index, window_index] = reference[image_index, 0] - scores
            evaluated += count * refine
        drops[:, coarse] = known.reshape(count, -1).to(device)
        return drops, evaluated

    @staticmethod
    def _doubt(known: Tensor, coarse_rows: list[int], coarse_cols: list[int], rows: int,
               cols: int) -> Tensor:
        """``[B, P]`` how little an interpolated drop can be trusted: the spread (max - min)
        of the evaluated drops at the corners of its grid cell."""
        r_lo, r_hi = _cell(coarse_rows, rows)
        c_lo, c_hi = _cell(coarse_cols, cols)
        corners = torch.stack([
            known[:, r][:, :, c] for r in (r_lo, r_hi) for c in (c_lo, c_hi)
        ])  # [4, B, rows, cols]
        spread = corners.amax(0) - corners.amin(0)
        return spread.reshape(len(known), -1)
