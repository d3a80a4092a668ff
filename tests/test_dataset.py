"""ShardDataset and BatchLoader: safe memory-mapped loading, whole-batch gathers that match the
shard rows, seeded stratified subsets, seeded per-epoch shuffles, rank sharding, prefetch."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from fgvc.data.dataset import BatchLoader, ShardDataset, stratified_subsample
from fgvc.data.demo import DemoConfig, generate_demo
from fgvc.data.shards import ShardError, make_shard, read_shard, shard_name, shards_of

SMALL = DemoConfig(num_designers=4, train_per_class=30, val_per_class=10, height=32, width=24,
                   shard_size=32, seed=3)  # 120 train images over 4 shards, the last one short


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo")
    generate_demo(path, SMALL)
    return path


@pytest.fixture(scope="module")
def rows(root) -> dict[str, torch.Tensor]:
    """Every train item, read straight from the shard files in order."""
    shards = [read_shard(p) for p in shards_of(root, "train")]
    return {k: torch.cat([s[k] for s in shards]) for k in ("images", "labels", "masks", "venues")}


def epoch_positions(loader: BatchLoader) -> torch.Tensor:
    return torch.cat([b.positions for b in loader])


# --- loading and validation -----------------------------------------------------------------

def test_shards_are_loaded_weights_only_and_memory_mapped(root, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    ds = ShardDataset(root, "train")
    assert len(calls) == len(ds.paths) == 4
    assert all(c.get("weights_only") is True and c.get("mmap") is True for c in calls)


def tiny_shard(n=5, num_classes=3, height=8, width=6, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=g)
    return make_shard(images, torch.arange(n) % num_classes, num_classes)


def plant(root: Path, index: int, obj, split: str = "train") -> Path:
    path = root / split / shard_name(index)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def changed(key, fn) -> dict:
    shard = tiny_shard()
    if fn is None:
        del shard[key]
    else:
        shard[key] = fn(shard[key])
    return shard


def corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:300])


class RunsCodeWhenLoaded:
    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


# (case, plant a bad train/shard_001.pt next to a good shard_000.pt, words in the message)
BAD = [
    ("not a dict", lambda r: plant(r, 1, (torch.zeros(2),)), "shard must be a dict"),
    ("missing key", lambda r: plant(r, 1, changed("one_hot", None)), "missing key 'one_hot'"),
    ("wrong dtype", lambda r: plant(r, 1, changed("images", lambda x: x.to(torch.int16))),
     "'images' must have dtype uint8"),
    ("wrong rank", lambda r: plant(r, 1, changed("labels", lambda x: x.view(5, 1))),
     "'labels' must have shape [N]"),
    ("N differs", lambda r: plant(r, 1, changed("one_hot", lambda x: x[:3])), "N differs between keys"),
    ("label out of range", lambda r: plant(r, 1, changed("labels", lambda x: x + 1)), "labels outside [0, 3)"),
    ("one_hot inconsistent", lambda r: plant(r, 1, changed("one_hot", lambda x: x.flip(0))),
     "'one_hot' is inconsistent with 'labels'"),
    ("size differs", lambda r: plant(r, 1, tiny_shard(height=9)), "differs from"),
    ("class count differs", lambda r: plant(r, 1, tiny_shard(num_classes=4)), "4 classes, expected 3"),
    ("truncated", lambda r: corrupt(plant(r, 1, tiny_shard())), "truncated or corrupt"),
]


@pytest.mark.parametrize("case,breaks,expected", BAD, ids=[c[0] for c in BAD])
def test_dataset_refuses_a_bad_shard_naming_it(tmp_path, case, breaks, expected):
    plant(tmp_path, 0, tiny_shard())
    breaks(tmp_path)
    with pytest.raises(ShardError) as err:
        ShardDataset(tmp_path, "train")
    assert str(tmp_path / "train" / "shard_001.pt") in str(err.value)
    assert expected in str(err.value)


def test_dataset_refuses_pickled_code_without_running_it(tmp_path):
    witness = tmp_path / "code-ran"
    plant(tmp_path, 0, tiny_shard())
    shard = tiny_shard()
    shard["extra"] = RunsCodeWhenLoaded(witness)
    bad = plant(tmp_path, 1, shard)
    with pytest.raises(ShardError) as err:
        ShardDataset(tmp_path, "train")
    assert not witness.exists()
    assert str(bad) in str(err.value) and "would run code" in str(err.value)


def test_dataset_refuses_a_missing_root_or_split(tmp_path):
    with pytest.raises(ShardError) as err:
        ShardDataset(tmp_path / "nowhere", "train")
    assert f"{tmp_path / 'nowhere' / 'train'}: split directory does not exist" in str(err.value)
    (tmp_path / "val").mkdir()
    with pytest.raises(ShardError) as err:
        ShardDataset(tmp_path, "val")
    assert f"{tmp_path / 'val'}: split has no shard_NNN.pt files" in str(err.value)


def test_dataset_refuses_a_split_with_no_images(tmp_path):
    plant(tmp_path, 0, tiny_shard(n=0))
    with pytest.raises(ShardError) as err:
        ShardDataset(tmp_path, "train")
    assert f"{tmp_path / 'train'}: split is empty" in str(err.value)


def test_dataset_describes_the_split(root):
    ds = ShardDataset(root, "train")
    assert len(ds) == 120
    assert ds.num_classes == 4
    assert ds.image_size == (32, 24)
    assert ds.keys == ("masks", "venues")
    assert ds.class_counts() == [30, 30, 30, 30]
    assert ds.label_names == {i: f"designer_{i:02d}" for i in range(4)}


# --- gathering --------------------------------------------------------------------------------

def test_gather_returns_the_shard_rows_in_the_order_asked(root, rows):
    ds = ShardDataset(root, "train")
    g = torch.Generator().manual_seed(0)
    for positions in (torch.randperm(120, generator=g)[:50], torch.arange(120),
                      torch.tensor([119, 0, 31, 32, 32, 95, 64])):
        items = ds.gather(positions)
        assert set(items) == {"images", "labels", "masks", "venues"}
        for key, value in items.items():
            assert torch.equal(value, rows[key][positions]), key


def test_batches_are_float_on_the_target_device_and_extras_match_rows(root, rows):
    ds = ShardDataset(root, "train")
    loader = BatchLoader(ds, batch_size=16, shuffle=True, seed=5, device="cpu", prefetch=0)
    seen = 0
    for batch in loader:
        assert batch.images.dtype == torch.float32 and batch.images.device.type == "cpu"
        assert batch.images.shape == (len(batch.positions), 3, 32, 24)
        assert torch.equal(batch.images, rows["images"][batch.positions].float() / 255.0)
        assert torch.equal(batch.labels, rows["labels"][batch.positions])
        assert torch.equal(batch.extras["masks"], rows["masks"][batch.positions])
        assert torch.equal(batch.extras["venues"], rows["venues"][batch.positions])
        seen += len(batch.positions)
    assert seen == 120


def test_extras_follow_the_subset(root, rows):
    ds = ShardDataset(root, "train", count=40, seed=1)
    for batch in BatchLoader(ds, batch_size=7, shuffle=True, seed=2, prefetch=0):
        index = ds.indices[batch.positions]
        assert torch.equal(batch.labels, rows["labels"][index])
        assert torch.equal(batch.extras["masks"], rows["masks"][index])
        assert torch.equal(batch.extras["venues"], rows["venues"][index])


# --- stratified subsampling -------------------------------------------------------------------

def imbalanced_labels() -> torch.Tensor:
    counts = [50, 30, 15, 5]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("count", [1, 7, 33, 50, 99])
def test_subsample_has_exact_count_and_keeps_proportions(count):
    labels = imbalanced_labels()
    chosen = stratified_subsample(labels, count, seed=0)
    assert len(chosen) == count
    assert len(chosen.unique()) == count
    assert torch.equal(chosen, chosen.sort().values)
    per_class = torch.bincount(labels[chosen], minlength=4).double()
    expected = torch.tensor([50, 30, 15, 5]).double() * count / 100
    assert ((per_class - expected).abs() < 1.0).all(), (per_class, expected)


def test_subsample_is_seeded():
    labels = imbalanced_labels()
    a = stratified_subsample(labels, 40, seed=11)
    assert torch.equal(a, stratified_subsample(labels, 40, seed=11))
    assert not torch.equal(a, stratified_subsample(labels, 40, seed=12))


def test_subsample_of_everything_or_more_is_everything():
    labels = imbalanced_labels()
    assert torch.equal(stratified_subsample(labels, 100, seed=0), torch.arange(100))
    assert torch.equal(stratified_subsample(labels, 500, seed=0), torch.arange(100))


def test_dataset_count_takes_a_seeded_stratified_subset(root):
    ds = ShardDataset(root, "train", count=40, seed=4)
    assert len(ds) == 40
    assert ds.class_counts() == [10, 10, 10, 10]
    assert torch.equal(ds.indices, ShardDataset(root, "train", count=40, seed=4).indices)
    assert not torch.equal(ds.indices, ShardDataset(root, "train", count=40, seed=5).indices)
    assert len(ShardDataset(root, "val", count=13, seed=0)) == 13


# --- order: shuffle, epochs, ranks ------------------------------------------------------------

def test_shuffle_is_seeded_per_epoch_and_covers_every_item_once(root):
    ds = ShardDataset(root, "train")
    loader = BatchLoader(ds, batch_size=16, shuffle=True, seed=7, prefetch=0)
    first = epoch_positions(loader)
    assert torch.equal(first.sort().values, torch.arange(120))
    assert torch.equal(first, epoch_positions(BatchLoader(ds, 16, shuffle=True, seed=7, prefetch=0)))
    loader.set_epoch(1)
    second = epoch_positions(loader)
    assert torch.equal(second.sort().values, torch.arange(120))
    assert not torch.equal(first, second)
    assert not torch.equal(first, epoch_positions(BatchLoader(ds, 16, shuffle=True, seed=8, prefetch=0)))
    loader.set_epoch(0)
    assert torch.equal(epoch_positions(loader), first)


def test_without_shuffle_the_order_is_the_dataset_order(root):
    loader = BatchLoader(ShardDataset(root, "train"), batch_size=50, prefetch=0)
    assert torch.equal(epoch_positions(loader), torch.arange(120))
    assert [len(b.positions) for b in loader] == [50, 50, 20]
    assert len(loader) == 3


def test_drop_last(root):
    loader = BatchLoader(ShardDataset(root, "train"), batch_size=50, shuffle=True, drop_last=True, prefetch=0)
    assert [len(b.positions) for b in loader] == [50, 50]
    assert len(loader) == 2


@pytest.mark.parametrize("world_size", [2, 3, 7])
def test_ranks_get_disjoint_parts_that_cover_the_epoch(root, world_size):
    ds = ShardDataset(root, "train")
    for epoch in (0, 1):
        parts = []
        for rank in range(world_size):
            loader = BatchLoader(ds, batch_size=8, shuffle=True, seed=3, rank=rank,
                                 world_size=world_size, prefetch=0)
            loader.set_epoch(epoch)
            parts.append(epoch_positions(loader))
        everything = torch.cat(parts)
        assert len(everything) == 120
        assert torch.equal(everything.sort().values, torch.arange(120))  # disjoint and covering
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_rank_must_be_below_world_size(root):
    ds = ShardDataset(root, "train")
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(ds, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(ds, 0)


# --- transform and prefetch -------------------------------------------------------------------

def noisy_flip(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A seeded augmentation: flip a random half of the batch, add seeded noise."""
    images = images.float() / 255.0
    flip = torch.rand(len(images), generator=g) < 0.5
    images[flip] = images[flip].flip(-1)
    return images + 0.01 * torch.randn(images.shape, generator=g)


def test_prefetch_gives_the_same_batches_as_no_prefetch(root):
    ds = ShardDataset(root, "train")
    for transform in (None, noisy_flip):
        plain = list(BatchLoader(ds, 16, shuffle=True, seed=9, transform=transform, prefetch=0))
        ahead = list(BatchLoader(ds, 16, shuffle=True, seed=9, transform=transform, prefetch=3))
        threads = list(BatchLoader(ds, 16, shuffle=True, seed=9, transform=transform, workers=3))
        assert len(plain) == len(ahead) == len(threads) == 8
        for a, b in [*zip(plain, ahead, strict=True), *zip(plain, threads, strict=True)]:
            assert torch.equal(a.positions, b.positions)
            assert torch.equal(a.images, b.images)
            assert torch.equal(a.labels, b.labels)
            assert a.extras.keys() == b.extras.keys()
            assert all(torch.equal(a.extras[k], b.extras[k]) for k in a.extras)


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fgvc-loader")]


def wait_for_prefetch_to_end(timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not prefetch_threads()


@pytest.mark.parametrize("prefetch", [0, 2])
def test_an_error_in_the_transform_reaches_the_consumer(root, prefetch):
    calls = []

    def broken(images, g):
        calls.append(len(images))
        if len(calls) == 3:
            raise RuntimeError("augmentation failed on batch 3")
        return images.float() / 255.0

    loader = BatchLoader(ShardDataset(root, "train"), 16, shuffle=True, transform=broken, prefetch=prefetch)
    got = []
    with pytest.raises(RuntimeError, match="augmentation failed on batch 3"):
        for batch in loader:
            got.append(batch)
    assert len(got) == 2
    wait_for_prefetch_to_end()


def test_stopping_early_ends_the_prefetch_thread(root):
    loader = BatchLoader(ShardDataset(root, "train"), 4, shuffle=True, prefetch=2)
    for i, _ in enumerate(loader):
        if i == 2:
            break
    wait_for_prefetch_to_end()
    assert len(list(loader)) == 30  # and the loader still works afterwards


def test_channels_last(root):
    batch = next(iter(BatchLoader(ShardDataset(root, "train"), 8, channels_last=True, prefetch=0)))
    assert batch.images.is_contiguous(memory_format=torch.channels_last)


def test_augmented_batches_do_not_depend_on_where_or_in_how_many_threads_they_are_made(root):
    from fgvc.training.augment import get_preset

    ds = ShardDataset(root, "train")
    aug = get_preset("heavy")
    made = {}
    for label, options in {"in line": dict(workers=0), "1 thread": dict(workers=1), "3 threads": dict(workers=3),
                           "on the device": dict(workers=2, augment_on_device=True)}.items():
        loader = BatchLoader(ds, 16, shuffle=True, seed=4, transform=aug, **options)
        loader.set_epoch(1)
        made[label] = list(loader)
    first = made.pop("in line")
    assert len(first) == 8
    for label, batches in made.items():
        for a, b in zip(first, batches, strict=True):
            assert torch.equal(a.positions, b.positions) and torch.equal(a.labels, b.labels), label
            assert torch.equal(a.images, b.images), label
    # each batch is the recipe applied to its rows with the generator of (seed, epoch, batch)
    loader = BatchLoader(ds, 16, shuffle=True, seed=4, transform=aug, workers=0)
    loader.set_epoch(1)
    k = 3
    assert torch.equal(first[k].images, aug(ds.gather(first[k].positions)["images"], loader._generator(k)))


@pytest.mark.parametrize("workers", [0, 2])
def test_the_transform_runs_on_one_intra_op_thread_and_the_consumer_keeps_its_own(root, workers):
    threads_seen = []

    def spy(images, g):
        threads_seen.append(torch.get_num_threads())
        return images.float() / 255.0

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in BatchLoader(ShardDataset(root, "train"), 32, transform=spy, workers=workers):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert threads_seen == [1, 1, 1, 1]


def test_intra_op_threads_restores_the_count():
    from fgvc.devices import intra_op_threads

    before = torch.get_num_threads()
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with intra_op_threads(1):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_negative_workers_are_refused(root):
    with pytest.raises(ValueError, match="workers must be >= 0"):
        BatchLoader(ShardDataset(root, "train"), 8, workers=-1)


# --- reused batch memory ----------------------------------------------------------------------

@pytest.fixture()
def pooled(monkeypatch):
    """The buffer pool on for the tiny batches of these tests (it skips blocks under 1 MB)."""
    import fgvc.data.dataset as dataset

    monkeypatch.setattr(dataset, "POOL_MIN_BYTES", 0)
    assert dataset.POOLING


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_memory_is_reused_only_once_nothing_holds_it(root, rows, pooled, workers):
    # Batches of 4: many more batches than can be in flight at once (two workers with two
    # prefetched each, those being made, the consumer's), so reuse does not hang on timing.
    loader = BatchLoader(ShardDataset(root, "train"), 4, shuffle=True, seed=2, workers=workers)
    seen = set()
    for batch in loader:  # dropped as we go: the same few blocks come back
        assert torch.equal(batch.images, rows["images"][batch.positions].float() / 255.0)
        seen.add(batch.images.data_ptr())
    assert len(loader) >= 24 and len(seen) < len(loader)
    kept = list(loader)  # all held at once: every batch has its own memory, and stays right
    assert len({b.images.data_ptr() for b in kept}) == len(kept)
    for batch in kept:
        assert torch.equal(batch.images, rows["images"][batch.positions].float() / 255.0)
        assert torch.equal(batch.labels, rows["labels"][batch.positions])


def test_a_view_or_an_autograd_graph_keeps_a_block_from_being_reused(pooled):
    from fgvc.data.dataset import BufferPool

    pool = BufferPool(capacity=1)  # one pooled block: handed out again only when free
    block = pool.empty((4, 8)).fill_(1.0)
    address = block.data_ptr()
    view = block[1:3]
    del block
    assert pool.empty((4, 8)).data_ptr() != address  # a view still reads it
    assert bool((view == 1.0).all())
    del view
    x = pool.empty((4, 8))
    assert x.data_ptr() == address  # free again: reused
    weight = torch.ones(8, requires_grad=True)
    loss = (x.fill_(3.0) * weight).sum()  # the product keeps x for the weight's gradient
    del x
    assert pool.empty((4, 8)).data_ptr() != address
    loss.backward()
    assert torch.equal(weight.grad, torch.full((8,), 12.0))  # computed from the untouched block
    del loss
    assert pool.empty((4, 8)).data_ptr() == address
