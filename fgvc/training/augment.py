"""Augmentation presets, each one named object applied per sample to a uint8 batch.

Parameters are drawn from an explicit `torch.Generator`, not the global RNG, so a run is
reproducible and augmentation can run in the loader's prefetch thread without racing the
training thread for random numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as F

from fgvc.registry import Registry


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(1, generator=g))


def _chance(g: torch.Generator, p: float) -> bool:
    return p > 0 and float(torch.rand(1, generator=g)) < p


def _box(g: torch.Generator, height: int, width: int, scale, ratio, attempts: int = 10):
    """A random box of area share in `scale` and aspect (w/h) in `ratio`, torchvision-style
    (log-uniform ratio, 10 attempts); None when no attempt fits."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, *log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    return None


@dataclass(frozen=True)
class HeavyAugment:
    """The original project's heavy recipe, per sample:
    RandomResizedCrop(scale=(0.6, 1.0), ratio=(0.8, 1.25)) back to the image size, horizontal
    flip, ColorJitter(0.3, 0.3, 0.3, 0.08) in random order, Gaussian blur (kernel 3,
    sigma in [0.1, 2.0]) with p=0.3, RandomErasing(p=0.4, scale=(0.02, 0.2),
    ratio=(0.3, 3.3)) with random values (uniform in [0, 1], the image's own range).
    """

    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (0.8, 1.25)
    flip_p: float = 0.5
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.08
    blur_p: float = 0.3
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    erase_p: float = 0.4
    erase_scale: tuple[float, float] = (0.02, 0.2)
    erase_ratio: tuple[float, float] = (0.3, 3.3)

    name = "heavy"

    def sample(self, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """float [3, H, W] in [0, 1] -> augmented float [3, H, W] in [0, 1]."""
        _, height, width = image.shape
        # A crop ratio is width/height, as in torchvision; the fallback is the whole image.
        box = _box(g, height, width, self.crop_scale, self.crop_ratio) or (0, 0, height, width)
        image = F.resized_crop(image, *box, size=[height, width], antialias=True)
        if _chance(g, self.flip_p):
            image = F.horizontal_flip(image)
        jitters = [
            (F.adjust_brightness, _uniform(g, 1 - self.brightness, 1 + self.brightness)),
            (F.adjust_contrast, _uniform(g, 1 - self.contrast, 1 + self.contrast)),
            (F.adjust_saturation, _uniform(g, 1 - self.saturation, 1 + self.saturation)),
            (F.adjust_hue, _uniform(g, -self.hue, self.hue)),
        ]
        for k in torch.randperm(4, generator=g).tolist():
            fn, factor = jitters[k]
            image = fn(image, factor)
        if _chance(g, self.blur_p):
            sigma = _uniform(g, *self.blur_sigma)
            image = F.gaussian_blur(image, kernel_size=[3, 3], sigma=[sigma, sigma])
        if _chance(g, self.erase_p):
            box = _box(g, height, width, self.erase_scale, self.erase_ratio)
            if box is not None:
                top, left, h, w = box
                image = image.clone()
                image[:, top:top + h, left:left + w] = torch.rand(3, h, w, generator=g)
        return image.clamp_(0, 1)

    def __call__(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> float [B, 3, H, W] in [0, 1], each sample augmented."""
        floats = images.float().div_(255.0)
        return torch.stack([self.sample(x, g) for x in floats])


PRESETS: Registry = Registry("augmentation recipe")
PRESETS.register("heavy", HeavyAugment())


def get_preset(name: str | None):
    """The recipe registered as ``name``; None -> None (no augmentation)."""
    return None if name is None else PRESETS.get(name)
