"""Executing a masking plan: this process's shards, then (rank 0) the label map and meta.json.

Every shard is written under the same name, in the same order, with the same labels, one_hot
and extra per-image keys; ``images`` background-removed, ``masks`` the predicted person mask,
``bg_removed`` bool [N]. Each shard goes to a temporary name and is renamed, then its sidecar
is written (fgvc.masking.sidecars), so a rerun after a crash skips every finished shard and
the result is byte-identical to an uninterrupted run. ``meta.json`` is written last: its
presence marks the destination complete.

Several processes (``fgvc mask --workers N``, or torchrun across machines) share one
mechanism, torch.distributed: each rank masks its shards, all meet at a barrier, then rank 0
reads every shard's sidecar and finishes. Within a process a reader thread loads the next
shard while the current one is segmented and a writer thread saves the previous one. Batches
never cross shards, so the output does not depend on the number of processes.
"""

from __future__ import annotations

import logging
import queue
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fgvc import distributed
from fgvc.data.roots import written_files
from fgvc.data.shards import atomic_write, dataset_digest, load_shard, read_meta, shards_of, write_json, write_shard
from fgvc.masking.background import remove_background
from fgvc.masking.plan import MaskError, MaskPlan, ShardTask, plan_masking
from fgvc.masking.segmenters import DEFAULT_SEG_SIZE, VOC_PERSON, Segmenter, build_segmenter
from fgvc.masking.sidecars import ShardStats, finished_stats, read_stats, write_job, write_stats

log = logging.getLogger("fgvc")


@dataclass
class MaskReport:
    """What ``execute`` returns. ``meta`` is None on ranks other than 0."""

    meta: dict | None
    person_ratios: dict[str, list[float]] = field(default_factory=dict)
    processed: dict[str, int] = field(default_factory=dict)  # images segmented by this call
    seconds: dict[str, float] = field(default_factory=dict)  # wall time those images took
    skipped_shards: int = 0

    def images_per_s(self, split: str | None = None) -> float | None:
        n = sum(self.processed.values()) if split is None else self.processed.get(split, 0)
        s = sum(self.seconds.values()) if split is None else self.seconds.get(split, 0.0)
        return n / s if n and s > 0 else None


def prepare_destination(plan: MaskPlan) -> None:
    """Create the destination, clear what ``overwrite`` replaces, record the job.

    Overwrite removes only what `mask` writes (shards named shard_NNN.pt, label map, meta,
    progress records), and each rank only its own shards, so ranks that start at different
    times never delete each other's fresh output.
    """
    dst = plan.dst
    dst.mkdir(parents=True, exist_ok=True)
    mine = plan.my_tasks
    if plan.overwrite:
        if plan.rank == 0:  # what no rank rewrites: meta, label map, shards of an earlier, larger run
            expected = {t.dst for t in plan.tasks}
            for path in written_files(dst):
                if path.is_file() and path not in expected:
                    path.unlink()
        for task in mine:
            task.dst.unlink(missing_ok=True)
            task.progress.unlink(missing_ok=True)
    for task in mine:  # temporary files a killed run left behind
        if task.dst.parent.exists():
            for stale in task.dst.parent.glob(f".{task.dst.name}.*.tmp"):
                stale.unlink(missing_ok=True)
    write_job(dst, plan.fingerprint)  # every rank: the same bytes, written atomically


def _assemble(source: dict, images: torch.Tensor, masks: torch.Tensor, bg_removed: torch.Tensor) -> dict:
    """The output shard: the source's keys in the source's order, images and masks replaced,
    ``bg_removed`` added; every other key copied unchanged (into its own compact storage)."""
    out = {}
    for key, value in source.items():
        if key == "images":
            out[key] = images
        elif key == "masks":
            out[key] = masks
        elif key == "bg_removed":
            out[key] = bg_removed
        elif isinstance(value, torch.Tensor):
            out[key] = value.clone(memory_format=torch.contiguous_format)
        else:
            out[key] = value
    out.setdefault("masks", masks)
    out.setdefault("bg_removed", bg_removed)
    return out


def mask_shard(shard: dict, segmenter: Segmenter, min_person_ratio: float, batch_size: int,
               on_batch: Callable[[int], None] | None = None) -> tuple[dict, torch.Tensor]:
    """Segment and mask one loaded shard in batches. Returns (output shard, person ratios [N]).

    The outputs are preallocated and each batch is written into its slice, so no batch is
    copied again to assemble the shard.
    """
    images = shard["images"]
    n, _, h, w = images.shape
    source_masks = shard.get("masks")
    out_images = torch.empty_like(images, memory_format=torch.contiguous_format)
    out_masks = torch.empty((n, h, w), dtype=torch.uint8)
    bg_removed = torch.empty(n, dtype=torch.bool)
    ratios = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        batch = images[sl]
        person = segmenter(batch, None if source_masks is None else source_masks[sl])
        out_masks[sl] = person
        _, bg_removed[sl], ratios[sl] = remove_background(batch, out_masks[sl], min_person_ratio,
                                                          out=out_images[sl])
        if on_batch is not None:
            on_batch(sl.stop - sl.start)
    return _assemble(shard, out_images, out_masks, bg_removed), ratios


_DONE = object()


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def run_tasks(plan: MaskPlan, segmenter: Segmenter, tasks: list[ShardTask],
              on_batch: Callable[[int], None], on_shard: Callable[[ShardStats], None]) -> None:
    """Mask `tasks` in this process: reader thread -> segmenter (here) -> writer thread."""
    if not tasks:
        return
    pin = plan.device.startswith("cuda")
    loaded: queue.Queue = queue.Queue(maxsize=1)
    to_write: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for task in tasks:
                # The whole file (not memory-mapped), so disk time overlaps compute.
                shard = load_shard(task.src, mmap=False)
                if pin:
                    shard["images"] = shard["images"].pin_memory()
                if not _put(loaded, (task, shard), stop):
                    return
            _put(loaded, _DONE, stop)
        except BaseException as e:  # handed to the main thread
            _put(loaded, e, stop)

    def write() -> None:
        while True:
            item = to_write.get()
            if item is _DONE:
                return
            if errors:
                continue  # drain after a failure so the producer never blocks
            task, shard, stats = item
            try:
                write_shard(task.dst, shard, num_classes=plan.num_classes)
                write_stats(task, stats, plan.fingerprint)
                on_shard(stats)
            except BaseException as e:
                errors.append(e)

    reader = threading.Thread(target=read, daemon=True, name="mask-reader")
    writer = threading.Thread(target=write, daemon=True, name="mask-writer")
    reader.start()
    writer.start()
    try:
        while True:
            item = loaded.get()
            if item is _DONE or errors:
                break
            if isinstance(item, BaseException):
                raise item
            task, shard = item
            out, ratios = mask_shard(shard, segmenter, plan.min_person_ratio, plan.batch_size, on_batch)
            stats = ShardStats(task.split, task.src.name, task.count, ratios.tolist(), out["bg_removed"].tolist())
            del shard
            to_write.put((task, out, stats))
    finally:
        stop.set()
        to_write.put(_DONE)
        writer.join()
    if errors:
        raise errors[0]


def split_statistics(stats: list[ShardStats]) -> dict:
    ratios = [r for s in stats for r in s.person_ratios]
    images = sum(s.images for s in stats)
    fallbacks = sum(s.fallbacks for s in stats)
    return {"images": images, "bg_removed": images - fallbacks, "fallbacks": fallbacks,
            "fallback_rate": fallbacks / images if images else 0.0,
            "person_ratio_mean": statistics.fmean(ratios) if ratios else 0.0,
            "person_ratio_median": statistics.median(ratios) if ratios else 0.0}


def _finish(plan: MaskPlan, all_stats: list[ShardStats]) -> dict:
    """Rank 0: check the output layout, copy the label map, write meta.json (last)."""
    for split in plan.splits:
        expected = [t.dst.name for t in plan.tasks if t.split == split]
        found = [p.name for p in shards_of(plan.dst, split)]
        if found != expected:
            raise MaskError(f"{plan.dst / split}: holds {found}, expected exactly {expected}")
    labels = plan.src / "index_to_label.json"
    if labels.exists():
        atomic_write(plan.dst / "index_to_label.json", lambda tmp: shutil.copyfile(labels, tmp))
    meta = {
        "source": "mask", "source_root": str(plan.src), "source_digest": plan.source_digest,
        "digest": dataset_digest(plan.dst), "image_size": list(plan.image_size), "num_classes": plan.num_classes,
        "counts": dict(plan.counts), "splits": list(plan.splits),
        "masking": {"segmenter": plan.segmenter_name, "weights": plan.weights,
                    "person_class": None if plan.seg_size is None else VOC_PERSON,
                    "min_person_ratio": plan.min_person_ratio, "seg_size": plan.seg_size,
                    "resize_effective": plan.resize_effective,
                    "statistics": {s: split_statistics([x for x in all_stats if x.split == s]) for s in plan.splits}},
        "source_meta": read_meta(plan.src),
    }
    write_json(plan.dst / "meta.json", meta)
    return meta


def _make_segmenter(plan: MaskPlan) -> Segmenter:
    if plan.segmenter is not None:
        return plan.segmenter.to(plan.device)
    weights = None if plan.seg_size is None else plan.weights
    return build_segmenter(plan.segmenter_name, weights, plan.seg_size or DEFAULT_SEG_SIZE, plan.device)


def execute(plan: MaskPlan, progress: bool = True,
            on_shard_done: Callable[[ShardStats], None] | None = None) -> MaskReport:
    """Run a plan: this rank's shards, then (rank 0) the label map and meta.json.

    Under a process group every rank waits at a barrier before rank 0 finishes; ranks run by
    hand one after the other (``world`` given without a group) leave rank 0 to run last.
    ``on_shard_done(stats)`` is called for each shard written by this call, after its file and
    sidecar are on disk (from the writer thread).
    """
    prepare_destination(plan)
    mine = plan.my_tasks
    done = {t.key: s for t in mine if (s := finished_stats(t, plan.fingerprint, plan.num_classes)) is not None}
    pending = [t for t in mine if t.key not in done]
    report = MaskReport(meta=None, skipped_shards=len(done))
    bar = tqdm(total=sum(t.count for t in mine), initial=sum(s.images for s in done.values()), unit="img",
               desc=f"mask {plan.dst.name}", disable=None if progress else True, dynamic_ncols=True)
    lock = threading.Lock()
    finished_at: dict[str, float] = {}  # split -> when its last shard was written
    started = time.monotonic()

    def on_shard(stats: ShardStats) -> None:
        with lock:
            done[stats.key] = stats
            report.processed[stats.split] = report.processed.get(stats.split, 0) + stats.images
            finished_at[stats.split] = time.monotonic()
        if on_shard_done is not None:
            on_shard_done(stats)

    try:
        if pending:
            segmenter = _make_segmenter(plan)
            started = time.monotonic()
            run_tasks(plan, segmenter, pending, bar.update, on_shard)
    finally:
        bar.close()
    previous = started  # per-split wall time: from the previous split's last shard to this one's
    for split in plan.splits:
        if split in finished_at:
            report.seconds[split] = max(finished_at[split] - previous, 1e-9)
            previous = finished_at[split]

    distributed.barrier()
    if plan.rank != 0:
        report.person_ratios = {s: [r for t in mine if t.split == s for r in done[t.key].person_ratios]
                                for s in plan.splits}
        return report
    stats = [done.get(t.key) or read_stats(t, plan.fingerprint) for t in plan.tasks]
    missing = [t for t, s in zip(plan.tasks, stats, strict=True) if s is None]
    if missing:
        raise MaskError(f"{plan.dst}: {len(missing)} shard(s) of other ranks are not written yet (first: "
                        f"{missing[0].key}, rank {missing[0].index % plan.world_size}); run every rank, rank 0 last")
    ordered = [s for s in stats if s is not None]
    report.person_ratios = {s: [r for x in ordered if x.split == s for r in x.person_ratios] for s in plan.splits}
    report.meta = _finish(plan, ordered)
    return report


def mask_dataset(src_root: str | Path, dst_root: str | Path, segmenter: str | Segmenter = "deeplabv3_resnet101",
                 progress: bool = True, on_shard_done: Callable[[ShardStats], None] | None = None,
                 **options) -> MaskReport:
    """Write the background-removed copy of ``src_root`` to ``dst_root`` (see plan_masking
    for the options: seg_weights, min_person_ratio, seg_size, batch_size, device, world,
    overwrite, splits)."""
    return execute(plan_masking(src_root, dst_root, segmenter, **options), progress=progress,
                   on_shard_done=on_shard_done)
