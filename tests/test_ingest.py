import hashlib
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from fgvc.data.decode import load_image, to_rgb
from fgvc.data.ingest import IngestOptions, ingest, val_count
from fgvc.data.shards import read_label_map, read_meta, read_shard, shards_of, validate_root

KEPT = ["Comme des Garçons", "Maison Margiela", "山本耀司"]
SKIPPED = {
    "Broken Label/empty.png",
    "Broken Label/noise.JPG",
    "Comme des Garçons/truncated.jpg",
    "Maison Margiela/noise.jpg",
    "山本耀司/empty.png",
}


def solid(size, colour, mode="RGB"):
    return Image.new(mode, size, colour)


def halves(size, left, right, mode="RGB"):
    """Left half `left`, right half `right`."""
    w, h = size
    image = Image.new(mode, size, right)
    image.paste(Image.new(mode, (w // 2, h), left), (0, 0))
    return image


def save_truncated_jpeg(path):
    solid((64, 64), (10, 200, 30)).save(path.with_suffix(".tmp.jpg"), quality=90)
    data = path.with_suffix(".tmp.jpg").read_bytes()
    path.with_suffix(".tmp.jpg").unlink()
    path.write_bytes(data[: len(data) // 2])


def build_tree(src):
    """4 designer folders: 3 with readable images (5, 4, 2), one whose files are all broken."""
    d = src / "Comme des Garçons"
    d.mkdir(parents=True)
    solid((30, 50), (200, 30, 30)).save(d / "rgb.jpg", quality=95)
    halves((20, 40), (255, 0, 0, 255), (255, 255, 255, 0), "RGBA").save(d / "rgba.png")
    solid((16, 16), 77, "L").save(d / "gray.png")
    palette_image(d / "palette.png")
    Image.fromarray(np.full((24, 12), 32896, dtype=np.uint16)).save(d / "deep.png")
    save_truncated_jpeg(d / "truncated.jpg")

    d = src / "Maison Margiela"
    d.mkdir()
    solid((40, 20), (0, 0, 200)).save(d / "wide.png")
    solid((20, 60), (0, 200, 0)).save(d / "tall.PNG")
    solid((33, 47), (90, 90, 0)).save(d / "odd.webp", lossless=True)
    exif_oriented_jpeg(d / "rotated.jpeg")
    (d / "noise.jpg").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8)))
    (d / "notes.txt").write_text("not an image")
    (d / ".DS_Store").write_bytes(b"\0\1")

    d = src / "山本耀司"
    d.mkdir()
    solid((25, 25), (10, 10, 10)).save(d / "a.png")
    solid((25, 50), (240, 240, 240)).save(d / "b.jpg")
    (d / "empty.png").write_bytes(b"")

    d = src / "Broken Label"
    d.mkdir()
    (d / "empty.png").write_bytes(b"")
    (d / "noise.JPG").write_bytes(b"definitely not a jpeg" * 10)


def palette_image(path):
    """Left half palette index 0 (white, transparent), right half index 1 (green)."""
    image = Image.new("P", (10, 10), 1)
    image.putpalette([255, 255, 255, 0, 255, 0] + [0] * 762)
    image.paste(0, (0, 0, 5, 10))
    image.save(path, transparency=0)


def exif_oriented_jpeg(path):
    """Stored 40 wide x 20 tall, red block in the stored top-left, EXIF orientation 6 (display
    = stored rotated 90 degrees clockwise: 20 wide x 40 tall, the block in the top-right)."""
    image = solid((40, 20), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, quality=95, exif=exif)


@pytest.fixture
def tree(tmp_path):
    src = tmp_path / "src"
    build_tree(src)
    return src


def test_ingest_writes_a_valid_root_with_exact_names_and_stratified_split(tree, tmp_path, caplog):
    root = tmp_path / "root"
    with caplog.at_level(logging.WARNING, logger="fgvc"):
        meta = ingest(tree, root, height=32, width=24, shard_size=4, progress=False)

    info = validate_root(root)
    assert info.image_size == (32, 24) and info.num_classes == 3
    assert read_label_map(root) == dict(enumerate(KEPT))
    raw = json.loads((root / "index_to_label.json").read_text(encoding="utf-8"))
    assert raw == {"0": "Comme des Garçons", "1": "Maison Margiela", "2": "山本耀司"}

    # readable per class: 5, 4, 2 -> val round(n * 0.2) = 1, 1, and 1 (n >= 2 forces one)
    assert info.class_counts == {"train": [4, 3, 1], "val": [1, 1, 1]}
    assert meta["counts"] == {"train": 8, "val": 3}
    assert meta["class_counts"]["train"] == {"Comme des Garçons": 4, "Maison Margiela": 3, "山本耀司": 1}
    assert [p.name for p in shards_of(root, "train")] == ["shard_000.pt", "shard_001.pt"]
    assert [p.name for p in shards_of(root, "val")] == ["shard_000.pt"]

    shard = read_shard(root / "train" / "shard_000.pt")
    assert shard["images"].dtype == torch.uint8 and shard["images"].shape == (4, 3, 32, 24)
    assert shard["labels"].dtype == torch.int64
    assert torch.equal(shard["one_hot"].argmax(1), shard["labels"])

    # skipped files: in meta (names relative to the source, with the error) and in the log
    assert meta["skipped_count"] == 5
    assert {s["path"] for s in meta["skipped"]} == SKIPPED
    assert all(s["error"] for s in meta["skipped"])
    assert read_meta(root)["skipped"] == meta["skipped"]
    warning = next(r.getMessage() for r in caplog.records if "unreadable" in r.getMessage())
    assert "skipped 5 unreadable" in warning
    assert all(name in warning for name in SKIPPED)

    # a designer with no readable image is dropped, recorded and warned about
    assert meta["dropped_classes"] == [
        {"label": "Broken Label", "files": 2, "reason": "every image file was unreadable"}]
    assert any("Broken Label" in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records)

    assert meta["image_size"] == [32, 24] and meta["resize"] == "pad"
    assert meta["val_fraction"] == 0.2 and meta["seed"] == 0
    assert meta["ignored"]["non_image_files"] == 1
    # nothing else left behind (no staging file)
    assert sorted(p.name for p in root.iterdir()) == ["index_to_label.json", "meta.json", "train", "val"]


def test_same_seed_gives_byte_identical_shards(tree, tmp_path):
    for name in ("a", "b"):
        ingest(tree, tmp_path / name, height=16, width=12, shard_size=3, progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("shard_*.pt"))
    assert len(files) == 3 + 1
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    val = (tmp_path / "a" / "val" / "shard_000.pt").read_bytes()
    other_seeds = []
    for seed in (1, 2, 3):
        ingest(tree, tmp_path / f"s{seed}", height=16, width=12, seed=seed, progress=False)
        other_seeds.append((tmp_path / f"s{seed}" / "val" / "shard_000.pt").read_bytes())
    assert any(v != val for v in other_seeds)


def test_reingest_into_a_smaller_split_removes_stale_shards(tree, tmp_path):
    root = tmp_path / "root"
    ingest(tree, root, height=16, width=12, shard_size=2, progress=False)
    assert len(shards_of(root, "train")) == 4
    ingest(tree, root, height=16, width=12, shard_size=500, progress=False)
    assert [p.name for p in shards_of(root, "train")] == ["shard_000.pt"]
    assert validate_root(root).counts == {"train": 8, "val": 3}


def test_zero_val_fraction_writes_train_only(tree, tmp_path):
    root = tmp_path / "root"
    meta = ingest(tree, root, height=16, width=12, val_fraction=0.0, progress=False)
    assert meta["counts"] == {"train": 11, "val": 0}
    assert not (root / "val").exists()
    assert validate_root(root, splits=("train",)).counts == {"train": 11}


def root_digest(root, source):
    """sha256 over every file of a root (relative name, then bytes), with the source's path in
    meta.json (its `source`, and the file names in PIL's error messages) read as `<source>`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "meta.json":
            for spelling in sorted({str(source.resolve()), str(source)}, key=len, reverse=True):
                data = data.replace(spelling.encode(), b"<source>")
        digest.update(str(path.relative_to(root)).encode() + b"\0" + data)
    return digest.hexdigest()


# Obtained by running this ingest with the code as it stood before `ingest` was split into named
# steps (one options record, one list of shard items), in the project's venv (torch 2.x, Pillow):
# a change of torch's file format or of Pillow's decoders changes it too, nothing else should.
TREE_DIGEST = "106a5a90f30a2ce7acf6b87e7fe43f2200124f72703e7cc42d2caa4030301615"


def test_ingest_writes_the_same_bytes_as_before(tree, tmp_path):
    """Shards, label map and meta.json byte for byte: the image modes, the skipped files and the
    dropped designer of the tree, in two train shards and one val shard."""
    ingest(tree, tmp_path / "keywords", height=32, width=24, shard_size=4, progress=False)
    assert root_digest(tmp_path / "keywords", tree) == TREE_DIGEST
    ingest(tree, tmp_path / "options", IngestOptions(height=32, width=24, shard_size=4), progress=False)
    assert root_digest(tmp_path / "options", tree) == TREE_DIGEST


@pytest.mark.parametrize("n, fraction, expected", [
    (0, 0.2, 0), (1, 0.5, 0), (2, 0.2, 1), (2, 0.9, 1), (5, 0.2, 1), (5, 0.5, 3), (10, 0.25, 3),
    (10, 0.0, 0), (100, 0.2, 20),
])
def test_val_count(n, fraction, expected):
    assert val_count(n, fraction) == expected


# --- decoding and resizing -----------------------------------------------------------------


def hwc(t):
    return t.permute(1, 2, 0).numpy().astype(int)


def test_pad_keeps_aspect_with_black_centred_bars(tmp_path):
    solid((40, 20), (200, 150, 100)).save(tmp_path / "wide.png")
    image = hwc(load_image(tmp_path / "wide.png", 32, 24, "pad"))
    # scale min(24/40, 32/20) = 0.6 -> content 24 x 12, rows 10..21
    assert (image[:10] == 0).all() and (image[22:] == 0).all()
    assert (np.abs(image[10:22] - [200, 150, 100]) <= 1).all()

    solid((20, 60), (200, 150, 100)).save(tmp_path / "tall.png")
    image = hwc(load_image(tmp_path / "tall.png", 32, 24, "pad"))
    # scale min(24/20, 32/60) = 0.533 -> content 11 wide x 32 tall, columns 6..16
    assert (image[:, :6] == 0).all() and (image[:, 17:] == 0).all()
    assert (np.abs(image[:, 6:17] - [200, 150, 100]) <= 1).all()


def thirds(path):
    """60 x 20: red, green, blue thirds."""
    image = solid((60, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))
    image.paste((0, 255, 0), (20, 0, 40, 20))
    image.save(path)


def test_stretch_and_center_crop_content(tmp_path):
    thirds(tmp_path / "thirds.png")
    red, green, blue = [255, 0, 0], [0, 255, 0], [0, 0, 255]

    stretched = hwc(load_image(tmp_path / "thirds.png", 32, 24, "stretch"))
    assert (np.abs(stretched[:, :6] - red) <= 2).all()
    assert (np.abs(stretched[:, 10:14] - green) <= 2).all()
    assert (np.abs(stretched[:, 18:] - blue) <= 2).all()

    # cover: crop 15 x 20 from the centre of the green third -> all green
    cropped = hwc(load_image(tmp_path / "thirds.png", 32, 24, "center-crop"))
    assert (np.abs(cropped - green) <= 2).all()

    halves((24, 64), (255, 0, 0), (0, 0, 255)).save(tmp_path / "tall.png")
    cropped = hwc(load_image(tmp_path / "tall.png", 16, 24, "center-crop"))
    assert (np.abs(cropped[:, :10] - red) <= 2).all() and (np.abs(cropped[:, 14:] - blue) <= 2).all()


def test_modes_convert_to_rgb(tmp_path):
    halves((8, 8), (255, 0, 0, 255), (255, 255, 255, 0), "RGBA").save(tmp_path / "rgba.png")
    image = hwc(load_image(tmp_path / "rgba.png", 8, 8, "stretch"))
    assert (image[:, :4] == [255, 0, 0]).all() and (image[:, 4:] == 0).all()  # on black

    solid((8, 8), (0, 0, 255, 128), "RGBA").save(tmp_path / "half.png")
    assert (np.abs(hwc(load_image(tmp_path / "half.png", 8, 8, "stretch")) - [0, 0, 128]) <= 1).all()

    palette_image(tmp_path / "palette.png")
    assert Image.open(tmp_path / "palette.png").info.get("transparency") == 0
    image = hwc(load_image(tmp_path / "palette.png", 10, 10, "stretch"))
    assert (image[:, :5] == 0).all() and (image[:, 5:] == [0, 255, 0]).all()

    solid((8, 8), 77, "L").save(tmp_path / "gray.png")
    assert (hwc(load_image(tmp_path / "gray.png", 8, 8, "stretch")) == 77).all()

    solid((16, 16), (0, 255, 255, 0), "CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert (np.abs(hwc(load_image(tmp_path / "cmyk.jpg", 8, 8, "stretch")) - [255, 0, 0]) <= 8).all()


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.empty((8, 8), dtype=np.uint16)
    values[:, :4], values[:, 4:] = 65535, 40 * 257
    values[0, 0] = 32896  # 128 * 257
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    image = hwc(load_image(tmp_path / "deep.png", 8, 8, "stretch"))
    assert image[0, 0].tolist() == [128, 128, 128]
    assert (image[1:, :4] == 255).all() and (image[:, 4:] == 40).all()

    wide = Image.fromarray(np.array([[0, 257, 65535, 70000]], dtype=np.int32))
    assert wide.mode == "I"
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 1, 255, 255]


def test_exif_orientation_is_applied(tmp_path):
    exif_oriented_jpeg(tmp_path / "rotated.jpg")
    image = hwc(load_image(tmp_path / "rotated.jpg", 40, 20, "stretch"))
    # displayed 20 wide x 40 tall; the stored top-left block is now top-right
    assert (np.abs(image[2:8, 12:18] - [255, 0, 0]) <= 30).all()
    assert (np.abs(image[2:8, 2:8] - [255, 255, 255]) <= 30).all()


def test_large_jpeg_is_downscaled_while_decoding(tmp_path):
    halves((800, 1200), (255, 0, 0), (0, 0, 255)).save(tmp_path / "big.jpg", quality=95)
    image = hwc(load_image(tmp_path / "big.jpg", 64, 48, "pad"))
    assert image.shape == (64, 48, 3)
    # 800 x 1200 -> 43 x 64 content at columns 2..44
    assert (image[:, :2] == 0).all() and (image[:, 45:] == 0).all()
    assert (np.abs(image[:, 4:18] - [255, 0, 0]) <= 8).all()
    assert (np.abs(image[:, 26:42] - [0, 0, 255]) <= 8).all()


# --- CSV sources and errors --------------------------------------------------------------------


def test_csv_source_with_relative_and_absolute_paths(tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        solid((10, 20), (i * 50, 0, 0)).save(images / f"a{i}.png")
        solid((10, 20), (0, i * 50, 0)).save(images / f"b{i}.png")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "local.png").write_bytes(b"")
    rows = ["path,label"]
    rows += [f"../images/a{i}.png,Dries Van Noten" for i in range(3)]
    rows += [f"{images / f'b{i}.png'},Comme des Garçons" for i in range(3)]
    rows += ["local.png,Comme des Garçons", "../images/missing.png,Dries Van Noten",
             "../images/a0.png,Dries Van Noten"]
    (lists / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")

    root = tmp_path / "root"
    with caplog.at_level(logging.WARNING, logger="fgvc"):
        meta = ingest(lists / "labels.csv", root, height=16, width=12, val_fraction=0.34, progress=False)
    assert read_label_map(root) == {0: "Comme des Garçons", 1: "Dries Van Noten"}
    assert meta["source_kind"] == "csv"
    assert validate_root(root).class_counts == {"train": [2, 2], "val": [1, 1]}
    assert {s["path"] for s in meta["skipped"]} == {"local.png", "../images/missing.png"}
    assert meta["ignored"]["duplicate_rows"] == 1
    assert "missing.png" in caplog.text


def test_csv_with_conflicting_labels_or_bad_header_is_refused(tmp_path):
    (tmp_path / "a.csv").write_text("path,label\nx.png,A\nx.png,B\n", encoding="utf-8")
    with pytest.raises(ValueError, match="labelled both 'A' and 'B'"):
        ingest(tmp_path / "a.csv", tmp_path / "root", progress=False)
    (tmp_path / "b.csv").write_text("file,designer\nx.png,A\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"b\.csv.*path,label"):
        ingest(tmp_path / "b.csv", tmp_path / "root", progress=False)


def test_unknown_source_kinds_are_refused(tmp_path):
    (tmp_path / "list.txt").write_text("x")
    with pytest.raises(ValueError, match=r"list\.txt: unknown source kind"):
        ingest(tmp_path / "list.txt", tmp_path / "root", progress=False)
    with pytest.raises(ValueError, match=r"nowhere: source does not exist"):
        ingest(tmp_path / "nowhere", tmp_path / "root", progress=False)
    flat = tmp_path / "flat"
    flat.mkdir()
    solid((4, 4), (0, 0, 0)).save(flat / "x.png")
    with pytest.raises(ValueError, match=r"flat: no designer folders"):
        ingest(flat, tmp_path / "root", progress=False)


def test_root_inside_source_is_refused(tree):
    with pytest.raises(ValueError, match="must not be inside the source"):
        ingest(tree, tree / "out", progress=False)
    with pytest.raises(ValueError, match="must not be inside the source"):
        ingest(tree, tree, progress=False)
    assert not (tree / "out").exists()


def test_bad_arguments_are_refused(tree, tmp_path):
    with pytest.raises(ValueError, match="resize policy"):
        ingest(tree, tmp_path / "root", resize="zoom", progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        ingest(tree, tmp_path / "root", val_fraction=1.0, progress=False)
