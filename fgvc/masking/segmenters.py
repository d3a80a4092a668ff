"""Person segmenters: uint8 images in, person masks out.

Every segmenter is called the same way, ``segmenter(images, source_masks) -> person_mask``:

  images        uint8 [B, 3, H, W] (any device)
  source_masks  uint8 [B, H, W] from the source shard, or None when the shard has none
  person_mask   uint8 [B, H, W] on the CPU, values 0/1, person = 1

Registered names (``SEGMENTERS``):

  deeplabv3_resnet101            torchvision DeepLabV3-ResNet101, COCO weights with VOC labels
  deeplabv3_mobilenet_v3_large   the same family on a MobileNetV3 backbone, much faster on CPU
  groundtruth                    the ``masks`` already stored in the source shards

The DeepLabV3 weights come the standard way (fgvc.models.weights): from the torch hub cache
(``$TORCH_HOME/hub/checkpoints/<file name from the torchvision url>``), downloaded into it when
missing and the network allows, or given explicitly (``seg_weights=PATH``);
``seg_weights="random"`` builds a randomly initialised model with a fixed seed, for tests and
benchmarks. A segmenter is an entry of ``SEGMENTERS``: adding one is one registration here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fgvc.catalog import SEGMENTERS
from fgvc.errors import FgvcError, MissingFileError
from fgvc.masking.config import DEFAULT_SEG_SIZE
from fgvc.models.factory import IMAGENET_MEAN, IMAGENET_STD
from fgvc.models.weights import WeightsUnavailable, fetch_url, torch_hub_path
from fgvc.safeload import load_tensors

# VOC class index of "person" in the 21-class label set of the torchvision DeepLabV3 weights.
VOC_PERSON = 15
VOC_CLASSES = 21
RANDOM_WEIGHTS = "random"
RANDOM_SEED = 0


class SegmenterWeightsError(MissingFileError):
    """The segmenter's weights are missing or unusable. The message names the file and the fix."""


class Segmenter:
    """Base class: a callable from uint8 images to uint8 0/1 person masks.

    ``name`` and ``weights`` describe the segmenter for provenance (meta.json, MLflow params);
    ``needs_source_masks`` says whether the source shards must carry ``masks``.
    """

    name: str = "segmenter"
    weights: str = "none"
    needs_source_masks: bool = False

    def to(self, device: torch.device | str) -> Segmenter:
        return self

    def __call__(self, images: Tensor, source_masks: Tensor | None = None) -> Tensor:
        raise NotImplementedError


class GroundTruthSegmenter(Segmenter):
    """Returns the person masks stored in the source shards (the demo data knows the truth)."""

    name = "groundtruth"
    weights = "source masks"
    needs_source_masks = True

    def __call__(self, images: Tensor, source_masks: Tensor | None = None) -> Tensor:
        if source_masks is None:
            raise ValueError("segmenter 'groundtruth' needs 'masks' in the source shards")
        return source_masks.to("cpu", torch.uint8)


def resized_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """Output size when the shorter side is resized to ``short_side``, keeping the aspect ratio
    (the rule of torchvision's ``Resize(int)``: the long side is truncated, not rounded)."""
    if height <= width:
        return short_side, int(short_side * width / height)
    return int(short_side * height / width), short_side


def preprocess(images: Tensor, seg_size: int, channels_last: bool = False) -> Tensor:
    """uint8 [B, 3, H, W] -> float [B, 3, h, w], shorter side ``seg_size``, ImageNet-normalised.

    The whole batch is resized at once (bilinear, antialiased). On the CPU the resize runs on
    uint8 like PIL's (and the original per-image PIL loop), through torch's vectorised uint8
    kernel; elsewhere it runs on float. Normalisation folds the /255 of ToTensor into the
    mean and std, and the float copy is made once, directly in the requested memory format.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 [B, 3, H, W], found {images.dtype} {list(images.shape)}")
    size = resized_size(images.shape[2], images.shape[3], seg_size)
    x = images
    if tuple(x.shape[2:]) != size:
        if x.device.type == "cpu":
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        else:
            x = F.interpolate(x.float(), size=size, mode="bilinear", antialias=True,
                              align_corners=False).round_().clamp_(0, 255)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(torch.float32, memory_format=fmt)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    return x.sub_(mean).div_(std)


def person_mask_from_logits(logits: Tensor, size: tuple[int, int], person_class: int = VOC_PERSON
                            ) -> Tensor:
    """Class logits [B, K, h, w] -> uint8 [B, H, W] CPU person mask: argmax label map == person,
    upsampled to the image size with nearest neighbour (as the original upsampled its labels)."""
    # Exactly `argmax(dim=1) == person_class` (argmax picks the first of tied maxima: the person
    # must beat every class before it and tie-or-beat every class after it), but two
    # contiguous max-reductions run ~25x faster on the CPU than one argmax over classes.
    score = logits[:, person_class]
    person = torch.ones_like(score, dtype=torch.bool)
    if person_class > 0:
        person &= score > logits[:, :person_class].amax(dim=1)
    if person_class + 1 < logits.shape[1]:
        person &= score >= logits[:, person_class + 1:].amax(dim=1)
    # Upsampled on the CPU, where the mask is wanted anyway (and uint8 nearest always works).
    person = person.to("cpu", torch.uint8).unsqueeze(1)
    if tuple(person.shape[2:]) != tuple(size):
        person = F.interpolate(person, size=tuple(size), mode="nearest")
    return person[:, 0]


class TorchvisionSegmenter(Segmenter):
    """A semantic segmentation ``nn.Module`` returning ``{"out": logits [B, K, h, w]}`` (the
    torchvision convention) or a logits tensor; "person" is class ``person_class``.

    Any such module can be injected (a randomly initialised model, a fake with chosen label
    maps); ``build_segmenter`` makes the registered ones. With ``channels_last`` (default) the
    model and its input use the NHWC layout, about twice as fast for DeepLabV3 on a CPU; the
    model is converted in place.
    """

    def __init__(self, model: nn.Module, name: str = "custom", weights: str = "injected",
                 seg_size: int = DEFAULT_SEG_SIZE, person_class: int = VOC_PERSON, channels_last: bool = True):
        if seg_size < 1:
            raise ValueError(f"seg_size must be positive, got {seg_size}")
        self.channels_last = channels_last
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model.eval()
        self.name = name
        self.weights = weights
        self.seg_size = seg_size
        self.person_class = person_class

    def to(self, device: torch.device | str) -> TorchvisionSegmenter:
        self.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def __call__(self, images: Tensor, source_masks: Tensor | None = None) -> Tensor:
        device = self.device
        images = images.to(device, non_blocking=True)
        with torch.inference_mode():
            out = self.model(preprocess(images, self.seg_size, self.channels_last))
            logits = out["out"] if isinstance(out, dict) else out
            return person_mask_from_logits(logits, (images.shape[2], images.shape[3]), self.person_class)


@dataclass(frozen=True)
class SegmenterSpec:
    """A registered segmenter. ``builder``/``weights_enum``: a torchvision segmentation model and
    its weights (imported only when built); neither for a segmenter that needs no model."""

    name: str
    builder: str | None = None
    weights_enum: str | None = None
    needs_source_masks: bool = False

    def _lookup(self, attr: str):
        from torchvision.models import segmentation

        return getattr(segmentation, attr)

    def build(self, **kwargs) -> nn.Module:
        return self._lookup(self._model_part(self.builder))(**kwargs)

    @property
    def url(self) -> str:
        return self._lookup(self._model_part(self.weights_enum)).DEFAULT.url

    def _model_part(self, attr: str | None) -> str:
        if attr is None:
            raise FgvcError(f"segmenter {self.name!r} runs no model")
        return attr

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


for _spec in (SegmenterSpec("deeplabv3_resnet101", "deeplabv3_resnet101", "DeepLabV3_ResNet101_Weights"),
              SegmenterSpec("deeplabv3_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large",
                            "DeepLabV3_MobileNet_V3_Large_Weights"),
              SegmenterSpec("groundtruth", needs_source_masks=True)):
    SEGMENTERS.register(_spec.name, _spec)


def cached_weights_path(name: str) -> Path:
    """Where torch hub keeps the default weights of ``name`` (honours TORCH_HOME)."""
    return torch_hub_path(SEGMENTERS.get(name).url)


def resolve_weights(name: str, seg_weights: str | Path | None) -> str:
    """The effective weights of a segmenter: ``"random"``, a file's absolute path (the given
    one, or the standard file from the cache or downloaded into it), or (no model)
    ``"source masks"``. Raises SegmenterWeightsError naming the file and the fix."""
    spec = SEGMENTERS.get(name)
    if spec.builder is None:
        return GroundTruthSegmenter.weights
    if seg_weights is not None and str(seg_weights) == RANDOM_WEIGHTS:
        return RANDOM_WEIGHTS
    if seg_weights is not None:
        path = Path(seg_weights).expanduser()
        if not path.is_file():
            raise SegmenterWeightsError(f"{name}: weights file {path} does not exist (pass seg_weights=PATH to an "
                                        f"existing file, or seg_weights=none for the standard weights)")
        return str(path.resolve())
    try:
        return str(fetch_url(spec.url, description=f"{name} segmenter weights").resolve())
    except WeightsUnavailable as error:
        raise SegmenterWeightsError(f"{error} (or pass seg_weights=PATH; seg_weights=random gives a randomly "
                                    f"initialised model, for tests only)") from None


def _state_dict_of(obj, path: str) -> dict:
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if all(isinstance(v, Tensor) for v in obj.values()):
            return obj
    raise SegmenterWeightsError(f"{path}: not a state_dict of tensors")


def build_segmenter(name: str, seg_weights: str | Path | None = None, seg_size: int = DEFAULT_SEG_SIZE,
                    device: str | torch.device = "cpu") -> Segmenter:
    """Build a registered segmenter on ``device`` (weights: see ``resolve_weights``)."""
    weights = resolve_weights(name, seg_weights)
    spec = SEGMENTERS.get(name)
    if spec.builder is None:
        return GroundTruthSegmenter()
    if weights == RANDOM_WEIGHTS:
        # A fixed seed, without touching the caller's RNG: every worker and every rerun builds
        # the same model, so their outputs are identical.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            model = spec.build(weights=None, weights_backbone=None, num_classes=VOC_CLASSES,
                               aux_loss=False)
    else:
        state = _state_dict_of(load_tensors(weights, what="weights file", error=SegmenterWeightsError), weights)
        has_aux = any(k.startswith("aux_classifier.") for k in state)
        model = spec.build(weights=None, weights_backbone=None, num_classes=VOC_CLASSES,
                           aux_loss=has_aux)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise SegmenterWeightsError(
                f"{weights}: does not fit {name} with {VOC_CLASSES} classes: "
                f"{str(e).splitlines()[0]}") from None
    # The auxiliary head only serves training; inference does not need its extra forward.
    model.aux_classifier = None
    return TorchvisionSegmenter(model, name=name, weights=weights, seg_size=seg_size).to(device)
