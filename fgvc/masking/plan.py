"""Planning a masking job: everything is checked before a byte is written.

``plan_masking`` refuses a destination that is the source, inside it or containing it; checks
that the source validates and the segmenter's weights can be had; and accepts a destination
that is empty, an unfinished run of the same job (it is resumed) or, with ``overwrite``, a
finished one (only the files `mask` wrote are replaced). Shards are dealt to ranks: rank r
takes shard i when i % world_size == r, counting over all splits in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fgvc.data.shards import ShardError, dataset_digest, load_shard, splits_of, validate_root
from fgvc.devices import resolve_device
from fgvc.distributed import World
from fgvc.errors import FgvcError
from fgvc.masking.background import DEFAULT_MIN_PERSON_RATIO
from fgvc.masking.segmenters import DEFAULT_SEG_SIZE, SEGMENTERS, Segmenter, resolve_weights
from fgvc.masking.sidecars import PROGRESS_DIR, read_job

__all__ = ["MaskError", "MaskPlan", "ShardTask", "check_destination", "plan_masking"]


class MaskError(FgvcError):
    """The masking job cannot run as asked (destination unsafe or taken). Says how to fix it."""


@dataclass(frozen=True)
class ShardTask:
    """One source shard and where its output and statistics go."""

    index: int  # position over all splits in order; decides the rank that owns the shard
    split: str
    src: Path
    dst: Path
    progress: Path
    count: int

    @property
    def key(self) -> str:
        return f"{self.split}/{self.src.name}"


@dataclass
class MaskPlan:
    """Everything ``execute`` needs, checked by ``plan_masking``."""

    src: Path
    dst: Path
    splits: list[str]
    tasks: list[ShardTask]
    segmenter_name: str
    weights: str
    seg_size: int | None
    min_person_ratio: float
    batch_size: int
    device: str
    rank: int
    world_size: int
    overwrite: bool
    source_digest: str
    num_classes: int
    image_size: tuple[int, int]
    counts: dict[str, int]
    segmenter: Segmenter | None = None  # an injected instance; None: build from the name

    @property
    def resize_effective(self) -> str:
        """How images are resized for the segmenter: on uint8 on the CPU (as PIL), on float
        elsewhere; with the device's own convolutions, other masks at the edges."""
        return "uint8-cpu" if torch.device(self.device).type == "cpu" else f"float32-{torch.device(self.device).type}"

    @property
    def fingerprint(self) -> dict:
        """What decides the output bytes: a resumed run must match it exactly (so CPU and GPU
        shards never mix in one root; CPU jobs keep the fingerprint they always had)."""
        device = {} if self.resize_effective == "uint8-cpu" else {"resize_effective": self.resize_effective}
        return {"source_digest": self.source_digest, "segmenter": self.segmenter_name, "weights": self.weights,
                "seg_size": self.seg_size, "min_person_ratio": self.min_person_ratio, **device}

    @property
    def my_tasks(self) -> list[ShardTask]:
        return [t for t in self.tasks if t.index % self.world_size == self.rank]

    def describe(self) -> dict:
        """What the plan resolved (MLflow params beside the config's, meta.json)."""
        return {"weights": self.weights, "seg_size_effective": self.seg_size or "none",
                "splits_effective": ",".join(self.splits), "source_root": str(self.src),
                "source_digest": self.source_digest, "dst_root": str(self.dst), "device_effective": self.device,
                "resize_effective": self.resize_effective, "world_size": self.world_size}


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def check_destination(src: Path, dst: Path) -> None:
    """Refuse a destination that is the source, inside it, or contains it."""
    if _inside(dst, src):
        what = "is" if dst == src else "is inside"
        raise MaskError(f"dst_root {dst} {what} src_root {src}: refusing to write into the source "
                        f"dataset; choose a destination outside it")
    if _inside(src, dst):
        raise MaskError(f"dst_root {dst} contains src_root {src}: refusing, since replacing the "
                        f"destination could touch the source; choose a separate directory")
    if dst.exists() and not dst.is_dir():
        raise MaskError(f"dst_root {dst} exists and is not a directory")


def _check_resumable(dst: Path, fingerprint: dict, overwrite: bool) -> None:
    """Refuse to replace a complete or foreign destination unless ``overwrite``."""
    if overwrite or not dst.exists():
        return
    if (dst / "meta.json").exists():
        raise MaskError(f"{dst}: destination is already a complete dataset root (meta.json "
                        f"exists); pass overwrite=true to replace it, or choose another dst_root")
    previous = read_job(dst)
    if previous is not None:
        if previous != fingerprint:
            changed = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
            raise MaskError(f"{dst}: holds an unfinished masking run with different settings "
                            f"({', '.join(changed)}); pass overwrite=true to replace it")
        return
    foreign = [p for s in splits_of(dst) for p in (dst / s).glob("*.pt")]
    if foreign:
        raise MaskError(f"{dst}: holds shard files not written by mask (e.g. {foreign[0]}); pass "
                        f"overwrite=true to replace them, or choose another dst_root")


def plan_masking(src_root: str | Path, dst_root: str | Path, segmenter: str | Segmenter = "deeplabv3_resnet101",
                 seg_weights: str | Path | None = None, min_person_ratio: float = DEFAULT_MIN_PERSON_RATIO,
                 seg_size: int = DEFAULT_SEG_SIZE, batch_size: int = 16, device: str | None = None,
                 world: World | None = None, overwrite: bool = False,
                 splits: tuple[str, ...] | None = None) -> MaskPlan:
    """Check the job and describe it; writes nothing. Raises MaskError, ShardError or
    SegmenterWeightsError with a message that says what is wrong and how to fix it."""
    src, dst = Path(src_root).resolve(), Path(dst_root).resolve()
    check_destination(src, dst)
    world = world or World()
    present = splits_of(src) if src.is_dir() else []
    if splits is not None:
        missing = [s for s in splits if s not in present]
        if missing:
            raise ShardError(f"{src}: has no split {', '.join(missing)} (splits present: "
                             f"{', '.join(present) or 'none'})")
        present = [s for s in present if s in splits]
    info = validate_root(src, tuple(present) or ("train", "val"))
    chosen = [s for s in present if s in info.shards]

    injected = segmenter if isinstance(segmenter, Segmenter) else None
    effective_size: int | None = seg_size  # None: the segmenter runs no model
    if injected is not None:
        name, weights = injected.name, injected.weights
        effective_size = getattr(injected, "seg_size", None)
        needs_masks = injected.needs_source_masks
    else:
        spec = SEGMENTERS.get(str(segmenter))
        name, weights, needs_masks = spec.name, resolve_weights(spec.name, seg_weights), spec.needs_source_masks
        if spec.builder is None:
            effective_size = None
    if needs_masks and not all("masks" in load_shard(p) for s in chosen for p in info.shards[s]):
        unmasked = next(p for s in chosen for p in info.shards[s] if "masks" not in load_shard(p))
        raise ShardError(f"{unmasked}: segmenter '{name}' uses the source's 'masks', but this "
                         f"shard has none; choose a model segmenter")

    tasks, index = [], 0
    for split in chosen:
        for path in info.shards[split]:
            count = int(load_shard(path)["labels"].shape[0])
            tasks.append(ShardTask(index, split, path, dst / split / path.name,
                                   dst / PROGRESS_DIR / split / f"{path.stem}.json", count))
            index += 1
    plan = MaskPlan(src=src, dst=dst, splits=chosen, tasks=tasks, segmenter_name=name, weights=weights,
                    seg_size=effective_size, min_person_ratio=float(min_person_ratio), batch_size=int(batch_size),
                    device=str(resolve_device(device)) if world.backend is None else str(world.device),
                    rank=world.rank, world_size=world.world_size, overwrite=bool(overwrite),
                    source_digest=dataset_digest(src), num_classes=info.num_classes, image_size=info.image_size,
                    counts={s: info.counts[s] for s in chosen}, segmenter=injected)
    _check_resumable(dst, plan.fingerprint, plan.overwrite)
    return plan
