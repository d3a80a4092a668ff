"""The `promote` configuration (kept apart from the registry code, so the CLI reads its options
without importing MLflow)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from fgvc.config import INT, STR, Choice, Config, Maybe, option

CANDIDATE, CHAMPION = "candidate", "champion"
ANY = "any"


def registered_name(arch: str) -> str:
    """`fgvc-<arch>` with characters the registry dislikes replaced (`timm:x` -> `fgvc-timm-x`)."""
    return "fgvc-" + re.sub(r"[^A-Za-z0-9_.-]", "-", arch)


@dataclass(frozen=True)
class PromoteConfig(Config):
    name: str = option(STR, "fgvc-resnet18", "Registered model (fgvc-<arch>).")
    arch: str | None = option(Maybe(STR, "none"), None, "Shortcut for --name fgvc-<arch> (wins over --name).")
    metric: str = option(Choice(("val_acc", "val_balanced_acc")), "val_acc", "Version tag to maximise.")
    dataset: str | None = option(
        Maybe(STR, "keep"), None, "Choose among versions of one dataset: keep (the champion's; without a "
        "champion the newest version's), a root name (demo-masked), a digest (or its first characters), "
        "or any (mix datasets on purpose).")
    regime: str | None = option(
        Maybe(STR, "keep"), None, "Choose among versions of one regime: keep (the champion's; without a "
        "champion any), a regime (unmasked, masked, unmasked+aug, masked+aug) or any.")
    version: int | None = option(Maybe(INT, "best"), None, "An explicit version, or best (by --metric).")
    alias: str = option(STR, CHAMPION, "The alias to move.")

    @property
    def registered_model(self) -> str:
        return registered_name(self.arch) if self.arch else self.name
