"""`predict`: a registered model's designers for any photos, written as a CSV and tracked.

Every photo goes through the version's own preprocessing (fgvc.models.predict.Predictor:
decoded like the served model, fitted to the training size with the training resize policy),
in batches, with a progress bar on a terminal. A file that cannot be read is listed (in the
log, in the CSV with its reason, in `unreadable.json`), never fatal. The run (`fgvc.task=predict`,
experiment `fgvc-predict`) records the version, the source and the counts, with the CSV as
its artifact.

`--format kaggle` writes `Id,Category` for every Id listed (sample.csv's order; Kaggle refuses
a submission that lacks one). A photo that cannot be read gets a fallback designer: the most
frequent designer of the version's training split (read from the data root its training run
recorded, `data_root_abs`, when that root is readable here and labels designers as the model
does; ties go to the lower class index); else the designer predicted most often for the
readable photos; else the model's first designer. Those Ids are named in a warning and listed
beside the submission in `<name>.unreadable.csv` (Id, file, error, fallback_designer), which
the run keeps with the submission, with the metric `predict/fallback_ids` and the param
`fallback_designer`.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from tqdm.auto import tqdm

from fgvc import mlflow_names
from fgvc.data.config import PredictConfig
from fgvc.data.shards import load_shard, read_label_map, read_meta, shards_of
from fgvc.data.sources import MAX_NAMES_IN_LOG, Photo, list_photos
from fgvc.data.unlabelled import has_unlabelled, listed_ids, unlabelled_batches
from fgvc.devices import cpu_count
from fgvc.errors import ConfigError, FgvcError
from fgvc.models.predict import Predictor, decode_image_bytes
from fgvc.tracking.markdown import code
from fgvc.tracking.model_registry import ResolvedModel, download_checkpoint, resolve_version
from fgvc.tracking.runs import artifact_dir, log_params, tracked_run

log = logging.getLogger("fgvc")

EXPERIMENT = mlflow_names.PREDICT
EXPERIMENT_DESCRIPTION = "Predictions of registered versions for folders of photos (`fgvc predict`): one CSV per run."


def read_photo(photo: Photo):
    """uint8 [H, W, 3], or the one-line reason it cannot be read."""
    try:
        if not photo.path.is_file():
            return "missing or not a regular file"
        return decode_image_bytes(photo.path.read_bytes(), photo.key)
    except FgvcError as e:
        return str(e).split(": ", 1)[-1]
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"


def predict_photos(predictor: Predictor, photos: list[Photo], top_k: int, batch_size: int,
                   progress: bool = True) -> tuple[list[dict], list[dict]]:
    """(one record per readable photo, one {file, error} per unreadable one), in listing order."""
    rows, unreadable = [], []
    bar = tqdm(total=len(photos), desc="predict", unit="img", disable=None if progress else True)
    with ThreadPoolExecutor(max_workers=max(1, min(8, cpu_count())), thread_name_prefix="fgvc-decode") as pool:
        for start in range(0, len(photos), batch_size):
            batch = photos[start:start + batch_size]
            decoded = list(pool.map(read_photo, batch))
            good = [(p, a) for p, a in zip(batch, decoded, strict=True) if not isinstance(a, str)]
            unreadable += [{"file": p.key, "path": str(p.path), "error": a}
                           for p, a in zip(batch, decoded, strict=True) if isinstance(a, str)]
            if good:
                for (photo, _), record in zip(good, predictor.predict([a for _, a in good], top_k=top_k), strict=True):
                    rows.append({"file": photo.key, **record})
            bar.update(len(batch))
    bar.close()
    return rows, unreadable


def predict_stored(predictor: Predictor, root: str, top_k: int, batch_size: int,
                   progress: bool = True) -> tuple[list[dict], list[dict]]:
    """The unlabelled test set a dataset root keeps (fgvc.data.unlabelled), keyed by Id; the
    photos that could not be read when it was prepared are the unreadable ones."""
    record = read_meta(root)["unlabelled_test"]
    rows = []
    bar = tqdm(total=record["count"], desc="predict", unit="img", disable=None if progress else True)
    for ids, images in unlabelled_batches(root):
        for start in range(0, len(ids), batch_size):
            arrays = [image.permute(1, 2, 0).numpy() for image in images[start:start + batch_size]]  # [H, W, 3]
            rows += [{"file": key, **r} for key, r in zip(ids[start:start + batch_size],
                                                          predictor.predict(arrays, top_k=top_k), strict=True)]
            bar.update(len(arrays))
    bar.close()
    return rows, [{"file": bad["id"], "path": bad.get("path", ""), "error": bad["error"]}
                  for bad in record.get("skipped", [])]


def most_frequent(counts: Sequence[int], names: Sequence[str]) -> str:
    """The designer with the largest count; a tie goes to the lower class index."""
    return names[max(range(len(names)), key=lambda i: (counts[i], -i))]


def training_class_counts(root: Path, names: Sequence[str]) -> list[int] | None:
    """Images per class in the train split of `root`, when it is readable here and its label
    map is the model's: meta.json's `class_counts` (an ingested root), else the shards' labels."""
    try:
        if read_label_map(root) != dict(enumerate(names)):
            return None
        recorded = (read_meta(root).get("class_counts") or {}).get("train")
        if isinstance(recorded, dict) and set(recorded) == set(names):
            return [int(recorded[name]) for name in names]
        labels = torch.cat([load_shard(path)["labels"] for path in shards_of(root, "train")])
        return torch.bincount(labels, minlength=len(names)).tolist()
    except (FgvcError, OSError, ValueError, KeyError, TypeError):
        return None


def training_root(run_id: str) -> str | None:
    """The data root a version's training run recorded (`data_root_abs`), if any."""
    try:
        return MlflowClient().get_run(run_id).data.params.get("data_root_abs")
    except MlflowException:
        return None


def fallback_designer(root: str | None, names: Sequence[str], rows: list[dict]) -> tuple[str, str]:
    """The designer an unreadable photo of a submission gets, and where it comes from (see the
    module docstring): `root` is the training data root, `rows` the readable photos' predictions."""
    counts = training_class_counts(Path(root), names) if root else None
    if counts is not None:
        return most_frequent(counts, names), f"the most frequent designer of the training split of {root}"
    unknown = f"the training data root {root} cannot be read here" if root else "the training run records no data root"
    if rows:
        predicted = Counter(row["designer"] for row in rows)
        return (most_frequent([predicted.get(name, 0) for name in names], names),
                f"{unknown}: the designer predicted most often")
    return names[0], f"{unknown} and no photo was readable: the model's first designer"


def unreadable_list_path(out: Path) -> Path:
    """Where a submission's unreadable photos are listed: beside it, `<name>.unreadable.csv`."""
    return out.with_name(f"{out.stem}.unreadable.csv")


def write_unreadable_list(path: Path, unreadable: list[dict], fallback: str | None) -> None:
    """A submission's unreadable photos (Id, file, error, fallback_designer); with none, a
    list left there by an earlier submission to the same place is removed."""
    if not unreadable:
        path.unlink(missing_ok=True)
        return
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["Id", "file", "error", "fallback_designer"])
        writer.writerows([bad["file"], bad.get("path", ""), bad["error"], fallback] for bad in unreadable)


def write_predictions(path: Path, rows: list[dict], unreadable: list[dict], fmt: str,
                      order: Sequence[str] = (), fallback: str | None = None) -> None:
    """csv: file, designer, probability, top_designers, top_probabilities (';'-joined), error;
    kaggle: Id,Category for every Id of `order` (the listing's), `fallback` for an unreadable photo."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if fmt == "kaggle":
            designer_of = {row["file"]: row["designer"] for row in rows}
            writer.writerow(["Id", "Category"])
            writer.writerows([key, designer_of.get(key, fallback)] for key in order)
            return
        writer.writerow(["file", "designer", "probability", "top_designers", "top_probabilities", "error"])
        for row in rows:
            writer.writerow([row["file"], row["designer"], f"{row['probability']:.6f}", ";".join(row["top_designers"]),
                             ";".join(f"{p:.6f}" for p in row["top_probabilities"]), ""])
        writer.writerows([bad["file"], "", "", "", "", bad["error"]] for bad in unreadable)


@dataclass
class PhotoSource:
    """What `predict` reads: the unlabelled test set a dataset root keeps (`stored`), or the
    photos listed in a folder or CSV."""

    stored: bool
    photos: list[Photo]
    count: int


@dataclass
class Predictions:
    """One record per readable photo, {file, path, error} per unreadable one, every key in
    listing order, and the designer an unreadable photo of a submission gets, and why."""

    rows: list[dict]
    unreadable: list[dict]
    order: list[str]
    fallback: str | None = None
    why: str | None = None


def run_predict(cfg: PredictConfig, progress: bool = True) -> dict:
    """Predict every photo of `cfg.source` with `cfg.model`, write `cfg.out`, log the run."""
    source = photo_source(cfg)  # before a run exists: a refusal leaves no FAILED run behind
    out = output_file(cfg)
    resolved = resolve_version(cfg.model)
    kaggle = cfg.format == "kaggle"
    sidecar = unreadable_list_path(out) if kaggle else None
    with tracked_run(EXPERIMENT, f"predict-{resolved.name}-v{resolved.version}", task="predict",
                     experiment_description=EXPERIMENT_DESCRIPTION, description=describe_run(cfg, resolved, source),
                     tags={"fgvc.model_uri": resolved.uri, "fgvc.source_run_id": resolved.run_id}) as run:
        with artifact_dir() as tmp:
            predictor = Predictor.from_checkpoint(download_checkpoint(resolved, tmp))
        found = predict_source(predictor, cfg, source, progress)
        if kaggle and found.unreadable:
            found.fallback, found.why = fallback_designer(training_root(resolved.run_id), predictor.label_names,
                                                          found.rows)
        warn_unreadable(cfg, found, sidecar)
        write_predictions(out, found.rows, found.unreadable, cfg.format, found.order, found.fallback)
        if sidecar is not None:  # the kaggle format
            write_unreadable_list(sidecar, found.unreadable, found.fallback)
        log_predictions(cfg, resolved, out, found, sidecar)
        run_id = run.info.run_id
    return {"run_id": run_id, "rows": len(found.rows), "unreadable": found.unreadable, "out": str(out),
            "model": resolved.uri, "fallback_designer": found.fallback,
            "unreadable_list": str(sidecar) if found.fallback else None}


def photo_source(cfg: PredictConfig) -> PhotoSource:
    """The photos of `--source`: a dataset root's unlabelled test set, or a listing; a root
    without one is refused."""
    stored = has_unlabelled(cfg.source)
    if not stored and (Path(cfg.source) / "meta.json").is_file():
        raise ConfigError(f"--source {cfg.source}: a dataset root without an unlabelled test set; give a folder of "
                          f"photos, or prepare the root with --unlabelled-test <Kaggle test folder>")
    if stored:
        return PhotoSource(True, [], read_meta(cfg.source)["unlabelled_test"]["count"])
    photos = list_photos(cfg.source)
    return PhotoSource(False, photos, len(photos))


def output_file(cfg: PredictConfig) -> Path:
    out = Path(cfg.out)
    if out.is_dir():
        raise ConfigError(f"--out {cfg.out}: is a folder; give a file name such as predictions.csv")
    return out


def describe_run(cfg: PredictConfig, resolved: ResolvedModel, source: PhotoSource) -> str:
    return (f"Predictions of {code(resolved.uri)} for {source.count} photo(s) of {code(cfg.source)}"
            + (" (its unlabelled test set, keyed by Id)" if source.stored else "")
            + f", written as {cfg.format} to {code(cfg.out)}.")


def predict_source(predictor: Predictor, cfg: PredictConfig, source: PhotoSource, progress: bool) -> Predictions:
    if source.stored:
        rows, unreadable = predict_stored(predictor, cfg.source, cfg.top_k, cfg.batch_size, progress)
        return Predictions(rows, unreadable, listed_ids(read_meta(cfg.source)["unlabelled_test"]))
    rows, unreadable = predict_photos(predictor, source.photos, cfg.top_k, cfg.batch_size, progress)
    return Predictions(rows, unreadable, [photo.key for photo in source.photos])


def warn_unreadable(cfg: PredictConfig, found: Predictions, sidecar: Path | None) -> None:
    """One warning naming the unreadable photos (the first MAX_NAMES_IN_LOG) and where they
    are listed; for a submission, the designer they were given."""
    if not found.unreadable:
        return
    unreadable = found.unreadable
    names = ", ".join(f"{b['file']} ({b['error']})" for b in unreadable[:MAX_NAMES_IN_LOG])
    more = f" ... and {len(unreadable) - MAX_NAMES_IN_LOG} more" if len(unreadable) > MAX_NAMES_IN_LOG else ""
    if cfg.format == "kaggle":
        log.warning("%d unreadable photo(s) given %r in the submission (%s), listed in %s: %s%s",
                    len(unreadable), found.fallback, found.why, sidecar, names, more)
    else:
        log.warning("%d unreadable photo(s), listed in %s: %s%s", len(unreadable), cfg.out, names, more)


def log_predictions(cfg: PredictConfig, resolved: ResolvedModel, out: Path, found: Predictions,
                    sidecar: Path | None) -> None:
    """Params, the counts `predict/...` and the files under `predictions/`."""
    kaggle = cfg.format == "kaggle"
    log_params({**cfg.params(), "model_version": resolved.version, "registered_model": resolved.name,
                "source_abs": str(Path(cfg.source).resolve()),
                **({"fallback_designer": found.fallback} if found.fallback else {})})
    predicted = {row["file"] for row in found.rows}
    mlflow.log_metrics({"predict/images": len(found.rows), "predict/unreadable": len(found.unreadable),
                        **({"predict/fallback_ids": sum(key not in predicted for key in found.order)}
                           if kaggle else {})})
    mlflow.log_artifact(str(out), "predictions")
    if kaggle and found.unreadable:
        mlflow.log_artifact(str(sidecar), "predictions")
    # mlflow annotates log_dict's content as a dict; it writes any JSON value (json.dump), here a list.
    mlflow.log_dict(found.unreadable, "predictions/unreadable.json")  # type: ignore[arg-type]
