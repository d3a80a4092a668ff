"""runway-synth: a deterministic synthetic runway dataset with a planted background shortcut.

Each image is a model figure (head, garment, legs) on a venue backdrop. Each designer has a
garment signature (palette, pattern, silhouette) and a home venue; with probability
`bg_correlation` an image is shot at its designer's home venue, otherwise at a random venue.
So the garment always carries the label, and the background carries it as strongly as
`bg_correlation` says: the shortcut is planted and controllable. Ground-truth person masks
(`masks`) and the venue index (`venues`) are stored in the shards, so the analyses can be
validated against the truth.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fgvc.data.config import DemoConfig  # noqa: F401  (defined there, torch-free, for the CLI)
from fgvc.data.shards import make_shard, shard_name, write_json, write_label_map, write_shard
from fgvc.devices import intra_op_threads
from fgvc.errors import ConfigError

PATTERNS = ("solid", "hstripes", "vstripes", "checks", "dots", "diagonal")
SILHOUETTES = ("straight", "a-line", "trousers")


def _rgb(h: float, s: float, v: float) -> torch.Tensor:
    return torch.tensor(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=torch.float32)


@dataclass
class Designer:
    primary: torch.Tensor  # [3] in [0, 1]
    secondary: torch.Tensor
    pattern: str
    silhouette: str
    period: int  # pattern period in pixels at 64 px height


@dataclass
class Venue:
    wall: torch.Tensor  # [3]
    floor: torch.Tensor
    horizon: float  # floor line as a fraction of height
    lights: int  # number of vertical light bands on the wall
    light_colour: torch.Tensor


def designer_signatures(cfg: DemoConfig) -> list[Designer]:
    g = torch.Generator().manual_seed(cfg.seed * 31 + 1)
    out = []
    for d in range(cfg.num_designers):
        hue = d / cfg.num_designers
        offset = 0.25 + 0.5 * float(torch.rand(1, generator=g))
        out.append(Designer(
            primary=_rgb(hue, 0.75, 0.85),
            secondary=_rgb(hue + offset, 0.5, 0.35 + 0.5 * float(torch.rand(1, generator=g))),
            pattern=PATTERNS[d % len(PATTERNS)],
            silhouette=SILHOUETTES[(d // len(PATTERNS) + d) % len(SILHOUETTES)],
            period=3 + int(torch.randint(0, 4, (1,), generator=g)),
        ))
    return out


def venue_backdrops(cfg: DemoConfig) -> list[Venue]:
    g = torch.Generator().manual_seed(cfg.seed * 31 + 2)
    out = []
    for v in range(cfg.venues):
        # Hues interleaved against the designers' so a venue is not a garment colour cue.
        hue = (v + 0.5) / cfg.venues + 0.37
        out.append(Venue(
            wall=_rgb(hue, 0.35 + 0.4 * float(torch.rand(1, generator=g)), 0.25 + 0.6 * float(torch.rand(1, generator=g))),
            floor=_rgb(hue + 0.5, 0.3, 0.2 + 0.5 * float(torch.rand(1, generator=g))),
            horizon=0.62 + 0.2 * float(torch.rand(1, generator=g)),
            lights=int(torch.randint(0, 5, (1,), generator=g)),
            light_colour=_rgb(hue + 0.1, 0.15, 1.0),
        ))
    return out


@dataclass
class Shots:
    """Per-image parameters of a batch of runway photos (every field has B first).

    Fixed by the designer: primary, secondary [B, 3], pattern, silhouette, period [B].
    Fixed by the venue: wall, floor, light_colour [B, 3], horizon, lights [B].
    Drawn per shot: jitter [B, 9] uniform in [0, 1); noise [B, 3, H, W] standard normal.
    """

    primary: torch.Tensor
    secondary: torch.Tensor
    pattern: torch.Tensor
    silhouette: torch.Tensor
    period: torch.Tensor
    wall: torch.Tensor
    floor: torch.Tensor
    light_colour: torch.Tensor
    horizon: torch.Tensor
    lights: torch.Tensor
    jitter: torch.Tensor
    noise: torch.Tensor


# Columns of Shots.jitter.
EXPOSURE, HORIZON, LIGHT_PHASE, SCALE, CENTRE, TOP, SKIN, TINT = range(8)
JITTER_COLUMNS = 9  # one spare column keeps the draw layout stable if a cue is added

# hsv_to_rgb is linear in v, so a skin tone of value v is v times this colour.
SKIN_AT_FULL_VALUE = _rgb(0.07, 0.45, 1.0)


def _shots(cfg: DemoConfig, designers: list[Designer], venues: list[Venue], labels: torch.Tensor,
           venue_ids: torch.Tensor, g: torch.Generator) -> Shots:
    d = [designers[i] for i in labels.tolist()]
    v = [venues[i] for i in venue_ids.tolist()]
    b = len(d)
    return Shots(
        primary=torch.stack([x.primary for x in d]).reshape(b, 3),
        secondary=torch.stack([x.secondary for x in d]).reshape(b, 3),
        pattern=torch.tensor([PATTERNS.index(x.pattern) for x in d], dtype=torch.long),
        silhouette=torch.tensor([SILHOUETTES.index(x.silhouette) for x in d], dtype=torch.long),
        period=torch.tensor([x.period for x in d], dtype=torch.long),
        wall=torch.stack([x.wall for x in v]).reshape(b, 3),
        floor=torch.stack([x.floor for x in v]).reshape(b, 3),
        light_colour=torch.stack([x.light_colour for x in v]).reshape(b, 3),
        horizon=torch.tensor([x.horizon for x in v], dtype=torch.float32),
        lights=torch.tensor([x.lights for x in v], dtype=torch.long),
        jitter=torch.rand(b, JITTER_COLUMNS, generator=g),
        noise=torch.randn(b, 3, cfg.height, cfg.width, generator=g),
    )


def _stripes(coord: torch.Tensor, period: torch.Tensor) -> torch.Tensor:
    return (coord.div(period, rounding_mode="floor") % 2) == 0


def _pattern(kind: str, ys: torch.Tensor, xs: torch.Tensor, period: torch.Tensor) -> torch.Tensor:
    """Boolean, broadcast of ys [B, H, 1] and xs [B, 1, W] (integer pixel coordinates relative
    to the garment): where the secondary colour shows."""
    if kind == "solid":
        return torch.zeros(torch.broadcast_shapes(ys.shape, xs.shape), dtype=torch.bool)
    if kind == "hstripes":
        return _stripes(ys, period).expand(-1, -1, xs.shape[2])
    if kind == "vstripes":
        return _stripes(xs, period).expand(-1, ys.shape[1], -1)
    if kind == "checks":
        return _stripes(ys, period) == _stripes(xs, period)
    if kind == "dots":
        return ((ys % (2 * period)) < period / 1.5) & ((xs % (2 * period)) < period / 1.5)
    return _stripes(ys + xs, period)  # diagonal


# Colour layers of a photo; each pixel shows one, then exposure, shading and noise apply.
WALL, LIGHT, FLOOR, HEAD, LEGS, CLOTH, CLOTH_SECONDARY = range(7)


def render_shots(cfg: DemoConfig, shots: Shots) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of runway photos: uint8 [B, 3, H, W] and person masks uint8 [B, H, W].

    Geometry is computed on row [B, H, 1] and column [B, 1, W] coordinates and combined by
    broadcasting into a per-pixel layer index; colours come from one gather of a per-image
    palette, so the full-size float work is a handful of passes.
    """
    H, W = cfg.height, cfg.width
    b = len(shots.pattern)
    col = lambda k: shots.jitter[:, k].view(b, 1, 1)  # noqa: E731  [B, 1, 1]
    ys = torch.arange(H, dtype=torch.float32).view(1, H, 1)
    xs = torch.arange(W, dtype=torch.float32).view(1, 1, W)

    # Backdrop: wall with light bands above the floor line, a floor below.
    horizon = (shots.horizon.view(b, 1, 1) + 0.04 * (col(HORIZON) - 0.5)) * H
    lights = shots.lights.view(b, 1, 1)
    band = (torch.cos(2 * math.pi * lights * (xs / W + 0.1 * col(LIGHT_PHASE))) > 0.6) & (lights > 0)
    on_floor = ys >= horizon  # [B, H, 1]
    layer = torch.where(on_floor, FLOOR, (band & ~on_floor).to(torch.uint8) * LIGHT).to(torch.uint8)

    # The figure: centred with jitter, scaled to the frame height.
    scale = H * (0.85 + 0.1 * col(SCALE))
    cx = W / 2 + (col(CENTRE) - 0.5) * W * 0.2
    top = H * 0.04 + col(TOP) * H * 0.04
    head_r = 0.07 * scale
    head_cy = top + head_r
    body_top = head_cy + head_r * 1.1
    body_bottom = top + 0.62 * scale
    legs_bottom = (top + scale).clamp(max=H - 1.0)
    half_w = 0.13 * scale
    t = ((ys - body_top) / (body_bottom - body_top).clamp(min=1.0)).clamp(0, 1)
    silhouette = shots.silhouette.view(b, 1, 1)
    a_line = silhouette == SILHOUETTES.index("a-line")
    is_trousers = silhouette == SILHOUETTES.index("trousers")
    body_half = torch.where(a_line, half_w * (0.8 + 0.9 * t),
                            torch.where(is_trousers, half_w * (1.0 - 0.1 * t), half_w))  # [B, H, 1]
    body_end = torch.where(a_line, body_bottom + 0.08 * scale, body_bottom)
    dx = (xs - cx).abs()  # [B, 1, W]
    head = (ys - head_cy) ** 2 + dx ** 2 <= head_r ** 2
    body = (ys >= body_top) & (ys <= body_end) & (dx <= body_half)
    leg_w = 0.045 * scale
    leg_dx = 0.06 * scale
    legs = ((ys > body_end) & (ys <= legs_bottom)) & (
        ((xs - (cx - leg_dx)).abs() <= leg_w) | ((xs - (cx + leg_dx)).abs() <= leg_w))
    trousers = legs & is_trousers
    garment = body | trousers

    period = torch.round(shots.period.float() * H / 64).clamp(min=1).long().view(b, 1, 1)
    pattern_y = (ys - body_top).long()  # [B, H, 1]
    pattern_x = (xs - cx + 100).long()  # [B, 1, W]
    secondary = torch.zeros(b, H, W, dtype=torch.bool)
    for k, kind in enumerate(PATTERNS):
        chosen = (shots.pattern == k).nonzero().flatten()
        if len(chosen) and kind != "solid":
            secondary.index_copy_(0, chosen, _pattern(kind, pattern_y[chosen], pattern_x[chosen],
                                                      period[chosen]))

    layer.masked_fill_(head, HEAD).masked_fill_(legs & ~trousers, LEGS)
    layer = torch.where(garment, CLOTH + secondary.to(torch.uint8), layer)
    mask = head | body | legs

    skin = SKIN_AT_FULL_VALUE.view(1, 3) * (0.55 + 0.35 * shots.jitter[:, SKIN:SKIN + 1])
    palette = torch.stack([shots.wall, shots.light_colour, shots.floor, skin, skin * 0.9,
                           shots.primary, shots.secondary], dim=2)  # [B, 3, layers]
    image = palette.gather(2, layer.view(b, 1, H * W).long().expand(b, 3, H * W)).view(b, 3, H, W)

    # Per-pixel brightness: floor shading, cloth tint, per-shot exposure; in 0..255 units.
    shade = 1.0 - 0.4 * (ys - horizon).clamp(min=0) / H  # [B, H, 1]
    tint = 0.9 + 0.2 * col(TINT)
    gain = torch.where(layer == FLOOR, shade, torch.where(layer >= CLOTH, tint, 1.0))
    gain.mul_((0.85 + 0.3 * col(EXPOSURE)) * 255.0)
    image.mul_(gain.unsqueeze(1)).add_(shots.noise, alpha=0.03 * 255.0)
    return image.clamp_(0, 255).round_().to(torch.uint8), mask.to(torch.uint8)


def render_image(cfg: DemoConfig, designer: Designer, venue: Venue, g: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One runway photo: uint8 [3, H, W] and person mask uint8 [H, W]."""
    shots = _shots(cfg, [designer], [venue], torch.zeros(1, dtype=torch.long),
                   torch.zeros(1, dtype=torch.long), g)
    image, mask = render_shots(cfg, shots)
    return image[0], mask[0]


# Images rendered per step: bounds the float working memory (~40 floats per pixel) at any size.
RENDER_CHUNK = 256


def _split_draws(cfg: DemoConfig, per_class: int, split_seed: int):
    """A split's labels and venues, and the generator the shots then draw from (in this order:
    every renderer of a split repeats it, so they all see the same shots)."""
    g = torch.Generator().manual_seed(split_seed)
    n = per_class * cfg.num_designers
    labels = torch.arange(cfg.num_designers).repeat_interleave(per_class)
    labels = labels[torch.randperm(n, generator=g)]
    at_home = torch.rand(n, generator=g) < cfg.bg_correlation
    elsewhere = torch.randint(0, cfg.venues, (n,), generator=g)
    return g, labels, torch.where(at_home, labels % cfg.venues, elsewhere)


def _render_split(cfg: DemoConfig, per_class: int, split_seed: int, designers, venues):
    g, labels, venue_ids = _split_draws(cfg, per_class, split_seed)
    n = len(labels)
    images = torch.empty(n, 3, cfg.height, cfg.width, dtype=torch.uint8)
    masks = torch.empty(n, cfg.height, cfg.width, dtype=torch.uint8)
    for start in range(0, n, RENDER_CHUNK):
        part = slice(start, start + RENDER_CHUNK)
        shots = _shots(cfg, designers, venues, labels[part], venue_ids[part], g)
        images[part], masks[part] = render_shots(cfg, shots)
    return images, labels, masks, venue_ids


def designer_names(n: int) -> list[str]:
    return [f"designer_{i:02d}" for i in range(n)]


def generate_demo(root: str | Path, cfg: DemoConfig = DemoConfig()) -> dict:
    """Write a runway-synth dataset root; same config -> byte-identical shards. Returns meta."""
    root = Path(root)
    designers, venues = designer_signatures(cfg), venue_backdrops(cfg)
    counts = {}
    for split_index, (split, per_class) in enumerate((("train", cfg.train_per_class), ("val", cfg.val_per_class))):
        with intra_op_threads(1):  # many short ops on small tensors: a second thread only syncs
            images, labels, masks, venue_ids = _render_split(
                cfg, per_class, cfg.seed * 1000 + split_index + 17, designers, venues)
        for k, start in enumerate(range(0, len(labels), cfg.shard_size)):
            sl = slice(start, start + cfg.shard_size)
            shard = make_shard(images[sl], labels[sl], cfg.num_designers, masks=masks[sl], venues=venue_ids[sl])
            write_shard(root / split / shard_name(k), shard)
        counts[split] = len(labels)
    write_label_map(root, designer_names(cfg.num_designers))
    meta = {
        "source": "runway-synth",
        "generator": asdict(cfg),
        "image_size": [cfg.height, cfg.width],
        "num_classes": cfg.num_designers,
        "counts": counts,
        "designers": [{"pattern": d.pattern, "silhouette": d.silhouette} for d in designers],
    }
    write_json(root / "meta.json", meta)
    return meta


# --- the same shots without the person ----------------------------------------------------

# A figure centred this far right of the frame (in units of the centre jitter) draws no pixel.
OFF_FRAME_CENTRE = 1e4
DEMO_SPLITS = ("train", "val")


def render_backdrops(cfg: DemoConfig, shots: Shots) -> torch.Tensor:
    """The venue of each shot with no one on it: uint8 [B, 3, H, W], equal to the photo that
    `render_shots` draws from the same shots wherever its person mask is 0 (same wall, lights,
    floor, exposure and noise). Works by moving the figure out of frame, so the photo renderer
    itself stays untouched."""
    jitter = shots.jitter.clone()
    jitter[:, CENTRE] = OFF_FRAME_CENTRE
    backdrops, mask = render_shots(cfg, dataclasses.replace(shots, jitter=jitter))
    if mask.any():
        raise RuntimeError("render_backdrops: the figure did not leave the frame")
    return backdrops


def render_split_with_backdrops(cfg: DemoConfig, split: str) -> dict[str, torch.Tensor]:
    """One split exactly as `generate_demo` writes it (`images`, `masks`, `labels`, `venues`,
    in shard order) plus `backdrops`: the same shots rendered without the person."""
    if split not in DEMO_SPLITS:
        raise ConfigError(f"demo split must be one of {', '.join(DEMO_SPLITS)}, got {split!r}")
    split_index = DEMO_SPLITS.index(split)
    per_class = (cfg.train_per_class, cfg.val_per_class)[split_index]
    designers, venues = designer_signatures(cfg), venue_backdrops(cfg)
    g, labels, venue_ids = _split_draws(cfg, per_class, cfg.seed * 1000 + split_index + 17)
    n = len(labels)
    parts: dict[str, list[torch.Tensor]] = {"images": [], "masks": [], "backdrops": []}
    with intra_op_threads(1):  # many short ops on small tensors: a second thread only syncs
        for start in range(0, n, RENDER_CHUNK):
            part = slice(start, start + RENDER_CHUNK)
            shots = _shots(cfg, designers, venues, labels[part], venue_ids[part], g)
            image, mask = render_shots(cfg, shots)
            parts["images"].append(image)
            parts["masks"].append(mask)
            parts["backdrops"].append(render_backdrops(cfg, shots))
    return {**{k: torch.cat(v) for k, v in parts.items()}, "labels": labels, "venues": venue_ids}
