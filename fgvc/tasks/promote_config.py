"""The `promote` configuration (kept apart from the task, so the CLI reads its options without
importing MLflow)."""

from __future__ import annotations

from dataclasses import dataclass

from fgvc.config import INT, STR, Choice, Config, Maybe, option
from fgvc.mlflow_names import CHAMPION, registered_name

ANY = "any"  # --dataset any / --regime any: choose across datasets or regimes on purpose


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
