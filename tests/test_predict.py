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
def store(tiny_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("predict")
    with store_with_a_trained_model(tiny_root, base):
        yield base


def demo_photos(tiny_root, folder, names):
    """Validation images of the tiny root saved as photo files of another size."""
    ds = ShardDataset(tiny_root, "val")
    images = ds.gather(torch.arange(len(names)))["images"]
    folder.mkdir(parents=True, exist_ok=True)
    for image, name in zip(images, names):
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


def test_kaggle_test_folder_gives_a_submission_keyed_by_id(store, tiny_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    monkeypatch.chdir(store)
    test = tmp_path / "test"
    demo_photos(tiny_root, test, ["13455.png", "2.png", "400.png"])
    (test / "sample.csv").write_text("Id,Category\n13455,x\n2,x\n400,x\n")
    rows = submission(test, tmp_path / "submission.csv", tiny_root)
    assert [r[0] for r in rows[1:]] == ["13455", "2", "400"]


def test_a_root_with_an_unlabelled_test_set_gives_a_submission_keyed_by_id(store, tiny_root, tmp_path,
                                                                         monkeypatch):
    """`prepare --unlabelled-test` keeps Kaggle's test photos in the root; `predict --source
    ROOT` predicts them in sample.csv's order, the photos unreadable at prepare listed."""
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
    assert [r[0] for r in rows[1:]] == ["400", "13455", "2"]
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
