"""The iDesigner download as it comes: the duplicated outer folder, show codes in the file
names, show-disjoint splits recorded and checkable (`prepare --check`), and the demo's shows."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from test_ingest import root_digest

from fgvc.cli import main
from fgvc.data.demo import DemoConfig, generate_demo
from fgvc.data.ingest import ingest
from fgvc.data.roots import check_groups, groups_by_split
from fgvc.data.shards import read_meta, validate_root

DESIGNERS = {"bottega veneta": "Bottega", "chado ralph rucci": "Chado", "dolce & gabbana": "Dolce"}


def idesigner_tree(base, looks=(2, 5, 3, 6, 4, 2, 3), uncoded=3):
    """`designer_image_train_v2_cropped/designer_image_train_v2_cropped/<designer>/*.png`: per
    designer, shows of the given sizes with season codes (one haute-couture show), plus files
    without a code. Tall tiny PNGs, the colour set by designer."""
    outer = base / "designer_image_train_v2_cropped"
    inner = outer / "designer_image_train_v2_cropped"
    seasons = ["SS11DLR", "FW07DL", "HCFW10DLR", "RS12DLR", "PF13DL", "SS08DLR", "FW09DLR"]
    for d, (folder, short) in enumerate(DESIGNERS.items()):
        path = inner / folder
        path.mkdir(parents=True)
        colour = (60 + 80 * d, 40, 200 - 70 * d)
        for season, n in zip(seasons, looks, strict=False):
            for k in range(n):
                couture = "_HC" if season == "SS08DLR" else ""
                Image.new("RGB", (6, 10), colour).save(path / f"{season}_{short}{couture}_{k:04d}.png")
        for k in range(uncoded):
            Image.new("RGB", (6, 10), colour).save(path / f"{short}_{297 + k}.png")
    return outer


def test_the_download_as_it_comes_splits_by_show(tmp_path, caplog):
    outer = idesigner_tree(tmp_path)
    with caplog.at_level("INFO"):
        meta = ingest(outer, tmp_path / "root", height=16, width=12, val_fraction=0.25, progress=False)
    assert "holds a single folder 'designer_image_train_v2_cropped'" in caplog.text
    assert meta["ignored"]["followed_single_folder"] == "designer_image_train_v2_cropped"
    assert sorted(json.loads((tmp_path / "root" / "index_to_label.json").read_text()).values()) == sorted(DESIGNERS)
    split = meta["split"]
    assert split["by"] == "show"  # auto: 25 of 28 files per designer carry a code
    assert split["coded_files"] == 3 * 25 and split["uncoded_files"] == 3 * 3
    assert split["groups_in_two_splits"] == 0
    assert sum(split["groups"].values()) == 3 * (7 + 3)
    assert "SS08-HC" in {name.split("/")[1] for name in split["group_names"]}
    found = check_groups(tmp_path / "root")
    assert found["spanning"] == {} and found["by"] == "show"
    per_split = groups_by_split(tmp_path / "root")
    for designer in DESIGNERS:
        val = sum(g.startswith(designer + "/") for g in per_split["val"])
        # 28 images, target 7 in val; whole shows of up to 6 looks: within 3 of the target
        assert abs(val - 7) <= 3, (designer, val)
        assert split["groups_per_designer"][designer]["val"] >= 1
        assert split["groups_per_designer"][designer]["train"] >= 1


def test_a_random_split_of_the_same_files_is_caught_by_the_check(tmp_path):
    outer = idesigner_tree(tmp_path)
    meta = ingest(outer, tmp_path / "root", height=16, width=12, val_fraction=0.25, split_by="random",
                  progress=False)
    assert meta["split"]["by"] == "random" and meta["split"]["groups_in_two_splits"] > 0
    assert check_groups(tmp_path / "root")["spanning"]


def test_a_test_fraction_writes_a_show_disjoint_test_split(tmp_path):
    outer = idesigner_tree(tmp_path)
    meta = ingest(outer, tmp_path / "root", height=16, width=12, val_fraction=0.2, test_fraction=0.2,
                  progress=False)
    assert set(meta["counts"]) == {"train", "val", "test"} and meta["counts"]["test"] > 0
    assert validate_root(tmp_path / "root").counts == meta["counts"]
    assert check_groups(tmp_path / "root")["spanning"] == {}


# Obtained by running this ingest with the code as it stood before `ingest` was split into named
# steps, in the project's venv (see test_ingest.TREE_DIGEST).
SHOWS_DIGEST = "61093d8ca5ce1c6d4383fbc2709a37aa4cac2bdfec40def0ea4cad1fee022212"


def test_a_show_split_with_a_test_fraction_writes_the_same_bytes_as_before(tmp_path):
    """Shards (with their group ids), label map and meta.json (groups per split and designer)."""
    outer = idesigner_tree(tmp_path)
    ingest(outer, tmp_path / "root", height=16, width=12, val_fraction=0.2, test_fraction=0.2, shard_size=7,
           seed=3, progress=False)
    assert root_digest(tmp_path / "root", outer) == SHOWS_DIGEST


def test_a_csv_group_column_is_the_show(tmp_path):
    rows = ["path,label,group"]
    for k in range(12):
        Image.new("RGB", (6, 10), (k * 20, 0, 0)).save(tmp_path / f"{k}.png")
        rows.append(f"{k}.png,{'ab'[k % 2]},show{k // 4}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    meta = ingest(tmp_path / "list.csv", tmp_path / "root", height=16, width=12, val_fraction=0.3, progress=False)
    assert meta["split"]["by"] == "show" and meta["split"]["coded_files"] == 12
    assert check_groups(tmp_path / "root")["spanning"] == {}


def test_designers_with_one_show_are_named_in_a_warning_and_in_meta(tmp_path, caplog):
    """A designer whose photos are all from one show cannot have validation images without
    leaking the show: the log says which designers, and meta.json keeps the list."""
    rows = ["path,label,group"]
    for k in range(12):
        Image.new("RGB", (6, 10), (k * 20, 0, 0)).save(tmp_path / f"{k}.png")
        label, group = ("solo", "SS11") if k < 4 else ("duo", ["FW12", "RS13"][k % 2])
        rows.append(f"{k}.png,{label},{group}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    with caplog.at_level("WARNING"):
        meta = ingest(tmp_path / "list.csv", tmp_path / "root", height=16, width=12, val_fraction=0.3,
                      progress=False)
    assert meta["split"]["single_group_designers"] == ["solo"]
    assert meta["class_counts"]["val"] == {"duo": 4, "solo": 0}
    [line] = [r.getMessage() for r in caplog.records if "one show" in r.getMessage()]
    assert r"1 designer(s) have one show only" in line and "solo" in line and "duo" not in line


def test_csv_groups_and_show_codes_of_names_are_one_show(tmp_path):
    """`ss11` in a CSV's group column and `SS11` read from a file name are the same show."""
    rows = ["path,label,group"]
    for k in range(8):
        name = f"SS11DLR_a_{k}.png" if k < 4 else f"FW12DLR_a_{k}.png"
        Image.new("RGB", (6, 10), (k * 20, 0, 0)).save(tmp_path / name)
        rows.append(f"{name},a,{'ss11' if k % 2 else ''}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    meta = ingest(tmp_path / "list.csv", tmp_path / "root", height=16, width=12, val_fraction=0.5, progress=False)
    assert meta["split"]["group_names"] == ["a/FW12", "a/SS11"]
    assert check_groups(tmp_path / "root")["spanning"] == {}


def test_prepare_logs_the_split_and_check_says_whether_a_show_leaks(tmp_path, mlflow_store):
    import mlflow

    outer = idesigner_tree(tmp_path)
    runner = CliRunner()
    done = runner.invoke(main, ["prepare", "--source", str(outer), "--root", str(tmp_path / "shows"),
                                "--height", "16", "--width", "12", "--val-fraction", "0.25"])
    assert done.exit_code == 0, done.output
    assert "Split by show" in done.output and "no show spans two splits" in done.output
    run = mlflow.search_runs(experiment_names=["fgvc-data"], output_format="list")[0]
    assert run.data.params["split_by"] == "auto" and run.data.params["split_by_effective"] == "show"
    assert run.data.tags["fgvc.split_by"] == "show" and run.data.tags["fgvc.groups_in_two_splits"] == "0"
    assert "Split by show" in run.data.tags["mlflow.note.content"]
    assert run.data.metrics["data/val/groups"] >= 3

    clean = runner.invoke(main, ["prepare", "--check", str(tmp_path / "shows")])
    assert clean.exit_code == 0 and "no show spans two splits" in clean.output
    done = runner.invoke(main, ["prepare", "--source", str(outer), "--root", str(tmp_path / "random"),
                                "--height", "16", "--width", "12", "--split-by", "random"])
    assert done.exit_code == 0, done.output
    leaky = runner.invoke(main, ["prepare", "--check", str(tmp_path / "random")])
    assert leaky.exit_code == 1 and "span two splits" in leaky.output


# --- the demo's shows -----------------------------------------------------------------------

SHOWS = DemoConfig(num_designers=3, train_per_class=16, val_per_class=8, test_per_class=8, height=32, width=24,
                   looks_per_show=4, seed=5)


def everything(root):
    from fgvc.data.shards import load_shard, shards_of

    out = {}
    for split in ("train", "val", "test"):
        shards = [load_shard(p) for p in shards_of(root, split)]
        out[split] = {k: torch.cat([s[k] for s in shards]) for k in ("images", "labels", "venues", "groups")}
    return out


def test_demo_shows_split_whole_or_at_random_from_the_same_images(tmp_path):
    by_show, at_random = tmp_path / "show", tmp_path / "random"
    generate_demo(by_show, SHOWS)
    generate_demo(at_random, dataclasses.replace(SHOWS, split_by="random"))
    a, b = everything(by_show), everything(at_random)
    for split, n in (("train", 48), ("val", 24), ("test", 24)):
        assert len(a[split]["labels"]) == len(b[split]["labels"]) == n
        assert torch.bincount(a[split]["labels"]).tolist() == [n // 3] * 3
    pool = lambda items: sorted(bytes(x.numpy()) for s in items.values() for x in s["images"])  # noqa: E731
    assert pool(a) == pool(b)  # the same looks, split differently
    assert check_groups(by_show)["spanning"] == {}
    assert check_groups(at_random)["spanning"]
    meta = read_meta(by_show)["split"]
    assert meta["by"] == "show" and meta["groups"] == {"train": 12, "val": 6, "test": 6}
    # a show has one venue and one lighting: its looks share the venue id and the wall colour
    for split in ("train", "val"):
        items = a[split]
        for show in items["groups"].unique():
            members = items["groups"] == show
            assert items["venues"][members].unique().numel() == 1
            assert items["labels"][members].unique().numel() == 1


def test_a_masked_root_is_checked_against_the_split_it_was_made_from(tmp_path):
    import shutil

    outer = idesigner_tree(tmp_path)
    ingest(outer, tmp_path / "root", height=16, width=12, val_fraction=0.25, progress=False)
    shutil.copytree(tmp_path / "root", tmp_path / "masked")
    meta = read_meta(tmp_path / "root")
    (tmp_path / "masked" / "meta.json").write_text(json.dumps({"source": "mask", "source_meta": meta}))
    assert check_groups(tmp_path / "masked") == check_groups(tmp_path / "root")
    (tmp_path / "masked" / "meta.json").write_text(json.dumps({"source": "mask"}))
    with pytest.raises(Exception, match="records no groups"):
        check_groups(tmp_path / "masked")


def test_prepare_passes_the_split_rule_to_the_demo():
    from fgvc.data.config import PrepareConfig

    assert PrepareConfig().demo().split_by == "show"
    assert PrepareConfig(split_by="random", test_per_class=4, looks_per_show=3).demo() == dataclasses.replace(
        DemoConfig(), split_by="random", test_per_class=4, looks_per_show=3)


def test_the_kaggle_test_folder_is_sent_to_predict_not_ingested(tmp_path):
    from fgvc.data.sources import list_photos
    from fgvc.errors import ConfigError

    for k in (13455, 7):
        Image.new("RGB", (6, 10)).save(tmp_path / f"{k}.png")
    (tmp_path / "sample.csv").write_text("Id,Category\n13455,a\n7,a\n")
    with pytest.raises(ConfigError, match="unlabelled test folder.*--unlabelled-test .*`fgvc predict --source "):
        ingest(tmp_path, tmp_path.parent / "root-of-test", height=16, width=12, progress=False)
    assert [(p.key, p.path.name) for p in list_photos(tmp_path)] == [("13455", "13455.png"), ("7", "7.png")]


def test_an_ingested_root_is_dealt_again_from_its_source(tmp_path):
    """`study --splits random,show` on a root prepared by show: the same files ingested again at
    random into a sibling root; a source that is gone is named in one line."""
    from fgvc.data.resplit import resplit_root
    from fgvc.errors import FgvcError

    outer = idesigner_tree(tmp_path)
    ingest(outer, tmp_path / "root", height=16, width=12, val_fraction=0.25, progress=False)
    assert resplit_root(tmp_path / "root", "show") == tmp_path / "root"
    other = resplit_root(tmp_path / "root", "random", progress=False)
    assert other == tmp_path / "root-random-split"
    mine, theirs = read_meta(tmp_path / "root"), read_meta(other)
    assert theirs["split"]["by"] == "random" and theirs["split"]["groups_in_two_splits"] > 0
    assert theirs["split"]["group_names"] == mine["split"]["group_names"]
    for split in ("train", "val"):  # the same share per designer, other files
        assert theirs["class_counts"][split] == mine["class_counts"][split]
    assert resplit_root(tmp_path / "root", "random") == other  # built once
    import shutil

    shutil.rmtree(outer)
    shutil.rmtree(other)
    with pytest.raises(FgvcError, match="was prepared from .*designer_image_train_v2_cropped, which is not there "
                                        "any more: splitting the same images by random deals them again from there"):
        resplit_root(tmp_path / "root", "random")


def test_the_kaggle_test_folder_is_kept_beside_the_splits_unlabelled_keyed_by_id(tmp_path):
    from fgvc.data.shards import splits_of
    from fgvc.data.unlabelled import unlabelled_batches
    from fgvc.study.tables import report_split

    outer = idesigner_tree(tmp_path)
    test = tmp_path / "designer_image_test_v2_cropped"
    test.mkdir()
    for k, colour in ((13455, (200, 10, 10)), (7, (10, 200, 10))):
        Image.new("RGB", (6, 10), colour).save(test / f"{k}.png")
    (test / "31.png").write_bytes(b"not a png")
    (test / "sample.csv").write_text("Id,Category\n13455,a\n31,a\n7,a\n99,a\n")
    root = tmp_path / "root"
    done = CliRunner().invoke(main, ["prepare", "--source", str(outer), "--root", str(root), "--height", "16",
                                     "--width", "12", "--unlabelled-test", str(test)])
    assert done.exit_code == 0, done.output
    record = read_meta(root)["unlabelled_test"]
    assert record["ids"] == ["13455", "7"] and record["count"] == 2 and record["keyed_by"] == "Id"
    assert [s["id"] for s in record["skipped"]] == ["31", "99"]
    assert record["listed_ids"] == ["13455", "31", "7", "99"]  # every Id, in sample.csv's order
    assert "missing or not a regular file" in record["skipped"][1]["error"]
    assert ("Unlabelled test set: 2 photo(s) keyed by Id in unlabelled-test/ (2 listed in sample.csv unreadable"
            in done.output)
    # not a split: nothing trains, selects or reports on it
    assert splits_of(root) == ["train", "val"] and report_split(root) == "val"
    validate_root(root)
    [(ids, images)] = list(unlabelled_batches(root))
    assert ids == ["13455", "7"] and images.shape == (2, 3, 16, 12) and images.dtype == torch.uint8
    assert images[0, 0].float().mean() > 150 and images[1, 1].float().mean() > 150  # in sample.csv's order
    # a folder without sample.csv: one line, nothing written
    refused = CliRunner().invoke(main, ["prepare", "--source", str(outer), "--root", str(tmp_path / "other"),
                                        "--unlabelled-test", str(outer)])
    assert refused.exit_code != 0 and "needs sample.csv (column Id)" in refused.output
    assert not (tmp_path / "other").exists()


def test_unlabelled_shards_past_a_thousand_are_read_in_numeric_order(tmp_path):
    """shard_1000.pt sorts before shard_999.pt as text; Ids must stay with their photos."""
    from fgvc.data.shards import save_tensors, shard_name, write_json
    from fgvc.data.unlabelled import FOLDER, unlabelled_batches

    numbers = [99, 100, 101, 999, 1000, 1001]
    (tmp_path / FOLDER).mkdir()
    for k in numbers:  # photo k of shard k: every pixel k % 256, Id "id<k>"
        images = torch.full((1, 3, 4, 3), k % 256, dtype=torch.uint8)
        save_tensors({"images": images}, tmp_path / FOLDER / shard_name(k))
    ids = [f"id{k}" for k in numbers]
    write_json(tmp_path / "meta.json", {"unlabelled_test": {"ids": ids, "count": len(ids), "skipped": []}})
    read = [(key, int(images[j, 0, 0, 0])) for keys, images in unlabelled_batches(tmp_path)
            for j, key in enumerate(keys)]
    assert read == [(f"id{k}", k % 256) for k in numbers]
