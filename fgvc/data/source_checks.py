"""What an ingest refuses to open, and which designer names are one designer.

- **Only regular files are opened.** A FIFO would block `open` forever, a device
  (``/dev/zero``) never ends, a symbolic link loop cannot be opened, and in a folder tree a link
  that leads out of the source reads files the source does not hold. Each is skipped before
  anything opens it and listed in ``meta.json``'s ``skipped`` with its reason (:func:`screen`).
- **A pixel budget below Pillow's.** Pillow refuses an image only above twice
  ``Image.MAX_IMAGE_PIXELS`` (about 179 million pixels); a 12000x12000 image below that decodes
  to gigabytes. The header's size is checked before decoding (:func:`check_image_size`): at most
  ``FGVC_MAX_IMAGE_PIXELS`` (default 40 million, a 7300x5500 photo, far above any runway crop).
- **Designer names compared after Unicode NFC normalisation.** "Café" typed on one machine
  and "Café" copied from macOS (decomposed: "e" + combining accent) print identically; names
  equal after NFC are merged into one class under the NFC spelling, with a warning naming both
  (:func:`merge_designer_names`). Names that differ only by case ("Zara", "ZARA") stay two
  classes, with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import unicodedata
from pathlib import Path

from fgvc.data.sources import SourceImage, SourceListing
from fgvc.errors import ConfigError

log = logging.getLogger("fgvc.data.ingest")

PIXELS_ENV = "FGVC_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 40_000_000
MAX_NAMES_IN_LOG = 20

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


class ImageTooLarge(ValueError):
    """An image whose header announces more pixels than the budget (it is not decoded)."""


def max_image_pixels() -> int:
    text = os.environ.get(PIXELS_ENV, "").strip()
    try:
        value = int(float(text)) if text else DEFAULT_MAX_PIXELS
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{PIXELS_ENV}={text!r}: expected a number of pixels > 0")
    return value


def check_image_size(size: tuple[int, int]) -> None:
    """Refuse an image of `size` (width, height, from its header) above the pixel budget."""
    width, height = size
    budget = max_image_pixels()
    if width * height > budget:
        raise ImageTooLarge(f"{width}x{height} = {width * height} pixels, more than {PIXELS_ENV}={budget}; "
                            f"not decoded")


def why_not_regular(path: Path, inside: Path | None = None) -> str | None:
    """Why `path` must not be opened (None for a regular file, or one that does not exist: the
    decoder reports that). With `inside`, a link that leads out of that folder is refused too."""
    try:
        link = path.is_symlink()
        info = path.stat()
    except FileNotFoundError:
        return "a broken symbolic link" if path.is_symlink() else None
    except OSError as error:
        return "a symbolic link loop" if error.errno == 40 else f"cannot be examined ({error.strerror})"
    for test, kind in _KINDS:
        if test(info.st_mode):
            return f"not a regular file: {kind}" + (f" (through a link to {os.path.realpath(path)})" if link else "")
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if inside is not None:  # the file, or a designer folder above it, may be the link
        target = Path(os.path.realpath(path))
        if not target.is_relative_to(Path(os.path.realpath(inside))):
            return f"a link out of the source (to {target})"
    return None


def screen(listing: SourceListing, source: Path) -> tuple[SourceListing, list[dict[str, str]]]:
    """The listing without the files that must not be opened, and those files as
    ``[{"path": name, "error": reason}]`` (meta.json's ``skipped`` format). In a folder tree
    the designer folders are looked through again: the listing drops a FIFO or a device
    without a word."""
    if listing.kind == "image-folder":
        source = listing.folder or source  # the designer folders' parent, after a nested download is unwrapped
    inside = source if listing.kind == "image-folder" else None
    refused: list[tuple[SourceImage, str]] = []
    keep: list[SourceImage] = []
    for image in listing.images:
        reason = why_not_regular(image.path, inside)
        if reason:
            refused.append((image, reason))
        else:
            keep.append(image)
    skipped = [{"path": image.name, "error": reason} for image, reason in refused]
    if listing.kind == "image-folder":
        listed = {image.path for image in listing.images}
        for designer in listing.designers:
            for entry in sorted((source / designer).iterdir()):
                if entry.name.startswith(".") or entry in listed:
                    continue
                reason = why_not_regular(entry, inside)
                if reason and not reason.endswith("a folder"):
                    skipped.append({"path": f"{designer}/{entry.name}", "error": reason})
    if skipped:
        shown = ", ".join(f"{s['path']} ({s['error']})" for s in skipped[:MAX_NAMES_IN_LOG])
        log.warning("%s: skipped %d file(s) that are not regular files in the source (listed in meta.json): %s",
                    source, len(skipped), shown)
    return dataclasses.replace(listing, images=keep), skipped


def merge_designer_names(listing: SourceListing) -> SourceListing:
    """The listing with designer names that are equal after NFC merged into their NFC
    spelling (warned); names equal after case folding only are warned about."""
    spellings: dict[str, set[str]] = {}
    for name in [*listing.designers, *(image.label for image in listing.images)]:
        spellings.setdefault(unicodedata.normalize("NFC", name), set()).add(name)
    merged = {nfc: sorted(names) for nfc, names in spellings.items() if len(names) > 1}
    for nfc, names in merged.items():
        log.warning("designer names %s are the same name in different Unicode forms: merged into one class %r",
                    " and ".join(ascii(n) for n in names), nfc)
    by_case: dict[str, list[str]] = {}
    for nfc in spellings:
        by_case.setdefault(nfc.casefold(), []).append(nfc)
    for names in by_case.values():
        if len(names) > 1:
            log.warning("designer names %s differ only by case: kept as %d classes (rename the folders or labels "
                        "if they are one designer)", ", ".join(repr(n) for n in sorted(names)), len(names))
    if not merged:
        return listing
    images = [dataclasses.replace(image, label=unicodedata.normalize("NFC", image.label)) for image in listing.images]
    designers = sorted({unicodedata.normalize("NFC", name) for name in listing.designers})
    notes = {**listing.notes, "merged_designer_names": {nfc: names for nfc, names in merged.items()}}
    return dataclasses.replace(listing, images=images, designers=designers, notes=notes)
