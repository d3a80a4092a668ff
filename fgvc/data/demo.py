"""runway-synth: a deterministic synthetic runway dataset with a planted background shortcut.

Each image is a model figure (head, garment, legs) on a venue backdrop. Each designer has a
garment signature (palette, pattern, silhouette) and a home venue. Looks come in runway shows
of `looks_per_show` looks: a show has one venue and one lighting (exposure, light phase,
camera height) shared by all its looks, and one collection (the signature, varied per show by
`collection_spread`: 0 keeps it exactly). A share `bg_correlation` of each designer's shows is
held at its home venue, the others at venues drawn evenly from all venues (home included), so
about bg_correlation + (1 - bg_correlation) / venues of the looks are at home: the background
shortcut is planted and controllable.

The splits are cut from one pool of looks: `split_by="show"` (the default) keeps every show
whole in one split, `"random"` deals each designer's looks at random, so a validation look has
show-mates in training (the leak a random split of real runway data has). The same config but
`split_by` gives the same images, only split differently. Ground-truth person masks (`masks`),
the venue index (`venues`) and the show index (`groups`, named in meta.json's
`split.group_names`) are stored in the shards, so the analyses can be validated against the
truth and the split checked.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fgvc.data.config import DemoConfig  # noqa: F401  (defined there, torch-free, for the CLI)
from fgvc.data.demo_pool import (
    SILHOUETTES,
    Designer,
    Pool,
    Venue,
    demo_pool,
    designer_signatures,
    split_members,
    venue_backdrops,
)
from fgvc.data.paint import PATTERNS, garment_pattern, hsv, shift_hue  # noqa: F401 (PATTERNS)
from fgvc.data.shards import make_shard, shard_name, write_json, write_label_map, write_shard
from fgvc.devices import intra_op_threads
from fgvc.errors import ConfigError


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
SKIN_AT_FULL_VALUE = hsv(0.07, 0.45, 1.0)


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


# Colour layers of a photo; each pixel shows one, then exposure, shading and noise apply.
WALL, LIGHT, FLOOR, HEAD, LEGS, CLOTH, CLOTH_SECONDARY = range(7)


def render_shots(cfg: DemoConfig, shots: Shots) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of runway photos: uint8 [B, 3, H, W] and person masks uint8 [B, H, W].

    Geometry is computed on row [B, H, 1] and column [B, 1, W] coordinates and combined by
    broadcasting into a per-pixel layer index; colours come from one gather of a per-image
    palette, so the full-size float work is a handful of passes.
    """
    H, W = cfg.height, cfg.width
    ys = torch.arange(H, dtype=torch.float32).view(1, H, 1)
    xs = torch.arange(W, dtype=torch.float32).view(1, 1, W)
    horizon = (shots.horizon.view(-1, 1, 1) + 0.04 * (_jitter(shots, HORIZON) - 0.5)) * H  # floor line, px
    layer = _backdrop_layers(shots, ys, xs, horizon)
    figure = _figure(shots, ys, xs, H)
    secondary = _garment_secondary(shots, figure, ys, xs, H, W)
    layer.masked_fill_(figure.head, HEAD).masked_fill_(figure.legs & ~figure.trousers, LEGS)
    layer = torch.where(figure.garment, CLOTH + secondary.to(torch.uint8), layer)
    image = _paint(shots, layer, ys, horizon)
    mask = figure.head | figure.body | figure.legs
    return image.clamp_(0, 255).round_().to(torch.uint8), mask.to(torch.uint8)


def _jitter(shots: Shots, column: int) -> torch.Tensor:
    """One column of the per-shot jitter as [B, 1, 1]."""
    return shots.jitter[:, column].view(len(shots.pattern), 1, 1)


def _backdrop_layers(shots: Shots, ys: torch.Tensor, xs: torch.Tensor, horizon: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W] layer index of the backdrop: wall with light bands above the floor
    line, a floor below."""
    W = xs.shape[2]
    lights = shots.lights.view(-1, 1, 1)
    band = (torch.cos(2 * math.pi * lights * (xs / W + 0.1 * _jitter(shots, LIGHT_PHASE))) > 0.6) & (lights > 0)
    on_floor = ys >= horizon  # [B, H, 1]
    return torch.where(on_floor, FLOOR, (band & ~on_floor).to(torch.uint8) * LIGHT).to(torch.uint8)


@dataclass
class Figure:
    """A batch's model figures as bool maps (each broadcasts to [B, H, W]), and where the
    garment's pattern is anchored: the body's top row and the figure's centre column [B, 1, 1]."""

    head: torch.Tensor
    body: torch.Tensor
    legs: torch.Tensor
    trousers: torch.Tensor  # legs covered by the garment
    body_top: torch.Tensor
    cx: torch.Tensor

    @property
    def garment(self) -> torch.Tensor:
        return self.body | self.trousers


def _figure(shots: Shots, ys: torch.Tensor, xs: torch.Tensor, H: int) -> Figure:
    """The figure: centred with jitter, scaled to the frame height, in the shot's silhouette."""
    W = xs.shape[2]
    scale = H * (0.85 + 0.1 * _jitter(shots, SCALE))
    cx = W / 2 + (_jitter(shots, CENTRE) - 0.5) * W * 0.2
    top = H * 0.04 + _jitter(shots, TOP) * H * 0.04
    head_r = 0.07 * scale
    head_cy = top + head_r
    body_top = head_cy + head_r * 1.1
    body_bottom = top + 0.62 * scale
    legs_bottom = (top + scale).clamp(max=H - 1.0)
    half_w = 0.13 * scale
    t = ((ys - body_top) / (body_bottom - body_top).clamp(min=1.0)).clamp(0, 1)
    silhouette = shots.silhouette.view(-1, 1, 1)
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
    return Figure(head, body, legs, legs & is_trousers, body_top, cx)


def _garment_secondary(shots: Shots, figure: Figure, ys: torch.Tensor, xs: torch.Tensor, H: int, W: int
                       ) -> torch.Tensor:
    """bool [B, H, W]: where each garment's pattern shows its secondary colour."""
    b = len(shots.pattern)
    period = torch.round(shots.period.float() * H / 64).clamp(min=1).long().view(b, 1, 1)
    pattern_y = (ys - figure.body_top).long()  # [B, H, 1]
    pattern_x = (xs - figure.cx + 100).long()  # [B, 1, W]
    secondary = torch.zeros(b, H, W, dtype=torch.bool)
    for k, kind in enumerate(PATTERNS):
        chosen = (shots.pattern == k).nonzero().flatten()
        if len(chosen) and kind != "solid":
            secondary.index_copy_(0, chosen, garment_pattern(kind, pattern_y[chosen], pattern_x[chosen],
                                                      period[chosen]))
    return secondary


def _paint(shots: Shots, layer: torch.Tensor, ys: torch.Tensor, horizon: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in 0..255 units: each layer's colour from a per-image palette, then
    floor shading, cloth tint, per-shot exposure and sensor noise."""
    b, H, W = layer.shape
    skin = SKIN_AT_FULL_VALUE.view(1, 3) * (0.55 + 0.35 * shots.jitter[:, SKIN:SKIN + 1])
    palette = torch.stack([shots.wall, shots.light_colour, shots.floor, skin, skin * 0.9,
                           shots.primary, shots.secondary], dim=2)  # [B, 3, layers]
    image = palette.gather(2, layer.view(b, 1, H * W).long().expand(b, 3, H * W)).view(b, 3, H, W)
    shade = 1.0 - 0.4 * (ys - horizon).clamp(min=0) / H  # [B, H, 1]
    tint = 0.9 + 0.2 * _jitter(shots, TINT)
    gain = torch.where(layer == FLOOR, shade, torch.where(layer >= CLOTH, tint, 1.0))
    gain.mul_((0.85 + 0.3 * _jitter(shots, EXPOSURE)) * 255.0)
    return image.mul_(gain.unsqueeze(1)).add_(shots.noise, alpha=0.03 * 255.0)


def render_image(cfg: DemoConfig, designer: Designer, venue: Venue, g: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One runway photo: uint8 [3, H, W] and person mask uint8 [H, W]."""
    shots = _shots(cfg, [designer], [venue], torch.zeros(1, dtype=torch.long),
                   torch.zeros(1, dtype=torch.long), g)
    image, mask = render_shots(cfg, shots)
    return image[0], mask[0]


# Images rendered per step: bounds the float working memory (~40 floats per pixel) at any size.
RENDER_CHUNK = 256


def _pool_shots(cfg: DemoConfig, pool: Pool, venues: list[Venue], periods: torch.Tensor, looks: slice,
                g: torch.Generator) -> Shots:
    """Shots of consecutive pool looks: the show fixes venue, lighting and collection; the
    designer the pattern period (`periods` [num_designers])."""
    show = pool.shows[looks]
    v = [venues[i] for i in pool.show_venue[show].tolist()]
    b = len(show)
    jitter = torch.rand(b, JITTER_COLUMNS, generator=g)
    jitter[:, [EXPOSURE, HORIZON, LIGHT_PHASE]] = pool.light[show]
    return Shots(
        primary=pool.primary[show], secondary=pool.secondary[show], pattern=pool.pattern[show],
        silhouette=pool.silhouette[show], period=periods[pool.labels[looks]],
        wall=torch.stack([x.wall for x in v]).reshape(b, 3),
        floor=torch.stack([x.floor for x in v]).reshape(b, 3),
        light_colour=torch.stack([x.light_colour for x in v]).reshape(b, 3),
        horizon=torch.tensor([x.horizon for x in v], dtype=torch.float32),
        lights=torch.tensor([x.lights for x in v], dtype=torch.long),
        jitter=jitter,
        noise=torch.randn(b, 3, cfg.height, cfg.width, generator=g),
    )


def render_pool(cfg: DemoConfig, backdrops: bool = False) -> dict[str, Any]:
    """Every look of the pool: images [N, 3, H, W], masks [N, H, W], labels, venues, groups
    (show ids) [N], and with ``backdrops`` the same shots without the person."""
    designers, venues = designer_signatures(cfg), venue_backdrops(cfg)
    pool = demo_pool(cfg, designers)
    periods = torch.tensor([x.period for x in designers], dtype=torch.long)
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 29)
    n = len(pool.labels)
    out: dict[str, Any] = {"images": torch.empty(n, 3, cfg.height, cfg.width, dtype=torch.uint8),
           "masks": torch.empty(n, cfg.height, cfg.width, dtype=torch.uint8)}
    if backdrops:
        out["backdrops"] = torch.empty(n, 3, cfg.height, cfg.width, dtype=torch.uint8)
    with intra_op_threads(1):  # many short ops on small tensors: a second thread only syncs
        for start in range(0, n, RENDER_CHUNK):
            part = slice(start, start + RENDER_CHUNK)
            shots = _pool_shots(cfg, pool, venues, periods, part, g)
            out["images"][part], out["masks"][part] = render_shots(cfg, shots)
            if backdrops:
                out["backdrops"][part] = render_backdrops(cfg, shots)
    out.update(labels=pool.labels, venues=pool.show_venue[pool.shows], groups=pool.shows)
    out["members"] = split_members(cfg, pool)
    out["show_designer"] = pool.show_designer
    return out


def designer_names(n: int) -> list[str]:
    return [f"designer_{i:02d}" for i in range(n)]


def show_names(show_designer: torch.Tensor) -> list[str]:
    """`designer_03/show_02`: the show's designer and its number among that designer's shows."""
    seen: dict[int, int] = {}
    names = []
    for d in show_designer.tolist():
        names.append(f"designer_{d:02d}/show_{seen.get(d, 0):02d}")
        seen[d] = seen.get(d, 0) + 1
    return names


def split_record(cfg: DemoConfig, rendered: dict) -> dict:
    """What meta.json says about the demo's split (as an ingest's `split`)."""
    from fgvc.data.splits import spanning

    names = show_names(rendered["show_designer"])
    members = rendered["members"]
    of = {split: [names[s] for s in rendered["groups"][m].tolist()] for split, m in members.items()}
    per_designer: dict[str, dict[str, int]] = {}
    for split, keys in of.items():
        for key in set(keys):
            label = key.split("/", 1)[0]
            per_designer.setdefault(label, {s: 0 for s in members})[split] += 1
    return {"by": cfg.split_by, "looks_per_show": cfg.looks_per_show,
            "groups": {split: len(set(keys)) for split, keys in of.items()},
            "groups_per_designer": dict(sorted(per_designer.items())),
            "groups_in_two_splits": len(spanning(of)), "group_names": names}


DEFAULT_DEMO = DemoConfig()  # `fgvc prepare`'s default demo


def generate_demo(root: str | Path, cfg: DemoConfig = DEFAULT_DEMO) -> dict:
    """Write a runway-synth dataset root; same config -> byte-identical shards. Returns meta."""
    root = Path(root)
    designers = designer_signatures(cfg)
    rendered = render_pool(cfg)
    counts = {}
    for split, members in rendered["members"].items():
        for k, start in enumerate(range(0, len(members), cfg.shard_size)):
            idx = members[start:start + cfg.shard_size]
            shard = make_shard(rendered["images"][idx], rendered["labels"][idx], cfg.num_designers,
                               masks=rendered["masks"][idx], venues=rendered["venues"][idx],
                               groups=rendered["groups"][idx])
            write_shard(root / split / shard_name(k), shard)
        counts[split] = len(members)
    write_label_map(root, designer_names(cfg.num_designers))
    meta = {
        "source": "runway-synth",
        "generator": asdict(cfg),
        "image_size": [cfg.height, cfg.width],
        "num_classes": cfg.num_designers,
        "counts": counts,
        "designers": [{"pattern": d.pattern, "silhouette": d.silhouette} for d in designers],
        "split": split_record(cfg, rendered),
    }
    write_json(root / "meta.json", meta)
    return meta


# --- the same shots without the person ----------------------------------------------------

# A figure centred this far right of the frame (in units of the centre jitter) draws no pixel.
OFF_FRAME_CENTRE = 1e4


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
    `groups`, in shard order) plus `backdrops`: the same shots rendered without the person."""
    if split not in cfg.splits:
        raise ConfigError(f"demo split must be one of {', '.join(cfg.splits)}, got {split!r}")
    rendered = render_pool(cfg, backdrops=True)
    idx = rendered["members"][split]
    return {k: rendered[k][idx] for k in ("images", "masks", "backdrops", "labels", "venues", "groups")}
