"""A trained model as a predictor: images of any size in, designers and probabilities out.

What a registered version serves (fgvc.tracking.pyfunc_model wraps this for MLflow). The
model is rebuilt from its checkpoint's spec and the state_dict is read with
``weights_only=True``: loading never unpickles a model object. Images are preprocessed as in
training: fitted to the training image size with the data root's resize policy (``pad``:
aspect kept, black bars; ``stretch``; ``center-crop``), scaled to [0, 1]; the model applies its
own input normalisation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fgvc.errors import FgvcError
from fgvc.models.factory import FGVCNet, build_model
from fgvc.regimes import REGIMES
from fgvc.safeload import load_tensors

log = logging.getLogger("fgvc")

RESIZE_POLICIES = ("pad", "stretch", "center-crop")


def model_from_checkpoint(ckpt: dict, where: str) -> FGVCNet:
    """Rebuild the architecture of an fgvc checkpoint and load its weights (eval mode)."""
    if "spec" not in ckpt or "model" not in ckpt:
        raise FgvcError(f"{where}: not an fgvc checkpoint (it lacks the model spec or state_dict; keys: "
                        f"{', '.join(sorted(map(str, ckpt)))})")
    model = build_model(ckpt["spec"])
    model.load_state_dict(ckpt["model"])
    return model.eval()


def fit_to(image: torch.Tensor, size: tuple[int, int], resize: str = "pad") -> torch.Tensor:
    """float [3, h, w] in [0, 1] -> [3, H, W] under a resize policy (bilinear, antialiased)."""
    height, width = size
    h, w = image.shape[1:]
    if (h, w) == (height, width):
        return image
    batch = image[None]
    if resize == "stretch":
        return F.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    if resize == "center-crop":
        scale = max(height / h, width / w)
        crop_h, crop_w = min(h, round(height / scale)), min(w, round(width / scale))
        top, left = (h - crop_h) // 2, (w - crop_w) // 2
        batch = batch[:, :, top:top + crop_h, left:left + crop_w]
        return F.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    if resize != "pad":
        raise FgvcError(f"unknown resize policy {resize!r}; choose from {', '.join(RESIZE_POLICIES)}")
    scale = min(height / h, width / w)
    inner = (min(height, max(1, round(h * scale))), min(width, max(1, round(w * scale))))
    fitted = F.interpolate(batch, size=inner, mode="bilinear", antialias=True, align_corners=False)[0]
    canvas = torch.zeros(3, height, width, dtype=image.dtype)
    top, left = (height - inner[0]) // 2, (width - inner[1]) // 2
    canvas[:, top:top + inner[0], left:left + inner[1]] = fitted
    return canvas


def as_image_list(images) -> list[torch.Tensor]:
    """uint8 ``[N, H, W, 3]`` (or one ``[H, W, 3]``, or a list of them, any sizes) -> float
    ``[3, H, W]`` tensors in [0, 1]."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = images[None]
    items = list(images) if not isinstance(images, np.ndarray) else [images[i] for i in range(len(images))]
    out = []
    for i, item in enumerate(items):
        array = np.asarray(item)
        if array.ndim != 3 or array.shape[-1] != 3:
            raise FgvcError(f"image {i}: expected uint8 [H, W, 3], found shape {list(array.shape)}")
        if array.dtype != np.uint8:
            raise FgvcError(f"image {i}: expected uint8 pixels (0..255), found {array.dtype}")
        out.append(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div_(255.0))
    if not out:
        raise FgvcError("no images to predict")
    return out


class Predictor:
    """``Predictor.from_checkpoint(path).predict(images, top_k=5)`` -> one record per image."""

    def __init__(self, model: FGVCNet, label_names: Sequence[str], resize: str = "pad",
                 device: str | torch.device = "cpu", batch_size: int = 64):
        if model.spec.image_size is None:
            raise FgvcError(f"{model.spec.arch}: the checkpoint records no image size to fit images to")
        self.model, self.label_names, self.resize = model.to(device).eval(), list(label_names), resize
        self.device, self.batch_size = torch.device(device), batch_size

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu",
                        quiet: bool = False) -> "Predictor":
        """The checkpoint's model, ready to predict. A model trained on background-removed
        images says once (unless ``quiet``) that raw photos are not what it knows."""
        ckpt = load_tensors(path, what="checkpoint")
        if not isinstance(ckpt, dict):
            raise FgvcError(f"{path}: a checkpoint must be a dict, found {type(ckpt).__name__}")
        model = model_from_checkpoint(ckpt, str(path))
        names = ckpt.get("label_names") or [str(i) for i in range(model.num_classes)]
        regime = ckpt.get("regime")
        if not quiet and regime in REGIMES and REGIMES.get(regime).masked:
            log.warning("this model (regime %s) was trained on background-removed images: give it "
                        "background-removed images (fgvc mask); raw photos get predictions it was not "
                        "validated on", regime)
        return cls(model, names, ckpt.get("resize", "pad"), device)

    def preprocess(self, images) -> torch.Tensor:
        """Images as the model saw them in training: float ``[N, 3, H, W]`` in [0, 1]."""
        size = tuple(self.model.spec.image_size)
        return torch.stack([fit_to(image, size, self.resize) for image in as_image_list(images)])

    def probabilities(self, images) -> torch.Tensor:
        batch = self.preprocess(images)
        out = []
        with torch.inference_mode():
            for start in range(0, len(batch), self.batch_size):
                logits = self.model(batch[start:start + self.batch_size].to(self.device))
                out.append(logits.float().softmax(dim=1).cpu())
        return torch.cat(out)

    def predict(self, images, top_k: int = 5) -> list[dict]:
        """Per image: ``designer``, ``class_index``, ``probability`` and the ``top_k`` designers
        with their probabilities, most likely first."""
        probs = self.probabilities(images)
        k = max(1, min(int(top_k), probs.shape[1]))
        values, indices = probs.topk(k, dim=1)
        records = []
        for p, i in zip(values.tolist(), indices.tolist()):
            records.append({"designer": self.label_names[i[0]], "class_index": i[0], "probability": p[0],
                            "top_designers": [self.label_names[j] for j in i], "top_probabilities": p})
        return records
