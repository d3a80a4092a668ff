"""`prepare`: build a dataset root (demo generator or ingest of real images) and track it."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import torch

from fgvc import mlflow_names
from fgvc.data.config import PrepareConfig
from fgvc.data.dataset import ShardDataset
from fgvc.data.demo import generate_demo
from fgvc.data.ingest import IngestOptions, ingest
from fgvc.data.roots import check_groups, remove_written, written_files
from fgvc.data.shards import RootInfo, dataset_digest, read_meta, validate_root
from fgvc.data.sources import KAGGLE_LIST
from fgvc.errors import ConfigError
from fgvc.tracking.markdown import code
from fgvc.tracking.runs import DESCRIPTION, artifact_dir, log_dataset, log_params, set_tags, tracked_run

log = logging.getLogger("fgvc")

EXPERIMENT_DESCRIPTION = ("Dataset roots built by `prepare`: the demo generator or an ingest of real images (params, "
                          "counts, a sample grid, the digest).")
EXPERIMENT = mlflow_names.DATA


def check_arguments_of(cfg: PrepareConfig) -> None:
    """Every argument, before anything is touched: the demo config, the ingest's arguments
    (source not inside the root, root not inside the source), an existing root."""
    root = Path(cfg.root)
    if cfg.is_demo:
        try:
            cfg.demo()
        except ValueError as e:
            raise ConfigError(str(e)) from None
    else:
        ingest_options(cfg).check(Path(cfg.source), root)
    if cfg.unlabelled_test is not None and not (Path(cfg.unlabelled_test) / KAGGLE_LIST).is_file():
        raise ConfigError(f"--unlabelled-test {cfg.unlabelled_test}: needs {KAGGLE_LIST} (column Id) listing its "
                          f"photos, as Kaggle's test folder has")
    if (root / "meta.json").exists() and not cfg.overwrite:
        raise ConfigError(f"{root}: a dataset already exists here; pass --overwrite true to rebuild it "
                          f"(only the files prepare wrote are removed)")


def build_root(cfg: PrepareConfig, progress: bool = True) -> dict:
    """Write the dataset root; returns its meta. Overwriting removes only what prepare wrote."""
    check_arguments_of(cfg)
    root = Path(cfg.root)
    if written_files(root):
        removed = remove_written(root)
        log.info("%s: removed %d file(s) of the previous dataset", root, removed)
    if cfg.is_demo:
        return generate_demo(root, cfg.demo())
    return ingest(cfg.source, root, ingest_options(cfg), progress=progress, unlabelled_test=cfg.unlabelled_test)


def ingest_options(cfg: PrepareConfig) -> IngestOptions:
    """The ingest's size, resize and split settings (shards of the default size)."""
    return IngestOptions(height=cfg.height, width=cfg.width, resize=cfg.resize, val_fraction=cfg.val_fraction,
                         seed=cfg.seed, split_by=cfg.split_by, group_pattern=cfg.group_pattern,
                         test_fraction=cfg.test_fraction)


def describe_split(meta: dict) -> str:
    """One sentence on the split (and the unlabelled test set) for the run's description and
    the terminal."""
    return " ".join(t for t in (_split_sentence(meta), _unlabelled_sentence(meta)) if t)


def _unlabelled_sentence(meta: dict) -> str:
    record = meta.get("unlabelled_test")
    if not record:
        return ""
    skipped = len(record.get("skipped", []))
    return (f"Unlabelled test set: {record['count']} photo(s) keyed by Id in unlabelled-test/"
            + (f" ({skipped} listed in sample.csv unreadable: see meta.json)" if skipped else "")
            + "; `fgvc predict --source <this root> --format kaggle` predicts it.")


def _split_sentence(meta: dict) -> str:
    split = meta.get("split") or {}
    if not split:
        return ""
    groups = ", ".join(f"{s} {n}" for s, n in split.get("groups", {}).items())
    text = f"Split by {split.get('by')}: shows (groups) per split {groups}"
    if "coded_files" in split:
        text += (f"; {split['coded_files']} file(s) carry a show code, {split['uncoded_files']} do not "
                 f"({split['uncoded_rule']})")
    crossing = split.get("groups_in_two_splits", 0)
    return text + (f"; {crossing} show(s) span two splits (a random split leaks shows)." if crossing
                   else "; no show spans two splits.")


def split_tags(meta: dict) -> dict:
    split = meta.get("split") or {}
    tags = {"fgvc.split_by": split.get("by"), "fgvc.groups_in_two_splits": split.get("groups_in_two_splits")}
    tags.update({f"fgvc.groups.{s}": n for s, n in (split.get("groups") or {}).items()})
    return {k: str(v) for k, v in tags.items() if v is not None}


def check_root(root: str) -> tuple[bool, str]:
    """`prepare --check ROOT`: (no show spans two splits, one line saying so)."""
    found = check_groups(root)
    groups = ", ".join(f"{s} {n}" for s, n in found["groups"].items())
    if not found["spanning"]:
        return True, f"{root}: split by {found['by']}; no show spans two splits (shows per split: {groups})"
    first = ", ".join(f"{g} ({'+'.join(s)})" for g, s in list(found["spanning"].items())[:3])
    return False, (f"{root}: {len(found['spanning'])} show(s) span two splits, e.g. {first}; rebuild it with "
                   f"`fgvc prepare --split-by show`")


def save_sample_grid(root: Path, path: Path, per_class: int = 4, max_classes: int = 16) -> Path:
    """A grid of training images, one row per class (first `max_classes` classes)."""
    from PIL import Image
    from torchvision.utils import make_grid

    ds = ShardDataset(root, "train")
    rows = []
    for c in range(min(ds.num_classes, max_classes)):
        members = (ds.labels == c).nonzero().flatten()[:per_class]
        images = ds.gather(members)["images"]
        if len(images) < per_class:
            pad = torch.zeros(per_class - len(images), *images.shape[1:], dtype=torch.uint8)
            images = torch.cat([images, pad])
        rows.append(images)
    grid = make_grid(torch.cat(rows), nrow=per_class, padding=2)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path


def run_prepare(cfg: PrepareConfig, progress: bool = True) -> dict:
    """Build the root and log params, counts, a sample grid and the digest to MLflow."""
    check_arguments_of(cfg)  # before a run exists: a refusal leaves no FAILED run behind
    what = "the synthetic runway demo" if cfg.is_demo else f"an ingest of {code(cfg.source)}"
    with tracked_run(EXPERIMENT, prepare_run_name(cfg), task="prepare", experiment_description=EXPERIMENT_DESCRIPTION,
                     description=f"Dataset root {code(cfg.root)}: {what}."):
        meta = build_root(cfg, progress)
        info = validate_root(cfg.root)
        digest = dataset_digest(cfg.root)
        log_params(prepare_params(cfg, meta, info, digest))
        log_counts(meta, info)
        set_tags({**split_tags(meta), DESCRIPTION: f"Dataset root {code(cfg.root)}: {what}. {describe_split(meta)}"})
        log_root_files(Path(cfg.root), info)
        log_dataset(cfg.root, digest, name=Path(cfg.root).name, context="output")
        log.info("dataset written to %s: %s, digest %s", cfg.root, info.counts, digest)
        return {**meta, "digest": digest}


def prepare_run_name(cfg: PrepareConfig) -> str:
    return "prepare-demo" if cfg.is_demo else f"prepare-{Path(cfg.source).name}"


def prepare_params(cfg: PrepareConfig, meta: dict, info: RootInfo, digest: str) -> dict:
    """The config's params and what the written root is."""
    return {**cfg.params(), "root_abs": str(Path(cfg.root).resolve()), "dataset_digest": digest,
            "num_classes": info.num_classes, "image_size": f"{info.image_size[0]}x{info.image_size[1]}",
            **({"split_by_effective": meta["split"]["by"]} if meta.get("split") else {})}


def log_counts(meta: dict, info: RootInfo) -> None:
    """`data/<split>/images`, `data/skipped_files`, `data/unlabelled_test/images` and
    `data/<split>/groups`."""
    for split, count in info.counts.items():
        mlflow.log_metric(f"data/{split}/images", count)
    mlflow.log_metric("data/skipped_files", meta.get("skipped_count", 0))
    if meta.get("unlabelled_test"):
        mlflow.log_metric("data/unlabelled_test/images", meta["unlabelled_test"]["count"])
    for split, count in ((meta.get("split") or {}).get("groups") or {}).items():
        mlflow.log_metric(f"data/{split}/groups", count)


def log_root_files(root: Path, info: RootInfo) -> None:
    """`data/class_counts.json` (designer names per split), `data/meta.json` and
    `data/sample_grid.png`."""
    names = info.label_names or {i: str(i) for i in range(info.num_classes)}
    counts = {split: {names[i]: n for i, n in enumerate(per_class)}
              for split, per_class in info.class_counts.items()}
    mlflow.log_dict(counts, "data/class_counts.json")
    mlflow.log_dict(read_meta(root), "data/meta.json")
    with artifact_dir() as tmp:
        mlflow.log_artifact(str(save_sample_grid(root, tmp / "sample_grid.png")), "data")
