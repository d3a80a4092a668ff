"""The analysis configuration: which registered model, which methods, on which images, with
which settings. A method's record is keyed by the settings it uses (see `settings_of`)."""

from __future__ import annotations

from dataclasses import dataclass

from fgvc.config import BOOL, INT, STR, Choice, Config, Kind, Maybe, digest, option, positive
from fgvc.errors import ConfigError

ALL = "all"
SPLITS = ("train", "val", "test")
# Grad-CAM's layer=auto: the deepest stage whose map has at least this many cells on its shorter
# side at the analysed image size. 7 is the resolution of the classic Grad-CAM of a ResNet at
# 224x224 (layer4: 7x7); coarser maps cannot tell a figure from the backdrop beside it.
MIN_CAM_CELLS = 7


class Methods(Kind):
    """A comma list of registered analysis methods; `all` = every method marked as part of it."""

    name = "comma list of methods or all"

    def parse(self, text: str) -> tuple[str, ...]:
        from fgvc.catalog import METHODS  # names without importing the methods; `all` loads them

        chosen: list[str] = []
        for part in str(text).replace("+", ",").split(","):
            part = part.strip()
            if not part:
                continue
            if part == ALL:
                chosen += list(METHODS.where(lambda m: m.in_all))
            elif part in METHODS:
                chosen.append(part)
            else:
                raise ValueError(f"unknown analysis method {part!r}; choose from {', '.join(METHODS.names())}, all")
        if not chosen:
            raise ValueError("no method given")
        return tuple(dict.fromkeys(chosen))

    def render(self, value):
        return ",".join(value)


@dataclass(frozen=True)
class AnalyzeConfig(Config):
    model: str = option(STR, "models:/fgvc-resnet18@candidate",
                        "models:/<name>@<alias>, models:/<name>/<version> or <name>@<alias>.")
    method: tuple[str, ...] = option(Methods(), ("gradcam",),
                                     "Comma list of methods (gradcam, occlusion, neighbors, shortcut, ...) "
                                     "or all (every attribution method and neighbours).")
    data_root: str | None = option(Maybe(STR), None, "Dataset to analyse (auto: the one the model trained on).")
    mask_root: str | None = option(Maybe(STR, "none"), None,
                                   "Masked root built from the same data, for person masks.")
    split: str = option(Choice(SPLITS), "val", "Split whose images are analysed.")
    num_images: int = option(INT, 64, "Images analysed (seeded, class-stratified).", check=positive)
    seed: int = option(INT, 0, "Seed of the image choice and of the background-swap partners.")
    target: str = option(Choice(("predicted", "label")), "predicted", "Class explained.")
    batch_size: int = option(INT, 32, "Images per forward pass.", check=positive, identity=False)
    layer: str | None = option(Maybe(STR), None,
                               f"Grad-CAM layer: auto (the deepest stage with at least {MIN_CAM_CELLS} cells on "
                               f"the map's shorter side) or a module name (e.g. body.layer3).")
    window: int = option(INT, 32, "Occlusion window side (pixels).", check=positive)
    stride: int = option(INT, 16, "Occlusion stride (pixels).", check=positive)
    fill: str = option(Choice(("zero", "mean", "blur")), "zero", "Occlusion fill.")
    occlusion_mode: str = option(Choice(("exact", "approx")), "exact",
                                 "Occlusion: exact, or approx (faster; reported as approximate).")
    k: int = option(INT, 5, "Neighbours per query.", check=positive)
    exclude_same_designer: bool = option(BOOL, False,
                                         "Neighbours: drop the query's own designer (which other designers look "
                                         "alike?).")
    show_on_training_run: bool | None = option(
        Maybe(BOOL), None, "Show these results as the training run's analysis metrics: auto (when the run shows "
        "none for the method yet, or shows these same settings) | true | false.", identity=False)
    device: str | None = option(Maybe(STR), None, "auto | cpu | cuda | cuda:N.", identity=False)

    def __post_init__(self):
        super().__post_init__()
        if self.stride > self.window:
            raise ConfigError(f"--stride {self.stride} is larger than --window {self.window}: pixels between "
                              f"windows would never be occluded")


# Settings every method's result depends on, beside its own `settings` fields.
COMMON_SETTINGS = ("split", "num_images", "seed", "target")


def settings_of(cfg: AnalyzeConfig, fields: tuple[str, ...]) -> dict[str, str]:
    """The rendered settings a method's result depends on."""
    params = cfg.params()
    return {name: params[name] for name in (*COMMON_SETTINGS, *fields)}


def settings_id(settings: dict[str, str], context: dict[str, str]) -> str:
    """The key of one analysis record: its settings plus what it ran on (model version, data)."""
    return digest({**settings, **context})
