"""The leak a random split of runway data has, reproduced on the demo: the same looks split at
random (a validation look has show-mates in training) and split by show; fn-small trained the
same way on both scores higher on the random split, on the photos and on their backdrops alone.
The study measures it (`--splits random,show`): the show-leak column, its intervals, and the
verdict that holds only on the leaky split.

Setting (stated, fixed): 4 designers, 32 train + 16 val looks each, 8 looks per show, 24x18,
bg_correlation 0 (a venue says nothing about the designer across shows), collection_spread 0.8
(each show's collection departs far from the designer's signature, as seasons do), demo seed
0; fn-small from random init (seed 0), Adam lr 3e-3, batch 16, 10 epochs, one CPU thread.
Intervals: 95 % percentile bootstrap over the 64 validation images (fgvc.analysis.stats).
"""

from __future__ import annotations

import dataclasses
import math

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from fgvc.analysis.stats import bootstrap_mean
from fgvc.data.demo import DemoConfig, generate_demo, render_pool
from fgvc.data.resplit import resplit_root
from fgvc.data.shards import read_meta
from fgvc.devices import intra_op_threads
from fgvc.errors import ConfigError
from fgvc.models.factory import create_model
from fgvc.study.config import Cell, StudyConfig
from fgvc.study.leak import annotate_summary, leak_paragraph, leak_table, show_leak
from fgvc.study.pairing import interval_text
from fgvc.study.render import markdown_tables, report_tables, terminal_table
from fgvc.study.tables import GARMENT, NO_VERDICT, RUNWAY, UNDECIDED, summarize

LEAK = DemoConfig(num_designers=4, train_per_class=32, val_per_class=16, height=24, width=18, looks_per_show=8,
                  bg_correlation=0.0, collection_spread=0.8, seed=0)


def train_and_score(cfg: DemoConfig) -> dict[str, torch.Tensor]:
    """Per validation image: is the photo classified right, is its backdrop alone (the same
    shot without the person) classified as the designer."""
    pool = render_pool(cfg, backdrops=True)
    train, val = pool["members"]["train"], pool["members"]["val"]
    images, backdrops = pool["images"].float() / 255, pool["backdrops"].float() / 255
    labels = pool["labels"]
    torch.manual_seed(0)
    model = create_model("fn-small", cfg.num_designers, pretrained=False, image_size=(cfg.height, cfg.width))
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(10):
        model.train()
        order = train[torch.randperm(len(train))]
        for start in range(0, len(order), 16):
            batch = order[start:start + 16]
            loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.inference_mode():
        return {"photo": (model(images[val]).argmax(1) == labels[val]).float(),
                "backdrop": (model(backdrops[val]).argmax(1) == labels[val]).float()}


@pytest.mark.slow
def test_a_random_split_leaks_the_show_and_a_show_split_does_not():
    with intra_op_threads(1):
        leaky = train_and_score(dataclasses.replace(LEAK, split_by="random"))
        clean = train_and_score(dataclasses.replace(LEAK, split_by="show"))
    for view in ("photo", "backdrop"):
        random_split = bootstrap_mean(leaky[view], seed=0)
        show_split = bootstrap_mean(clean[view], seed=0)
        print(f"{view}: random split {random_split.estimate:.3f} [{random_split.low:.3f}, {random_split.high:.3f}], "
              f"show split {show_split.estimate:.3f} [{show_split.low:.3f}, {show_split.high:.3f}]")
        assert random_split.low > show_split.high, view


# --- the study over both splits -------------------------------------------------------------

def test_a_study_over_both_splits_runs_every_cell_on_each():
    plan = StudyConfig(splits=("random", "show"), regimes=("unmasked", "masked")).plan()
    assert [c.key for c in plan.cells()] == [
        "fn-small/unmasked/seed0/random-split", "fn-small/masked/seed0/random-split",
        "fn-small/unmasked/seed0/show-split", "fn-small/masked/seed0/show-split"]
    assert plan.cells()[0].run_name == "fn-small-unmasked-s0-random-split"
    assert plan.data() == [(None, "random"), (None, "show")]
    assert plan.demo_for(None, "random") == dataclasses.replace(plan.demo, split_by="random")
    assert [c.key for c in StudyConfig(regimes=("unmasked",)).plan().cells()] == ["fn-small/unmasked/seed0"]
    with pytest.raises(ConfigError, match="lists a value twice"):
        StudyConfig(splits=("random", "random"))
    with pytest.raises(ConfigError, match="'leaky'"):
        StudyConfig(splits=("leaky", "show"))


def leak_rows(random_correct: float, show_correct: float, verdicts: tuple[str, str], seeds=(0,)):
    """fn-small unmasked on the random and the show split: per-image correctness (64 images on
    each split, different images) and the swap test's columns."""
    g = torch.Generator().manual_seed(3)
    rows, per_image = [], {}
    for seed in seeds:
        for split, p, v in (("random", random_correct, verdicts[0]), ("show", show_correct, verdicts[1])):
            run, cell = f"run-{split}-{seed}", Cell("fn-small", "unmasked", seed, None, split)
            rows.append({"arch": "fn-small", "regime": "unmasked", "bg_correlation": None, "split_by": split,
                         "seed": seed, "cell": cell.key, "run_id": run, "run_name": cell.run_name,
                         "status": "trained", "verdict": v, "verdict_reason": "No-FG ...", "split": "val"})
            offset = 0 if split == "random" else 1000  # different validation images
            correct = (torch.rand(64, generator=g) < p).float().tolist()
            index = list(range(offset, offset + 64))
            per_image[(cell.key, "gradcam")] = {"dataset_index": index, "correct": correct}
            per_image[(cell.key, "shortcut")] = {"dataset_index": index, "correct_no_fg": correct,
                                                 "correct_mixed_same": correct, "correct_mixed_rand": [0.0] * 64}
    return rows, per_image


def test_the_show_leak_is_random_minus_show_and_says_when_a_verdict_holds_only_on_the_random_split():
    rows, per_image = leak_rows(0.9, 0.3, (RUNWAY, UNDECIDED))
    [entry] = show_leak(rows, per_image)
    leaky, clean = rows
    assert leaky["cell"] == "fn-small/unmasked/seed0/random-split"
    mean = lambda row, column: sum(per_image[(row["cell"], "gradcam")][column]) / 64  # noqa: E731
    assert entry["leak_acc"] == pytest.approx(mean(leaky, "correct") - mean(clean, "correct"))
    assert 0.4 < entry["leak_acc_low"] < entry["leak_acc"] < entry["leak_acc_high"] < 0.8
    assert entry["leak_bg_gap"] == pytest.approx(entry["leak_acc"])  # Mixed-Rand all wrong: BG-gap = correctness
    assert leaky["leak_acc"] == clean["leak_acc"] == entry["leak_acc"]
    assert entry["only_on_random_split"] == 1 and entry["verdict_show"] == UNDECIDED
    assert leaky["leak_note"] == "holds only on the random split"
    assert leaky["verdict_reason"].endswith(f"Holds only on the random split, where validation looks have "
                                            f"show-mates in training: on the show split the same cell says "
                                            f"'{UNDECIDED}'")
    assert "leak_note" not in clean and clean["verdict_reason"] == "No-FG ..."
    assert entry["show_leak"].startswith(f"acc +{entry['leak_acc']:.3f} [+") and "; BG-gap +" in entry["show_leak"]
    # the tables: a show-leak column, a split column, the leak table after the summary
    summary = summarize(rows)
    annotate_summary(summary, [entry])
    assert [s["split_by"] for s in summary] == ["random", "show"]
    assert summary[1]["leak_acc_low"] == entry["leak_acc_low"] and summary[0]["leak_bg_gap"] == entry["leak_bg_gap"]
    tables = report_tables(rows, summary, 0.25, extra=[leak_table([entry])])
    assert [t.title for t in tables] == ["Summary (one seed)", "Show leak (random split − show split, the same "
                                         "images)", "Cells (2)"]
    for table in (tables[0], tables[2]):
        assert "split" in table.header and "show leak, Δ acc" in table.header and "show leak, Δ BG-gap" in table.header
        at = table.header.index("show leak, Δ acc")
        assert [line[at] for line in table.body] == [interval_text(entry, "leak_acc", sign=True)] * 2
    assert tables[1].body[0][-3:] == [RUNWAY, UNDECIDED, "1/1"]
    assert f"{RUNWAY}; holds only on the random split" in tables[2].body[0]
    assert "holds only on the random split" in terminal_table(rows)
    assert "unpaired bootstrap" in markdown_tables(rows, summary, 0.25, extra=[leak_table([entry])])
    assert "In 1 of 1 the verdict holds only on the random split" in leak_paragraph([entry])


def test_results_csv_keeps_a_column_only_some_rows_have_and_no_spread_is_an_empty_cell(tmp_path):
    import csv

    from fgvc.files import write_csv

    rows, _ = leak_rows(0.6, 0.6, (GARMENT, GARMENT))
    rows[1]["leak_note"] = "holds only on the random split"  # the second row only
    summary = summarize(rows)
    write_csv(tmp_path / "results.csv", rows)
    write_csv(tmp_path / "summary.csv", summary)
    with open(tmp_path / "results.csv", newline="") as f:
        read = list(csv.DictReader(f))
    assert [r["leak_note"] for r in read] == ["", "holds only on the random split"]
    with open(tmp_path / "summary.csv", newline="") as f:
        first = next(csv.DictReader(f))
    assert first["val_acc_std"] == "" and "None" not in first.values()


def test_agreeing_splits_leave_the_verdicts_alone_and_seeds_widen_the_leak():
    rows, per_image = leak_rows(0.6, 0.6, (GARMENT, GARMENT))
    [entry] = show_leak(rows, per_image)
    assert entry["leak_acc_low"] < 0 < entry["leak_acc_high"] and entry["only_on_random_split"] == 0
    assert not any("leak_note" in r for r in rows) and "No verdict holds only" in leak_paragraph([entry])
    assert not any(r["verdict_reason"].endswith("'") for r in rows)
    rows, per_image = leak_rows(0.9, 0.3, (RUNWAY, NO_VERDICT), seeds=(0, 1))
    [entry] = show_leak(rows, per_image)
    assert entry["seeds"] == 2 and entry["only_on_random_split"] == 2 and entry["verdict_random"] == f"{RUNWAY} (2/2)"
    assert entry["leak_acc"] == pytest.approx(sum(r["leak_acc"] for r in rows[::2]) / 2)
    # both seeds analyse the same images of each split: each split's images drawn once per replicate for both
    from fgvc.analysis.stats import bootstrap_difference

    correct = lambda row: per_image[(row["cell"], "gradcam")]["correct"]  # noqa: E731
    crossed = bootstrap_difference([(correct(rows[0]), correct(rows[1])), (correct(rows[2]), correct(rows[3]))],
                                   seed=0, crossed=True)
    assert (entry["leak_acc_low"], entry["leak_acc_high"]) == pytest.approx((crossed.low, crossed.high))
    assert "crossed" in entry["interval"] and "crossed" in leak_table([entry]).note
    # a grid without the split axis has no leak
    plain = [dict(r, split_by=None) for r in leak_rows(0.9, 0.3, (RUNWAY, RUNWAY))[0]]
    assert show_leak(plain, per_image) == [] and not any("leak_acc" in r for r in plain)
    assert math.isnan(show_leak(leak_rows(0.9, 0.3, (RUNWAY, RUNWAY))[0], {})[0]["leak_acc"])


def test_a_root_is_dealt_again_by_the_other_rule_with_the_same_images(tmp_path):
    cfg = DemoConfig(num_designers=2, train_per_class=8, val_per_class=8, height=16, width=12, looks_per_show=4)
    generate_demo(tmp_path / "demo", cfg)
    assert resplit_root(tmp_path / "demo", "show") == tmp_path / "demo"
    other = resplit_root(tmp_path / "demo", "random", progress=False)
    assert other == tmp_path / "demo-random-split"
    meta = read_meta(other)
    assert meta["generator"] == {**read_meta(tmp_path / "demo")["generator"], "split_by": "random"}
    assert meta["split"]["by"] == "random" and meta["split"]["groups_in_two_splits"] > 0
    images = lambda root: sorted(bytes(t.numpy().tobytes()) for split in ("train", "val")  # noqa: E731
                                 for t in torch.load(root / split / "shard_000.pt", weights_only=True)["images"])
    assert images(other) == images(tmp_path / "demo")
    assert resplit_root(tmp_path / "demo", "random") == other  # built once


LEAK_STUDY = dict(splits=("random", "show"), archs=("fn-small",), regimes=("unmasked",), seeds=(0,), epochs=6,
                  batch_size=16, num_images=24)


@pytest.mark.slow
def test_the_study_measures_the_show_leak(tmp_path, mlflow_store):
    """LEAK's looks prepared by show; the study deals them again at random and trains fn-small on
    both (the study's own training recipe, 6 epochs), analysing 24 of the 64 validation images."""
    generate_demo(tmp_path / "leak", LEAK)
    with intra_op_threads(1):
        result = run_study_quietly(StudyConfig(data_root=str(tmp_path / "leak"), **LEAK_STUDY))
    leaky, clean = result.rows
    assert (leaky["split_by"], clean["split_by"]) == ("random", "show")
    for name in ("acc", "no_fg_acc", "bg_gap"):
        print(f"show leak {name}: {leaky[f'leak_{name}']:+.3f} [{leaky[f'leak_{name}_low']:+.3f}, "
              f"{leaky[f'leak_{name}_high']:+.3f}]; random {leaky[name]:.3f}, show {clean[name]:.3f}")
        assert leaky[f"leak_{name}_low"] <= leaky[f"leak_{name}"] <= leaky[f"leak_{name}_high"]
    assert leaky["leak_acc_low"] > 0 and leaky["leak_no_fg_acc"] > 0
    print(leaky["verdict"], "|", clean["verdict"], "|", leaky["verdict_reason"])
    client = MlflowClient()
    assert client.get_run(leaky["run_id"]).data.tags["fgvc.split_by"] == "random"
    assert client.get_run(leaky["run_id"]).data.params["data_root"].endswith("leak-random-split")
    assert "across_regimes/show_leak_acc" in client.get_run(clean["run_id"]).data.metrics
    report = mlflow.artifacts.load_text(f"runs:/{result.run_id}/study/report.html")
    assert "Show leak (random split − show split, the same images)" in report and "show leak, Δ BG-gap" in report
    assert "Show leak, random split minus show split" in report
    leak_csv = mlflow.artifacts.load_text(f"runs:/{result.run_id}/study/show_leak.csv")
    assert leak_csv.splitlines()[0].startswith("arch,regime,bg_correlation,seeds,leak_acc")
    params = client.get_run(result.run_id).data.params
    assert params["splits"] == "random,show" and params["splits_effective"] == "random,show"


def run_study_quietly(cfg: StudyConfig):
    from fgvc.tasks.study import run_study

    return run_study(cfg, progress=False)
