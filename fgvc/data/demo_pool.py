"""Who shows what where in the runway-synth demo (fgvc.data.demo renders it): each designer's
signature (colours, pattern, silhouette, light period) and each venue's backdrop, then the pool of
shows and looks, deterministic in the config's seed, and which looks each split holds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fgvc.data.config import DemoConfig
from fgvc.data.paint import PATTERNS, hsv, shift_hue

SILHOUETTES = ("straight", "a-line", "trousers")


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
            primary=hsv(hue, 0.75, 0.85),
            secondary=hsv(hue + offset, 0.5, 0.35 + 0.5 * float(torch.rand(1, generator=g))),
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
            wall=hsv(hue, 0.35 + 0.4 * float(torch.rand(1, generator=g)),
                     0.25 + 0.6 * float(torch.rand(1, generator=g))),
            floor=hsv(hue + 0.5, 0.3, 0.2 + 0.5 * float(torch.rand(1, generator=g))),
            horizon=0.62 + 0.2 * float(torch.rand(1, generator=g)),
            lights=int(torch.randint(0, 5, (1,), generator=g)),
            light_colour=hsv(hue + 0.1, 0.15, 1.0),
        ))
    return out


@dataclass
class Pool:
    """Every look of a demo dataset, in render order (designer-major), and its shows.

    Per look [N]: labels, shows (show index). Per show [S]: designer, venue, part (the split
    the show belongs to under split_by="show"), light [S, 3] (exposure, horizon, light phase
    in [0, 1)), primary/secondary [S, 3], pattern/silhouette [S] (the show's collection).
    """

    labels: torch.Tensor
    shows: torch.Tensor
    show_designer: torch.Tensor
    show_venue: torch.Tensor
    show_part: list[str]
    light: torch.Tensor
    primary: torch.Tensor
    secondary: torch.Tensor
    pattern: torch.Tensor
    silhouette: torch.Tensor


def _even_chunks(n: int, size: int) -> list[int]:
    """n looks in ceil(n / size) shows of near-equal size."""
    k = -(-n // size)
    return [n // k + (1 if i < n % k else 0) for i in range(k)] if n else []


def demo_pool(cfg: DemoConfig, designers: list[Designer]) -> Pool:
    """The shows and looks of `cfg` (see the module docstring); deterministic in cfg.seed."""
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 17)
    labels: list[int] = []
    shows: list[int] = []
    show_designer: list[int] = []
    show_venue: list[int] = []
    show_part: list[str] = []
    for d in range(cfg.num_designers):
        first = len(show_designer)
        for part in cfg.splits:
            for size in _even_chunks(cfg.per_class(part), cfg.looks_per_show):
                shows += [len(show_designer)] * size
                labels += [d] * size
                show_designer.append(d)
                show_part.append(part)
        count = len(show_designer) - first
        # A share bg_correlation of the designer's shows at home; the rest at venues dealt evenly.
        at_home = torch.zeros(count, dtype=torch.bool)
        at_home[torch.randperm(count, generator=g)[:round(cfg.bg_correlation * count)]] = True
        dealt = torch.cat([torch.randperm(cfg.venues, generator=g) for _ in range(-(-count // cfg.venues))])
        show_venue += torch.where(at_home, d % cfg.venues, dealt[:count]).tolist()
    n_shows = len(show_designer)
    light = torch.rand(n_shows, 3, generator=g)
    variation = torch.rand(n_shows, 5, generator=g)  # hue shift, pattern change, pattern, silhouette change, silhouette
    spread = cfg.collection_spread
    primary, secondary, pattern, silhouette = [], [], [], []
    for k, d in enumerate(show_designer):
        sig, u = designers[d], variation[k].tolist()
        shift = spread * (u[0] - 0.5)
        primary.append(shift_hue(sig.primary, shift) if shift else sig.primary)
        secondary.append(shift_hue(sig.secondary, shift) if shift else sig.secondary)
        pattern.append(int(u[2] * len(PATTERNS)) if u[1] < spread else PATTERNS.index(sig.pattern))
        silhouette.append(int(u[4] * len(SILHOUETTES)) if u[3] < spread else SILHOUETTES.index(sig.silhouette))
    return Pool(torch.tensor(labels, dtype=torch.long), torch.tensor(shows, dtype=torch.long),
                torch.tensor(show_designer), torch.tensor(show_venue, dtype=torch.long), show_part, light,
                torch.stack(primary), torch.stack(secondary), torch.tensor(pattern), torch.tensor(silhouette))


def split_members(cfg: DemoConfig, pool: Pool) -> dict[str, torch.Tensor]:
    """Look indices of each split, in shard order: whole shows (split_by="show") or each
    designer's looks dealt at random (split_by="random"), with the same counts per designer."""
    g = torch.Generator().manual_seed(cfg.seed * 1000 + 23)
    part_of_look = [pool.show_part[s] for s in pool.shows.tolist()]
    members: dict[str, list[int]] = {split: [] for split in cfg.splits}
    for d in range(cfg.num_designers):
        looks = (pool.labels == d).nonzero().flatten()
        if cfg.split_by == "random":
            looks = looks[torch.randperm(len(looks), generator=g)]
            start = 0
            for split in ("val", "test", "train"):
                if split in members:
                    members[split] += looks[start:start + cfg.per_class(split)].tolist()
                    start += cfg.per_class(split)
        else:
            for i in looks.tolist():
                members[part_of_look[i]].append(i)
    return {split: torch.tensor(m, dtype=torch.long)[torch.randperm(len(m), generator=g)]
            for split, m in members.items()}
