"""Grad-CAM (Selvaraju et al., ICCV 2017, arXiv:1610.02391), batched.

For a target layer with activation ``A`` of shape ``[B, K, h, w]`` and class score ``y_c``
(a logit), the map is ``relu(sum_k w_k A_k)`` with ``w_k`` the spatial mean of
``d y_c / d A_k``, upsampled bilinearly to the input size.

Only the gradient with respect to the hooked activation is computed
(``torch.autograd.grad``), so no parameter ``.grad`` is touched. The forward pass runs
without autograd up to the target layer; the hook re-roots the activation as a leaf that
requires grad and switches autograd on, so only the head after the target layer is
recorded and differentiated (less memory and work than a full backward to the input).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fgvc.analysis.common import (
    AttributionResult,
    TargetsLike,
    eval_mode,
    normalize_per_image,
    resolve_targets,
)


class GradCAM:
    """Grad-CAM for a model following the fgvc interface.

    Args:
        model: ``forward(x [B, 3, H, W] in [0, 1]) -> logits [B, C]``.
        target_layer: module whose output ``[B, K, h, w]`` is explained; defaults to
            ``model.feature_stage`` (the last convolutional stage).

    Use ``GradCAM(model).attribute(images, targets)`` or, to keep the hook across several
    batches, ``with GradCAM(model) as cam: cam.attribute(...)``. The model runs in eval
    mode; the hook is removed and the model's train/eval flags restored on exit, also on
    error.
    """

    def __init__(self, model: nn.Module, target_layer: Optional[nn.Module] = None) -> None:
        if target_layer is None:
            target_layer = getattr(model, "feature_stage", None)
            if target_layer is None:
                raise ValueError(
                    "model has no `feature_stage`; pass target_layer= explicitly"
                )
        self.model = model
        self.target_layer = target_layer
        self._activation: Optional[Tensor] = None
        self._explaining = False
        self._handle = None
        self._mode = None

    def _capture(self, module: nn.Module, inputs, output: Tensor) -> Optional[Tensor]:
        if not self._explaining:  # other forward passes inside the context are untouched
            return None
        # Inside the no_grad forward of `attribute`: from here on the graph is recorded
        # (the surrounding no_grad context restores the previous state on exit).
        torch.set_grad_enabled(True)
        self._activation = output.detach().requires_grad_(True)
        return self._activation

    def __enter__(self) -> "GradCAM":
        if self._handle is not None:
            raise RuntimeError("GradCAM context is already active")
        self._mode = eval_mode(self.model)
        self._mode.__enter__()
        try:
            self._handle = self.target_layer.register_forward_hook(self._capture)
        except BaseException:
            self._mode.__exit__(None, None, None)
            self._mode = None
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._handle is not None:
                self._handle.remove()
        finally:
            self._handle = None
            self._activation = None
            if self._mode is not None:
                self._mode.__exit__(None, None, None)
                self._mode = None

    def attribute(self, images: Tensor, targets: TargetsLike = None) -> AttributionResult:
        """Explain ``images`` ``[B, 3, H, W]`` for ``targets`` (``None``: predicted class;
        an int; or ``B`` class indices).

        Returns an :class:`AttributionResult` whose ``raw`` is the upsampled ReLU'd CAM."""
        if self._handle is None:
            with self:
                return self.attribute(images, targets)
        # inference_mode(False): also usable from code running under inference_mode.
        try:
            with torch.inference_mode(False):
                self._explaining = True
                with torch.no_grad():
                    logits = self.model(images)
                self._explaining = False
                activation = self._activation
                if activation is None:
                    raise RuntimeError("target layer was not called in the forward pass")
                resolved = resolve_targets(targets, logits)
                with torch.enable_grad():
                    score = logits.gather(1, resolved[:, None]).sum()
                    (grads,) = torch.autograd.grad(score, activation)
        finally:
            self._explaining = False
            self._activation = None
        activation = activation.detach()
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * activation).sum(dim=1, keepdim=True))
        raw = F.interpolate(
            cam, size=images.shape[-2:], mode="bilinear", align_corners=False
        )[:, 0]
        logits = logits.detach()
        return AttributionResult(
            raw=raw,
            maps=normalize_per_image(raw),
            targets=resolved,
            logits=logits,
            probs=logits.softmax(dim=1),
        )
