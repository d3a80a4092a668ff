"""One dataset and one batch loader over a split of shards.

The hot path gathers whole batches from memory-mapped uint8 shards with one `index_select`
per shard touched (no per-sample Python work) and converts to float on the target device.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from fgvc.data.shards import ShardError, read_label_map, read_shard, shards_of
from fgvc.devices import intra_op_threads

# Per-image keys the loader carries along with images and labels when a shard has them.
OPTIONAL_KEYS = ("masks", "venues", "bg_removed")


def stratified_subsample(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Seeded, class-stratified choice of `count` indices (sorted), keeping class proportions.

    Each class gets floor(count * share) items; the remainder goes to the classes with the
    largest fractional parts (ties by class index), so the result is exact and reproducible.
    """
    n = len(labels)
    if count is None or count >= n:
        return torch.arange(n)
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    num_classes = int(labels.max()) + 1
    per_class = torch.bincount(labels, minlength=num_classes).double()
    exact = per_class * count / n
    quota = exact.floor().long()
    remainder = count - int(quota.sum())
    if remainder:
        order = sorted(range(num_classes), key=lambda c: (-(exact[c] - quota[c]).item(), c))
        for c in order[:remainder]:
            quota[c] += 1
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        if quota[c]:
            chosen.append(members[torch.randperm(len(members), generator=g)[: quota[c]]])
    return torch.cat(chosen).sort().values


class ShardDataset:
    """A split of a dataset root: memory-mapped shards plus an index of the chosen items.

    `count` takes a seeded, class-stratified subset (the original's train_count/val_count).
    """

    def __init__(self, root: str | Path, split: str, count: int | None = None, seed: int = 0,
                 num_classes: int | None = None):
        self.root, self.split = Path(root), split
        self.paths = shards_of(root, split)
        self.shards = [read_shard(p, num_classes=num_classes) for p in self.paths]
        first = self.shards[0]
        self.num_classes = int(first["one_hot"].shape[1]) if num_classes is None else num_classes
        self.image_size = tuple(first["images"].shape[2:])
        for path, shard in zip(self.paths, self.shards, strict=True):
            if tuple(shard["images"].shape[2:]) != self.image_size:
                raise ShardError(
                    f"{path}: image size {tuple(shard['images'].shape[2:])} differs from "
                    f"{self.image_size} in {self.paths[0]}"
                )
            if shard["one_hot"].shape[1] != self.num_classes:
                raise ShardError(f"{path}: {shard['one_hot'].shape[1]} classes, expected {self.num_classes}")
        sizes = torch.tensor([len(s["labels"]) for s in self.shards])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
        self._starts = self.offsets.tolist()
        all_labels = torch.cat([s["labels"] for s in self.shards])
        if len(all_labels) == 0:
            raise ShardError(f"{self.root / split}: split is empty (its shards hold no images)")
        self.keys = tuple(k for k in OPTIONAL_KEYS if all(k in s for s in self.shards))
        self.indices = stratified_subsample(all_labels, count, seed) if count else torch.arange(len(all_labels))
        self.labels = all_labels[self.indices]
        self.label_names = read_label_map(root)

    def __len__(self) -> int:
        return len(self.indices)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def gather(self, positions: torch.Tensor, empty: Callable = torch.empty) -> dict[str, torch.Tensor]:
        """Items at `positions` (indices into this dataset), as uint8/int64 CPU tensors
        (allocated by `empty(shape, dtype=...)`).

        Rows are read in file order, one `index_select` per shard and key touched, straight
        into the output; the batch keeps the order of `positions` (already-sorted positions,
        as BatchLoader passes them, need no reordering copy).
        """
        positions = torch.as_tensor(positions, dtype=torch.long).flatten()
        global_idx = self.indices[positions]
        n = len(positions)
        in_order = n < 2 or bool((global_idx[1:] >= global_idx[:-1]).all())
        if not in_order:
            order = torch.argsort(global_idx, stable=True)
            global_idx = global_idx[order]
        # Row range of each shard in the sorted indices: one search for every shard boundary.
        bounds = torch.searchsorted(global_idx, self.offsets).tolist()
        first = self.shards[0]
        out = {key: empty((n, *first[key].shape[1:]), dtype=first[key].dtype)
               for key in ("images", "labels", *self.keys)}
        for s, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            if start == stop:
                continue
            local = global_idx[start:stop] - self._starts[s]
            for key, dest in out.items():
                source = self.shards[s][key]
                if source.dtype == dest.dtype:
                    torch.index_select(source, 0, local, out=dest[start:stop])
                else:
                    dest[start:stop] = source.index_select(0, local)
        if not in_order:  # row j holds positions[order[j]]; put row j back at order[j]
            out = {key: torch.empty_like(v).index_copy_(0, order, v) for key, v in out.items()}
        return out


class BufferPool:
    """Batch-sized CPU tensors whose memory is used again once nothing else holds it.

    A fresh 20-40 MB tensor per batch costs more in page faults (the allocator returns such
    blocks to the system and gets zeroed pages back) than gathering and converting the
    batch. The pool keeps up to `capacity` storages and hands one out again only when its
    use count shows the pool as the sole owner: no tensor, view, numpy array or autograd
    graph still refers to it, so a batch a caller keeps is never overwritten.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._storages: list[torch.UntypedStorage] = []
        self._lock = threading.Lock()

    @staticmethod
    def _free(storage: torch.UntypedStorage) -> bool:
        return torch._C._storage_Use_Count(storage._cdata) == 1

    def empty(self, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if not POOLING or nbytes < POOL_MIN_BYTES:
            return torch.empty(shape, dtype=dtype)
        with self._lock:  # the tensor is made under the lock: no two threads take one storage
            storage = next((s for s in self._storages if s.nbytes() == nbytes and self._free(s)), None)
            if storage is None:
                storage = torch.UntypedStorage(nbytes)
                if len(self._storages) < self.capacity:
                    self._storages.append(storage)
            # torch's stubs list set_(storage, offset, size) only with a stride; the op defaults it (contiguous).
            return torch.empty(0, dtype=dtype).set_(storage, 0, shape)  # type: ignore[call-overload]


# Reuse needs torch's storage use count (present since torch 2.0); without it, no pooling.
POOLING = hasattr(torch._C, "_storage_Use_Count")
POOL_MIN_BYTES = 1 << 20  # smaller blocks come back from the allocator's free lists anyway


@dataclass
class Batch:
    images: torch.Tensor  # float [B, 3, H, W] in [0, 1], on the target device
    labels: torch.Tensor  # int64 [B]
    extras: dict[str, torch.Tensor]  # masks [B, H, W] uint8, venues [B], ... (CPU)
    positions: torch.Tensor  # indices into the dataset


class BatchLoader:
    """Batches over a ShardDataset: seeded shuffle per epoch, optional rank sharding, optional
    per-sample transform on the uint8 batch (e.g. augmentation), background loading.

    `rank`/`world_size` give each process a disjoint part of every epoch's order (DDP); part
    sizes differ by at most one item, so ranks may differ by one batch.

    `transform(images_uint8 [B,3,H,W], generator) -> float [B,3,H,W] in [0, 1]` draws from a
    generator seeded by (seed, epoch, batch), so a batch's result does not depend on which
    thread makes it. It runs where the batch is loaded: in the `workers` loader threads (each
    keeping up to `prefetch` batches ready) when both are > 0, else in the consumer's thread.
    On the CPU it runs on one intra-op thread wherever it runs, so its result does not depend
    on thread counts either (a reduction split across threads sums in another order). With
    `augment_on_device`, the uint8 batch is copied to the device first and transformed there,
    in the consumer's thread (a GPU augments a batch faster than CPU threads can).
    Without a transform, a GPU gets the batch as uint8 and makes it float; for the CPU the
    loader threads make it float (so `prefetch * workers` float batches may wait in memory).
    Each batch's positions come sorted (see `order`).
    """

    def __init__(self, dataset: ShardDataset, batch_size: int, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, device: str | torch.device = "cpu",
                 transform: Callable | None = None, prefetch: int = 2, rank: int = 0,
                 world_size: int = 1, channels_last: bool = False, workers: int = 1,
                 augment_on_device: bool = False):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.drop_last, self.device, self.transform = drop_last, torch.device(device), transform
        self.prefetch, self.rank, self.world_size = prefetch, rank, world_size
        self.channels_last, self.workers = channels_last, workers
        self.augment_on_device = augment_on_device
        self.epoch = 0
        # Enough for the batches in flight: queued, being made, and the consumer's two.
        self._pool = BufferPool(capacity=2 * (max(workers, 1) * (max(prefetch, 0) + 1) + 2))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> torch.Tensor:
        """This rank's positions for the current epoch. Batch k holds items
        `order[k*B:(k+1)*B]`, sorted, so `Batch.positions` is the authoritative order."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            order = order[self.rank::self.world_size]
        return order

    def __len__(self) -> int:
        n = len(self.order())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _batch_positions(self) -> list[torch.Tensor]:
        """This epoch's batches as positions. Sorted within the batch: rows are then read in
        file order (locality on the memory-mapped shards); which items form a batch is still
        the shuffled order's."""
        order = self.order()
        batches = [order[s:s + self.batch_size].sort().values for s in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def _generator(self, k: int) -> torch.Generator:
        """The draws of batch k: from (seed, epoch, k) only."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 100_003 + k)

    def _load(self, k: int, positions: torch.Tensor) -> tuple[int, torch.Tensor, dict]:
        """Batch k, as far as it can be made ahead of the consumer: gathered, transformed (unless
        on the device), and on a CPU target already float; for a GPU it stays uint8 (a quarter
        of the bytes to copy), gathered into pinned memory for a non-blocking copy."""
        items = self.dataset.gather(positions, empty=self._pinned_empty if self.device.type == "cuda"
                                    else self._pool.empty)
        if self.transform is None:
            if self.device.type == "cpu":
                pixels = items["images"]
                items["images"] = self._pool.empty(pixels.shape, torch.float32).copy_(pixels).div_(255.0)
                del pixels
        elif not self.augment_on_device:
            with intra_op_threads(1):
                items["images"] = self.transform(items["images"], self._generator(k))
        if self.device.type == "cuda" and not items["images"].is_pinned():  # made by a CPU transform
            items["images"] = items["images"].pin_memory()
        return k, positions, items

    @staticmethod
    def _pinned_empty(shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A batch gathered straight into pinned memory, no pageable copy in between. Torch's
        caching host allocator pools these blocks and, after a non-blocking copy, hands one out
        again only once the copy has finished."""
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def _to_device(self, k: int, positions: torch.Tensor, items: dict) -> Batch:
        non_blocking = self.device.type == "cuda"
        images = items.pop("images").to(self.device, non_blocking=non_blocking)
        if self.transform is not None and self.augment_on_device:
            images = self.transform(images, self._generator(k))
        elif images.dtype == torch.uint8:
            images = images.float().div_(255.0)  # after the copy to the device
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = items.pop("labels").to(self.device, non_blocking=non_blocking)
        return Batch(images, labels, items, positions)

    def __iter__(self) -> Iterator[Batch]:
        batches = self._batch_positions()
        if self.prefetch <= 0 or self.workers <= 0:
            for k, positions in enumerate(batches):
                yield self._to_device(*self._load(k, positions))
            return
        yield from self._prefetched(batches)

    def _prefetched(self, batches: list[torch.Tensor]) -> Iterator[Batch]:
        """`workers` threads load batches k = w, w + workers, ... into their own queue; the
        consumer reads the queues in turn, so batches arrive in order."""
        workers = min(self.workers, max(len(batches), 1))
        queues: list[queue.Queue] = [queue.Queue(maxsize=self.prefetch) for _ in range(workers)]
        stop = threading.Event()

        def put(q: queue.Queue, item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce(w: int) -> None:
            try:
                for k in range(w, len(batches), workers):
                    if not put(queues[w], self._load(k, batches[k])):
                        return
            except BaseException as e:  # surfaced in the consumer
                put(queues[w], e)

        threads = [threading.Thread(target=produce, args=(w,), daemon=True, name=f"fgvc-loader-{w}")
                   for w in range(workers)]
        for t in threads:
            t.start()
        try:
            for k in range(len(batches)):
                item = queues[k % workers].get()
                if isinstance(item, BaseException):
                    raise item
                yield self._to_device(*item)
        finally:
            stop.set()
            for t, q in zip(threads, queues, strict=True):
                while t.is_alive():
                    try:
                        q.get_nowait()
                    except queue.Empty:
                        t.join(timeout=0.05)
