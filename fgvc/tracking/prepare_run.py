"""`prepare`: build a dataset root (demo generator or ingest of real images) and track it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import mlflow
import torch

from fgvc.data.dataset import ShardDataset
from fgvc.data.demo import DemoConfig, generate_demo
from fgvc.data.shards import dataset_digest, read_meta, validate_root
from fgvc.tracking.runs import artifact_dir, log_dataset, log_params, tracked_run

log = logging.getLogger("fgvc")


def build_root(source: str, root: str | Path, demo: DemoConfig | None = None, height: int = 64,
               width: int = 48, resize: str = "pad", val_fraction: float = 0.2, seed: int = 0,
               overwrite: bool = False) -> dict:
    """Write the dataset root from `source` ("demo" or a folder/CSV path); returns its meta."""
    root = Path(root)
    if (root / "meta.json").exists():
        if not overwrite:
            raise FileExistsError(f"{root}: a dataset already exists here; pass overwrite=true to rebuild it")
        shutil.rmtree(root)
    if source == "demo":
        return generate_demo(root, demo or DemoConfig(seed=seed))
    from fgvc.data.ingest import ingest

    return ingest(source, root, height=height, width=width, resize=resize,
                  val_fraction=val_fraction, seed=seed)


def ensure_demo(root: str | Path, cfg: DemoConfig = DemoConfig()) -> Path:
    """The default demo root, generated on first use."""
    root = Path(root)
    if not (root / "meta.json").exists():
        log.info("generating the demo dataset in %s (first use)", root)
        generate_demo(root, cfg)
    return root


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


def run_prepare(source: str = "demo", root: str = "data/demo", demo: DemoConfig | None = None,
                **ingest_options) -> dict:
    """Build the root and log params, counts, a sample grid and the digest to MLflow."""
    name = "prepare-demo" if source == "demo" else f"prepare-{Path(source).name}"
    with tracked_run("fgvc-data", name):
        meta = build_root(source, root, demo=demo, **ingest_options)
        info = validate_root(root)
        digest = dataset_digest(root)
        params = {"source": source, "root": str(Path(root).resolve()), "dataset_digest": digest,
                  "num_classes": info.num_classes,
                  "image_size": f"{info.image_size[0]}x{info.image_size[1]}"}
        if source == "demo":
            params.update({f"demo.{k}": v for k, v in meta["generator"].items()})
        else:
            params.update(ingest_options)
        log_params(params)
        for split, count in info.counts.items():
            mlflow.log_metric(f"data/{split}/images", count)
        mlflow.log_metric("data/skipped_files", meta.get("skipped_count", 0))
        names = info.label_names or {i: str(i) for i in range(info.num_classes)}
        counts = {split: {names[i]: n for i, n in enumerate(per_class)}
                  for split, per_class in info.class_counts.items()}
        mlflow.log_dict(counts, "data/class_counts.json")
        mlflow.log_dict(read_meta(root), "data/meta.json")
        with artifact_dir() as tmp:
            mlflow.log_artifact(str(save_sample_grid(Path(root), tmp / "sample_grid.png")), "data")
        log_dataset(root, digest, name=Path(root).name, context="output")
        log.info("dataset written to %s: %s, digest %s", root, info.counts, digest)
        return {**meta, "digest": digest}
