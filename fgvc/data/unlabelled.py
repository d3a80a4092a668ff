"""The unlabelled test set of a download (Kaggle's: numbered photos and `sample.csv` with a
column `Id`) kept in a dataset root beside its labelled splits.

`fgvc prepare --unlabelled-test FOLDER` decodes the photos `sample.csv` lists exactly as the
training images (same size and resize policy) into ``<root>/unlabelled-test/shard_NNN.pt``
(one tensor each: ``images`` uint8 [N, 3, H, W], shards read in numeric order); meta.json's
``unlabelled_test`` records the ``Id``s of the stored photos in shard order (``ids``), every
``Id`` of sample.csv in its order (``listed_ids``), the source and the files that could not
be read (``skipped``). It is not a split of the root (it has no labels, so nothing trains,
selects or reports on it): `fgvc predict --source <root>` predicts it and writes a
submission keyed by ``Id``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fgvc.data.shards import ShardError, atomic_write, read_meta, save_tensors, shard_files, shard_name
from fgvc.data.sources import KAGGLE_LIST, list_photos
from fgvc.devices import cpu_count
from fgvc.errors import ConfigError
from fgvc.safeload import load_tensors

log = logging.getLogger("fgvc")

FOLDER = "unlabelled-test"


def ingest_unlabelled(folder: str | Path, root: str | Path, height: int, width: int, resize: str,
                      shard_size: int = 500, progress: bool = True, workers: int | None = None) -> dict:
    """Decode the photos ``folder/sample.csv`` lists into ``root/unlabelled-test``; returns
    what meta.json records (``source``, ``keyed_by``, ``count``, ``ids``, ``listed_ids``,
    ``skipped``)."""
    from fgvc.data.decode import load_image  # Pillow only when a root is ingested

    folder, root = Path(folder), Path(root)
    if not (folder / KAGGLE_LIST).is_file():
        raise ConfigError(f"--unlabelled-test {folder}: needs {KAGGLE_LIST} (column Id) listing its photos, as "
                          f"Kaggle's test folder has")
    photos = list_photos(folder)

    def decode(photo):
        if not photo.path.is_file():
            return "missing or not a regular file"
        try:
            return load_image(photo.path, height, width, resize)
        except Exception as e:  # listed, never fatal
            return f"{type(e).__name__}: {e}"

    ids, images, skipped = [], [], []
    bar = tqdm(total=len(photos), desc="unlabelled test", unit="img", disable=None if progress else True)
    with ThreadPoolExecutor(max_workers=max(1, workers or cpu_count()), thread_name_prefix="fgvc-decode") as pool:
        for photo, pixels in zip(photos, pool.map(decode, photos), strict=True):
            bar.update(1)
            if isinstance(pixels, str):
                skipped.append({"id": photo.key, "path": str(photo.path), "error": pixels})
            else:
                ids.append(photo.key)
                images.append(pixels)
    bar.close()
    if not images:
        raise ConfigError(f"--unlabelled-test {folder}: none of the {len(photos)} listed photo(s) could be read")
    out = root / FOLDER
    for old in shard_files(out):
        old.unlink()
    for k, start in enumerate(range(0, len(images), shard_size)):
        part = {"images": torch.stack(images[start:start + shard_size])}
        atomic_write(out / shard_name(k), functools.partial(save_tensors, part))
    if skipped:
        log.warning("unlabelled test: %d of %d listed photo(s) unreadable, listed in meta.json: %s", len(skipped),
                    len(photos), ", ".join(f"{s['id']} ({s['error']})" for s in skipped[:5]))
    log.info("unlabelled test: %d photo(s) of %s in %s, keyed by Id", len(ids), folder, out)
    return {"source": str(folder.resolve()), "keyed_by": "Id", "count": len(ids), "ids": ids,
            "listed_ids": [photo.key for photo in photos], "skipped": skipped}


def listed_ids(record: dict) -> list[str]:
    """Every Id of sample.csv in its order; a root prepared before that was recorded gives the
    stored photos' Ids, then the unreadable ones."""
    return record.get("listed_ids") or [*record["ids"], *(bad["id"] for bad in record.get("skipped", []))]


def has_unlabelled(root: str | Path) -> bool:
    root = Path(root)
    return (root / "meta.json").is_file() and "unlabelled_test" in read_meta(root)


def unlabelled_batches(root: str | Path) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(Ids, images uint8 [n, 3, H, W]) per shard of a root's unlabelled test set."""
    root = Path(root)
    record = read_meta(root)["unlabelled_test"]
    ids = record["ids"]
    paths = shard_files(root / FOLDER)
    start = 0
    for path in paths:
        images = load_tensors(path, "unlabelled test shard", error=ShardError)["images"]
        yield ids[start:start + len(images)], images
        start += len(images)
    if start != len(ids):
        raise ShardError(f"{root / FOLDER}: holds {start} photo(s), meta.json lists {len(ids)} Ids; prepare the root "
                         f"again")
