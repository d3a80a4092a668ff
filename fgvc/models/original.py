"""Checkpoints of the original project's training scripts, imported as fgvc models.

The original scripts saved ``torch.save({"model": model.state_dict(), "num_classes": C}, path)``
(``best_resnet50.pt``, ``best_FashionNetMedium.pt``, ...) for five architectures:

* torchvision ``resnet18`` / ``resnet34`` / ``resnet50`` with ``fc = Linear(in_features, C)``:
  keys ``conv1.*``, ``bn1.*``, ``layer1.0.conv1.*``, ..., ``fc.*``;
* ``FashionNetSmall`` / ``FashionNetMedium`` (fgvc's ``fn-small`` / ``fn-medium``): one
  ``features`` Sequential of (conv, BatchNorm, ReLU) triples, so conv block k is
  ``features.{3k}.*`` and its BatchNorm ``features.{3k+1}.*``, then ``classifier.*``.

Mapping onto an :class:`~fgvc.models.factory.FGVCNet` (keys ``body.*``, ``head.*`` and the
normalisation buffers ``input_mean`` / ``input_std``):

* ResNet: ``fc.*`` -> ``head.*``; every other key ``k`` -> ``body.k``.
* FashionNet: the k-th conv block in order (``stem.0``, ``stem.1``, ``stage1.0``, ...,
  ``stage3.2``) takes ``features.{3k}.*`` as ``body.<block>.conv.*`` and ``features.{3k+1}.*``
  as ``body.<block>.bn.*``; ``classifier.*`` -> ``head.*``.

Every tensor of the file maps to exactly one tensor of the model and the load is strict.

The input normalisation is not in the files. ResNets fine-tuned from ImageNet weights saw
ImageNet mean/std-normalised ``[0, 1]`` pixels; ``--from_scratch`` ResNets and every FashionNet
saw raw ``[0, 1]`` pixels. The caller says which (``normalization="imagenet"`` or ``"none"``);
the imported model keeps it in its buffers and, like every fgvc model, takes ``[0, 1]`` images.
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..catalog import ORIGINAL_ARCHS
from ..errors import ConfigError, FgvcError, MissingFileError
from ..safeload import load_tensors
from .factory import IMAGENET_MEAN, IMAGENET_STD, FGVCNet, ModelSpec, build_model, image_size_of
from .fashionnet import ConvBNReLU

__all__ = [
    "ORIGINAL_ARCHS",
    "ArchMismatchError",
    "CheckpointError",
    "ClassCountError",
    "Normalization",
    "detect_arch",
    "import_original",
    "load_original",
    "num_classes_of",
    "read_original_state",
]

Normalization = Literal["imagenet", "none"]

_FASHIONNET, _RESNET = "FashionNet", "ResNet"
_FAMILY = {"resnet18": _RESNET, "resnet34": _RESNET, "resnet50": _RESNET,
           "fn-small": _FASHIONNET, "fn-medium": _FASHIONNET}
_CLASSIFIER = {_FASHIONNET: "classifier", _RESNET: "fc"}
_FAMILY_KEYS = {_FASHIONNET: "features.*, classifier.*", _RESNET: "conv1.*, layer1.*, ..., fc.*"}
_MODULE_PREFIX = "module."  # what DistributedDataParallel puts before every key


class CheckpointError(FgvcError, ValueError):
    """A checkpoint cannot be read, or does not hold a state_dict."""


class ArchMismatchError(CheckpointError):
    """The checkpoint's tensors do not fit the requested architecture."""


class ClassCountError(CheckpointError):
    """The checkpoint's classifier has another class count than the data."""


# --------------------------------------------------------------------------------------------
# Reading files.
# --------------------------------------------------------------------------------------------

def read_original_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state_dict of a checkpoint file, read with ``torch.load(weights_only=True)``.

    Accepts ``{"model": state_dict, ...}``, ``{"state_dict": state_dict, ...}`` or a bare
    state_dict, and drops a ``module.`` prefix on every key (a DDP-wrapped model). A file that
    holds more than tensors, numbers, strings and containers (a pickle whose loading would run
    code) raises :class:`~fgvc.errors.UnsafeFileError`; a missing file
    :class:`~fgvc.errors.MissingFileError`; an unreadable one :class:`CheckpointError`. Every
    message is one line naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: checkpoint file does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file (a checkpoint is one .pt file)")
    content = load_tensors(path, what="checkpoint", error=CheckpointError)
    state = _unwrap(content)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state_dict "
                              "(tensor names -> tensors) or {'model': state_dict}")
    return _checked_state_dict(state, f"{path}: ")


def _unwrap(content):
    # Two levels at most: {"state_dict": {"model": ...}} has been seen; deeper nesting has not.
    for _ in range(2):
        if not isinstance(content, Mapping):
            break
        inner = next((content[key] for key in ("model", "state_dict")
                      if isinstance(content.get(key), Mapping)), None)
        if inner is None:
            break
        content = inner
    return content


def _checked_state_dict(state: Mapping, where: str) -> dict[str, torch.Tensor]:
    """``state`` as a plain dict of tensors without a DDP prefix; refuses anything else."""
    if not state:
        raise CheckpointError(f"{where}the checkpoint holds no tensors")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where}entry {key!r} is a {type(value).__name__}, not a tensor; "
                                  "expected a state_dict or {'model': state_dict, 'num_classes': C}")
    if all(key.startswith(_MODULE_PREFIX) for key in state):
        return {key[len(_MODULE_PREFIX):]: value for key, value in state.items()}
    return dict(state)


# --------------------------------------------------------------------------------------------
# What each architecture's checkpoint holds.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layout:
    """One architecture as the original project saved it.

    ``to_fgvc``: original key -> FGVCNet key, for every tensor (classifier included);
    ``shapes``: original key -> shape, classifier excluded (its rows are the class count).
    """

    arch: str
    family: str
    to_fgvc: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    num_features: int


@functools.cache
def _layout(arch: str) -> _Layout:
    # Built on the meta device: shapes and names only, no memory and no initialisation cost.
    with torch.device("meta"):
        model = build_model(ModelSpec(arch=arch, num_classes=1))
    family = _FAMILY[arch]
    to_fgvc: dict[str, str] = {}
    if family == _RESNET:
        to_fgvc.update({key: f"body.{key}" for key in model.body.state_dict()})
    else:
        blocks = [(name, block) for name, block in model.body.named_modules()
                  if isinstance(block, ConvBNReLU)]
        for index, (name, block) in enumerate(blocks):
            for part, position in (("conv", 3 * index), ("bn", 3 * index + 1)):
                to_fgvc.update({f"features.{position}.{key}": f"body.{name}.{part}.{key}"
                                for key in getattr(block, part).state_dict()})
    own = model.state_dict()
    shapes = {key: tuple(own[target].shape) for key, target in to_fgvc.items()}
    for name in ("weight", "bias"):
        to_fgvc[f"{_CLASSIFIER[family]}.{name}"] = f"head.{name}"
    unmapped = set(own) - set(to_fgvc.values()) - {"input_mean", "input_std"}
    assert not unmapped, f"{arch}: model tensors without an original counterpart: {sorted(unmapped)}"
    return _Layout(arch, family, to_fgvc, shapes, model.num_features)


def _family_of(state: Mapping[str, torch.Tensor]) -> str | None:
    if any(key.startswith(("features.", "classifier.")) for key in state):
        return _FASHIONNET
    if "conv1.weight" in state or any(key.startswith(("layer1.", "fc.")) for key in state):
        return _RESNET
    return None


def _expected_shapes(arch: str, state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Every key ``arch`` has, with its shape; the classifier takes the checkpoint's class count."""
    layout = _layout(arch)
    classifier = _CLASSIFIER[layout.family]
    weight = state.get(f"{classifier}.weight")
    rows = int(weight.shape[0]) if weight is not None and weight.dim() >= 1 else 1
    return {**layout.shapes, f"{classifier}.weight": (rows, layout.num_features),
            f"{classifier}.bias": (rows,)}


def _misfit(state: Mapping[str, torch.Tensor], arch: str) -> tuple[int, str] | None:
    """``None`` when ``state`` is exactly a checkpoint of ``arch`` (any class count); otherwise
    the number of disagreeing keys and a one-line account of them."""
    expected = _expected_shapes(arch, state)
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong = [key for key in expected if key in state and tuple(state[key].shape) != expected[key]]
    if not (missing or unexpected or wrong):
        return None
    parts = []
    if missing:
        parts.append(f"missing keys {_key_groups(missing, present=state)}")
    if unexpected:
        parts.append(f"unexpected keys {_key_groups(unexpected, present=expected)}")
    if wrong:
        key = wrong[0]
        more = f" (and {len(wrong) - 1} more shape mismatches)" if len(wrong) > 1 else ""
        parts.append(f"{key}: checkpoint {list(state[key].shape)}, {arch} expects "
                     f"{list(expected[key])}{more}")
    return len(missing) + len(unexpected) + len(wrong), "; ".join(parts)


def _key_groups(keys: list[str], present, shown: int = 4) -> str:
    """``keys`` summarised by their shortest prefix absent from ``present``: the keys of a whole
    missing block read ``layer1.2.*``, a lone key reads in full."""
    prefixes = {".".join(key.split(".")[:i]) for key in present for i in range(1, key.count(".") + 2)}
    groups: list[str] = []
    for key in keys:
        parts = key.split(".")
        group = key
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            if prefix not in prefixes:
                group = prefix + ".*"
                break
        if group not in groups:
            groups.append(group)
    listed = ", ".join(groups[:shown])
    return listed + (f" and {len(groups) - shown} more" if len(groups) > shown else "")


def detect_arch(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The one of :data:`ORIGINAL_ARCHS` whose every key and shape the state_dict matches exactly
    (any class count), or ``None``. A ``module.`` prefix is ignored."""
    state = _checked_state_dict(state_dict, "")
    return next((arch for arch in ORIGINAL_ARCHS if _misfit(state, arch) is None), None)


def num_classes_of(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Class count of an original checkpoint: the rows of ``classifier.weight`` (FashionNet) or
    ``fc.weight`` (ResNet)."""
    state = _checked_state_dict(state_dict, "")
    for classifier in _CLASSIFIER.values():
        weight = state.get(f"{classifier}.weight")
        if weight is not None and weight.dim() == 2:
            return int(weight.shape[0])
    raise CheckpointError("the checkpoint has no 2-D classifier.weight (FashionNet) or fc.weight "
                          "(ResNet): it is not a classifier of the original project "
                          f"(keys start {list(state)[:3]})")


# --------------------------------------------------------------------------------------------
# Import.
# --------------------------------------------------------------------------------------------

def import_original(state_dict: Mapping[str, torch.Tensor], arch: str | None = None,
                    num_classes: int | None = None, *, normalization: Normalization,
                    image_size: int | tuple[int, int] | None = None,
                    source: str | os.PathLike | None = None) -> FGVCNet:
    """An :class:`FGVCNet` holding exactly the tensors of an original-project state_dict.

    ``arch``: one of :data:`ORIGINAL_ARCHS`, or ``None`` to use :func:`detect_arch` (the command
    line's ``"auto"`` means the same).
    ``num_classes``: the class count the model must have (the data root's); ``None`` takes the
    checkpoint's. ``normalization``: ``"imagenet"`` for a ResNet fine-tuned from ImageNet
    weights, ``"none"`` for raw pixels (``--from_scratch`` ResNets, every FashionNet).
    ``source``: the checkpoint file, recorded in the spec as ``pretrained_effective="file:<abs
    path>"`` and named in errors; without it the spec records ``"state_dict"``.

    The model is rebuilt with :func:`build_model` (so ``build_model(model.spec)`` plus its
    ``state_dict()`` reproduce it) and loaded with ``strict=True``; it is returned in training
    mode like any new module: call ``.eval()`` before predicting.
    Raises :class:`ArchMismatchError` / :class:`ClassCountError` (one line saying which keys,
    shapes or counts disagree) and :class:`~fgvc.errors.ConfigError` for a bad option.
    """
    where = f"{source}: " if source is not None else ""
    state = _checked_state_dict(state_dict, where)
    if normalization not in ("imagenet", "none"):
        raise ConfigError(f"normalization {normalization!r}: use 'imagenet' (a ResNet fine-tuned "
                          "from ImageNet weights) or 'none' (raw [0, 1] pixels: --from_scratch "
                          "ResNets, FashionNet)")
    arch = _resolve_arch(state, arch, where)
    family = _FAMILY[arch]
    if family == _FASHIONNET and normalization == "imagenet":
        raise ConfigError(f"normalization 'imagenet' for {arch}: the original project trained FashionNet "
                          "on raw [0, 1] pixels; use normalization='none'")
    _check_fits(state, arch, where)
    classes = num_classes_of(state)
    if num_classes is not None and int(num_classes) != classes:
        classifier = f"{_CLASSIFIER[family]}.weight"
        raise ClassCountError(f"{where}the checkpoint has {classes} classes ({classifier} "
                              f"{list(state[classifier].shape)}) but the data root has {int(num_classes)}")

    if source is not None:
        resolved = str(Path(source).expanduser().resolve())
        requested, effective = resolved, f"file:{resolved}"
    else:
        requested = effective = "state_dict"
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if normalization == "imagenet" else (None, None)
    spec = ModelSpec(arch=arch, num_classes=classes, image_size=image_size_of(image_size),
                     pretrained=requested, pretrained_effective=effective, mean=mean, std=std)
    model = build_model(spec)
    to_fgvc = _layout(arch).to_fgvc
    own = model.state_dict()
    mapped = {to_fgvc[key]: value for key, value in state.items()}
    mapped.update(input_mean=own["input_mean"], input_std=own["input_std"])
    model.load_state_dict(mapped, strict=True)
    return model


def load_original(path: str | os.PathLike, arch: str | None = None, num_classes: int | None = None, *,
                  normalization: Normalization, image_size: int | tuple[int, int] | None = None) -> FGVCNet:
    """:func:`read_original_state` then :func:`import_original` with ``source=path``."""
    return import_original(read_original_state(path), arch, num_classes, normalization=normalization,
                           image_size=image_size, source=path)


def _resolve_arch(state: Mapping[str, torch.Tensor], arch: str | None, where: str) -> str:
    if arch in ORIGINAL_ARCHS:
        return arch
    if arch is not None and str(arch).strip().lower() != "auto":
        close = difflib.get_close_matches(str(arch), ORIGINAL_ARCHS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"arch {arch!r}: {hint}the original project's checkpoints are one of "
                          f"{', '.join(ORIGINAL_ARCHS)} (or None to detect it)")
    detected = detect_arch(state)
    if detected is not None:
        return detected
    family = _family_of(state)
    if family is None:
        raise ArchMismatchError(f"{where}{_unknown_family(state)}")
    # Report against the architecture of that family the checkpoint comes closest to.
    candidates = [(misfit, name) for name in ORIGINAL_ARCHS
                  if _FAMILY[name] == family and (misfit := _misfit(state, name)) is not None]
    (_, account), closest = min(candidates, key=lambda item: item[0][0])
    raise ArchMismatchError(f"{where}the checkpoint fits none of {', '.join(ORIGINAL_ARCHS)}; "
                            f"closest is {closest}: {account}")


def _check_fits(state: Mapping[str, torch.Tensor], arch: str, where: str) -> None:
    family, found = _FAMILY[arch], _family_of(state)
    if found is None:
        raise ArchMismatchError(f"{where}{_unknown_family(state)}")
    if found != family:
        raise ArchMismatchError(f"{where}the checkpoint has {found} keys ({_FAMILY_KEYS[found]}) "
                                f"but arch {arch} expects {_FAMILY_KEYS[family]}{_fits_hint(state)}")
    misfit = _misfit(state, arch)
    if misfit is not None:
        raise ArchMismatchError(f"{where}the checkpoint does not fit {arch}: {misfit[1]}{_fits_hint(state)}")


def _fits_hint(state: Mapping[str, torch.Tensor]) -> str:
    fits = detect_arch(state)
    return f"; it fits {fits} (pass arch={fits})" if fits is not None else ""


def _unknown_family(state: Mapping[str, torch.Tensor]) -> str:
    return (f"the checkpoint has neither FashionNet keys ({_FAMILY_KEYS[_FASHIONNET]}) nor ResNet keys "
            f"({_FAMILY_KEYS[_RESNET]}): its keys start {list(state)[:3]}")
