"""The masking job's small files beside its shards, under ``dst/.progress/``.

- ``job.json``: the job's fingerprint (what decides the output bytes); a rerun with the same
  fingerprint resumes, another one is refused unless ``overwrite``.
- ``<split>/<shard>.json``: one shard's statistics (person ratios, fallbacks), written right
  after its shard, so a rerun skips finished shards and rank 0 can gather every rank's
  statistics from disk. A crash between a shard's rename and its sidecar is repaired from the
  shard itself (its ``masks`` and ``bg_removed`` give the same numbers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fgvc.data.shards import ShardError, read_shard, write_json
from fgvc.masking.background import person_ratio

PROGRESS_DIR = ".progress"
JOB_FILE = "job.json"


@dataclass
class ShardStats:
    split: str
    shard: str
    images: int
    person_ratios: list[float]
    bg_removed: list[bool]

    @property
    def fallbacks(self) -> int:
        return sum(not b for b in self.bg_removed)

    @property
    def key(self) -> str:
        return f"{self.split}/{self.shard}"


def _read(path: Path) -> dict | None:
    """A small JSON record; None when absent or unreadable (it is then rebuilt)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def read_job(dst: Path) -> dict | None:
    return _read(dst / PROGRESS_DIR / JOB_FILE)


def write_job(dst: Path, fingerprint: dict) -> None:
    write_json(dst / PROGRESS_DIR / JOB_FILE, fingerprint)


def write_stats(task, stats: ShardStats, fingerprint: dict) -> None:
    write_json(task.progress, {"fingerprint": fingerprint, "split": stats.split, "shard": stats.shard,
                               "images": stats.images, "fallbacks": stats.fallbacks,
                               "person_ratios": stats.person_ratios, "bg_removed": stats.bg_removed})


def read_stats(task, fingerprint: dict) -> ShardStats | None:
    """The statistics sidecar of a shard, when it belongs to this job and is whole."""
    record = _read(task.progress) or {}
    if record.get("fingerprint") != fingerprint or record.get("images") != task.count:
        return None
    ratios, removed = record.get("person_ratios"), record.get("bg_removed")
    if not isinstance(ratios, list) or not isinstance(removed, list) or len(ratios) != task.count:
        return None
    return ShardStats(task.split, task.src.name, task.count, [float(r) for r in ratios], [bool(b) for b in removed])


def finished_stats(task, fingerprint: dict, num_classes: int) -> ShardStats | None:
    """Statistics of a shard this job already wrote, or None when it must be (re)made: its
    file exists and validates, and its sidecar is there or can be rebuilt from it."""
    if not task.dst.exists():
        return None
    try:
        shard = read_shard(task.dst, num_classes=num_classes)
    except ShardError:
        return None
    if shard["labels"].shape[0] != task.count or "masks" not in shard or "bg_removed" not in shard:
        return None
    stats = read_stats(task, fingerprint)
    if stats is None:
        stats = ShardStats(task.split, task.src.name, task.count, person_ratio(shard["masks"]).tolist(),
                           shard["bg_removed"].to(torch.bool).tolist())
        write_stats(task, stats, fingerprint)
    return stats
