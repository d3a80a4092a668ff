"""Decoding one image file into the shard format's pixels: uint8 [3, H, W] at the root's size,
under its resize policy (fgvc.data.config.RESIZE_POLICIES). Shared by ingest, the unlabelled
test set and the predictor, so a photo is decoded the same way wherever it enters."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from fgvc.data.config import RESIZE_POLICIES
from fgvc.data.source_checks import check_image_size
from fgvc.errors import ConfigError

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Downscale in steps first (JPEG DCT scaling, then box reduction) before the final LANCZOS pass,
# as Pillow's thumbnail does; 3.0 is indistinguishable from a single full LANCZOS resize.
REDUCING_GAP = 3.0


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, with transparency composited on black."""
    if image.mode in SIXTEEN_BIT_MODES:
        # Pillow's own conversion clips 16-bit values at 255; scale the full range instead.
        values = np.asarray(image).astype(np.int64).clip(0, 65535)
        image = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (0, 0, 0))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image if image.mode == "RGB" else image.convert("RGB")


def fit_image(image: Image.Image, height: int, width: int, resize: str = "pad") -> Image.Image:
    """Resize an RGB image to exactly `width` x `height` under one of RESIZE_POLICIES."""
    w, h = image.size
    filt = Image.Resampling.LANCZOS
    if resize == "stretch":
        return image.resize((width, height), filt, reducing_gap=REDUCING_GAP)
    if resize == "center-crop":
        # Crop the largest centred box with the target aspect, in source coordinates, and
        # resample it in one pass.
        if w * height > h * width:
            crop_w = h * width / height
            box = ((w - crop_w) / 2, 0.0, (w + crop_w) / 2, float(h))
        else:
            crop_h = w * height / width
            box = (0.0, (h - crop_h) / 2, float(w), (h + crop_h) / 2)
        return image.resize((width, height), filt, box=box, reducing_gap=REDUCING_GAP)
    if resize == "pad":
        scale = min(width / w, height / h)
        content = (min(width, max(1, round(w * scale))), min(height, max(1, round(h * scale))))
        canvas = Image.new("RGB", (width, height), (0, 0, 0))
        canvas.paste(image.resize(content, filt, reducing_gap=REDUCING_GAP),
                     ((width - content[0]) // 2, (height - content[1]) // 2))
        return canvas
    raise ConfigError(f"unknown resize policy {resize!r}; choose one of {', '.join(RESIZE_POLICIES)}")


def load_image(path: str | Path, height: int, width: int, resize: str = "pad") -> torch.Tensor:
    """Decode one image file into uint8 [3, H, W]. Raises whatever Pillow raises on a bad file."""
    with Image.open(path) as image:
        check_image_size(image.size)  # from the header: a giant is refused before decoding
        w, h = image.size
        # JPEG only: let the decoder downscale (1/2, 1/4, 1/8) while staying at least
        # REDUCING_GAP times above the target in either orientation (EXIF may swap the axes).
        scale = max(height / h, width / w, height / w, width / h) * REDUCING_GAP
        if scale < 1:
            image.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))
        image.load()
        fitted = fit_image(to_rgb(ImageOps.exif_transpose(image)), height, width, resize)
    return torch.from_numpy(np.asarray(fitted).copy()).permute(2, 0, 1).contiguous()
