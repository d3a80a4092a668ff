"""A trained model as a predictor: images of any size in, designers and probabilities out.

What a registered version serves (fgvc.tracking.pyfunc_model wraps this for MLflow). The
model is rebuilt from its checkpoint's spec and the state_dict is read with
``weights_only=True``: loading never unpickles a model object. Images are preprocessed as in
training: fitted to the training image size with the data root's resize policy (``pad``:
aspect kept, black bars; ``stretch``; ``center-crop``), scaled to [0, 1]; the model applies its
own input normalisation.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fgvc.devices import resolve_device
from fgvc.errors import FgvcError
from fgvc.models.factory import FGVCNet, build_model
from fgvc.regimes import REGIMES
from fgvc.safeload import load_tensors, require_finite

log = logging.getLogger("fgvc")

RESIZE_POLICIES = ("pad", "stretch", "center-crop")
SERVE_DEVICE_ENV = "FGVC_SERVE_DEVICE"
# Images per forward pass: a request of more images runs in batches of this many, so a large
# request cannot exhaust GPU memory (64 images at 224x160 take about 1 GB in a ResNet-50).
BATCH_SIZE = 64


def serving_device(device: str | torch.device | None = "auto") -> torch.device:
    """Where a served model runs: ``auto`` (or None) means $FGVC_SERVE_DEVICE when set, else
    the GPU when one is visible, else the CPU; anything else is a device (cpu, cuda, cuda:N)."""
    if device is None or str(device) == "auto":
        device = os.environ.get(SERVE_DEVICE_ENV, "").strip() or None
        if device == "auto":
            device = None
    try:
        return resolve_device(device)
    except FgvcError as e:
        raise FgvcError(str(e).replace("--device", SERVE_DEVICE_ENV if device else "device")) from None


def model_from_checkpoint(ckpt: dict, where: str) -> FGVCNet:
    """Rebuild the architecture of an fgvc checkpoint and load its weights (eval mode)."""
    if "spec" not in ckpt or "model" not in ckpt:
        raise FgvcError(f"{where}: not an fgvc checkpoint (it lacks the model spec or state_dict; keys: "
                        f"{', '.join(sorted(map(str, ckpt)))})")
    require_finite(ckpt["model"], where)
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


# --- what a caller may send: uint8 arrays, or JPEG/PNG bytes as base64 text ---------------------

# Budgets, stated and configurable (environment, read at each call): an encoded image larger
# than MAX_IMAGE_BYTES, or an image or a request with more pixels than MAX_PIXELS, is refused
# before it is decoded. 40 megapixels covers any camera photo; Pillow's own bomb limit is 179 M.
MAX_PIXELS_ENV, MAX_PIXELS = "FGVC_MAX_PIXELS", 40_000_000
MAX_IMAGE_BYTES_ENV, MAX_IMAGE_BYTES = "FGVC_MAX_IMAGE_BYTES", 20_000_000
IMAGE_COLUMNS = ("image", "images", "image_base64")


class ImageInputError(FgvcError, ValueError):
    """An input that is not an image the model can take (the message is one line)."""


def _budget(env: str, default: int) -> int:
    import os

    text = os.environ.get(env, "").strip()
    try:
        return int(text) if text else default
    except ValueError:
        raise ImageInputError(f"{env}={text!r} is not an integer") from None


def decode_base64_image(text, index: int = 0) -> np.ndarray:
    """JPEG/PNG/WebP bytes, or their base64 text (`base64 -w0 photo.jpg`, a `data:` URL
    too), -> uint8 [H, W, 3]; refused in one line when it is not base64, not an image, or
    over the byte or pixel budget (checked from the header, before decoding)."""
    import base64
    import binascii

    max_bytes = _budget(MAX_IMAGE_BYTES_ENV, MAX_IMAGE_BYTES)
    if isinstance(text, (bytes, bytearray)) and not bytes(text[:4]).isascii():
        return decode_image_bytes(bytes(text), f"image {index}")
    text = text.decode("ascii", "replace") if isinstance(text, (bytes, bytearray)) else str(text)
    text = text.strip()
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    if len(text) > max_bytes * 4 // 3 + 4:
        raise ImageInputError(f"image {index}: {len(text)} base64 characters, over the budget of {max_bytes} "
                              f"bytes ({MAX_IMAGE_BYTES_ENV})")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(f"image {index}: not base64 text (send `base64 -w0 photo.jpg`)") from None
    return decode_image_bytes(data, f"image {index}")


def decode_image_bytes(data: bytes, what: str) -> np.ndarray:
    """An encoded image (JPEG, PNG, WebP, ...) -> uint8 [H, W, 3], EXIF orientation applied,
    transparency on black (as ingest does); refused in one line naming ``what`` when it is
    over the byte or pixel budget (read from the header, before decoding) or not an image."""
    import io

    from PIL import Image, ImageOps, UnidentifiedImageError

    from fgvc.data.decode import to_rgb

    max_bytes = _budget(MAX_IMAGE_BYTES_ENV, MAX_IMAGE_BYTES)
    if len(data) > max_bytes:
        raise ImageInputError(f"{what}: {len(data)} bytes, over the budget of {max_bytes} ({MAX_IMAGE_BYTES_ENV})")
    try:
        with Image.open(io.BytesIO(data)) as image:
            w, h = image.size
            max_pixels = _budget(MAX_PIXELS_ENV, MAX_PIXELS)
            if w * h > max_pixels:
                raise ImageInputError(f"{what}: {w}x{h} pixels, over the budget of {max_pixels} ({MAX_PIXELS_ENV})")
            image.load()
            return np.asarray(to_rgb(ImageOps.exif_transpose(image))).copy()
    except ImageInputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = "not a JPEG/PNG/WebP image" if isinstance(e, UnidentifiedImageError) else f"unreadable image ({e})"
        raise ImageInputError(f"{what}: {reason}".splitlines()[0]) from None


def _encoded_column(model_input):
    """The base64 images of an input, when it carries them: a DataFrame or dict column named
    image/images/image_base64 (or its only column), a list or array of strings or bytes."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        names = [c for c in model_input.columns if str(c).lower() in IMAGE_COLUMNS]
        if names or len(model_input.columns) == 1:
            return list(model_input[names[0] if names else model_input.columns[0]])
        raise ImageInputError(f"a table input needs a column named {' or '.join(IMAGE_COLUMNS)} holding base64 "
                              f"images; found {', '.join(map(str, model_input.columns))}")
    if isinstance(model_input, dict):
        names = [k for k in model_input if str(k).lower() in IMAGE_COLUMNS]
        if not names:
            raise ImageInputError(f"an input object needs a key {' or '.join(IMAGE_COLUMNS)}; found "
                                  f"{', '.join(map(str, model_input))}")
        column = model_input[names[0]]
        return list(np.asarray(column, dtype=object).reshape(-1)) if not isinstance(column, list) else column
    if isinstance(model_input, (str, bytes)):
        return [model_input]
    if isinstance(model_input, np.ndarray) and model_input.dtype.kind in "USO" and model_input.ndim <= 1:
        return list(model_input.reshape(-1))
    if isinstance(model_input, (list, tuple)) and model_input and all(isinstance(x, (str, bytes)) for x in model_input):
        return list(model_input)
    return None


def check_pixel_array(array: np.ndarray, index: int) -> np.ndarray:
    """A numeric image as uint8: integers in 0..255 only. Floats (even in [0, 1]), booleans and
    out-of-range numbers are refused, never cast (a cast would silently change the picture)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        raise ImageInputError(f"image {index}: boolean pixels; send integers 0..255")
    if array.dtype.kind == "f":
        raise ImageInputError(f"image {index}: expected uint8 pixels (integers 0..255), found {array.dtype} "
                              f"(floats are refused, not truncated)")
    if array.dtype.kind in "iu":
        if array.size and (int(array.min()) < 0 or int(array.max()) > 255):
            raise ImageInputError(f"image {index}: pixel values must be 0..255, found {int(array.min())}.."
                                  f"{int(array.max())}")
        return array.astype(np.uint8)
    raise ImageInputError(f"image {index}: expected uint8 pixels (0..255), found {array.dtype}")


def images_from_input(model_input) -> list[np.ndarray]:
    """What a caller sends (uint8 ``[N, H, W, 3]`` or a list of ``[H, W, 3]``; integer arrays
    in 0..255; base64 JPEG/PNG strings in a column ``image``) -> uint8 ``[H, W, 3]`` arrays,
    within the pixel budget. Every refusal is an ImageInputError with a one-line reason."""
    encoded = _encoded_column(model_input)
    if encoded is not None:
        if not encoded:
            raise ImageInputError("no images to predict")
        images = [decode_base64_image(item, i) for i, item in enumerate(encoded)]
    else:
        if isinstance(model_input, np.ndarray) and model_input.ndim == 3:
            model_input = model_input[None]
        items = [model_input[i] for i in range(len(model_input))] if isinstance(model_input, np.ndarray) \
            else list(model_input)
        images = []
        for i, item in enumerate(items):
            array = np.asarray(item)
            if array.dtype == object:
                raise ImageInputError(f"image {i}: not an array of pixels (images of different sizes go as base64 "
                                      f"strings or separate requests)")
            if array.ndim != 3 or array.shape[-1] != 3:
                raise ImageInputError(f"image {i}: expected uint8 [H, W, 3], found shape {list(array.shape)}")
            images.append(check_pixel_array(array, i))
    max_pixels = _budget(MAX_PIXELS_ENV, MAX_PIXELS)
    total = sum(a.shape[0] * a.shape[1] for a in images)
    if total > max_pixels:
        raise ImageInputError(f"{len(images)} image(s) of {total} pixels in all, over the budget of {max_pixels} "
                              f"({MAX_PIXELS_ENV}); send fewer or smaller images")
    return images


def check_top_k(value) -> int:
    """`top_k` as a caller sends it: an integer >= 1 (a larger one than the class count
    returns every class). Floats with a fraction, booleans and text are refused."""
    if isinstance(value, (bool, np.bool_)):
        raise ImageInputError(f"top_k must be an integer >= 1, found {value!r}")
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ImageInputError(f"top_k must be an integer >= 1, found {value!r}")
    return int(value)


class Predictor:
    """``Predictor.from_checkpoint(path).predict(images, top_k=5)`` -> one record per image.

    Runs on ``device`` (default ``auto``: see :func:`serving_device`), ``batch_size`` images
    per forward pass; images are fitted on the CPU, probabilities come back to it once."""

    def __init__(self, model: FGVCNet, label_names: Sequence[str], resize: str = "pad",
                 device: str | torch.device | None = "auto", batch_size: int = BATCH_SIZE):
        if model.spec.image_size is None:
            raise FgvcError(f"{model.spec.arch}: the checkpoint records no image size to fit images to")
        self.device, self.batch_size = serving_device(device), batch_size
        self.model, self.label_names, self.resize = model.to(self.device).eval(), list(label_names), resize

    _loading_quietly = 0  # > 0 inside loading_quietly()

    @classmethod
    @contextlib.contextmanager
    def loading_quietly(cls):
        """Loads inside say nothing about raw photos: MLflow loading a model it is logging (to
        check its input example) is not somebody about to send photos."""
        cls._loading_quietly += 1
        try:
            yield
        finally:
            cls._loading_quietly -= 1

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = "auto",
                        quiet: bool = False) -> Predictor:
        """The checkpoint's model, ready to predict. A model trained on background-removed
        images says once (unless ``quiet``) that raw photos are not what it knows."""
        ckpt = load_tensors(path, what="checkpoint")
        if not isinstance(ckpt, dict):
            raise FgvcError(f"{path}: a checkpoint must be a dict, found {type(ckpt).__name__}")
        model = model_from_checkpoint(ckpt, str(path))
        names = ckpt.get("label_names") or [str(i) for i in range(model.num_classes)]
        regime = ckpt.get("regime")
        masked = isinstance(regime, str) and regime in REGIMES and REGIMES.get(regime).masked
        if masked and not (quiet or cls._loading_quietly):
            log.warning("this model (regime %s) was trained on background-removed images: give it "
                        "background-removed images (fgvc mask); raw photos get predictions it was not "
                        "validated on", regime)
        return cls(model, names, ckpt.get("resize", "pad"), device)

    def preprocess(self, images) -> torch.Tensor:
        """Images as the model saw them in training: float ``[N, 3, H, W]`` in [0, 1]."""
        size = self.model.spec.image_size
        if size is None:
            raise FgvcError(f"{self.model.spec.arch}: the model does not record the image size it was trained on")
        return torch.stack([fit_to(image, size, self.resize) for image in as_image_list(images_from_input(images))])

    def probabilities(self, images) -> torch.Tensor:
        batch = self.preprocess(images)
        out = []
        with torch.inference_mode():
            for start in range(0, len(batch), self.batch_size):
                logits = self.model(batch[start:start + self.batch_size].to(self.device))
                out.append(logits.float().softmax(dim=1))
        return torch.cat(out).cpu()

    def predict(self, images, top_k: int = 5) -> list[dict]:
        """Per image: ``designer``, ``class_index``, ``probability`` and the ``top_k`` designers
        with their probabilities, most likely first."""
        probs = self.probabilities(images)
        k = max(1, min(int(top_k), probs.shape[1]))
        values, indices = probs.topk(k, dim=1)
        records = []
        for p, i in zip(values.tolist(), indices.tolist(), strict=True):
            records.append({"designer": self.label_names[i[0]], "class_index": i[0], "probability": p[0],
                            "top_designers": [self.label_names[j] for j in i], "top_probabilities": p})
        return records
