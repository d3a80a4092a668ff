"""Listing a source of real runway photos: an image-folder tree `<source>/<designer>/*.jpg`
(the iDesigner training set's layout) or a CSV file with the header `path,label`. Designer
names are kept exactly as given; nothing is decoded here (fgvc.data.ingest does that)."""

from __future__ import annotations

import csv
import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from fgvc.errors import ConfigError

log = logging.getLogger("fgvc.data.ingest")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
MAX_NAMES_IN_LOG = 20


@dataclass(frozen=True)
class SourceImage:
    path: Path  # where to read it
    name: str  # how it is reported and hashed: relative to the source, or as written in the CSV
    label: str  # designer name, exactly as given
    group: str | None = None  # a CSV's `group` column (the show), when given


@dataclass
class SourceListing:
    kind: str  # "image-folder" or "csv"
    images: list[SourceImage]
    designers: list[str]  # every designer named by the source, sorted
    notes: dict  # what the listing ignored, for meta.json
    folder: Path | None = None  # an image folder's designer folders are in here (after unwrapping)


def visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def unwrap_single_folder(source: Path) -> Path:
    """The iDesigner download unpacks as `designer_image_train_v2_cropped/
    designer_image_train_v2_cropped/<designer>/*.png`: a folder holding one folder and no
    files, whose own entries are folders, is followed one level down (and the log says so)."""
    entries = visible(source)
    if len(entries) == 1 and entries[0].is_dir():
        inner = visible(entries[0])
        if inner and all(p.is_dir() for p in inner):
            log.info("%s: holds a single folder %r and nothing else; reading the designer folders inside it",
                     source, entries[0].name)
            return entries[0]
    return source


def list_image_folder(source: Path) -> SourceListing:
    """`<source>/<designer>/*.{png,jpg,jpeg,webp}`; hidden files and folders are ignored. A
    source holding a single folder of designer folders is read one level down."""
    given, source = source, unwrap_single_folder(source)
    folders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = [p.name for p in source.iterdir() if p.is_file() and not p.name.startswith(".")]
    if not folders:
        raise ConfigError(
            f"{source}: no designer folders found; an image-folder source must look like "
            f"<source>/<designer>/*.jpg (extensions: {', '.join(IMAGE_EXTENSIONS)})"
        )
    if loose:
        log.warning("%s: ignored %d file(s) outside designer folders: %s",
                    source, len(loose), ", ".join(sorted(loose)[:MAX_NAMES_IN_LOG]))
    images, not_images = [], 0
    for folder in folders:
        for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(SourceImage(path, f"{folder.name}/{path.name}", folder.name))
            else:
                not_images += 1
    if not images:
        raise ConfigError(f"{source}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in any designer folder")
    notes = {"files_outside_designer_folders": len(loose), "non_image_files": not_images,
             "followed_single_folder": source.name if source != given else None}
    return SourceListing("image-folder", images, [f.name for f in folders], notes, source)


def list_csv(source: Path) -> SourceListing:
    """A CSV with columns `path,label` and optionally `group` (the show; others ignored). Rows
    naming the same file twice with the
    same label count once; with different labels the CSV is refused."""
    with open(source, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = {name.strip().lower(): name for name in reader.fieldnames or [] if name}
        if "path" not in columns or "label" not in columns:
            raise ConfigError(
                f"{source}: a CSV source needs the header 'path,label', found {reader.fieldnames}"
            )
        group_column = columns.get("group")
        images: list[SourceImage] = []
        seen: dict[str, str] = {}
        duplicates = 0
        for row in reader:
            where = f"{source}, line {reader.line_num}"
            written, label = row.get(columns["path"]), row.get(columns["label"])
            if not written or not written.strip() or not label:
                raise ConfigError(f"{where}: empty path or label")
            path = Path(written.strip())
            path = path if path.is_absolute() else source.parent / path
            key = os.path.normpath(path)
            if key in seen:
                if seen[key] != label:
                    raise ConfigError(
                        f"{where}: {written!r} is labelled both {seen[key]!r} and {label!r}"
                    )
                duplicates += 1
                continue
            seen[key] = label
            group = (row.get(group_column) or "").strip() or None if group_column else None
            images.append(SourceImage(path, written.strip(), label, group))
    if not images:
        raise ConfigError(f"{source}: the CSV lists no images")
    if duplicates:
        log.warning("%s: ignored %d duplicate row(s)", source, duplicates)
    designers = sorted({image.label for image in images})
    return SourceListing("csv", images, designers, {"duplicate_rows": duplicates})


def list_source(source: str | Path) -> SourceListing:
    source = Path(source)
    if source.is_dir() and (source / KAGGLE_LIST).is_file():
        raise ConfigError(f"{source}: an unlabelled test folder ({KAGGLE_LIST} lists its images by Id); a dataset "
                          f"root's splits need labels. Keep it in the root with `fgvc prepare --source <training "
                          f"folder> --unlabelled-test {shlex.quote(str(source))}`, or predict it directly with "
                          f"`fgvc predict --source {shlex.quote(str(source))} --format kaggle`")
    if source.is_dir():
        return list_image_folder(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        return list_csv(source)
    if not source.exists():
        raise ConfigError(f"{source}: source does not exist")
    raise ConfigError(
        f"{source}: unknown source kind; expected an image folder <source>/<designer>/*.jpg "
        f"or a .csv file with the header 'path,label'"
    )


# --- photos to predict (no labels) ------------------------------------------------------------

KAGGLE_LIST = "sample.csv"


@dataclass(frozen=True)
class Photo:
    path: Path
    key: str  # how the output names it: the Kaggle Id, the CSV's path, or the path under the folder


def _photos_by_id(listing: Path) -> list[Photo]:
    """A Kaggle-style list (`sample.csv`, column `Id`): images `<folder>/<Id>.<ext>`."""
    with open(listing, newline="", encoding="utf-8-sig") as f:
        ids = [row.get("Id") or row.get("id") for row in csv.DictReader(f)]
    named = [i.strip() for i in ids if i is not None]
    if not ids or len(named) != len(ids):
        raise ConfigError(f"{listing}: needs a column 'Id' naming the images (as Kaggle's sample.csv)")
    folder = listing.parent
    found = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
    return [Photo(found.get(i, folder / f"{i}.png"), i) for i in named]


def list_photos(source: str | Path) -> list[Photo]:
    """Photos to predict: a folder (every image under it, sorted; a folder with a Kaggle
    `sample.csv` means the images it lists, keyed by `Id`), or a CSV with a `path` column
    (relative to the CSV) or an `Id` column. A listed file that is missing is kept, so it is
    reported as unreadable rather than dropped."""
    source = Path(source)
    if source.is_dir():
        if (source / KAGGLE_LIST).is_file():
            return _photos_by_id(source / KAGGLE_LIST)
        source = unwrap_single_folder(source)
        photos = [Photo(p, str(p.relative_to(source))) for p in sorted(source.rglob("*"))
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in
                                                                      p.relative_to(source).parts)]
        if not photos:
            raise ConfigError(f"{source}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        return photos
    if source.is_file() and source.suffix.lower() == ".csv":
        with open(source, newline="", encoding="utf-8-sig") as f:
            header = [h.strip().lower() for h in (csv.DictReader(f).fieldnames or [])]
        if "path" not in header:
            return _photos_by_id(source)
        with open(source, newline="", encoding="utf-8-sig") as f:
            rows = [{k.strip().lower(): v for k, v in row.items() if k} for row in csv.DictReader(f)]
        photos = []
        for row in rows:
            written = (row.get("path") or "").strip()
            if written:
                path = Path(written)
                photos.append(Photo(path if path.is_absolute() else source.parent / path, written))
        if not photos:
            raise ConfigError(f"{source}: the CSV lists no images")
        return photos
    if not source.exists():
        raise ConfigError(f"{source}: source does not exist")
    raise ConfigError(f"{source}: expected a folder of images or a .csv with a 'path' or 'Id' column")
