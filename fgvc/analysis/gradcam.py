"""Grad-CAM (Selvaraju et al., ICCV 2017, arXiv:1610.02391), batched.

For a target layer with activation ``A`` of shape ``[B, K, h, w]`` and class score ``y_c``
(a logit), the map is ``relu(sum_k w_k A_k)`` with ``w_k`` the spatial mean of
``d y_c / d A_k``, upsampled bilinearly to the input size.

Only the gradient with respect to the target activation is computed
(``torch.autograd.grad``), so no parameter ``.grad`` is touched, and autograd records only
the part of the network after the target layer. Up to the target layer nothing is recorded.

Two ways to get there, same maps:

- models :func:`fgvc.analysis.incremental.lower` understands (torchvision ResNets,
  FashionNet, the FGVCNet wrapper, plain Sequential CNNs), with a target layer whose output
  is one of the lowered tensors: the lowered network runs instead of the modules
  (eval-mode BatchNorm folded into the convs, ReLU fused, channels-last memory), which is
  the same function computed with fewer passes over memory;
- any other model: a forward hook on the target layer re-roots its output as a leaf that
  requires grad and switches autograd on for the rest of the forward pass.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from fgvc.analysis.common import (
    AttributionResult,
    TargetsLike,
    check_target_count,
    eval_mode,
    normalize_per_image,
    resolve_targets,
)
from fgvc.analysis.incremental import Lowered, LoweringCache, UnsupportedModel


class GradCAM:
    """Grad-CAM for a model following the fgvc interface.

    Args:
        model: ``forward(x [B, 3, H, W] in [0, 1]) -> logits [B, C]``.
        target_layer: module whose output ``[B, K, h, w]`` is explained; defaults to
            ``model.feature_stage`` (the last convolutional stage).

    Use ``GradCAM(model).attribute(images, targets)`` or, to keep the setup across several
    batches, ``with GradCAM(model) as cam: cam.attribute(...)``. The model runs in eval
    mode; any hook is removed and the model's train/eval flags restored on exit, also on
    error. After a call, ``fast_path`` says whether the lowered network computed it.
    """

    def __init__(self, model: nn.Module, target_layer: nn.Module | None = None) -> None:
        if target_layer is None:
            target_layer = getattr(model, "feature_stage", None)
            if target_layer is None:
                raise ValueError(
                    "model has no `feature_stage`; pass target_layer= explicitly"
                )
        self.model = model
        self.target_layer = target_layer
        self._activation: Tensor | None = None
        self._explaining = False
        self._handle: RemovableHandle | None = None
        self._mode: contextlib.AbstractContextManager[nn.Module] | None = None
        self._active = False
        self._lowering = LoweringCache()
        self.fast_path = False

    def _capture(self, module: nn.Module, inputs, output: Tensor) -> Tensor | None:
        if not self._explaining:  # other forward passes inside the context are untouched
            return None
        # Inside the no_grad forward of `attribute`: from here on the graph is recorded
        # (the surrounding no_grad context restores the previous state on exit).
        torch.set_grad_enabled(True)
        self._activation = output.detach().requires_grad_(True)
        return self._activation

    def __enter__(self) -> GradCAM:
        if self._active:
            raise RuntimeError("GradCAM context is already active")
        self._mode = eval_mode(self.model)
        self._mode.__enter__()
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._handle is not None:
                self._handle.remove()
        finally:
            self._handle = None
            self._activation = None
            self._active = False
            if self._mode is not None:
                self._mode.__exit__(None, None, None)
                self._mode = None

    def _lowered_network(self) -> tuple[Lowered, int] | None:
        """The lowered model and the target layer's tensor in it, or ``None``; lowered again
        whenever a weight, a module or a hook changed."""
        try:
            lowered = self._lowering.get(self.model)
        except UnsupportedModel:
            return None
        node = lowered.tensor_of(self.target_layer)
        return (lowered, node) if node else None

    def attribute(self, images: Tensor, targets: TargetsLike = None) -> AttributionResult:
        """Explain ``images`` ``[B, 3, H, W]`` for ``targets`` (``None``: predicted class;
        an int; or ``B`` class indices).

        Returns an :class:`AttributionResult` whose ``raw`` is the upsampled ReLU'd CAM."""
        if not self._active:
            with self:
                return self.attribute(images, targets)
        check_target_count(targets, images.shape[0])
        # inference_mode(False): also usable from code running under inference_mode.
        with torch.inference_mode(False):
            lowered = self._lowered_network()
            self.fast_path = lowered is not None
            if lowered is not None:
                logits, activation, resolved, grads = self._lowered_pass(*lowered, images, targets)
            else:
                logits, activation, resolved, grads = self._hooked_pass(images, targets)
        activation = activation.detach()
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * activation).sum(dim=1, keepdim=True))
        raw = F.interpolate(
            cam, size=images.shape[-2:], mode="bilinear", align_corners=False
        )[:, 0].contiguous()
        logits = logits.detach()
        return AttributionResult(
            raw=raw,
            maps=normalize_per_image(raw),
            targets=resolved,
            logits=logits,
            probs=logits.softmax(dim=1),
        )

    def _lowered_pass(self, lowered: Lowered, node: int, images: Tensor, targets: TargetsLike):
        with torch.no_grad():
            tensors = lowered.run(images.contiguous(memory_format=torch.channels_last),
                                  stop=node)
        activation = tensors[node].detach().requires_grad_(True)
        tensors[node] = activation
        with torch.enable_grad():
            logits = lowered.run(images, start=node, tensors=tensors)[-1]
            resolved = resolve_targets(targets, logits)
            score = logits.gather(1, resolved[:, None]).sum()
            (grads,) = torch.autograd.grad(score, activation)
        return logits, activation, resolved, grads

    def _hooked_pass(self, images: Tensor, targets: TargetsLike):
        if self._handle is None:
            self._handle = self.target_layer.register_forward_hook(self._capture)
        try:
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
        return logits, activation, resolved, grads
