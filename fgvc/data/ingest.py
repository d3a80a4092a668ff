"""Ingest real runway photos (e.g. the iDesigner training set) into a shard dataset root.

A source is either an image-folder tree, `<source>/<designer>/*.{png,jpg,jpeg,webp}` (the
layout of the iDesigner training set), or a CSV file with the header `path,label` (paths
relative to the CSV's folder or absolute; `label` is the designer name). Designer names are
kept exactly as given (spaces, capitals, accents, CJK) and class indices follow their sorted
order (Python string order, so case-sensitive).

Every image is decoded once, converted to RGB and fitted to a fixed H x W:

  pad          keep the aspect ratio, letterbox with black, centred (default: runway crops are
               tall, and black bars match the background-removed convention of `mask`)
  stretch      scale each axis independently to H x W
  center-crop  scale to cover H x W, then keep the centre

Pixel conventions: transparency (RGBA, LA, P/L/RGB with a transparent colour) is composited
on black, like removed background; 16-bit images (I;16*, I) are scaled from 0..65535 to
0..255 (v * 255 / 65535, rounded), not clipped; CMYK and other modes use Pillow's conversion;
the EXIF orientation tag is applied.

Files that cannot be decoded (truncated, garbage, empty) are skipped and reported: one logged
warning with the count and names, and `skipped` / `skipped_count` in `meta.json`. A designer
left with no readable image (or with no image files at all) is dropped from the label map with
a warning and recorded under `dropped_classes`: every class of the root has data.

The split (fgvc.data.splits) is stratified per designer and computed over the readable images:
`--split-by show` keeps each runway show (the season code at the start of iDesigner file names,
or a CSV's `group` column) whole in one split, `random` shuffles images, `auto` (the default)
picks `show` when most files carry a code. Each image's group id is stored in the shards
(`groups`) and `meta.json` records the rule and the groups per split and per designer; a
designer with one show only has no val or test images, and is named in a warning and in
`split.single_group_designers`. Which
images go where, and their order in the shards, come from a seeded hash of each file's path
relative to the source: the same inputs and seed give byte-identical shards on any machine.

Memory stays flat: decoded images are appended to an anonymous staging file inside `root`
(deleted automatically), and each shard is assembled from it in its own buffer. Disk use peaks
at about twice the size of the written shards.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fgvc.data.config import RESIZE_POLICIES
from fgvc.data.decode import load_image
from fgvc.data.shards import (
    SHARD_PATTERN,
    ShardError,
    make_shard,
    shard_name,
    write_json,
    write_label_map,
    write_shard,
)
from fgvc.data.source_checks import merge_designer_names, screen
from fgvc.data.sources import MAX_NAMES_IN_LOG, SourceImage, SourceListing, list_source
from fgvc.data.splits import (  # noqa: F401  (seeded_rank, val_count: imported from here too)
    DEFAULT_GROUP_PATTERN,
    Split,
    check_split_arguments,
    make_split,
    seeded_rank,
    split_random,
    summary,
    val_count,
)
from fgvc.data.unlabelled import ingest_unlabelled
from fgvc.devices import cpu_count
from fgvc.errors import ConfigError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# The split (fgvc.data.splits: show-disjoint or random, stratified per designer)


def split_stratified(images: list[SourceImage], val_fraction: float, seed: int
                     ) -> dict[str, list[int]]:
    """Indices into `images` for train and val of a random split, each in a seeded order."""
    return split_random([i.label for i in images], [i.name for i in images], val_fraction, seed).members


# ---------------------------------------------------------------------------------------------
# Ingest


def check_arguments(source: Path, root: Path, height: int, width: int, resize: str,
                    val_fraction: float, shard_size: int = 500) -> None:
    """Refuse bad arguments before anything is read or written."""
    if resize not in RESIZE_POLICIES:
        raise ConfigError(f"unknown resize policy {resize!r}; choose one of {', '.join(RESIZE_POLICIES)}")
    if height < 1 or width < 1:
        raise ConfigError(f"image size must be positive, got {height}x{width}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_size < 1:
        raise ConfigError(f"shard_size must be at least 1, got {shard_size}")
    if root.exists() and not root.is_dir():
        raise ShardError(f"{root}: dataset root is not a directory")
    src, dst = source.resolve(), root.resolve()
    if source.is_dir() and (dst == src or src in dst.parents):
        raise ConfigError(
            f"{root}: the dataset root must not be inside the source folder {source} "
            f"(its files would be read back as images by the next ingest)"
        )
    if dst in src.parents:
        raise ConfigError(
            f"{source}: the source lies inside the dataset root {root}; choose a root outside "
            f"the source (rebuilding the root must never touch its images)"
        )


def _report_skipped(skipped: list[dict]) -> None:
    if not skipped:
        return
    names = [s["path"] for s in skipped]
    shown = ", ".join(names[:MAX_NAMES_IN_LOG])
    more = f" ... and {len(names) - MAX_NAMES_IN_LOG} more" if len(names) > MAX_NAMES_IN_LOG else ""
    log.warning("skipped %d unreadable image file(s) (listed in meta.json): %s%s",
                len(skipped), shown, more)


def _report_single_group(designers: list[str]) -> None:
    if not designers:
        return
    shown = ", ".join(designers[:MAX_NAMES_IN_LOG])
    more = f" ... and {len(designers) - MAX_NAMES_IN_LOG} more" if len(designers) > MAX_NAMES_IN_LOG else ""
    log.warning("%d designer(s) have one show only, so no val or test images (a show never spans two splits; "
                "listed in meta.json split.single_group_designers): %s%s", len(designers), shown, more)


def _remove_stale_shards(split_dir: Path, keep: int) -> None:
    """Shards from an earlier, larger ingest into the same root would mix with the new ones."""
    if not split_dir.is_dir():
        return
    for path in split_dir.iterdir():
        m = SHARD_PATTERN.match(path.name)
        if m and int(m.group(1)) >= keep:
            path.unlink()
    if keep == 0 and not any(split_dir.iterdir()):
        split_dir.rmdir()


def decode_all(images: list[SourceImage], height: int, width: int, resize: str, staging: int,
               workers: int | None = None, chunk: int = 256) -> Iterator[tuple[SourceImage, Exception | None]]:
    """Decode every image into row k of the staging file `staging` (a file descriptor; row k
    holds images[k], [3, H, W] uint8), ``workers`` threads at a time: Pillow releases the GIL
    while it decodes and resamples, and each thread writes its own rows (``os.pwrite``), so
    decoding uses every core. Yields, in order, each image with None or the exception that
    made it unreadable. At most ``chunk`` images are in flight."""
    row_bytes = 3 * height * width

    def decode(k: int) -> Exception | None:
        try:
            pixels = load_image(images[k].path, height, width, resize)
        except Exception as e:  # reported by the caller, with the file's name
            return e
        os.pwrite(staging, pixels.numpy().tobytes(), k * row_bytes)
        return None

    workers = workers or cpu_count()
    if workers == 1:
        yield from ((images[k], decode(k)) for k in range(len(images)))
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fgvc-decode") as pool:
        for start in range(0, len(images), chunk):
            part = range(start, min(start + chunk, len(images)))
            yield from zip((images[k] for k in part), pool.map(decode, part), strict=True)


@dataclass(frozen=True)
class IngestOptions:
    """How an ingest fits its images and deals them into splits and shards: everything
    meta.json records of it, so the same options and source give byte-identical roots."""

    height: int = 64
    width: int = 48
    resize: str = "pad"
    val_fraction: float = 0.2
    seed: int = 0
    shard_size: int = 500
    split_by: str = "auto"
    group_pattern: str = DEFAULT_GROUP_PATTERN
    test_fraction: float = 0.0

    def check(self, source: Path, root: Path) -> None:
        """Refuse bad options before anything is read or written."""
        check_arguments(source, root, self.height, self.width, self.resize, self.val_fraction, self.shard_size)
        check_split_arguments(self.split_by, self.group_pattern, self.val_fraction, self.test_fraction)


@dataclass(frozen=True)
class Staged:
    """A readable image of the listing and the staging-file row holding its pixels."""

    image: SourceImage
    row: int


@dataclass(frozen=True)
class ShardItem:
    """One image of a shard: its staging row, class index and group id."""

    row: int
    label: int
    group: int


@dataclass(frozen=True)
class ShardJob:
    """A shard file to write and its images, in order."""

    path: Path
    items: list[ShardItem]


@dataclass
class Layout:
    """The shards to write, and what meta.json says about them."""

    jobs: list[ShardJob]
    counts: dict[str, int]  # split -> images
    class_counts: dict[str, dict[str, int]]  # split -> designer -> images
    group_names: list[str]  # group id -> group key


def _write_shards(jobs: list[ShardJob], staging: int, height: int, width: int, num_classes: int,
                  workers: int) -> None:
    """Assemble each shard from its staging rows and write it, several shards at a time
    (reading rows and writing files release the GIL)."""
    row_bytes = 3 * height * width

    def write(job: ShardJob) -> None:
        images = torch.empty(len(job.items), 3, height, width, dtype=torch.uint8)  # [N, 3, H, W]
        for j, item in enumerate(job.items):
            if os.preadv(staging, [images[j].numpy().reshape(-1).data], item.row * row_bytes) != row_bytes:
                raise OSError(f"{job.path.parent.parent}: staging file ended early (disk full?)")
        labels = torch.tensor([item.label for item in job.items], dtype=torch.int64)
        groups = torch.tensor([item.group for item in job.items], dtype=torch.int64)
        write_shard(job.path, make_shard(images, labels, num_classes, groups=groups), num_classes=num_classes)

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="fgvc-shards") as pool:
        list(pool.map(write, jobs))


def ingest(source: str | Path, root: str | Path, options: IngestOptions | None = None, *, progress: bool = True,
           workers: int | None = None, unlabelled_test: str | Path | None = None, **settings) -> dict:
    """Write a dataset root (train/val(/test) shards, index_to_label.json, meta.json) from an
    image folder or a `path,label[,group]` CSV; returns the meta written. See the module
    docstring and fgvc.data.splits for the split. ``settings``: fields of
    :class:`IngestOptions` by name (``height=32, val_fraction=0.1``), over ``options``;
    ``unlabelled_test``: a Kaggle test folder kept beside the splits (fgvc.data.unlabelled)."""
    source, root = Path(source), Path(root)
    options = replace(options or IngestOptions(), **settings)
    options.check(source, root)
    listing, refused = screen(list_source(source), source)
    listing = merge_designer_names(listing)
    _start_root(root)
    workers = workers or cpu_count()
    with tempfile.TemporaryFile(dir=root, prefix=".ingest-staging-") as staging:
        staged, skipped = _decode_listing(listing, options, staging.fileno(), workers, progress)
        skipped = refused + skipped  # not opened: not regular files (logged by screen)
        kept, dropped = _kept_designers(listing, staged, source, skipped)
        split = _deal(staged, options)
        layout = _lay_out_shards(root, staged, split, kept, options.shard_size)
        _write_shards(layout.jobs, staging.fileno(), options.height, options.width, len(kept), workers)
    _warn_without_val(root, options, layout)
    write_label_map(root, kept)
    meta = _meta(source, listing, options, split, staged, layout, kept, skipped, dropped)
    if unlabelled_test is not None:
        meta["unlabelled_test"] = ingest_unlabelled(unlabelled_test, root, options.height, options.width,
                                                    options.resize, options.shard_size, progress, workers)
    write_json(root / "meta.json", meta)
    _report_ingest(source, root, meta, split, len(staged))
    return meta


def _start_root(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    # meta.json is written last and marks a finished root; an interrupted re-ingest must not
    # leave the previous one's in place.
    (root / "meta.json").unlink(missing_ok=True)


def _decode_listing(listing: SourceListing, options: IngestOptions, staging: int, workers: int, progress: bool
                    ) -> tuple[list[Staged], list[dict]]:
    """Decode every listed file once into the staging file (row k holds listing.images[k],
    [3, H, W] uint8): the readable images, and {path, error} for each unreadable one."""
    staged: list[Staged] = []
    skipped: list[dict] = []
    bar = tqdm(total=len(listing.images), desc="ingest", unit="img", disable=None if progress else True)
    decoded = decode_all(listing.images, options.height, options.width, options.resize, staging, workers)
    for k, (image, error) in enumerate(decoded):
        bar.update(1)
        if error is not None:  # a bad file must not stop the run: report it instead
            skipped.append({"path": image.name, "error": f"{type(error).__name__}: {error}"})
            continue
        staged.append(Staged(image, k))
    bar.close()
    _report_skipped(skipped)
    return staged, skipped


def _kept_designers(listing: SourceListing, staged: list[Staged], source: Path, skipped: list[dict]
                    ) -> tuple[list[str], list[dict]]:
    """The designers with a readable image (sorted: class index order), and a record of each
    one dropped; refuses a source with no readable image."""
    listed: dict[str, int] = {}
    for image in listing.images:
        listed[image.label] = listed.get(image.label, 0) + 1
    kept = sorted({s.image.label for s in staged})
    dropped_names = [name for name in listing.designers if name not in kept]
    dropped = [
        {"label": name, "files": listed.get(name, 0),
         "reason": "every image file was unreadable" if listed.get(name) else "no image files"}
        for name in dropped_names
    ]
    if dropped:
        log.warning("dropped %d designer(s) with no readable image: %s", len(dropped), ", ".join(dropped_names))
    if not kept:
        raise ConfigError(f"{source}: no readable images ({len(skipped)} file(s) skipped)")
    return kept, dropped


def _deal(staged: list[Staged], options: IngestOptions) -> Split:
    """The split of the readable images (fgvc.data.splits), indices into `staged`."""
    split = make_split([s.image.label for s in staged], [s.image.name for s in staged], options.split_by,
                       options.val_fraction, options.seed, options.test_fraction, options.group_pattern,
                       [s.image.group for s in staged])
    _report_single_group(split.single_group_designers)
    return split


def _lay_out_shards(root: Path, staged: list[Staged], split: Split, kept: list[str], shard_size: int) -> Layout:
    """Each split's members in shards of `shard_size`, in the split's order; removes the
    shards an earlier, larger ingest left in the root."""
    index_of = {name: i for i, name in enumerate(kept)}
    group_names = sorted(set(split.group_of))
    group_id = {g: k for k, g in enumerate(group_names)}
    if "test" not in split.members:
        _remove_stale_shards(root / "test", 0)
    layout = Layout([], {}, {}, group_names)
    for split_name, members in split.members.items():
        chunks = [members[start:start + shard_size] for start in range(0, len(members), shard_size)]
        layout.jobs += [ShardJob(root / split_name / shard_name(k),
                                 [ShardItem(staged[i].row, index_of[staged[i].image.label],
                                            group_id[split.group_of[i]]) for i in chunk])
                        for k, chunk in enumerate(chunks)]
        _remove_stale_shards(root / split_name, len(chunks))
        layout.counts[split_name] = len(members)
        per_class = {name: 0 for name in kept}
        for i in members:
            per_class[staged[i].image.label] += 1
        layout.class_counts[split_name] = per_class
    return layout


def _warn_without_val(root: Path, options: IngestOptions, layout: Layout) -> None:
    if layout.counts["val"] == 0:
        log.warning("%s: no validation images (val_fraction=%s, largest designer has %d image(s)); "
                    "the root has a train split only", root, options.val_fraction,
                    max(layout.class_counts["train"].values()))


def _meta(source: Path, listing: SourceListing, options: IngestOptions, split: Split, staged: list[Staged],
          layout: Layout, kept: list[str], skipped: list[dict], dropped: list[dict]) -> dict:
    """meta.json of an ingested root (its keys in this order)."""
    labels = [s.image.label for s in staged]
    return {
        "source": str(source.resolve()),
        "source_kind": listing.kind,
        "image_size": [options.height, options.width],
        "resize": options.resize,
        "transparency": "composited on black",
        "val_fraction": options.val_fraction,
        "test_fraction": options.test_fraction,
        "seed": options.seed,
        "split": {**summary(split, labels, options.group_pattern), "group_names": layout.group_names},
        "shard_size": options.shard_size,
        "num_classes": len(kept),
        "counts": layout.counts,
        "class_counts": layout.class_counts,
        "listed_count": len(listing.images),
        "skipped_count": len(skipped),
        "skipped": skipped,
        "dropped_classes": dropped,
        "ignored": listing.notes,
    }


def _report_ingest(source: Path, root: Path, meta: dict, split: Split, readable: int) -> None:
    log.info("ingested %s into %s: %d classes, %s, skipped %d", source, root, meta["num_classes"],
             ", ".join(f"{s} {n}" for s, n in meta["counts"].items()), meta["skipped_count"])
    log.info("split by %s: groups %s; %d file(s) carry a show code, %d do not (%s)", split.rule,
             meta["split"]["groups"], split.coded, readable - split.coded, meta["split"]["uncoded_rule"])
