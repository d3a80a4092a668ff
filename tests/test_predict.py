"""`fgvc predict`: a registered model's designers for a folder of photos or a Kaggle test
folder, written as a CSV (or Id,Category), unreadable files listed, the run tracked."""

from __future__ import annotations

import csv

import mlflow
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from stores import store_with_a_trained_model

from fgvc.cli import main
from fgvc.data.dataset import ShardDataset
from fgvc.data.shards import read_label_map


@pytest.fixture(scope="module")
def store(tiny_root, tmp_path_factory, store_template):
    base = tmp_path_factory.mktemp("predict")
    with store_with_a_trained_model(tiny_root, base, store_template):
        yield base


def demo_photos(tiny_root, folder, names):
    """Validation images of the tiny root saved as photo files of another size."""
    ds = ShardDataset(tiny_root, "val")
    images = ds.gather(torch.arange(len(names)))["images"]
    folder.mkdir(parents=True, exist_ok=True)
    for image, name in zip(images, names, strict=True):
        Image.fromarray(image.permute(1, 2, 0).numpy()).resize((48, 64)).save(folder / name)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_predict_writes_one_row_per_photo_and_lists_the_unreadable(store, tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    monkeypatch.chdir(store)
    photos = tmp_path / "photos"
    demo_photos(tiny_root, photos / "runway", ["a.png", "b.jpg", "c.png"])
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out" / "predictions.csv"
    done = CliRunner().invoke(main, ["predict", "--model", "models:/fgvc-fn-small@candidate", "--source", str(photos),
                                     "--out", str(out), "--top-k", "2", "--batch-size", "2"])
    assert done.exit_code == 0, done.output
    assert "3 photo(s) predicted" in done.output and "1 unreadable" in done.output
    rows = read_rows(out)
    assert rows[0] == ["file", "designer", "probability", "top_designers", "top_probabilities", "error"]
    names = set(read_label_map(tiny_root).values())
    good = {r[0]: r for r in rows[1:] if not r[5]}
    assert set(good) == {"runway/a.png", "runway/b.jpg", "runway/c.png"}
    for row in good.values():
        assert row[1] in names and 0 < float(row[2]) <= 1
        assert row[3].split(";")[0] == row[1] and len(row[3].split(";")) == 2
    bad = [r for r in rows[1:] if r[5]]
    assert [r[0] for r in bad] == ["broken.jpg"] and "not a JPEG/PNG/WebP image" in bad[0][5]
    run = mlflow.search_runs(experiment_names=["fgvc-predict"], output_format="list")[0]
    assert run.data.tags["fgvc.task"] == "predict" and run.data.params["model_version"] == "1"
    assert run.data.metrics["predict/images"] == 3 and run.data.metrics["predict/unreadable"] == 1
    logged = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="predictions/predictions.csv",
                                                 dst_path=str(tmp_path / "logged"))
    assert read_rows(logged) == rows


def submission(source, out, tiny_root) -> list[list[str]]:
    """`predict --format kaggle` of ``source`` into ``out``: its rows, checked for the header
    and for designers of the model."""
    done = CliRunner().invoke(main, ["predict", "--model", "models:/fgvc-fn-small/1", "--source", str(source),
                                     "--out", str(out), "--format", "kaggle"])
    assert done.exit_code == 0, done.output
    rows = read_rows(out)
    assert rows[0] == ["Id", "Category"] and {r[1] for r in rows[1:]} <= set(read_label_map(tiny_root).values())
    return rows


def most_frequent_training_designer(root) -> str:
    """The designer with the most train images of ``root`` (ties: the lowest class index)."""
    counts = torch.bincount(ShardDataset(root, "train").labels)
    return read_label_map(root)[int(torch.argmax(counts))]


def test_kaggle_test_folder_gives_a_submission_keyed_by_id(store, tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    monkeypatch.chdir(store)
    test = tmp_path / "test"
    demo_photos(tiny_root, test, ["13455.png", "2.png", "400.png"])
    (test / "sample.csv").write_text("Id,Category\n13455,x\n2,x\n400,x\n")
    rows = submission(test, tmp_path / "submission.csv", tiny_root)
    assert [r[0] for r in rows[1:]] == ["13455", "2", "400"]
    assert not (tmp_path / "submission.unreadable.csv").exists()


def test_a_kaggle_submission_has_every_id_an_unreadable_photo_gets_the_most_frequent_designer(
        store, tiny_root, tmp_path, monkeypatch, caplog):
    """Kaggle refuses a submission that lacks an Id: every Id of sample.csv is written, in its
    order; a photo that cannot be read (broken, or missing) gets the version's most frequent
    training designer, and is listed on the terminal, beside the submission and in the run."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    monkeypatch.chdir(store)
    test = tmp_path / "test"
    demo_photos(tiny_root, test, ["13455.png", "2.png", "400.png"])
    (test / "7.png").write_bytes(b"not a png")
    (test / "sample.csv").write_text("Id,Category\n400,x\n7,x\n13455,x\n5,x\n2,x\n")
    out = tmp_path / "submission.csv"
    with caplog.at_level("WARNING", logger="fgvc"):
        rows = submission(test, out, tiny_root)
    fallback = most_frequent_training_designer(tiny_root)
    assert [r[0] for r in rows[1:]] == ["400", "7", "13455", "5", "2"]
    assert rows[2][1] == fallback and rows[4][1] == fallback
    [line] = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert "2 unreadable photo(s)" in line and f"given {fallback!r}" in line and "submission.unreadable.csv" in line
    assert f"the most frequent designer of the training split of {tiny_root.resolve()}" in line
    sidecar = read_rows(tmp_path / "submission.unreadable.csv")
    assert sidecar[0] == ["Id", "file", "error", "fallback_designer"]
    assert [(r[0], r[1], r[3]) for r in sidecar[1:]] == [("7", str(test / "7.png"), fallback),
                                                         ("5", str(test / "5.png"), fallback)]
    assert "not a JPEG/PNG/WebP image" in sidecar[1][2] and "missing" in sidecar[2][2]
    [run] = mlflow.search_runs(experiment_names=["fgvc-predict"], output_format="list",
                               filter_string=f"params.out = '{out}'")
    assert run.data.metrics["predict/unreadable"] == 2 and run.data.metrics["predict/fallback_ids"] == 2
    assert run.data.params["fallback_designer"] == fallback
    logged = mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                 artifact_path="predictions/submission.unreadable.csv",
                                                 dst_path=str(tmp_path / "logged"))
    assert read_rows(logged) == sidecar
    # a later submission to the same place with every photo readable leaves no stale list
    (test / "sample.csv").write_text("Id,Category\n400,x\n2,x\n")
    assert [r[0] for r in submission(test, out, tiny_root)[1:]] == ["400", "2"]
    assert not (tmp_path / "submission.unreadable.csv").exists()


def test_a_root_with_an_unlabelled_test_set_gives_a_submission_keyed_by_id(store, tiny_root, tmp_path,
                                                                         monkeypatch):
    """`prepare --unlabelled-test` keeps Kaggle's test photos in the root; `predict --source
    ROOT` predicts them in sample.csv's order, every Id written: the photos unreadable at
    prepare get the most frequent training designer and are listed beside the submission."""
    import shutil

    from fgvc.data.shards import read_meta, write_json
    from fgvc.data.unlabelled import ingest_unlabelled

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    monkeypatch.chdir(store)
    test = tmp_path / "test"
    demo_photos(tiny_root, test, ["13455.png", "2.png", "400.png"])
    (test / "sample.csv").write_text("Id,Category\n400,x\n13455,x\n5,x\n2,x\n")
    root = tmp_path / "root"
    shutil.copytree(tiny_root, root)
    meta = read_meta(root)
    height, width = meta["image_size"]
    write_json(root / "meta.json", {**meta, "unlabelled_test": ingest_unlabelled(test, root, height, width, "pad",
                                                                                 progress=False)})
    rows = submission(root, tmp_path / "submission.csv", tiny_root)
    fallback = most_frequent_training_designer(tiny_root)
    assert [r[0] for r in rows[1:]] == ["400", "13455", "5", "2"] and rows[3][1] == fallback
    sidecar = read_rows(tmp_path / "submission.unreadable.csv")
    assert [(r[0], r[3]) for r in sidecar[1:]] == [("5", fallback)] and "missing" in sidecar[1][2]
    # the same photos read from the folder get the same designers
    assert submission(test, tmp_path / "direct.csv", tiny_root) == rows
    [run] = mlflow.search_runs(experiment_names=["fgvc-predict"], output_format="list",
                               filter_string=f"params.source = '{root}'")
    assert run.data.metrics["predict/unreadable"] == 1 and "unlabelled test set, keyed by Id" in \
        run.data.tags["mlflow.note.content"]
    plain = CliRunner().invoke(main, ["predict", "--model", "models:/fgvc-fn-small/1", "--source", str(tiny_root)])
    assert plain.exit_code == 1 and "a dataset root without an unlabelled test set" in plain.output


def test_an_unknown_source_is_one_line_and_no_run(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    done = CliRunner().invoke(main, ["predict", "--model", "models:/fgvc-fn-small@candidate",
                                     "--source", str(tmp_path / "nowhere")])
    assert done.exit_code == 1 and "source does not exist" in done.output


def test_the_fallback_is_the_most_frequent_designer_of_the_training_split(tmp_path):
    """Counted from the root's train shards, or taken from an ingested root's meta.json; a
    tie goes to the lower class index; a root that labels designers otherwise is not used."""
    from fgvc.data.shards import make_shard, shard_name, write_json, write_label_map, write_shard
    from fgvc.tasks.predict import most_frequent, training_class_counts

    names = ["a", "b", "c"]
    write_label_map(tmp_path, names)
    for k, labels in enumerate([[1, 0], [1, 2]]):
        write_shard(tmp_path / "train" / shard_name(k),
                    make_shard(torch.zeros(len(labels), 3, 4, 3, dtype=torch.uint8), torch.tensor(labels), 3))
    assert training_class_counts(tmp_path, names) == [1, 2, 1]
    assert most_frequent([1, 2, 1], names) == "b" and most_frequent([5, 1, 5], names) == "a"
    write_json(tmp_path / "meta.json", {"class_counts": {"train": {"a": 5, "b": 1, "c": 5}}})
    assert training_class_counts(tmp_path, names) == [5, 1, 5]
    assert training_class_counts(tmp_path, ["x", "y", "z"]) is None
    assert training_class_counts(tmp_path / "gone", names) is None


def test_without_the_training_root_the_fallback_is_the_designer_predicted_most_often(tmp_path):
    from fgvc.tasks.predict import fallback_designer

    names = ["a", "b", "c"]
    designer, why = fallback_designer(str(tmp_path / "gone"), names, [{"designer": d} for d in "cca"])
    assert designer == "c" and "cannot be read here" in why and "predicted most often" in why
    assert fallback_designer(None, names, [{"designer": "b"}]) == ("b", "the training run records no data root: "
                                                                      "the designer predicted most often")
    assert fallback_designer(str(tmp_path / "gone"), names, [])[0] == "a"
