"""The data regimes: which images a model trains on and with which augmentation recipe.

One vocabulary everywhere (params, tags, run names, registry tags, study tables, report):
``unmasked``, ``masked``, ``unmasked+aug``, ``masked+aug``. A regime is a registered entry,
so a new one (say, a light recipe on masked data) is one registration, and the study grid,
the CLI choices and the report pick it up.
"""

from __future__ import annotations

from dataclasses import dataclass

from fgvc.registry import Registry


@dataclass(frozen=True)
class Regime:
    name: str
    masked: bool  # trains on the background-removed root
    augment: str | None  # augmentation recipe (fgvc.training.augment.PRESETS), None: none
    description: str


REGIMES: Registry[Regime] = Registry("regime")


def register_regime(regime: Regime) -> Regime:
    return REGIMES.register(regime.name, regime)


register_regime(Regime("unmasked", False, None, "the source images"))
register_regime(Regime("masked", True, None, "the background-removed images (person segmentation)"))
register_regime(Regime("unmasked+aug", False, "heavy", "the source images, heavy augmentation"))
register_regime(Regime("masked+aug", True, "heavy", "the background-removed images, heavy augmentation"))


def regime_of(masked: bool, augment: str | None) -> str:
    """The registered regime of a training: its data (masked or not) and its recipe."""
    for name, regime in REGIMES.items():
        if regime.masked == masked and regime.augment == augment:
            return name
    base = "masked" if masked else "unmasked"
    return f"{base}+{augment}" if augment else base
