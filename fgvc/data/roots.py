"""Dataset roots as a task finds them: the demo generated on first use, masked roots
recognised, and what `prepare`/`mask` may remove when told to overwrite a root."""

from __future__ import annotations

import json
import logging
import os
import shlex
from dataclasses import asdict, fields
from pathlib import Path

from fgvc.data.demo import DemoConfig, generate_demo
from fgvc.data.shards import SHARD_PATTERN, SPLITS, ShardError, read_meta
from fgvc.errors import MissingFileError

log = logging.getLogger("fgvc")

DEFAULT_DATA_ROOT = "data/demo"
# What `prepare` and `mask` write into a root; `--overwrite true` removes exactly these.
ROOT_FILES = ("meta.json", "index_to_label.json")
ROOT_DIRS = (".progress",)
# The demo a task generates when given no demo settings (fgvc prepare with its defaults).
DEFAULT_DEMO = DemoConfig()


def ensure_demo(root: str | Path, cfg: DemoConfig = DEFAULT_DEMO) -> Path:
    """A demo root generated with ``cfg``: generated when missing, refused when it holds demo
    data of another configuration (the numbers would silently describe other data)."""
    root = Path(root)
    if (root / "meta.json").exists():
        found = read_meta(root).get("generator")
        wanted = json.loads(json.dumps(asdict(cfg)))
        if found is not None and found != wanted:
            changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            raise ShardError(f"{root}: holds demo data generated with other settings ({', '.join(changed)}); "
                             f"pass another data_root, or delete it (`rm -r {shlex.quote(str(root))}`) and it is "
                             f"generated again with these settings on first use")
        return root
    log.info("generating the demo dataset in %s (first use)", root)
    generate_demo(root, cfg)
    return root


def demo_config_of(root: str | Path) -> DemoConfig | None:
    """The generator settings of a demo root (its meta.json's ``generator``), None for another root."""
    found = read_meta(root).get("generator") if (Path(root) / "meta.json").exists() else None
    if found is None:
        return None
    return DemoConfig(**{k: v for k, v in found.items() if k in {f.name for f in fields(DemoConfig)}})


def resolve_root(data_root: str | Path) -> Path:
    """The default demo root is generated on first use; any other missing root is an error."""
    root = Path(data_root)
    if (root / "meta.json").exists() or root.exists():
        return root
    if os.path.normpath(str(data_root)) == os.path.normpath(DEFAULT_DATA_ROOT):
        return ensure_demo(root)
    raise MissingFileError(f"{root}: dataset root does not exist (run `fgvc prepare --root {shlex.quote(str(root))}` "
                           f"or `fgvc mask` to create it)")


def is_masked_root(root: str | Path) -> bool:
    """A root written by `mask` says so in meta.json."""
    meta = read_meta(root)
    return bool(meta.get("source") == "mask" or (meta.get("masking") or {}).get("segmenter"))


def written_files(root: str | Path) -> list[Path]:
    """The files and folders `prepare` or `mask` wrote into ``root``: its shards, label map,
    meta and progress records. Nothing else in the root is ever removed by an overwrite."""
    root = Path(root)
    found = [root / name for name in ROOT_FILES if (root / name).exists()]
    found += [root / name for name in ROOT_DIRS if (root / name).is_dir()]
    for split in (*SPLITS, "unlabelled-test"):  # fgvc.data.unlabelled.FOLDER
        folder = root / split
        if folder.is_dir():
            found += sorted(p for p in folder.iterdir()
                            if p.is_file() and (SHARD_PATTERN.match(p.name) or
                                                (p.name.startswith(".shard_") and p.name.endswith(".tmp"))))
    return found


def remove_written(root: str | Path) -> int:
    """Remove what :func:`written_files` lists (empty split folders too); returns the count."""
    import shutil

    removed = 0
    for path in written_files(root):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed += 1
    for split in SPLITS:
        folder = Path(root) / split
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return removed


def recorded_split(root: str | Path) -> dict:
    """meta.json's `split` record, or that of the root a masked root was made from."""
    meta = read_meta(root)
    return meta.get("split") or (meta.get("source_meta") or {}).get("split") or {}


def groups_by_split(root: str | Path) -> dict[str, list[str]]:
    """The group (show) of every image per split, from the shards' `groups` ids and meta.json's
    `split.group_names`. Refuses a root that records no groups (prepared before splits kept
    groups, or written by a tool that drops them)."""
    import torch

    from fgvc.data.shards import load_shard, shards_of, splits_of

    root = Path(root)
    names = recorded_split(root).get("group_names")
    if not names:
        raise ShardError(f"{root}: meta.json records no groups (split.group_names); rebuild it with "
                         f"`fgvc prepare` to check its split")
    out: dict[str, list[str]] = {}
    for split in splits_of(root):
        ids: list[int] = []
        for path in shards_of(root, split):
            shard = load_shard(path)
            if "groups" not in shard:
                raise ShardError(f"{path}: records no 'groups' (the show of each image); rebuild the root "
                                 f"with `fgvc prepare` to check its split")
            ids += torch.as_tensor(shard["groups"]).tolist()
        if ids and max(ids) >= len(names):
            raise ShardError(f"{root / split}: group id {max(ids)} has no name in meta.json's split.group_names")
        out[split] = [names[i] for i in ids]
    return out


def check_groups(root: str | Path) -> dict:
    """Whether any group spans two splits: {"groups": {split: count}, "spanning": {group:
    splits}, "by": the recorded rule}."""
    from fgvc.data.splits import spanning

    of = groups_by_split(root)
    return {"by": recorded_split(root).get("by"),
            "groups": {split: len(set(keys)) for split, keys in of.items()}, "spanning": spanning(of)}
