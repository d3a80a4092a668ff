"""The shard format: read, validate and write `shard_XXX.pt` files.

A dataset root holds `train/` and `val/` (optionally `test/`), each with `shard_XXX.pt` files,
plus `index_to_label.json` (class index -> designer name) and `meta.json` (provenance).

Each shard is a dict saved with `torch.save`:
  images   uint8 [N, 3, H, W]
  labels   int64 [N], in [0, C)
  one_hot  [N, C], consistent with labels
  masks    optional uint8 [N, H, W], values 0/1, person = 1
  ...      optional per-image keys (e.g. `venues`, `bg_removed`): any tensor with N first

Shards are always read with `weights_only=True` (a `.pt` file is a pickle: data must never
execute code) and memory-mapped, so memory does not grow with the dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fgvc.data.config import SPLITS
from fgvc.errors import FgvcError
from fgvc.safeload import load_tensors

log = logging.getLogger("fgvc")

REQUIRED_KEYS = ("images", "labels", "one_hot")
SHARD_PATTERN = re.compile(r"^shard_(\d+)\.pt$")


class ShardError(FgvcError, ValueError):
    """A dataset root, split or shard breaks a rule of the format. The message names the file."""


def shard_name(index: int) -> str:
    return f"shard_{index:03d}.pt"


def shard_files(folder: str | Path) -> list[Path]:
    """The `shard_NNN.pt` files of a folder in numeric order (`shard_999` before `shard_1000`,
    which text order puts first); none when the folder does not exist."""
    folder = Path(folder)
    numbered: list[tuple[int, str, Path]] = []
    for path in folder.iterdir() if folder.is_dir() else []:
        match = SHARD_PATTERN.match(path.name)
        if match and path.is_file():
            numbered.append((int(match.group(1)), path.name, path))
    return [path for _, _, path in sorted(numbered)]


def shards_of(root: str | Path, split: str) -> list[Path]:
    """The shard files of one split, in numeric order. Refuses a missing or empty split."""
    split_dir = Path(root) / split
    if not split_dir.exists():
        raise ShardError(f"{split_dir}: split directory does not exist")
    if not split_dir.is_dir():
        raise ShardError(f"{split_dir}: not a directory")
    files = shard_files(split_dir)
    strays = sorted(p.name for p in split_dir.iterdir() if p.is_file() and p.suffix == ".pt"
                    and not SHARD_PATTERN.match(p.name))
    if strays:
        log.warning("%s: ignored %d .pt file(s) not named shard_NNN.pt: %s", split_dir, len(strays),
                    ", ".join(strays[:5]))
    if not files:
        extra = f" (found {', '.join(strays[:5])}: shards must be named shard_NNN.pt)" if strays else ""
        raise ShardError(f"{split_dir}: split has no shard_NNN.pt files{extra}")
    return files


def splits_of(root: str | Path) -> list[str]:
    """The splits present under a root (directories named train/val/test)."""
    return [s for s in SPLITS if (Path(root) / s).is_dir()]


def load_shard(path: str | Path, mmap: bool = True) -> dict:
    """Load one shard safely (weights_only, memory-mapped). Does not validate contents."""
    path = Path(path)
    if not path.exists():
        raise ShardError(f"{path}: file does not exist")
    if not path.is_file():
        raise ShardError(f"{path}: not a regular file")
    obj = load_tensors(path, what="shard", mmap=mmap, error=ShardError)
    if not isinstance(obj, dict):
        raise ShardError(f"{path}: shard must be a dict, found {type(obj).__name__}")
    return obj


@dataclass
class ShardInfo:
    path: Path
    count: int
    image_size: tuple[int, int]
    num_classes: int
    keys: tuple[str, ...]


def validate_shard(shard: dict, path: str | Path, num_classes: int | None = None) -> ShardInfo:
    """Check every rule of the format; raise ShardError naming `path` and the rule broken."""
    path = Path(path)
    for key in REQUIRED_KEYS:
        if key not in shard:
            raise ShardError(f"{path}: missing key '{key}' (keys present: {sorted(shard)})")
        if not isinstance(shard[key], torch.Tensor):
            raise ShardError(f"{path}: '{key}' must be a tensor, found {type(shard[key]).__name__}")
    images, labels, one_hot = shard["images"], shard["labels"], shard["one_hot"]
    if images.dtype != torch.uint8:
        raise ShardError(f"{path}: 'images' must have dtype uint8, found {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ShardError(f"{path}: 'images' must have shape [N, 3, H, W], found {list(images.shape)}")
    if labels.dtype != torch.int64:
        raise ShardError(f"{path}: 'labels' must have dtype int64, found {labels.dtype}")
    if labels.dim() != 1:
        raise ShardError(f"{path}: 'labels' must have shape [N], found {list(labels.shape)}")
    if one_hot.dim() != 2:
        raise ShardError(f"{path}: 'one_hot' must have shape [N, C], found {list(one_hot.shape)}")
    n = images.shape[0]
    for key, value in shard.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] != n:
            raise ShardError(
                f"{path}: N differs between keys: 'images' has {n} items, '{key}' has {value.shape[0]}"
            )
    c = one_hot.shape[1]
    if num_classes is not None and c != num_classes:
        raise ShardError(f"{path}: 'one_hot' has {c} classes, expected {num_classes}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= c):
        raise ShardError(
            f"{path}: labels outside [0, {c}): min {int(labels.min())}, max {int(labels.max())}"
        )
    if n:
        expected = torch.zeros(n, c, dtype=torch.bool)
        expected[torch.arange(n), labels] = True
        wrong_rows = ((one_hot != 0) != expected).any(dim=1) | (one_hot[expected] != 1)
        if bool(wrong_rows.any()):
            bad = int(wrong_rows.nonzero()[0])
            raise ShardError(
                f"{path}: 'one_hot' is inconsistent with 'labels' (first at row {bad}: label "
                f"{int(labels[bad])}, one_hot {one_hot[bad].tolist()})"
            )
    if "masks" in shard:
        masks = shard["masks"]
        if not isinstance(masks, torch.Tensor) or masks.dtype != torch.uint8:
            raise ShardError(f"{path}: 'masks' must be a uint8 tensor")
        if masks.dim() != 3 or tuple(masks.shape[1:]) != tuple(images.shape[2:]):
            raise ShardError(
                f"{path}: 'masks' must have shape [N, H, W] = {[n, *images.shape[2:]]}, "
                f"found {list(masks.shape)}"
            )
        if n and int(masks.max()) > 1:
            raise ShardError(f"{path}: 'masks' must hold only 0 and 1")
    _check_per_image(shard, path, n)
    return ShardInfo(path, n, (int(images.shape[2]), int(images.shape[3])), c, tuple(shard))


# Optional per-image keys: (allowed dtypes, rule in words).
PER_IMAGE_KEYS = {
    "venues": ((torch.int64, torch.int32, torch.int16, torch.uint8), "an integer tensor [N] of venue ids >= 0"),
    "bg_removed": ((torch.bool, torch.uint8), "a bool tensor [N]"),
    # the show (or other group) of each image: an index into meta.json's split.group_names
    "groups": ((torch.int64, torch.int32), "an integer tensor [N] of group ids >= 0"),
}


def _check_per_image(shard: dict, path: Path, n: int) -> None:
    for key, (dtypes, rule) in PER_IMAGE_KEYS.items():
        if key not in shard:
            continue
        value = shard[key]
        if not isinstance(value, torch.Tensor) or value.dtype not in dtypes or list(value.shape) != [n]:
            found = (f"{value.dtype} {list(value.shape)}" if isinstance(value, torch.Tensor)
                     else type(value).__name__)
            raise ShardError(f"{path}: '{key}' must be {rule} (N = {n}), found {found}")
        if key in ("venues", "groups") and n and int(value.min()) < 0:
            raise ShardError(f"{path}: '{key}' must be {rule}, found a negative id {int(value.min())}")
        if key == "bg_removed" and n and value.dtype == torch.uint8 and int(value.max()) > 1:
            raise ShardError(f"{path}: 'bg_removed' must be {rule}, found values above 1")


def read_shard(path: str | Path, num_classes: int | None = None, mmap: bool = True) -> dict:
    """Load and validate one shard."""
    shard = load_shard(path, mmap=mmap)
    validate_shard(shard, path, num_classes)
    return shard


def make_shard(images: torch.Tensor, labels: torch.Tensor, num_classes: int, **extra) -> dict:
    """Assemble a shard dict with `one_hot` derived from labels (uint8 to keep shards small).

    Tensors are copied into storage of their own: `torch.save` writes a view's whole
    underlying storage, so a slice of a bigger tensor would otherwise carry all of it.
    """
    compact = lambda t: t.contiguous().clone()  # noqa: E731
    images = compact(images)
    labels = compact(labels.to(torch.int64))
    one_hot = torch.zeros(len(labels), num_classes, dtype=torch.uint8)
    one_hot[torch.arange(len(labels)), labels] = 1
    shard = {"images": images, "labels": labels, "one_hot": one_hot}
    shard.update({k: compact(v) if isinstance(v, torch.Tensor) else v for k, v in extra.items()})
    return shard


def atomic_write(path: str | Path, write) -> None:
    """Write through `write(tmp_path)` to a temporary name in the same directory, flush it to
    disk, then rename, so a crash never leaves a half-written file under the final name.

    `write` creates the temporary file itself, so it gets the usual permissions (umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def save_tensors(obj, path: str) -> None:
    # Saving through a file object (not a name) keeps the bytes independent of the file name:
    # torch.save names the records inside the archive after a named file.
    with open(path, "wb") as f:
        torch.save(obj, f)


def write_shard(path: str | Path, shard: dict, num_classes: int | None = None) -> None:
    """Validate and write a shard atomically. Same contents -> byte-identical file."""
    validate_shard(shard, path, num_classes)
    atomic_write(path, lambda tmp: save_tensors(shard, tmp))


def write_json(path: str | Path, obj) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_json(path: str | Path, what: str):
    """A JSON file, with one-line errors naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: {what} is not valid JSON ({e})") from None


def read_label_map(root: str | Path) -> dict[int, str]:
    """`index_to_label.json` as {index: designer name}; absent file -> {}.

    The file must be a JSON object mapping class indices ("0", "1", ...) to names."""
    path = Path(root) / "index_to_label.json"
    if not path.exists():
        return {}
    raw = read_json(path, "the label map")
    if not isinstance(raw, dict):
        raise ShardError(f"{path}: must be a JSON object mapping class indices to designer names "
                         f'({{"0": "name", ...}}), found a JSON {type(raw).__name__}')
    out = {}
    for key, name in raw.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise ShardError(f"{path}: key {key!r} is not a class index (keys must be integers 0..C-1)") from None
        if not isinstance(name, str):
            raise ShardError(f"{path}: the name of class {index} must be a string, found {name!r}")
        out[index] = name
    return out


def write_label_map(root: str | Path, names: dict[int, str] | list[str]) -> None:
    if isinstance(names, list):
        names = dict(enumerate(names))
    write_json(Path(root) / "index_to_label.json", {str(k): v for k, v in sorted(names.items())})


def read_meta(root: str | Path) -> dict:
    path = Path(root) / "meta.json"
    if not path.exists():
        return {}
    meta = read_json(path, "the dataset's meta.json")
    if not isinstance(meta, dict):
        raise ShardError(f"{path}: must be a JSON object, found a JSON {type(meta).__name__}")
    return meta


@dataclass
class RootInfo:
    """What validation learned about a dataset root."""

    root: Path
    num_classes: int
    image_size: tuple[int, int]
    counts: dict[str, int] = field(default_factory=dict)
    class_counts: dict[str, list[int]] = field(default_factory=dict)
    shards: dict[str, list[Path]] = field(default_factory=dict)
    has_masks: bool = False
    label_names: dict[int, str] = field(default_factory=dict)


def validate_root(root: str | Path, splits: tuple[str, ...] = ("train", "val")) -> RootInfo:
    """Validate every shard of the given splits (plus any `test/` present) before work starts.

    Refuses a missing root, a missing or empty split, any bad shard, image sizes differing
    between shards, and splits disagreeing on the class count.
    """
    root = Path(root)
    if not root.exists():
        raise ShardError(f"{root}: dataset root does not exist")
    if not root.is_dir():
        raise ShardError(f"{root}: dataset root is not a directory")
    wanted = list(splits) + [s for s in splits_of(root) if s not in splits]
    info: RootInfo | None = None
    first_shard: Path | None = None
    for split in wanted:
        paths = shards_of(root, split)
        total = 0
        class_counts = None
        masks_everywhere = True
        for path in paths:
            shard = load_shard(path)
            s = validate_shard(shard, path)
            if info is None:
                info = RootInfo(root, s.num_classes, s.image_size)
                first_shard = path
            if s.image_size != info.image_size:
                raise ShardError(
                    f"{path}: image size {s.image_size[0]}x{s.image_size[1]} differs from "
                    f"{info.image_size[0]}x{info.image_size[1]} in {first_shard}"
                )
            if s.num_classes != info.num_classes:
                raise ShardError(
                    f"{path}: {s.num_classes} classes, but {first_shard} has {info.num_classes} "
                    f"(splits must agree on the class count)"
                )
            counts = torch.bincount(shard["labels"], minlength=s.num_classes)
            class_counts = counts if class_counts is None else class_counts + counts
            total += s.count
            masks_everywhere &= "masks" in shard
        if total == 0:
            raise ShardError(f"{root / split}: split is empty (its shards hold no images)")
        assert info is not None and class_counts is not None  # set by the split's first shard
        info.counts[split] = total
        info.class_counts[split] = class_counts.tolist()
        info.shards[split] = paths
        info.has_masks = masks_everywhere if split == wanted[0] else info.has_masks and masks_everywhere
    if info is None:
        raise ShardError(f"{root}: no split to validate")
    info.label_names = read_label_map(root)
    if info.label_names and set(info.label_names) != set(range(info.num_classes)):
        missing = sorted(set(range(info.num_classes)) - set(info.label_names))
        extra = sorted(set(info.label_names) - set(range(info.num_classes)))
        raise ShardError(
            f"{root / 'index_to_label.json'}: must name every class 0..{info.num_classes - 1} of the shards "
            f"exactly once" + (f"; missing {missing[:10]}" if missing else "")
            + (f"; indices outside the range {extra[:10]}" if extra else ""))
    return info


def dataset_digest(root: str | Path) -> str:
    """A short content digest of a root: its shard bytes, label map and split layout.

    Hashes file contents in 1 MiB blocks, so it is exact and memory-flat; 16 hex chars.
    """
    root = Path(root)
    h = hashlib.sha256()
    for split in splits_of(root):
        for path in shards_of(root, split):
            h.update(f"{split}/{path.name}".encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    labels = root / "index_to_label.json"
    if labels.exists():
        h.update(labels.read_bytes())
    return h.hexdigest()[:16]


def pixels_digest(root: str | Path) -> str:
    """A digest of what a training sees: each split's images and labels, and the label map;
    not the other keys or the metadata. Two roots with the same pixels (the masked roots of a
    dose-response study, whose backdrops differ only where the mask removed them) share it."""
    root = Path(root)
    h = hashlib.sha256()
    for split in splits_of(root):
        h.update(split.encode())
        for path in shards_of(root, split):
            shard = load_shard(path)
            for key in ("images", "labels"):
                tensor = shard[key].contiguous()
                h.update(f"{key}{tuple(tensor.shape)}{tensor.dtype}".encode())
                h.update(tensor.numpy().tobytes())
    labels = root / "index_to_label.json"
    if labels.exists():
        h.update(labels.read_bytes())
    return h.hexdigest()[:16]
