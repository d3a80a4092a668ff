"""The training configuration: every knob of a training, typed, with the original scripts'
defaults. Parsed once by the CLI; params and the config id are rendered from it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from fgvc.catalog import ORIGINAL_ARCHS, PRESETS, arch_problem
from fgvc.config import (
    BOOL,
    FLOAT,
    INT,
    STR,
    Choice,
    Config,
    FlagOr,
    Kind,
    Maybe,
    below_one,
    config_id,
    non_negative,
    option,
    positive,
)
from fgvc.errors import ConfigError

if TYPE_CHECKING:
    import torch

DEFAULT_DATA_ROOT = "data/demo"
DEFAULT_RECIPE = "heavy"

# Characters MLflow's registry filters and URIs take without quoting trouble.
REGISTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")


class Augmentation(Kind):
    """``false``/``none`` -> None, ``true`` -> the heavy recipe, or a recipe's name."""

    @property
    def name(self) -> str:  # type: ignore[override]
        return "true|false|" + "|".join(PRESETS.names())

    def parse(self, text):
        word = str(text).strip().lower()
        if word in ("none", *("false", "no", "0", "off")):
            return None
        if word in ("true", "yes", "1", "on"):
            return DEFAULT_RECIPE
        return Choice(PRESETS.names).parse(word)

    def render(self, value):
        return "false" if value is None else "true" if value == DEFAULT_RECIPE else value


def _registry_name(value) -> str | None:
    if value is None or value is False or isinstance(value, str) and REGISTRY_NAME.match(value):
        return None
    if not isinstance(value, str):
        return "must be a name, 'auto' (None) or 'none' (False)"
    return "must be letters, digits, '_', '.' or '-' (the registry's filters cannot hold quotes)"


@dataclass(frozen=True)
class TrainConfig(Config):
    arch: str = option(STR, "resnet18", "resnet18 | resnet34 | resnet50 | fn-small | fn-medium | "
                       "timm:<name>.", check=arch_problem)
    pretrained: bool | str | None = option(
        Maybe(FlagOr(STR, "path")), None,
        "auto: ImageNet weights when they can be had (cache or download), else random init; "
        "true: ImageNet weights or stop; false: random init; or a weights file.")
    data_root: str = option(STR, DEFAULT_DATA_ROOT, "Dataset root (the demo data is generated on first use).",
                            identity=False)
    aug: str | None = option(Augmentation(), None, "false | true (the heavy recipe) | a recipe name.")
    epochs: int = option(INT, 6, "Training epochs.", check=positive)
    batch_size: int = option(INT, 64, "Global batch size.", check=positive)
    lr_head: float = option(FLOAT, 1e-3, "Learning rate of the classifier head.", check=positive)
    lr_backbone: float | None = option(Maybe(FLOAT), None, "auto: 1e-4 (ResNet/timm) or lr_head (FashionNet).",
                                       check=positive)
    weight_decay: float | None = option(Maybe(FLOAT), None, "auto: 0.05 (ResNet/timm) or 0.01 (FashionNet).",
                                        check=non_negative)
    label_smoothing: float = option(FLOAT, 0.1, "Label smoothing of the training loss, in [0, 1).",
                                    check=below_one)
    seed: int = option(INT, 0, "Random seed (the same seed on the CPU gives the same metrics).")
    train_count: int | None = option(Maybe(INT, "all"), None, "Class-stratified training subset size.",
                                     check=positive)
    val_count: int | None = option(Maybe(INT, "all"), None, "Class-stratified validation subset size.",
                                   check=positive)
    num_workers: int | None = option(Maybe(INT), None, "Loader threads; auto: the fastest for this machine "
                                     "(none on a CPU-only machine, 2 beside a GPU).", check=non_negative,
                                     identity=False)
    device: str | None = option(Maybe(STR), None, "auto | cpu | cuda | cuda:N.", identity=False)
    amp: bool | None = option(Maybe(BOOL), None, "Mixed precision: auto (on for CUDA) | true | false.")
    channels_last: bool | None = option(Maybe(BOOL), None, "auto (on for CUDA) | true | false.")
    grad_clip: float = option(FLOAT, 0.0, "Max gradient norm (0: off).", check=non_negative)
    resume: bool | str = option(FlagOr(STR, "run id"), False,
                                "true: the newest unfinished run of this config | <run_id> | false.",
                                identity=False)
    registered_model: str | Literal[False] | None = option(
        Maybe(STR, "auto", also={"none": False}), None,
        "Registry name (auto: fgvc-<arch>; none: do not register).", check=_registry_name, identity=False)
    nproc: int = option(INT, 1, "Data-parallel processes on this machine (>1: relaunches under torchrun; "
                        "batch_size stays the global batch).", check=positive, identity=False)
    sync_bn: bool = option(BOOL, False, "DDP on GPUs: synchronise BatchNorm statistics across processes.")

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size % self.nproc:
            raise ConfigError(f"--batch-size {self.batch_size} is the global batch and must be divisible "
                              f"by --nproc {self.nproc}")

    @property
    def is_fashionnet(self) -> bool:
        return self.arch.startswith("fn-")

    @property
    def effective_lr_backbone(self) -> float:
        if self.lr_backbone is not None:
            return self.lr_backbone
        return self.lr_head if self.is_fashionnet else 1e-4

    @property
    def effective_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.01 if self.is_fashionnet else 0.05

    def device_recipe(self, device: torch.device) -> dict[str, str]:
        """What the device changes about the result, rendered concretely: the autocast dtype,
        the memory layout, where the augmentation runs (a GPU runs it batched, with other
        random draws than the CPU's per-image path) and cuDNN's autotuned kernels."""
        from fgvc.training.loop import Precision

        precision = Precision.for_device(device, self.amp, self.channels_last)
        return {"amp_effective": precision.amp_name,
                "channels_last_effective": "true" if precision.channels_last else "false",
                "augment_path": augment_path(self.aug, device),
                "cudnn_benchmark": "true" if cudnn_benchmark(device) else "false"}

    def identity(self, device: torch.device | None = None) -> str:
        """Digest of the options that define the result and of how `device` (default: this
        config's device, resolved here) runs them: finds the run to resume (`fgvc.config_id`).
        The device recipe is part of it where it differs from the CPU's: CPU runs keep the ids
        they always had, and a GPU run never continues a CPU run, or the other way round."""
        import torch

        from fgvc.devices import resolve_device

        device = resolve_device(self.device) if device is None else device
        cpu = self.device_recipe(torch.device("cpu"))
        differs = {k: v for k, v in self.device_recipe(device).items() if v != cpu[k]}
        return config_id(self, differs or None)

    def request_id(self) -> str:
        """Digest of what was asked, whatever machine asks (`fgvc.request_id`): the options
        that define the result without the device recipe, so no device is resolved. A study
        finds its cells by it (a CPU node collects cells trained on GPUs); on the CPU it equals
        :meth:`identity`."""
        return config_id(self, None)


def augment_path(aug: str | None, device: torch.device) -> str:
    """``none``, ``cpu`` (per image, in the loader) or ``device`` (batched, on the GPU)."""
    if aug is None:
        return "none"
    return "device" if device.type == "cuda" else "cpu"


def cudnn_benchmark(device: torch.device) -> bool:
    """Autotuned cuDNN kernels on CUDA: a root's images share one size, so the tuning of the
    first batches holds for the rest (the last, smaller batch tunes once more)."""
    return device.type == "cuda"


@dataclass(frozen=True)
class RegisterConfig(Config):
    checkpoint: str = option(STR, "best.pt", "Checkpoint written by the original scripts ({'model': state_dict} "
                             "or a bare state_dict).")
    arch: str | None = option(Maybe(Choice(ORIGINAL_ARCHS)), None, "Architecture of the checkpoint (auto: the one "
                              "its tensors fit).")
    data_root: str = option(STR, "data/demo", "Dataset root whose validation split evaluates the model.")
    normalization: Literal["imagenet", "none"] | None = option(Maybe(Choice(("imagenet", "none"))), None,
                                       "Input normalisation the model was trained with: auto (imagenet for "
                                       "ResNets, as the original trained from ImageNet weights; none for "
                                       "FashionNet), imagenet, or none (a ResNet trained --from_scratch).")
    registered_model: str | None = option(Maybe(STR), None, "Registry name (auto: fgvc-<arch>).")
    batch_size: int = option(INT, 64, "Validation batch size.", check=positive)
    device: str | None = option(Maybe(STR), None, "auto | cpu | cuda | cuda:N.")
