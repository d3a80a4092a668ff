"""Augmentation presets, each one named object applied per sample to a uint8 batch.

Parameters are drawn from an explicit `torch.Generator`, not the global RNG, so a run is
reproducible and augmentation can run in a loader thread (or on the GPU) without racing the
training thread for random numbers.

`HeavyAugment.__call__` (the CPU path) draws every sample's parameters first, in the order of
the per-sample definition (`HeavyAugment.sample`), then applies each step to the whole batch:
one kernel per step and batch instead of dozens of small ops per image. The batched steps do
the same float operations in the same order as the per-sample definition, so the result is
the same bit for bit for the same generator (tests/test_augment.py holds them to it).
`HeavyAugment.batch` is the same recipe for a GPU: parameters drawn for the whole batch at
once and no per-sample work at all (`BatchLoader(..., augment_on_device=True)`; its batched ops
are in `augment_batch.py`); its results are reproducible but not the CPU path's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as F

from fgvc.catalog import PRESETS
from fgvc.training.augment_batch import DEVICE_JITTERS, LUMA, batch_boxes


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
class SampleDraws:
    """One sample's random choices under HeavyAugment."""

    crop: tuple[int, int, int, int]  # top, left, height, width
    flip: bool
    factors: tuple[float, float, float, float]  # brightness, contrast, saturation, hue
    order: tuple[int, ...]  # the colour jitters' order, indices into `factors`
    blur_sigma: float | None  # None: no blur
    erase: tuple[int, int, int, int] | None  # top, left, height, width; None: no erasing
    erase_values: torch.Tensor | None  # float [3, h, w] in [0, 1)


def _index(members: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(members, dtype=torch.long, device=device)


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars as [n, 1, 1, 1] in the batch's dtype and device, each rounded the
    way a kernel rounds a Python-float argument."""
    return torch.tensor(values, dtype=torch.float64).to(like.dtype).to(like.device).view(-1, 1, 1, 1)


# The colour jitters below work in place on a batch [n, 3, H, W] of floats in [0, 1], one
# factor per image, and return it.

def _luma(images: torch.Tensor) -> torch.Tensor:
    """[n, 3, H, W] -> [n, 1, H, W], torchvision's rgb_to_grayscale without rounding."""
    r, g, b = images.unbind(dim=-3)
    return r.mul(LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(-3)


def _blend_(images: torch.Tensor, others, ratios: list[float]) -> torch.Tensor:
    """ratio * image + (1 - ratio) * other for each image, clamped to [0, 1], as torchvision's
    blend. The scaling is one batched multiply; the addition runs per image, as
    `add_(other, alpha=1 - ratio)` on an image-sized tensor, because that kernel rounds its
    vectorised body and its scalar tail differently (where the tail falls depends on the
    tensor's size)."""
    images.mul_(_column(ratios, images))
    for one, other, ratio in zip(images, others, ratios, strict=True):
        one.add_(other, alpha=1.0 - ratio)
    return images.clamp_(0, 1)


def _brightness_(images: torch.Tensor, factors: list[float]) -> torch.Tensor:
    return images.mul_(_column(factors, images)).clamp_(0, 1)


def _contrast_(images: torch.Tensor, factors: list[float]) -> torch.Tensor:
    # Each image's mean luma reduced on its own: a batched reduction may sum in another order.
    means = [torch.mean(one, dim=(-3, -2, -1), keepdim=True) for one in _luma(images)]  # [1, 1, 1]
    return _blend_(images, means, factors)


def _saturation_(images: torch.Tensor, factors: list[float]) -> torch.Tensor:
    return _blend_(images, _luma(images), factors)


def _is_zero(x: torch.Tensor) -> torch.Tensor:
    """1.0 where x == 0, else 0.0, for x >= 0, in place (float arithmetic runs several times
    faster than a comparison into a bool tensor on the CPU)."""
    return torch.sign(x, out=x).neg_().add_(1.0)


def _equals(x: torch.Tensor, k: float) -> torch.Tensor:
    """1.0 where the integer-valued x equals k, else 0.0."""
    return (x - k).abs_().neg_().add_(1.0).clamp_(min=0.0)


def _hue_(images: torch.Tensor, shifts: list[float]) -> torch.Tensor:
    """Rotate each image's hue by its shift (in turns) through HSV, as torchvision's
    adjust_hue: the same float operations in the same order. The selections (channel max and
    min, the 0/0 guards, the sextant lookup) are done exactly with element-wise arithmetic
    (0/1 indicators; sums with one non-zero term), which on the CPU is far cheaper than
    comparisons into bool tensors, `torch.where`, or a gather over the channel dimension."""
    red, green, blue = images.unbind(dim=-3)
    high = torch.maximum(red, green)
    high = torch.maximum(high, blue, out=high)
    low = torch.minimum(red, green)
    low = torch.minimum(low, blue, out=low)
    spread = low.neg_().add_(high)  # high - low
    grey = _is_zero(spread.clone())  # hue and saturation are 0 there; divisors become 1 (no 0/0)
    colour = 1.0 - grey
    saturation = spread / torch.addcmul(grey, high, colour)
    distance = (high.unsqueeze(-3) - images).div_(grey.addcmul_(spread, colour).unsqueeze_(-3))
    dr, dg, db = distance.unbind(dim=-3)
    red_is_max = _is_zero(high - red)
    green_is_max = _is_zero(high - green)
    red_not_max = colour.copy_(red_is_max).neg_().add_(1.0)
    from_green = dr.add(2.0).sub_(db).mul_(green_is_max * red_not_max)
    from_red = db.sub_(dg).mul_(red_is_max)
    from_blue = dg.add_(4.0).sub_(dr).mul_(red_not_max.mul_(green_is_max.neg_().add_(1.0)))
    # fmod(x, 1) and remainder(x, 1) as x - trunc(x) and x - floor(x): exact, the same values
    # (the sign of a zero aside, which nothing downstream can see), and several times faster.
    hue = from_red.add_(from_green).add_(from_blue).mul_(1.0 / 6.0).add_(1.0)
    hue = hue.sub_(torch.trunc(hue)).add_(_column(shifts, images)[:, 0])
    hue = hue.sub_(torch.floor(hue))

    sextant_pos = hue.mul_(6)
    sextant = torch.floor(sextant_pos)
    fraction = sextant_pos.sub_(sextant)
    sextant.sub_(torch.clamp(sextant - 5.0, min=0.0).mul_(6.0))  # 6 -> 0 (a hue rounded up to 1)
    s_f = saturation * fraction
    one_minus_s = saturation.neg_().add_(1.0)  # 1 - s
    q = s_f.neg().add_(1.0).mul_(high).clamp_(0.0, 1.0)  # (1 - s*f) * v
    t = s_f.add_(one_minus_s).mul_(high).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(high).clamp_(0.0, 1.0)
    # Sextant 0..5 of the hue circle: (r, g, b) = (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q).
    e = [_equals(sextant, float(k)) for k in range(6)]
    for channel, (v_at, q_at, t_at, p_at) in enumerate((((0, 5), 1, 4, (2, 3)), ((1, 2), 3, 0, (4, 5)),
                                                        ((3, 4), 5, 2, (0, 1)))):
        value = images[:, channel]
        torch.mul(high, e[v_at[0]] + e[v_at[1]], out=value)
        value.addcmul_(q, e[q_at]).addcmul_(t, e[t_at]).addcmul_(p, e[p_at[0]] + e[p_at[1]])
    return images


JITTERS = (_brightness_, _contrast_, _saturation_, _hue_)


def _gaussian_kernels(sigmas: list[float], like: torch.Tensor) -> torch.Tensor:
    """3x3 Gaussian kernels [n, 3, 3], torchvision's construction (softmax of -(x / sigma)^2
    over 3 taps spanning +-1/sqrt(2), outer product)."""
    lim = 2 / (2.0 * math.sqrt(2.0))
    taps = torch.linspace(-lim, lim, steps=3, dtype=like.dtype, device=like.device)
    rows = []
    for sigma in sigmas:
        k = torch.softmax(taps.div(sigma).pow(2).neg(), dim=0)
        rows.append(k.unsqueeze(-1) * k)
    return torch.stack(rows)


def _blur(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Each image [3, H, W] blurred by its own 3x3 kernel (reflect padding), as torchvision's
    gaussian_blur: one grouped convolution over the batch, a group per (image, channel), on a
    channels-last input (several times faster on the CPU, and the same sums)."""
    n, c, h, w = images.shape
    weight = kernels.unsqueeze(1).expand(n, c, 3, 3).reshape(n * c, 1, 3, 3)
    padded = nnf.pad(images.reshape(1, n * c, h, w), [1, 1, 1, 1], mode="reflect")
    blurred = nnf.conv2d(padded.contiguous(memory_format=torch.channels_last), weight, groups=n * c)
    return blurred.reshape(n, c, h, w)


def _gaussian_kernels_batch(sigmas: torch.Tensor) -> torch.Tensor:
    """`_gaussian_kernels` for a tensor of sigmas at once, on their device (the batch path)."""
    lim = 2 / (2.0 * math.sqrt(2.0))
    taps = torch.linspace(-lim, lim, steps=3, dtype=sigmas.dtype, device=sigmas.device)
    k = torch.softmax((taps[None, :] / sigmas[:, None]).pow(2).neg(), dim=1)
    return k[:, :, None] * k[:, None, :]


def _resized_crop_into(dest: torch.Tensor, image: torch.Tensor, box: tuple[int, int, int, int]) -> None:
    """dest [1, C, H, W] = the box of the uint8 image [1, C, H, W] as floats in [0, 1],
    resized (bilinear, antialiased, as torchvision's resized_crop) to H x W; a box of that
    size is copied as it is. Only the box is converted to float, and the resize writes into
    the batch directly."""
    top, left, h, w = box
    crop = image[:, :, top:top + h, left:left + w].float().div_(255.0)
    if (h, w) == tuple(dest.shape[-2:]):
        dest.copy_(crop)
    else:
        torch.ops.aten._upsample_bilinear2d_aa.out(crop, list(dest.shape[-2:]), False, None, None, out=dest)


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

    def draw(self, g: torch.Generator, height: int, width: int) -> SampleDraws:
        """One sample's parameters, drawn from `g` in the order of `sample`."""
        # A crop ratio is width/height, as in torchvision; the fallback is the whole image.
        crop = _box(g, height, width, self.crop_scale, self.crop_ratio) or (0, 0, height, width)
        flip = _chance(g, self.flip_p)
        factors = (_uniform(g, 1 - self.brightness, 1 + self.brightness),
                   _uniform(g, 1 - self.contrast, 1 + self.contrast),
                   _uniform(g, 1 - self.saturation, 1 + self.saturation),
                   _uniform(g, -self.hue, self.hue))
        order = tuple(torch.randperm(4, generator=g).tolist())
        sigma = _uniform(g, *self.blur_sigma) if _chance(g, self.blur_p) else None
        erase, values = None, None
        if _chance(g, self.erase_p):
            erase = _box(g, height, width, self.erase_scale, self.erase_ratio)
            if erase is not None:
                values = torch.rand(3, erase[2], erase[3], generator=g)
        return SampleDraws(crop, flip, factors, order, sigma, erase, values)

    def sample(self, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """float [3, H, W] in [0, 1] -> augmented float [3, H, W] in [0, 1], one image
        through torchvision's functional ops: the definition the batched path matches."""
        _, height, width = image.shape
        d = self.draw(g, height, width)
        image = F.resized_crop(image, *d.crop, size=[height, width], antialias=True)
        if d.flip:
            image = F.horizontal_flip(image)
        jitters = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
        for k in d.order:
            image = jitters[k](image, d.factors[k])
        if d.blur_sigma is not None:
            image = F.gaussian_blur(image, kernel_size=[3, 3], sigma=[d.blur_sigma, d.blur_sigma])
        if d.erase is not None and d.erase_values is not None:  # drawn together
            top, left, h, w = d.erase
            image = image.clone()
            image[:, top:top + h, left:left + w] = d.erase_values.to(image.device)
        return image.clamp_(0, 1)

    def __call__(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> float [B, 3, H, W] in [0, 1], each sample augmented, on the
        batch's device (the draws come from `g` on the CPU)."""
        batch, channels, height, width = images.shape
        device = images.device
        draws = [self.draw(g, height, width) for _ in range(batch)]
        out = torch.empty((batch, channels, height, width), dtype=torch.float32, device=device)
        for i, d in enumerate(draws):
            _resized_crop_into(out[i:i + 1], images[i:i + 1], d.crop)

        def apply(members: list[int], step) -> None:
            """out[members] = step(out[members]) (a copy of those rows, changed in place)."""
            if members:
                index = _index(members, device)
                out.index_copy_(0, index, step(out.index_select(0, index)))

        apply([i for i, d in enumerate(draws) if d.flip], lambda rows: rows.flip(-1))
        for slot in range(4):
            for k, jitter in enumerate(JITTERS):
                members = [i for i, d in enumerate(draws) if d.order[slot] == k]
                factors = [draws[i].factors[k] for i in members]
                apply(members, lambda rows, jitter=jitter, factors=factors: jitter(rows, factors))
        blurred = [i for i, d in enumerate(draws) if d.blur_sigma is not None]
        sigmas = [d.blur_sigma for d in draws if d.blur_sigma is not None]
        apply(blurred, lambda rows: _blur(rows, _gaussian_kernels(sigmas, rows)))
        erased = [(i, d.erase, d.erase_values) for i, d in enumerate(draws)
                  if d.erase is not None and d.erase_values is not None]  # drawn together
        if erased:
            # One host-to-device copy for all of the batch's erasing values.
            values = torch.cat([erase_values.flatten() for _, _, erase_values in erased]).to(device)
            start = 0
            for i, (top, left, h, w), _ in erased:
                out[i, :, top:top + h, left:left + w] = values[start:start + 3 * h * w].view(3, h, w)
                start += 3 * h * w
        return out.clamp_(0, 1)


    def batch(self, images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The recipe for a batch on a GPU: uint8 [B, 3, H, W] on any device -> float in [0, 1].

        The same steps and distributions as `__call__`, but every parameter is drawn for the
        whole batch at once (from `g`, on the CPU) and every step is one batched op: the crop
        and resize is one `roi_align` (bilinear; the crop is never larger than the image, so
        torchvision's antialiasing never applies; at the crop's edge the interpolation may
        read the neighbouring pixel instead of repeating the edge one), the colour jitters are
        applied to every image of a slot of the random order at once and kept where that image
        has that jitter, and erasing is a mask. Its draws and float rounding differ from
        `__call__`'s, so its results differ too; they are reproducible for the same generator.
        """
        from torchvision.ops import roi_align

        n, channels, height, width = images.shape
        device = images.device
        top, left, h, w, found = batch_boxes(g, n, height, width, self.crop_scale, self.crop_ratio)
        top, left = top.where(found, 0), left.where(found, 0)
        h, w = h.where(found, height), w.where(found, width)
        flip = torch.rand(n, generator=g) < self.flip_p
        spans = torch.tensor([[1 - self.brightness, 1 + self.brightness], [1 - self.contrast, 1 + self.contrast],
                              [1 - self.saturation, 1 + self.saturation], [-self.hue, self.hue]])
        factors = spans[:, 0] + (spans[:, 1] - spans[:, 0]) * torch.rand(n, 4, generator=g)
        order = torch.rand(n, 4, generator=g).argsort(1)  # a uniform random order per image
        blur = torch.rand(n, generator=g) < self.blur_p
        sigmas = torch.empty(n).uniform_(*self.blur_sigma, generator=g)
        erase = torch.rand(n, generator=g) < self.erase_p
        e_top, e_left, e_h, e_w, e_found = batch_boxes(g, n, height, width, self.erase_scale, self.erase_ratio)
        erase &= e_found
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=g))
        # Every parameter in one pinned host tensor and one non-blocking copy: a plain copy to
        # the GPU would wait for the work queued before it (the previous training step).
        columns = [torch.arange(n), left, top, left + w, top + h, flip, *factors.T, *order.T, blur, sigmas,
                   erase, e_top, e_left, e_h, e_w]
        params = torch.stack([c.float() for c in columns], 1)
        if device.type == "cuda":
            params = params.pin_memory()
        params = params.to(device, non_blocking=True)
        boxes, flip_d, factors_d = params[:, 0:5].contiguous(), params[:, 5], params[:, 6:10]
        order_d, blur_d, sigmas_d = params[:, 10:14], params[:, 14], params[:, 15]
        erase_d, erase_box = params[:, 16], params[:, 17:21]

        x = images.float().div_(255.0)
        x = roi_align(x, boxes, output_size=(height, width), spatial_scale=1.0, sampling_ratio=1, aligned=True)
        x = torch.where(flip_d.view(-1, 1, 1, 1) > 0, x.flip(-1), x)
        for slot in range(4):
            for k, jitter in enumerate(DEVICE_JITTERS):
                here = (order_d[:, slot] == k).view(-1, 1, 1, 1)
                x = torch.where(here, jitter(x, factors_d[:, k].view(-1, 1, 1, 1)), x)
        if bool(blur.any()):  # decided on the host: no wait for the GPU
            x = torch.where(blur_d.view(-1, 1, 1, 1) > 0, _blur(x, _gaussian_kernels_batch(sigmas_d)), x)
        if bool(erase.any()):
            rows = torch.arange(height, device=device, dtype=x.dtype).view(1, height, 1)
            cols = torch.arange(width, device=device, dtype=x.dtype).view(1, 1, width)
            e_top, e_left, e_h, e_w = (erase_box[:, i].view(-1, 1, 1) for i in range(4))
            inside = (rows >= e_top) & (rows < e_top + e_h) & (cols >= e_left) & (cols < e_left + e_w)
            inside &= erase_d.view(-1, 1, 1) > 0
            noise = torch.rand(x.shape, generator=torch.Generator(device).manual_seed(seed), device=device)
            x = torch.where(inside.unsqueeze(1), noise, x)
        return x.clamp_(0, 1)


PRESETS.register("heavy", HeavyAugment())


def get_preset(name: str | None):
    """The recipe registered as ``name``; None -> None (no augmentation)."""
    return None if name is None else PRESETS.get(name)
