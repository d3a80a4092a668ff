"""The shard format: validation refuses every bad input with a message naming the file and the
problem; writes are atomic; the digest tracks content."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from fgvc.data.shards import (
    ShardError,
    atomic_write,
    dataset_digest,
    load_shard,
    make_shard,
    read_shard,
    shard_name,
    shards_of,
    validate_root,
    write_label_map,
    write_shard,
)

C = 3  # classes in the tiny shards below


def tiny_shard(n: int = 6, num_classes: int = C, height: int = 8, width: int = 6, seed: int = 0,
               masks: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % num_classes
    extra = {"masks": torch.randint(0, 2, (n, height, width), dtype=torch.uint8, generator=g)} if masks else {}
    return make_shard(images, labels, num_classes, venues=torch.arange(n), **extra)


def plant(root: Path, split: str, index: int, obj) -> Path:
    """Save anything as a shard file, bypassing write_shard's validation."""
    path = root / split / shard_name(index)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def good_root(root: Path, train_shards: int = 2) -> Path:
    for k in range(train_shards):
        write_shard(root / "train" / shard_name(k), tiny_shard(seed=k))
    write_shard(root / "val" / shard_name(0), tiny_shard(seed=9))
    write_label_map(root, ["a", "b", "c"])
    return root


def edited(**changes) -> dict:
    """A valid shard with some keys replaced (value None deletes the key)."""
    shard = tiny_shard()
    for key, value in changes.items():
        if value is None:
            del shard[key]
        else:
            shard[key] = value(shard) if callable(value) else value
    return shard


def wrong_label(shard: dict, value: int) -> torch.Tensor:
    labels = shard["labels"].clone()
    labels[2] = value
    return labels


def shifted_one_hot(shard: dict) -> torch.Tensor:
    one_hot = shard["one_hot"].clone()
    one_hot[4] = one_hot[4].roll(1)
    return one_hot


class RunsCodeWhenLoaded:
    """A pickle payload: unpickling it calls open(target, "w"), creating the file."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# (case, how to break train/shard_000.pt, words the message must contain)
BAD_SHARDS = [
    ("not a dict", lambda root: plant(root, "train", 0, torch.zeros(3)), "shard must be a dict, found Tensor"),
    ("list", lambda root: plant(root, "train", 0, [torch.zeros(3)]), "shard must be a dict, found list"),
    ("missing images", lambda root: plant(root, "train", 0, edited(images=None)), "missing key 'images'"),
    ("missing labels", lambda root: plant(root, "train", 0, edited(labels=None)), "missing key 'labels'"),
    ("missing one_hot", lambda root: plant(root, "train", 0, edited(one_hot=None)), "missing key 'one_hot'"),
    ("labels not a tensor", lambda root: plant(root, "train", 0, edited(labels=[0, 1, 2, 0, 1, 2])),
     "'labels' must be a tensor, found list"),
    ("images float", lambda root: plant(root, "train", 0, edited(images=lambda s: s["images"].float())),
     "'images' must have dtype uint8, found torch.float32"),
    ("labels int32", lambda root: plant(root, "train", 0, edited(labels=lambda s: s["labels"].int())),
     "'labels' must have dtype int64, found torch.int32"),
    ("images rank 3", lambda root: plant(root, "train", 0, edited(images=lambda s: s["images"][:, 0])),
     "'images' must have shape [N, 3, H, W], found [6, 8, 6]"),
    ("images 1 channel", lambda root: plant(root, "train", 0, edited(images=lambda s: s["images"][:, :1])),
     "'images' must have shape [N, 3, H, W], found [6, 1, 8, 6]"),
    ("labels rank 2", lambda root: plant(root, "train", 0, edited(labels=lambda s: s["labels"][:, None])),
     "'labels' must have shape [N], found [6, 1]"),
    ("one_hot rank 1", lambda root: plant(root, "train", 0, edited(one_hot=lambda s: s["one_hot"].flatten())),
     "'one_hot' must have shape [N, C]"),
    ("N differs", lambda root: plant(root, "train", 0, edited(labels=lambda s: s["labels"][:5])),
     "N differs between keys: 'images' has 6 items, 'labels' has 5"),
    ("N differs in masks", lambda root: plant(root, "train", 0, edited(masks=lambda s: s["masks"][:4])),
     "'masks' has 4"),
    ("label = C", lambda root: plant(root, "train", 0, edited(labels=lambda s: wrong_label(s, C))),
     "labels outside [0, 3): min 0, max 3"),
    ("label < 0", lambda root: plant(root, "train", 0, edited(labels=lambda s: wrong_label(s, -1))),
     "labels outside [0, 3): min -1"),
    ("one_hot inconsistent", lambda root: plant(root, "train", 0, edited(one_hot=shifted_one_hot)),
     "'one_hot' is inconsistent with 'labels' (first at row 4"),
    ("one_hot with a 2", lambda root: plant(root, "train", 0, edited(one_hot=lambda s: s["one_hot"] * 2)),
     "'one_hot' is inconsistent with 'labels' (first at row 0"),
    ("masks not 0/1", lambda root: plant(root, "train", 0, edited(masks=lambda s: s["masks"] * 2)),
     "'masks' must hold only 0 and 1"),
    ("masks wrong size", lambda root: plant(root, "train", 0, edited(masks=lambda s: s["masks"][:, :4])),
     "'masks' must have shape [N, H, W]"),
    ("truncated", lambda root: truncated(plant(root, "train", 0, tiny_shard())),
     "cannot be read as a torch file (truncated or corrupt?)"),
    ("not a torch file", lambda root: (root / "train" / shard_name(0)).write_bytes(b"not a torch file " * 40),
     "cannot be read"),
    ("empty file", lambda root: (root / "train" / shard_name(0)).write_bytes(b""),
     "cannot be read as a torch file (truncated or corrupt?)"),
]


@pytest.mark.parametrize("case,breaks,expected", BAD_SHARDS, ids=[c[0] for c in BAD_SHARDS])
def test_validate_root_names_the_file_and_the_problem(tmp_path, case, breaks, expected):
    root = good_root(tmp_path)
    breaks(root)
    with pytest.raises(ShardError) as err:
        validate_root(root)
    message = str(err.value)
    assert str(root / "train" / "shard_000.pt") in message
    assert expected in message


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    root = good_root(tmp_path / "root")
    witness = tmp_path / "code-ran.txt"
    shard = tiny_shard()
    shard["note"] = RunsCodeWhenLoaded(witness)
    bad = plant(root, "train", 1, shard)
    with pytest.raises(ShardError) as err:
        validate_root(root)
    assert not witness.exists()
    assert str(bad) in str(err.value)
    assert "would run code" in str(err.value)
    assert "open" in str(err.value)  # the refused callable is named


def test_missing_root(tmp_path):
    with pytest.raises(ShardError, match="dataset root does not exist") as err:
        validate_root(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)


def test_root_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ShardError, match="not a directory"):
        validate_root(tmp_path / "file")


def test_missing_split(tmp_path):
    root = good_root(tmp_path)
    for p in (root / "val").iterdir():
        p.unlink()
    (root / "val").rmdir()
    with pytest.raises(ShardError) as err:
        validate_root(root)
    assert f"{root / 'val'}: split directory does not exist" in str(err.value)


def test_split_without_pt_files(tmp_path):
    root = good_root(tmp_path)
    for p in (root / "val").iterdir():
        p.unlink()
    (root / "val" / "notes.txt").write_text("images go here")
    with pytest.raises(ShardError) as err:
        validate_root(root)
    assert f"{root / 'val'}: split has no shard_NNN.pt files" in str(err.value)


def test_split_whose_shards_hold_no_images(tmp_path):
    root = good_root(tmp_path)
    plant(root, "val", 0, tiny_shard(n=0))
    with pytest.raises(ShardError) as err:
        validate_root(root)
    assert f"{root / 'val'}: split is empty" in str(err.value)


def test_image_sizes_differ_between_shards(tmp_path):
    root = good_root(tmp_path)
    plant(root, "train", 1, tiny_shard(height=10))
    with pytest.raises(ShardError) as err:
        validate_root(root)
    assert str(root / "train" / "shard_001.pt") in str(err.value)
    assert "image size 10x6 differs from 8x6" in str(err.value)


def test_image_size_differs_between_splits(tmp_path):
    root = good_root(tmp_path)
    plant(root, "val", 0, tiny_shard(width=7))
    with pytest.raises(ShardError) as err:
        validate_root(root)
    assert str(root / "val" / "shard_000.pt") in str(err.value)
    assert "differs from" in str(err.value)


def test_train_and_val_disagree_on_class_count(tmp_path):
    root = good_root(tmp_path)
    plant(root, "val", 0, tiny_shard(num_classes=4))
    with pytest.raises(ShardError) as err:
        validate_root(root)
    message = str(err.value)
    assert str(root / "val" / "shard_000.pt") in message
    assert "4 classes" in message and "has 3" in message
    assert "splits must agree on the class count" in message


def test_label_map_disagrees_with_class_count(tmp_path):
    root = good_root(tmp_path)
    write_label_map(root, ["a", "b"])
    with pytest.raises(ShardError) as err:
        validate_root(root)
    assert str(root / "index_to_label.json") in str(err.value)
    assert "must name every class 0..2 of the shards exactly once; missing [2]" in str(err.value)


def test_validate_root_reports_what_it_found(tmp_path):
    root = good_root(tmp_path, train_shards=2)
    info = validate_root(root)
    assert info.num_classes == C
    assert info.image_size == (8, 6)
    assert info.counts == {"train": 12, "val": 6}
    assert info.class_counts["train"] == [4, 4, 4]
    assert [p.name for p in info.shards["train"]] == ["shard_000.pt", "shard_001.pt"]
    assert info.has_masks
    assert info.label_names == {0: "a", 1: "b", 2: "c"}


def test_shards_are_listed_in_numeric_order(tmp_path):
    for k in (10, 2, 1):
        plant(tmp_path, "train", k, tiny_shard())
    (tmp_path / "train" / "shard_1000.pt").write_bytes(b"")
    assert [p.name for p in shards_of(tmp_path, "train")] == [
        "shard_001.pt", "shard_002.pt", "shard_010.pt", "shard_1000.pt"]


def test_load_shard_missing_file(tmp_path):
    with pytest.raises(ShardError, match="file does not exist") as err:
        load_shard(tmp_path / "shard_000.pt")
    assert str(tmp_path / "shard_000.pt") in str(err.value)


def test_legacy_non_zip_shards_still_load(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(tiny_shard(), path, _use_new_zipfile_serialization=False)
    shard = read_shard(path)
    assert torch.equal(shard["images"], tiny_shard()["images"])


def test_read_shard_checks_the_expected_class_count(tmp_path):
    path = plant(tmp_path, "train", 0, tiny_shard())
    with pytest.raises(ShardError, match="'one_hot' has 3 classes, expected 5"):
        read_shard(path, num_classes=5)


def test_float_and_bool_one_hot_are_accepted(tmp_path):
    for dtype in (torch.float32, torch.bool):
        shard = tiny_shard()
        shard["one_hot"] = shard["one_hot"].to(dtype)
        write_shard(tmp_path / f"{dtype}.pt", shard)


def test_write_shard_refuses_an_invalid_shard_and_writes_nothing(tmp_path):
    path = tmp_path / "train" / "shard_000.pt"
    shard = tiny_shard()
    shard["labels"] = shard["labels"] + C
    with pytest.raises(ShardError) as err:
        write_shard(path, shard)
    assert str(path) in str(err.value) and "labels outside [0, 3)" in str(err.value)
    assert not path.exists()
    assert not path.parent.exists() or not list(path.parent.iterdir())


def test_write_shard_round_trip_and_same_bytes_under_any_name(tmp_path):
    shard = tiny_shard()
    write_shard(tmp_path / "a" / "shard_000.pt", shard)
    write_shard(tmp_path / "b" / "shard_007.pt", shard)
    assert (tmp_path / "a" / "shard_000.pt").read_bytes() == (tmp_path / "b" / "shard_007.pt").read_bytes()
    back = read_shard(tmp_path / "a" / "shard_000.pt")
    for key in shard:
        assert torch.equal(back[key], shard[key])


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_shard(tmp_path / "shard_000.pt", tiny_shard())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shard_000.pt").stat().st_mode) == 0o644


def test_atomic_write_leaves_no_temp_file_on_failure(tmp_path):
    target = tmp_path / "out" / "shard_000.pt"

    def half_then_crash(tmp):
        Path(tmp).write_bytes(b"half a shard")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_crash)
    assert list(target.parent.iterdir()) == []


def test_atomic_write_keeps_the_old_file_when_a_rewrite_fails(tmp_path):
    target = tmp_path / "meta.json"
    atomic_write(target, lambda tmp: Path(tmp).write_text("old"))

    def crash(tmp):
        Path(tmp).write_text("new, but incomplete")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_dataset_digest_is_stable_and_changes_with_one_byte(tmp_path):
    root = good_root(tmp_path)
    digest = dataset_digest(root)
    assert len(digest) == 16
    assert dataset_digest(root) == digest

    shard = root / "train" / "shard_001.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    changed = dataset_digest(root)
    assert changed != digest

    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert dataset_digest(root) == digest


def test_dataset_digest_covers_the_label_map(tmp_path):
    root = good_root(tmp_path)
    digest = dataset_digest(root)
    write_label_map(root, ["a", "b", "d"])
    assert dataset_digest(root) != digest
