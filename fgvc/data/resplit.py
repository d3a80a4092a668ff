"""The same images split another way: a prepared root dealt again by show or at random, so a
study can train on both and measure what a random split leaks (fgvc.study.leak).

A root already split by the wanted rule is itself. Otherwise its images are dealt again from
where they came from, into the sibling root ``<root>-<rule>-split``: a demo root is generated
again with the same generator settings but ``split_by`` (the demo's two splits hold the same
images by construction); an ingested root is ingested again from the source folder or CSV its
meta.json records, with the same size, resize policy, fractions, seed and group pattern. The
sibling must hold as many images as the root, or the source changed since and the two splits
would not be of the same images: refused in one line.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
from pathlib import Path

from fgvc.data.roots import demo_config_of, ensure_demo, is_masked_root
from fgvc.data.shards import read_meta
from fgvc.data.splits import DEFAULT_GROUP_PATTERN
from fgvc.errors import ConfigError, MissingFileError

log = logging.getLogger("fgvc")

RULES = ("show", "random")
# what an ingest's meta.json records and a new ingest must repeat
_SETTINGS = ("image_size", "resize", "val_fraction", "test_fraction", "seed", "shard_size")


def split_rule(root: str | Path) -> str | None:
    """How a root's images were split (``show`` or ``random``), from its meta.json."""
    return (read_meta(root).get("split") or {}).get("by")


def resplit_path(root: str | Path, rule: str) -> Path:
    root = Path(root)
    return root if split_rule(root) == rule else root.parent / f"{root.name}-{rule}-split"


def _total(meta: dict) -> int:
    return sum((meta.get("counts") or {}).values())


def resplit_root(root: str | Path, rule: str, progress: bool = True) -> Path:
    """``root``'s images split by ``rule``: ``root`` itself when it is split so, else its
    sibling (see the module docstring), built when missing or built from other settings."""
    if rule not in RULES:
        raise ConfigError(f"split rule {rule!r}: choose one of {', '.join(RULES)}")
    root = Path(root)
    target = resplit_path(root, rule)
    if target == root:
        return root
    meta = read_meta(root)
    demo = demo_config_of(root)
    if demo is not None:
        return ensure_demo(target, dataclasses.replace(demo, split_by=rule))
    source = meta.get("source")
    if is_masked_root(root) or not source or source == "runway-synth":
        raise ConfigError(f"{root}: its meta.json records no source to deal its images again from; pass the root "
                          f"that `fgvc prepare` wrote from your images (not a masked one)")
    if not Path(source).exists():
        raise MissingFileError(f"{root} was prepared from {source}, which is not there any more: splitting the same "
                               f"images by {rule} deals them again from there")
    from fgvc.data.ingest import IngestOptions, ingest  # PIL and the decoders only when a root is dealt again

    found = read_meta(target) if (target / "meta.json").exists() else {}
    same = (found.get("source") == meta["source"] and (found.get("split") or {}).get("by") == rule
            and all(found.get(k) == meta.get(k) for k in _SETTINGS) and _total(found) == _total(meta))
    if same:
        return target
    log.info("splitting the images of %s by %s into %s (from %s)", root, rule, target, source)
    height, width = meta["image_size"]
    options = IngestOptions(height=height, width=width, resize=meta.get("resize", "pad"),
                            val_fraction=meta.get("val_fraction", 0.2), seed=meta.get("seed", 0),
                            shard_size=meta.get("shard_size", 500), split_by=rule,
                            group_pattern=(meta.get("split") or {}).get("group_pattern") or DEFAULT_GROUP_PATTERN,
                            test_fraction=meta.get("test_fraction", 0.0))
    made = ingest(source, target, options, progress=progress)
    if _total(made) != _total(meta):
        raise ConfigError(f"{source} holds {_total(made)} readable images now, {_total(meta)} when {root} was "
                          f"prepared: the two splits would not be of the same images; prepare it again "
                          f"(`fgvc prepare --source {shlex.quote(source)} --root {shlex.quote(str(root))} "
                          f"--overwrite true`)")
    return target
