"""The images an analysis looks at: a seeded, class-stratified subset of one split, with
person masks (from the shards, or from a masked root built from the same data)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from fgvc.data.dataset import ShardDataset
from fgvc.data.shards import ShardError, dataset_digest
from fgvc.errors import ConfigError


@dataclass
class AnalysisData:
    root: Path
    split: str
    images: torch.Tensor  # uint8 [N, 3, H, W]
    labels: torch.Tensor  # int64 [N]
    indices: torch.Tensor  # int64 [N]: position of each image in its split (shard order)
    masks: torch.Tensor | None  # uint8 [N, H, W], person = 1
    venues: torch.Tensor | None  # int64 [N] (demo data)
    names: list[str]  # designer name of each class index
    mask_source: str
    digest: str

    @property
    def image_size(self) -> tuple[int, int]:
        return (int(self.images.shape[2]), int(self.images.shape[3]))

    def designer(self, label: int) -> str:
        return self.names[int(label)] if 0 <= int(label) < len(self.names) else str(int(label))


def load_analysis_data(root: str | Path, split: str, num_images: int, seed: int,
                       mask_root: str | Path | None = None, num_classes: int | None = None) -> AnalysisData:
    ds = ShardDataset(root, split, count=num_images, seed=seed, num_classes=num_classes)
    items = ds.gather(torch.arange(len(ds)))
    masks, source = items.get("masks"), f"{root} ({split} shards)"
    if masks is None and mask_root is not None:
        masked = ShardDataset(mask_root, split, count=num_images, seed=seed, num_classes=num_classes)
        if len(masked) != len(ds) or "masks" not in masked.keys:
            raise ShardError(f"{mask_root}/{split}: does not match {root}/{split} or has no 'masks' "
                             f"(build it with `fgvc mask --src-root {shlex.quote(str(root))}`)")
        other = masked.gather(torch.arange(len(masked)))
        if not torch.equal(other["labels"], items["labels"]):
            raise ShardError(f"{mask_root}/{split}: labels differ from {root}/{split}; "
                             f"a mask root must be built from the same data")
        masks, source = other["masks"], f"{mask_root} ({split} shards)"
    names = [ds.label_names.get(i, str(i)) for i in range(ds.num_classes)]
    return AnalysisData(Path(root), split, items["images"], items["labels"], ds.indices.clone(), masks,
                        items.get("venues"), names, source if masks is not None else "none", dataset_digest(root))


def check_fits_model(data: AnalysisData, spec: dict, label_names: list[str] | None, model: str) -> None:
    """Refuse data the model was not trained for: another image size, or a label map that
    names the classes differently (the numbers would describe another task)."""
    size = spec.get("image_size")
    if size is not None and tuple(size) != data.image_size:
        raise ConfigError(f"{data.root}: images are {data.image_size[0]}x{data.image_size[1]}, but {model} was "
                          f"trained on {size[0]}x{size[1]}; analyse it on data of its own size")
    if label_names and list(label_names) != list(data.names):
        differ = next(i for i, (a, b) in enumerate(zip(label_names, data.names, strict=True)) if a != b) \
            if len(label_names) == len(data.names) else None
        where = (f"class {differ} is {label_names[differ]!r} for the model but {data.names[differ]!r} in the data"
                 if differ is not None else f"the model has {len(label_names)} classes, the data {len(data.names)}")
        raise ConfigError(f"{data.root}/index_to_label.json disagrees with {model}'s class names ({where})")
