"""Build a background-removed dataset root from a source root, shard by shard.

``mask_dataset(src, dst, ...)`` = ``execute(plan_masking(src, dst, ...))``:

- ``plan_masking`` checks everything before a byte is written: the destination is not the
  source or inside it, the source validates (``validate_root``), the segmenter's weights exist,
  and the destination is empty, an unfinished run of the same job (resumed), or ``overwrite``.
- ``execute`` writes every shard of every split under the same name, in the same order, with the
  same labels, one_hot and extra per-image keys; ``images`` background-removed, ``masks`` the
  predicted person mask and ``bg_removed`` bool [N]. Then ``index_to_label.json`` and, last,
  ``meta.json``: its presence marks the destination complete.

Crash safety: each shard is written to a temporary name and renamed, then its statistics go to
``dst/.progress/<split>/<shard>.json``. A rerun skips every shard that exists, validates and
belongs to the same job (``.progress/job.json``), so the result is byte-identical to an
uninterrupted run.

Scale: shards are dealt to ranks (``RANK``/``WORLD_SIZE`` from torchrun: rank r takes shard i
when i % world_size == r, counting over all splits in order) and, within a rank, to ``workers``
spawned processes. Batches never cross shards, so the output does not depend on either count.
Rank 0 waits for every shard's statistics, then writes the label map and ``meta.json``.
Within a process a reader thread loads the next shard while the current one is segmented, and a
writer thread saves the previous one.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import queue
import shutil
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from fgvc.data.shards import (
    ShardError,
    atomic_write,
    dataset_digest,
    load_shard,
    read_meta,
    read_shard,
    shards_of,
    splits_of,
    validate_root,
    write_json,
    write_shard,
)
from fgvc.masking.background import DEFAULT_MIN_PERSON_RATIO, person_ratio, remove_background
from fgvc.masking.segmenters import VOC_PERSON, Segmenter, build_segmenter, resolve_weights

log = logging.getLogger("fgvc")

PROGRESS_DIR = ".progress"
JOB_FILE = "job.json"
POLL_SECONDS = 2.0

# (event kind, payload): "ready" (None), "batch" (image count), "shard" (ShardStats record).
EventSink = Callable[[str, object], None]


class MaskError(RuntimeError):
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
    workers: int
    rank: int
    world_size: int
    overwrite: bool
    source_digest: str
    num_classes: int
    image_size: tuple[int, int]
    counts: dict[str, int]
    segmenter: Segmenter | None = None  # an injected instance; None: build from the name

    @property
    def fingerprint(self) -> dict:
        """What decides the output bytes: a resumed run must match it exactly."""
        return {
            "source_digest": self.source_digest,
            "segmenter": self.segmenter_name,
            "weights": self.weights,
            "seg_size": self.seg_size,
            "min_person_ratio": self.min_person_ratio,
        }

    @property
    def my_tasks(self) -> list[ShardTask]:
        return [t for t in self.tasks if t.index % self.world_size == self.rank]

    def describe(self) -> dict:
        """The parameters worth recording (MLflow params, meta.json)."""
        return {
            "segmenter": self.segmenter_name,
            "weights": self.weights,
            "min_person_ratio": self.min_person_ratio,
            "seg_size": self.seg_size,
            "batch_size": self.batch_size,
            "source_root": str(self.src),
            "source_digest": self.source_digest,
            "dst_root": str(self.dst),
            "device": self.device,
            "workers": self.workers,
            "world_size": self.world_size,
        }


@dataclass
class ShardStats:
    split: str
    shard: str
    images: int
    person_ratios: list[float]
    bg_removed: list[bool]

    @property
    def fallbacks(self) -> int:
        return sum(not b for b in self.bg_removed)


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


# ----------------------------------------------------------------------------------- planning


def resolve_device(device: str | torch.device = "auto") -> str:
    """"auto": the GPU of this local rank when CUDA is present, else the CPU."""
    device = str(device)
    if device != "auto":
        return device
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return f"cuda:{local % torch.cuda.device_count()}"
    return "cpu"


def dist_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size) from the arguments, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    world_size = int(world_size if world_size is not None else os.environ.get("WORLD_SIZE", "1"))
    rank = int(rank if rank is not None else os.environ.get("RANK", "0"))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size


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
    job_file = dst / PROGRESS_DIR / JOB_FILE
    if job_file.exists():
        previous = read_meta_file(job_file)
        if previous != fingerprint:
            changed = sorted(k for k in set(previous) | set(fingerprint)
                             if previous.get(k) != fingerprint.get(k))
            raise MaskError(f"{dst}: holds an unfinished masking run with different settings "
                            f"({', '.join(changed)}); pass overwrite=true to replace it")
        return
    foreign = [p for s in splits_of(dst) for p in (dst / s).glob("*.pt")]
    if foreign:
        raise MaskError(f"{dst}: holds shard files not written by mask (e.g. {foreign[0]}); pass "
                        f"overwrite=true to replace them, or choose another dst_root")


def read_meta_file(path: Path) -> dict:
    """A small JSON record (job, sidecar); {} when absent or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def plan_masking(src_root: str | Path, dst_root: str | Path,
                 segmenter: str | Segmenter = "deeplabv3_resnet101",
                 seg_weights: str | Path | None = None,
                 min_person_ratio: float = DEFAULT_MIN_PERSON_RATIO, seg_size: int = 520,
                 batch_size: int = 16, device: str = "auto", workers: int = 1,
                 rank: int | None = None, world_size: int | None = None,
                 overwrite: bool = False) -> MaskPlan:
    """Check the job and describe it; writes nothing. Raises MaskError, ShardError or
    SegmenterWeightsError with a message that says what is wrong and how to fix it."""
    src, dst = Path(src_root).resolve(), Path(dst_root).resolve()
    check_destination(src, dst)
    if batch_size < 1 or workers < 1 or seg_size < 1:
        raise ValueError(f"batch_size, workers and seg_size must be positive, got "
                         f"{batch_size}, {workers}, {seg_size}")
    if not 0.0 <= min_person_ratio <= 1.0:
        raise ValueError(f"min_person_ratio must be in [0, 1], got {min_person_ratio}")
    rank, world_size = dist_rank(rank, world_size)

    splits = splits_of(src) if src.is_dir() else []
    info = validate_root(src, tuple(splits) or ("train", "val"))
    splits = [s for s in splits if s in info.shards]

    injected = segmenter if isinstance(segmenter, Segmenter) else None
    if injected is not None:
        name, weights = injected.name, injected.weights
        seg_size = getattr(injected, "seg_size", None)
        needs_masks = injected.needs_source_masks
    else:
        name, weights = str(segmenter), resolve_weights(str(segmenter), seg_weights)
        needs_masks = name == "groundtruth"
        if needs_masks:
            seg_size = None
    if needs_masks and not info.has_masks:
        missing = next(p for s in splits for p in info.shards[s] if "masks" not in load_shard(p))
        raise ShardError(f"{missing}: segmenter '{name}' uses the source's 'masks', but this "
                         f"shard has none; choose a model segmenter")

    tasks, index = [], 0
    for split in splits:
        for path in info.shards[split]:
            count = int(load_shard(path)["labels"].shape[0])
            tasks.append(ShardTask(index, split, path, dst / split / path.name,
                                   dst / PROGRESS_DIR / split / f"{path.stem}.json", count))
            index += 1
    plan = MaskPlan(
        src=src, dst=dst, splits=splits, tasks=tasks, segmenter_name=name, weights=weights,
        seg_size=seg_size, min_person_ratio=float(min_person_ratio), batch_size=int(batch_size),
        device=resolve_device(device), workers=int(workers), rank=rank, world_size=world_size,
        overwrite=bool(overwrite), source_digest=dataset_digest(src),
        num_classes=info.num_classes, image_size=info.image_size, counts=dict(info.counts),
        segmenter=injected)
    _check_resumable(dst, plan.fingerprint, plan.overwrite)
    return plan


# ------------------------------------------------------------------------------ progress files


def _stats_record(stats: ShardStats, fingerprint: dict) -> dict:
    return {"fingerprint": fingerprint, "split": stats.split, "shard": stats.shard,
            "images": stats.images, "fallbacks": stats.fallbacks,
            "person_ratios": stats.person_ratios, "bg_removed": stats.bg_removed}


def read_progress(task: ShardTask, fingerprint: dict) -> ShardStats | None:
    """The statistics sidecar of a shard, when it belongs to this job and is whole."""
    record = read_meta_file(task.progress)
    if record.get("fingerprint") != fingerprint or record.get("images") != task.count:
        return None
    ratios, removed = record.get("person_ratios"), record.get("bg_removed")
    if not isinstance(ratios, list) or not isinstance(removed, list) or len(ratios) != task.count:
        return None
    return ShardStats(task.split, task.src.name, task.count, [float(r) for r in ratios],
                      [bool(b) for b in removed])


def finished_stats(task: ShardTask, plan: MaskPlan) -> ShardStats | None:
    """Statistics of a shard already written by this job, or None when it must be (re)made.

    A shard is finished when its file exists and validates. Its statistics come from the
    sidecar; if a crash fell between the rename and the sidecar, they are recomputed from the
    shard's own ``masks`` and ``bg_removed`` (the same numbers) and the sidecar is written.
    """
    if not task.dst.exists():
        return None
    try:
        shard = read_shard(task.dst, num_classes=plan.num_classes)
    except ShardError:
        return None
    if shard["labels"].shape[0] != task.count or "masks" not in shard or "bg_removed" not in shard:
        return None
    stats = read_progress(task, plan.fingerprint)
    if stats is None:
        stats = ShardStats(task.split, task.src.name, task.count,
                           person_ratio(shard["masks"]).tolist(),
                           shard["bg_removed"].to(torch.bool).tolist())
        write_json(task.progress, _stats_record(stats, plan.fingerprint))
    return stats


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def prepare_destination(plan: MaskPlan) -> None:
    """Create the destination, clear what ``overwrite`` replaces, record the job.

    Each rank clears only its own shards (and rank 0 the files no rank writes), so ranks that
    start at different times never delete each other's fresh output.
    """
    dst = plan.dst
    dst.mkdir(parents=True, exist_ok=True)
    mine = plan.my_tasks
    if plan.overwrite:
        if plan.rank == 0:
            _remove(dst / "meta.json")
            expected = {t.dst for t in plan.tasks}
            for split in splits_of(dst):
                for path in (dst / split).glob("*.pt"):
                    if path not in expected:
                        _remove(path)
        for task in mine:
            _remove(task.dst)
            _remove(task.progress)
    for task in mine:  # temporary files a killed run left behind
        for stale in task.dst.parent.glob(f".{task.dst.name}.*.tmp") if task.dst.parent.exists() else []:
            _remove(stale)
    write_json(dst / PROGRESS_DIR / JOB_FILE, plan.fingerprint)


# --------------------------------------------------------------------------------- the work


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


class _Worker:
    """Runs a list of shard tasks in one process: reader thread -> segmenter -> writer thread."""

    def __init__(self, plan: MaskPlan, segmenter: Segmenter, sink: EventSink):
        self.plan, self.segmenter, self.sink = plan, segmenter, sink
        self.pin = plan.device.startswith("cuda")

    def _read(self, tasks: list[ShardTask], out: queue.Queue, stop: threading.Event) -> None:
        def hand_over(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    pass
            return False

        try:
            for task in tasks:
                # Read the whole file here (not memory-mapped), so disk time overlaps compute.
                shard = load_shard(task.src, mmap=False)
                if self.pin:
                    shard["images"] = shard["images"].pin_memory()
                if not hand_over((task, shard)):
                    return
            hand_over(_DONE)
        except BaseException as e:  # handed to the main thread
            hand_over(e)

    def _write(self, inbox: queue.Queue, errors: list) -> None:
        while True:
            item = inbox.get()
            if item is _DONE:
                return
            if errors:
                continue  # drain after a failure so the producer never blocks
            task, shard, stats = item
            try:
                write_shard(task.dst, shard, num_classes=self.plan.num_classes)
                write_json(task.progress, _stats_record(stats, self.plan.fingerprint))
                self.sink("shard", stats)
            except BaseException as e:
                errors.append(e)

    def run(self, tasks: list[ShardTask]) -> None:
        if not tasks:
            return
        loaded: queue.Queue = queue.Queue(maxsize=1)
        to_write: queue.Queue = queue.Queue(maxsize=1)
        stop, errors = threading.Event(), []
        reader = threading.Thread(target=self._read, args=(tasks, loaded, stop), daemon=True,
                                  name="mask-reader")
        writer = threading.Thread(target=self._write, args=(to_write, errors), daemon=True,
                                  name="mask-writer")
        reader.start()
        writer.start()
        try:
            while True:
                item = loaded.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                if errors:
                    break
                task, shard = item
                out, ratios = mask_shard(shard, self.segmenter, self.plan.min_person_ratio,
                                         self.plan.batch_size,
                                         on_batch=lambda k: self.sink("batch", k))
                stats = ShardStats(task.split, task.src.name, task.count, ratios.tolist(),
                                   out["bg_removed"].tolist())
                del shard
                to_write.put((task, out, stats))
        finally:
            stop.set()
            to_write.put(_DONE)
            writer.join()
        if errors:
            raise errors[0]


def worker_threads(workers: int) -> int:
    """Intra-op threads per process: the CPUs of this machine shared by every masking process
    on it (torchrun's LOCAL_WORLD_SIZE ranks, each with ``workers`` processes)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cpus // (max(1, workers) * max(1, local)))


def _make_segmenter(plan: MaskPlan) -> Segmenter:
    if plan.segmenter is not None:
        return plan.segmenter.to(plan.device)
    weights = None if plan.segmenter_name == "groundtruth" else plan.weights
    return build_segmenter(plan.segmenter_name, weights, plan.seg_size or 520, plan.device)


_events = None  # the queue a spawned worker reports to (set by _init_process)


def _init_process(events, threads: int) -> None:
    global _events
    _events = events
    torch.set_num_threads(threads)


def _process_main(plan: MaskPlan, tasks: list[ShardTask]) -> None:
    """Entry point of a spawned worker process."""
    sink = lambda kind, payload: _events.put((kind, payload))  # noqa: E731
    segmenter = _make_segmenter(plan)
    sink("ready", None)
    _Worker(plan, segmenter, sink).run(tasks)


def _run_pending(plan: MaskPlan, pending: list[ShardTask], sink: EventSink) -> None:
    if not pending:
        return
    if plan.workers == 1:
        if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            torch.set_num_threads(worker_threads(1))
        segmenter = _make_segmenter(plan)
        sink("ready", None)
        _Worker(plan, segmenter, sink).run(pending)
        return
    ctx = torch.multiprocessing.get_context("spawn")
    events = ctx.Queue()
    shares = [pending[w::plan.workers] for w in range(plan.workers)]
    shares = [s for s in shares if s]
    with cf.ProcessPoolExecutor(max_workers=len(shares), mp_context=ctx, initializer=_init_process,
                                initargs=(events, worker_threads(plan.workers))) as pool:
        futures = [pool.submit(_process_main, plan, share) for share in shares]
        try:
            while True:
                try:
                    sink(*events.get(timeout=0.2))
                except queue.Empty:
                    pass
                failed = [f for f in futures if f.done() and f.exception() is not None]
                if failed:
                    raise failed[0].exception()
                if all(f.done() for f in futures):
                    break
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    # The workers have exited, which flushes what they queued: collect the last events.
    while True:
        try:
            sink(*events.get(timeout=0.5))
        except queue.Empty:
            break


def _wait_for(plan: MaskPlan, tasks: list[ShardTask], timeout_s: float | None) -> list[ShardStats]:
    """Rank 0: the statistics of every shard, waiting for the other ranks to finish theirs."""
    start, stats, told = time.monotonic(), {}, False
    while True:
        for task in tasks:
            if task.key not in stats and task.dst.exists():
                s = read_progress(task, plan.fingerprint)
                if s is not None:
                    stats[task.key] = s
        missing = [t for t in tasks if t.key not in stats]
        if not missing:
            return [stats[t.key] for t in tasks]
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise MaskError(f"{plan.dst}: gave up waiting for {len(missing)} shards of other ranks "
                            f"(first: {missing[0].key}, rank {missing[0].index % plan.world_size})")
        if not told:
            log.info("rank 0: waiting for %d shards of other ranks", len(missing))
            told = True
        time.sleep(POLL_SECONDS)


def split_statistics(stats: list[ShardStats]) -> dict:
    ratios = [r for s in stats for r in s.person_ratios]
    images = sum(s.images for s in stats)
    fallbacks = sum(s.fallbacks for s in stats)
    return {
        "images": images,
        "bg_removed": images - fallbacks,
        "fallbacks": fallbacks,
        "fallback_rate": fallbacks / images if images else 0.0,
        "person_ratio_mean": statistics.fmean(ratios) if ratios else 0.0,
        "person_ratio_median": statistics.median(ratios) if ratios else 0.0,
    }


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
    by_split = {s: split_statistics([x for x in all_stats if x.split == s]) for s in plan.splits}
    meta = {
        "source": "mask",
        "source_root": str(plan.src),
        "source_digest": plan.source_digest,
        "digest": dataset_digest(plan.dst),
        "image_size": list(plan.image_size),
        "num_classes": plan.num_classes,
        "counts": dict(plan.counts),
        "masking": {
            "segmenter": plan.segmenter_name,
            "weights": plan.weights,
            "person_class": None if plan.segmenter_name == "groundtruth" else VOC_PERSON,
            "min_person_ratio": plan.min_person_ratio,
            "seg_size": plan.seg_size,
            "statistics": by_split,
        },
        "source_meta": read_meta(plan.src),
    }
    write_json(plan.dst / "meta.json", meta)
    return meta


def execute(plan: MaskPlan, progress: bool = True,
            on_shard_done: Callable[[ShardStats], None] | None = None,
            wait_timeout_s: float | None = None) -> MaskReport:
    """Run a plan: this rank's shards, then (rank 0) the label map and meta.json.

    ``on_shard_done(stats)`` is called once per shard written by this call, after its file and
    statistics are on disk (from a helper thread when ``workers`` is 1).
    """
    prepare_destination(plan)
    mine = plan.my_tasks
    done: dict[str, ShardStats] = {}
    for task in mine:
        stats = finished_stats(task, plan)
        if stats is not None:
            done[task.key] = stats
    pending = [t for t in mine if t.key not in done]
    report = MaskReport(meta=None, skipped_shards=len(done))

    bar = tqdm(total=sum(t.count for t in mine), initial=sum(s.images for s in done.values()),
               unit="img", desc=f"mask {plan.dst.name}", disable=not progress, dynamic_ncols=True)
    lock = threading.Lock()
    times: dict[str, float] = {}  # split -> when its last processed shard was written
    started: list[float] = []

    def sink(kind: str, payload) -> None:
        with lock:
            if kind == "ready":
                started.append(time.monotonic())
            elif kind == "batch":
                bar.update(payload)
            elif kind == "shard":
                done[f"{payload.split}/{payload.shard}"] = payload
                report.processed[payload.split] = report.processed.get(payload.split, 0) + payload.images
                times[payload.split] = time.monotonic()
        if kind == "shard" and on_shard_done is not None:
            on_shard_done(payload)

    try:
        _run_pending(plan, pending, sink)
    finally:
        bar.close()
    # Per-split wall time: from the previous split's last shard (or the start) to this one's.
    previous = min(started) if started else time.monotonic()
    for split in plan.splits:
        if split in times:
            report.seconds[split] = max(times[split] - previous, 1e-9)
            previous = times[split]

    for task in mine:  # a shard whose event got lost still has its sidecar
        if task.key not in done:
            stats = read_progress(task, plan.fingerprint)
            if stats is None:
                raise MaskError(f"{task.dst}: a worker finished without writing this shard")
            done[task.key] = stats
    if plan.rank != 0:
        mine_stats = [done[t.key] for t in mine]
        report.person_ratios = {s: [r for x in mine_stats if x.split == s for r in x.person_ratios]
                                for s in plan.splits}
        return report
    others = [t for t in plan.tasks if t.index % plan.world_size != plan.rank]
    all_stats = {t.key: done[t.key] for t in mine}
    all_stats.update({f"{s.split}/{s.shard}": s for s in _wait_for(plan, others, wait_timeout_s)})
    ordered = [all_stats[t.key] for t in plan.tasks]
    report.person_ratios = {s: [r for x in ordered if x.split == s for r in x.person_ratios]
                            for s in plan.splits}
    report.meta = _finish(plan, ordered)
    return report


def mask_dataset(src_root: str | Path, dst_root: str | Path,
                 segmenter: str | Segmenter = "deeplabv3_resnet101",
                 seg_weights: str | Path | None = None,
                 min_person_ratio: float = DEFAULT_MIN_PERSON_RATIO, seg_size: int = 520,
                 batch_size: int = 16, device: str = "auto", workers: int = 1,
                 rank: int | None = None, world_size: int | None = None, overwrite: bool = False,
                 progress: bool = True,
                 on_shard_done: Callable[[ShardStats], None] | None = None) -> MaskReport:
    """Write the background-removed copy of ``src_root`` to ``dst_root``; see the module doc."""
    plan = plan_masking(src_root, dst_root, segmenter, seg_weights, min_person_ratio, seg_size,
                        batch_size, device, workers, rank, world_size, overwrite)
    return execute(plan, progress=progress, on_shard_done=on_shard_done)
