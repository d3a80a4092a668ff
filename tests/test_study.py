"""`study`: the grid, the parent and child runs, reuse of finished cells, the tables, the report,
and the records its numbers come from."""

from __future__ import annotations

import base64
import csv
import io
import math
import os
from html.parser import HTMLParser

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from stores import new_store

from fgvc.analysis.config import AnalyzeConfig
from fgvc.data.demo import DemoConfig
from fgvc.errors import ConfigError
from fgvc.regimes import REGIMES
from fgvc.study.config import PRESETS, Cell, StudyConfig
from fgvc.study.render import markdown_tables, report_tables
from fgvc.study.tables import (
    DID_NOT_LEARN,
    GARMENT,
    LEARNED,
    NO_DATA,
    NO_DATA_VERDICT,
    NO_VERDICT,
    QUALITY_FACTOR,
    RUNWAY,
    UNDECIDED,
    add_comparisons,
    attribution_vs_swap,
    columns,
    regime_pairs,
    report_split,
    summarize,
    verdict,
)
from fgvc.tasks.analyze import run_analyze
from fgvc.tasks.study import run_study
from fgvc.tasks.study_cell import train_config
from fgvc.tasks.study_roots import demo_root_for
from fgvc.viz.report import Example, build_report, save_dose_response, save_regime_bars, save_reliance_scatter

torch.set_num_threads(1)

TINY_DEMO = dict(num_designers=3, train_per_class=8, val_per_class=4, test_per_class=4, height=32, width=24)
TINY_ARGS = ["--num-designers", "3", "--train-per-class", "8", "--val-per-class", "4", "--test-per-class", "4",
             "--height", "32", "--width", "24", "--epochs", "1", "--batch-size", "8", "--num-images", "6"]
KEY_COLUMNS = ["arch", "regime", "bg_correlation", "split_by", "seed", "cell", "run_name", "run_id", "status", "model",
               "chance"]


def tiny_study(**overrides) -> StudyConfig:
    opts = dict(epochs=1, batch_size=8, num_images=6, **TINY_DEMO)
    opts.update(overrides)
    return StudyConfig(**opts)


def children(parent_id: str) -> list:
    experiment_id = MlflowClient().get_run(parent_id).info.experiment_id
    return MlflowClient().search_runs([experiment_id], f"tags.`fgvc.study` = '{parent_id}'")


def artifact_text(run_id: str, path: str) -> str:
    return mlflow.artifacts.load_text(f"runs:/{run_id}/{path}")


class _Links(HTMLParser):
    """Every src/href attribute and every tag name of a page."""

    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.refs += [(tag, k, v or "") for k, v in attrs if k in ("src", "href", "srcset", "data", "action")]


def assert_self_contained(page: str) -> int:
    """No reference leaves the page; every image is a decodable inline PNG. Returns the image count."""
    links = _Links()
    links.feed(page)
    assert not {"script", "link", "iframe", "object", "embed"} & links.tags
    assert "url(" not in page and "@import" not in page
    images = 0
    for tag, attr, value in links.refs:
        assert tag == "img" and attr == "src", (tag, attr, value[:80])
        assert value.startswith("data:image/png;base64,"), value[:80]
        assert base64.b64decode(value.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
        images += 1
    return images


# --- configuration ------------------------------------------------------------------------

def test_presets_fill_the_grid_and_single_params_override_them():
    quick = StudyConfig().plan()
    assert quick.archs == ("fn-small",) and quick.regimes == REGIMES.names() and quick.seeds == (0,)
    assert [c.key for c in quick.cells()] == [f"fn-small/{r}/seed0" for r in REGIMES.names()]
    full = StudyConfig(preset="full").plan()
    assert full.archs == ("resnet18", "resnet34", "fn-small", "fn-medium") and full.seeds == (0, 1, 2)
    # both presets report on a test split; the full preset's demo is the default demo with one
    assert len(full.cells()) == 4 * 4 * 3 and full.demo == DemoConfig(test_per_class=40)
    assert quick.demo.test_per_class == 10 and quick.demo.splits == ("train", "val", "test")
    assert DemoConfig().test_per_class == 0  # `fgvc prepare`'s default demo is unchanged
    mine = StudyConfig(preset="full", archs=("fn-small",), regimes=("masked",), epochs=2, num_designers=4).plan()
    assert mine.archs == ("fn-small",) and mine.regimes == ("masked",) and mine.epochs == 2
    assert mine.seeds == (0, 1, 2) and mine.demo == DemoConfig(num_designers=4, test_per_class=40)
    assert StudyConfig(test_per_class=0).plan().demo.splits == ("train", "val")
    assert mine.cells()[0].spec.masked and mine.cells()[0].spec.augment is None
    dose = StudyConfig(bg_correlations=(0.0, 1.0), regimes=("unmasked",)).plan()
    assert [c.key for c in dose.cells()] == ["fn-small/unmasked/seed0/bg0", "fn-small/unmasked/seed0/bg1"]
    assert dose.demo_for(0.0).bg_correlation == 0.0


@pytest.mark.parametrize("overrides, message", [
    (dict(regimes=("unmasked", "bg-only")), "unknown regime.*'bg-only'|'bg-only' is not one of"),
    (dict(seeds=(0, 0)), r"--seeds \(seeds\): lists a value twice"),
    (dict(epochs=0), r"--epochs \(epochs\): must be positive"),
    (dict(bg_correlations=(0.5, 2.0)), "must be in \\[0, 1\\]"),
])
def test_bad_grids_are_refused(overrides, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        StudyConfig(**overrides)


def test_each_demo_configuration_has_its_own_root():
    assert str(demo_root_for(DemoConfig())) == "data/demo"
    assert str(demo_root_for(PRESETS["quick"]["demo"])) == "data/demo-quick"
    assert str(demo_root_for(PRESETS["full"]["demo"])) == "data/demo-full"  # not `prepare`'s data/demo
    other = demo_root_for(DemoConfig(num_designers=3))
    assert other.name.startswith("demo-") and other != demo_root_for(DemoConfig(num_designers=4))


# --- numbers, verdicts, figures, report ----------------------------------------------------

def fake_rows() -> list[dict]:
    rows = []
    for regime, acc, no_fg in (("unmasked", 0.9, 0.8), ("masked", 0.8, 0.2)):
        for seed, delta in ((0, -0.05), (1, 0.05)):
            row = {"arch": "fn-small", "regime": regime, "bg_correlation": None, "seed": seed,
                   "run_id": f"run-{regime}-{seed}", "status": "trained", "val_acc": acc + delta,
                   "val_balanced_acc": acc, "verdict": RUNWAY if regime == "unmasked" else GARMENT}
            for c in columns()[2:]:
                row[c.name] = no_fg if c.name == "no_fg_acc" else acc if c.name == "acc" else 0.5
                if c.interval:
                    row[f"{c.name}_low"], row[f"{c.name}_high"] = row[c.name] - 0.1, row[c.name] + 0.1
            row["precision_at_1"] = float("nan") if seed else 0.7
            rows.append(row)
    return rows


def test_summary_gives_mean_and_spread_across_seeds_and_no_spread_for_one():
    summary = summarize(fake_rows())
    assert [(s["arch"], s["regime"], s["seeds"]) for s in summary] == [("fn-small", "unmasked", 2),
                                                                      ("fn-small", "masked", 2)]
    assert summary[0]["val_acc_mean"] == pytest.approx(0.9)
    assert summary[0]["val_acc_std"] == pytest.approx(math.sqrt(2 * 0.05 ** 2))  # sample std
    assert summary[1]["no_fg_acc_mean"] == pytest.approx(0.2) and summary[1]["no_fg_acc_std"] == 0
    assert summary[0]["precision_at_1_mean"] == pytest.approx(0.7)  # the NaN seed is left out
    assert summary[0]["verdict"] == f"{RUNWAY} (2/2)"
    one = summarize(fake_rows()[:1])
    assert one[0]["val_acc_std"] is None and one[0]["no_fg_acc_low"] == pytest.approx(0.7)
    [table, _] = report_tables(fake_rows()[:1], one, chance=0.25)
    assert "±" not in " ".join(table.body[0]) and "[0.700, 0.900]" in " ".join(table.body[0])


@pytest.mark.parametrize("no_fg, gap, only_fg, expected", [
    ((0.6, 0.9), (0.1, 0.4), (0.2, 0.5), RUNWAY),     # backdrop alone above chance and a positive BG-gap
    ((0.0, 0.1), (-0.1, 0.1), (0.8, 1.0), GARMENT),   # the person alone suffices, no backdrop effect
    ((0.3, 0.9), (-0.2, 0.3), (0.8, 1.0), UNDECIDED),  # backdrop above chance but BG-gap's interval holds 0
    ((0.0, 0.2), (-0.1, 0.1), (0.0, 0.3), UNDECIDED),  # nothing above chance at all
])
def test_verdict_rules(no_fg, gap, only_fg, expected):
    row = {"no_fg_acc_low": no_fg[0], "no_fg_acc_high": no_fg[1], "bg_gap_low": gap[0], "bg_gap_high": gap[1],
           "only_fg_acc_low": only_fg[0], "only_fg_acc_high": only_fg[1]}
    assert verdict(row, chance=0.25) == expected


def test_report_is_self_contained_and_lists_every_cell(tmp_path):
    rows = fake_rows()
    summary = summarize(rows)
    figures = [Example("scatter", save_reliance_scatter(tmp_path / "a.png", rows, chance=0.25)),
               Example("bars", save_regime_bars(tmp_path / "b.png", summary, columns(), chance=0.25)),
               Example("dose", save_dose_response(tmp_path / "c.png", [{**s, "bg_correlation": b}
                                                                        for s in summary for b in (0.0, 1.0)]))]
    page = build_report("Study <x>", {"data": "demo & more"}, report_tables(rows, summary, 0.25), figures,
                        {"unmasked": [Example("gradcam <0>", figures[0].path)]}, notes=["a note"])
    assert assert_self_contained(page) == 4
    assert (tmp_path / "a.svg").read_text().lstrip().startswith(("<?xml", "<svg"))  # figures also as SVG
    for row in rows:
        assert row["run_id"] in page
    assert "0.900 ± 0.071" in page  # mean ± spread of val acc, unmasked
    assert "Study &lt;x&gt;" in page and "demo &amp; more" in page and "gradcam &lt;0&gt;" in page
    assert 'runway"' in page and 'garment"' in page  # verdict cells are coloured


# --- the quality gate, the masked twin, paired regime differences ---------------------------

def per_image_table(values: dict, indices=range(20)) -> dict:
    return {"dataset_index": list(indices), **{k: list(v) for k, v in values.items()}}


def test_a_cell_at_chance_level_did_not_learn(tiny_root):
    """A model whose output ignores the image (it names one designer for every look) is right
    on exactly that designer's share of the val images, 4 of 12 = chance, whatever its
    weights: no verdict, greyed, counted; a cell that learned keeps its verdict."""
    from fgvc.analysis.data import load_analysis_data

    val = load_analysis_data(tiny_root, "val", 12, 0)
    assert torch.bincount(val.labels).tolist() == [4, 4, 4]  # balanced: one designer is a third of the looks
    blind = torch.zeros_like(val.labels)  # the prediction of a model that ignores its input
    correct = (blind == val.labels).float().tolist()
    assert sum(correct) == 4
    chance = 1 / 3
    rows = [dict(fake_rows()[0], run_id="noise", run_name="noise", regime="masked", cell="noise"),
            dict(fake_rows()[0], run_id="good", run_name="good", regime="masked", seed=1, cell="good")]
    per_image = {("noise", "gradcam"): per_image_table({"correct": correct}, val.indices.tolist()),
                 ("good", "gradcam"): per_image_table({"correct": [1.0] * 12}, val.indices.tolist())}
    add_comparisons(rows, per_image, chance)
    noise, good = rows
    assert noise["acc_low"] <= QUALITY_FACTOR * chance, noise["acc"]
    assert noise["quality"] == DID_NOT_LEARN and noise["verdict"] == NO_VERDICT
    assert "does not clear 1.5 x chance" in noise["verdict_reason"]
    assert good["quality"] == LEARNED and good["verdict"] == RUNWAY
    summary = summarize(rows)
    assert summary[0]["did_not_learn"] == 1 and f"{NO_VERDICT} (1/2)" in summary[0]["verdict"]
    tables = report_tables(rows, summary, chance)
    cells = tables[-1]
    assert list(cells.muted) == [True, False]
    page = build_report("s", {}, tables, [], {})
    # one greyed cell, in each of the cells table's column groups
    assert page.count('<tr class="muted">') == len(cells.parts()) > 1 and "did not learn" in page
    markdown = markdown_tables(rows, summary, chance)
    assert f"| {DID_NOT_LEARN} | {NO_VERDICT} |" in markdown and "| _0.500 [0.400, 0.600]_ |" in markdown


def test_a_cell_whose_per_image_file_is_missing_has_no_data_not_a_verdict(mlflow_store, tmp_path, caplog):
    """An attribution record without its per_image.csv (a failed upload, a pruned artifact):
    the study warns naming the record and the file, the cell's quality is "undecided (no
    data)" (never "learned"), it gets no verdict, and the tables show and grey it."""
    from fgvc.study.records import CellResult
    from fgvc.study.render import terminal_table
    from fgvc.tasks import study_report

    client = MlflowClient()
    record = client.create_run(client.create_experiment("records")).info.run_id  # its files are gone
    cell = Cell("fn-small", "unmasked", 0)
    with caplog.at_level("WARNING", logger="fgvc"):
        per_image = study_report._per_image([CellResult(cell, "run-1", "trained", "models:/m/1", {},
                                                        {"gradcam": record})], tmp_path / "downloads")
    assert per_image == {}
    [warning] = [r.getMessage() for r in caplog.records if "per_image.csv" in r.getMessage()]
    assert f"analysis/gradcam/per_image.csv of run {record} unavailable" in warning
    assert f"study cell {cell.key} has no per-image gradcam numbers" in warning

    rows = [dict(fake_rows()[0], regime="unmasked", cell=cell.key, run_id="run-1", run_name=cell.run_name)]
    for key in ("acc", "acc_low", "acc_high"):
        rows[0].pop(key)
    add_comparisons(rows, per_image, chance=0.25)
    [row] = rows
    assert math.isnan(row["acc_low"])
    assert row["quality"] == NO_DATA and row["verdict"] == NO_DATA_VERDICT, (row["quality"], row["verdict"])
    assert "quality gate cannot be read" in row["verdict_reason"]
    summary = summarize(rows)
    assert summary[0]["no_data"] == 1 and summary[0]["verdict"] == f"{NO_DATA_VERDICT} (1/1)"
    cells = report_tables(rows, summary, 0.25)[-1]
    assert cells.body[0][cells.header.index("quality")] == NO_DATA and list(cells.muted) == [True]
    assert f"| {NO_DATA} | {NO_DATA_VERDICT} |" in markdown_tables(rows, summary, 0.25)
    assert NO_DATA in terminal_table(rows) and NO_DATA_VERDICT in terminal_table(rows)


def twin_rows(strength_excess: float) -> tuple[list[dict], dict]:
    """An unmasked cell whose background preference exceeds its masked twin's by
    ``strength_excess`` on every image (plus noise), and the swap-test correctness."""
    g = torch.Generator().manual_seed(1)
    base = torch.rand(20, generator=g) + 0.5
    rows, per_image = [], {}
    for regime, shift, no_fg in (("unmasked", strength_excess, 0.9), ("masked", 0.0, 0.2)):
        cell = Cell("fn-small", regime, 0, 1.0)
        rows.append({"arch": "fn-small", "regime": regime, "bg_correlation": 1.0, "seed": 0, "cell": cell.key,
                     "run_id": f"run-{regime}", "run_name": f"fn-small-{regime}", "status": "trained",
                     "verdict": UNDECIDED, "split": "test", "no_fg_acc_low": 0.1, "bg_gap_low": -0.1,
                     "only_fg_acc_low": 0.1})
        noise = 0.05 * torch.randn(20, generator=g)
        for method in ("gradcam", "occlusion"):
            per_image[(cell.key, method)] = per_image_table({"correct": [1.0] * 20,
                                                             "bg_preference": (base + shift + noise).tolist()})
        per_image[(cell.key, "shortcut")] = per_image_table({
            "correct_original": [1.0] * 20, "correct_no_fg": (torch.rand(20, generator=g) < no_fg).float().tolist(),
            "correct_mixed_same": [1.0] * 20, "correct_mixed_rand": [0.0 if regime == "unmasked" else 1.0] * 20})
    return rows, per_image


def test_attribution_is_referred_to_the_masked_twin_with_a_paired_interval():
    rows, per_image = twin_rows(0.3)
    differences = add_comparisons(rows, per_image, chance=0.2)
    unmasked, masked = rows
    assert unmasked["twin"] == "fn-small-masked" and masked["twin"] == ""
    for method in ("gradcam", "occlusion"):
        assert unmasked[f"{method}_excess"] == pytest.approx(0.3, abs=0.05)
        assert 0 < unmasked[f"{method}_excess_low"] < unmasked[f"{method}_excess_high"]
        assert math.isnan(masked[f"{method}_excess"])
    [difference] = differences
    assert difference["comparison"] == "unmasked − masked" and difference["seeds"] == 1
    assert difference["bg_gap"] == pytest.approx(1.0) and difference["acc_source"] == 0.0
    assert difference["no_fg_acc_low"] > 0
    none, _ = twin_rows(0.0)
    add_comparisons(none, twin_rows(0.0)[1], chance=0.2)
    assert none[0]["gradcam_excess_low"] < 0 < none[0]["gradcam_excess_high"]
    text = attribution_vs_swap(rows)
    assert "of 1 unmasked cells with a masked twin" in text and "gradcam's excess" in text
    titles = [t.title for t in report_tables(rows, summarize(rows), 0.2, differences)]
    assert titles == ["Summary (one seed)", "Paired regime differences (same source images)", "Cells (2)"]
    alone = [r for r in twin_rows(0.3)[0] if r["regime"] == "unmasked"]
    add_comparisons(alone, per_image, chance=0.2)
    assert alone[0]["twin"] == "none in the grid" and "no masked twin" in attribution_vs_swap(alone)


class RecordingClient:
    """What `tag_cells` writes, run by run, as the store keeps it (a later tag of the same name
    replaces the earlier; a metric's value is its last at step 0)."""

    def __init__(self):
        self.tags: dict[str, dict[str, str]] = {}
        self.metrics: dict[str, dict[str, float]] = {}

    def log_batch(self, run_id, metrics=(), tags=()):
        self.tags.setdefault(run_id, {}).update({t.key: t.value for t in tags})
        self.metrics.setdefault(run_id, {}).update({m.key: m.value for m in metrics})


def dose_grid(monkeypatch):
    """A dose-response grid at strengths 0 and 1, unmasked and masked, as `complete_rows` gets
    it: the two masked cells share one training (their roots are pixel-identical) but each has
    its own swap-test record, on its own strength's source images. Per-image files are served
    from memory in place of the records' artifacts. Returns (results, rows, records)."""
    from fgvc.files import write_csv
    from fgvc.study.records import CellResult
    from fgvc.tasks import study_report

    ones = lambda k, n=20: [1] * k + [0] * (n - k)  # noqa: E731 (k of 20 images right)
    # correct_original, correct_no_fg, correct_mixed_same, correct_mixed_rand per cell
    swap = {(0.0, "unmasked"): (ones(10), ones(4), ones(10), ones(10)),
            (0.0, "masked"): (ones(15), ones(3), ones(12), ones(14)),
            (1.0, "unmasked"): (ones(18), ones(16), ones(18), ones(6)),
            (1.0, "masked"): (ones(5), ones(9), ones(6), ones(12))}
    records, results, rows = {}, [], []
    for strength in (0.0, 1.0):
        for regime in ("unmasked", "masked"):
            cell = Cell("fn-small", regime, 0, strength)
            run = "run-masked" if regime == "masked" else f"run-unmasked-{strength:g}"
            original, no_fg, same, rand = swap[(strength, regime)]
            for method, table in (("gradcam", {"correct": original, "bg_preference": [1.0 + strength] * 20}),
                                  ("shortcut", {"correct_original": original, "correct_no_fg": no_fg,
                                                "correct_mixed_same": same, "correct_mixed_rand": rand})):
                records[(f"rec-{method}-{cell.key}", f"analysis/{method}/per_image.csv")] = \
                    {"dataset_index": list(range(20)), **table}
            results.append(CellResult(cell, run, "trained", f"models:/m/{run}", {},
                                      {m: f"rec-{m}-{cell.key}" for m in ("gradcam", "shortcut")}))
            rows.append({"arch": cell.arch, "regime": regime, "bg_correlation": strength, "split_by": None, "seed": 0,
                         "cell": cell.key, "run_name": cell.run_name, "run_id": run, "status": "trained",
                         "verdict": UNDECIDED, "no_fg_acc_low": 0.1 + strength / 2, "bg_gap_low": -0.1 + strength / 5,
                         "only_fg_acc_low": 0.5})

    def serve(record, artifact, dst, consequence=""):
        dst.mkdir(parents=True, exist_ok=True)
        return write_csv(dst / "per_image.csv", records[(record, artifact)])

    monkeypatch.setattr(study_report, "_download", serve)
    return results, rows, records


def test_cells_that_share_a_training_keep_their_own_records_tags_and_differences(tiny_root, monkeypatch):
    """The masked cells of strengths 0 and 1 share one training run; unmasked − masked at each
    strength is the difference of that strength's own two swap records (the regression: both
    strengths paired with strength 1's record), and the shared run carries each cell's verdict
    and comparison numbers under names of its own, one never replacing the other."""
    from fgvc.tasks.study_report import complete_rows

    results, rows, records = dose_grid(monkeypatch)
    roots = {(s, None): type("Roots", (), {"root": lambda self, cell: tiny_root})() for s in (0.0, 1.0)}
    client = RecordingClient()
    differences, leak = complete_rows(client, results, rows, roots, chance=0.25)
    assert leak == []
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    for strength in (0.0, 1.0):
        [difference] = [d for d in differences if d["bg_correlation"] == strength]
        assert difference["comparison"] == "unmasked − masked"
        first, second = (records[(f"rec-shortcut-fn-small/{r}/seed0/bg{strength:g}", "analysis/shortcut/per_image.csv")]
                         for r in ("unmasked", "masked"))
        gap = lambda t: mean(t["correct_mixed_same"]) - mean(t["correct_mixed_rand"])  # noqa: E731
        expected = {"acc_source": mean(first["correct_original"]) - mean(second["correct_original"]),
                    "no_fg_acc": mean(first["correct_no_fg"]) - mean(second["correct_no_fg"]),
                    "bg_gap": gap(first) - gap(second)}
        for name, value in expected.items():
            assert difference[name] == pytest.approx(value), (strength, name, difference[name], value)
    masked0, masked1 = rows[1], rows[3]
    assert masked0["acc"] == pytest.approx(0.75) and masked1["acc"] == pytest.approx(0.25)  # each its own record
    assert rows[0]["twin"] == masked0["run_name"] and rows[2]["twin"] == masked1["run_name"]
    assert rows[0]["gradcam_excess"] == pytest.approx(0.0) and rows[2]["gradcam_excess"] == pytest.approx(0.0)

    shared = client.tags["run-masked"]
    assert {k: v for k, v in shared.items() if k.startswith("fgvc.verdict")} == {
        "fgvc.verdict.bg0": masked0["verdict"], "fgvc.verdict.bg1": masked1["verdict"]}
    assert masked0["verdict"] != masked1["verdict"]  # two verdicts a single tag would have merged
    assert (shared["fgvc.quality.bg0"], shared["fgvc.quality.bg1"]) == (LEARNED, DID_NOT_LEARN)
    metrics = client.metrics["run-masked"]
    assert (metrics["across_regimes/val_acc.bg0"], metrics["across_regimes/val_acc.bg1"]) == pytest.approx((0.75, 0.25))
    assert "across_regimes/val_acc" not in metrics and "fgvc.verdict" not in shared
    for strength, row in ((0.0, rows[0]), (1.0, rows[2])):  # a run of one cell keeps the plain names
        run = f"run-unmasked-{strength:g}"
        assert client.tags[run]["fgvc.verdict"] == row["verdict"]
        assert client.metrics[run]["across_regimes/val_acc"] == pytest.approx(row["acc"])


def test_gather_reads_each_record_once_and_hands_plain_records_to_compute(tiny_root, monkeypatch, tmp_path):
    """Two cells whose training and swap record are shared (identical pixels): the record's
    per-image file is downloaded once and both cells get its table; the gathered records carry
    the training run's metrics and the reported split, and compute needs nothing else."""
    from types import SimpleNamespace

    from fgvc.files import write_csv
    from fgvc.study.records import CellResult
    from fgvc.study.results import compute
    from fgvc.tasks import study_report

    downloads = []

    def serve(record, artifact, dst, consequence=""):
        downloads.append((record, artifact))
        dst.mkdir(parents=True, exist_ok=True)
        correct = [1] * 18 + [0] * 2
        table = ({"correct": correct, "bg_preference": [1.0] * 20} if "shortcut" not in artifact else
                 {"correct_original": correct, "correct_no_fg": correct, "correct_mixed_same": correct,
                  "correct_mixed_rand": correct})
        return write_csv(dst / "per_image.csv", {"dataset_index": list(range(20)), **table})

    monkeypatch.setattr(study_report, "_download", serve)
    cells = [Cell("fn-small", "masked", 0, b) for b in (0.0, 1.0)]
    results = [CellResult(c, "run-masked", "trained", "models:/m/1", {"shortcut": {"acc_original": 0.9}},
                          {"gradcam": f"rec-gradcam-{c.key}", "shortcut": "rec-shortcut-shared"}) for c in cells]
    client = SimpleNamespace(get_run=lambda run_id: SimpleNamespace(data=SimpleNamespace(
        metrics={"best/val_acc": 0.85})))
    roots = {(b, None): SimpleNamespace(root=lambda cell: tiny_root) for b in (0.0, 1.0)}
    records = study_report.gather(client, results, roots)
    assert sorted(downloads) == sorted([("rec-shortcut-shared", "analysis/shortcut/per_image.csv"),
                                        *((f"rec-gradcam-{c.key}", "analysis/gradcam/per_image.csv") for c in cells)])
    assert records[0].per_image["shortcut"] == records[1].per_image["shortcut"]
    assert set(records[0].per_image) == {"gradcam", "shortcut"} and records[0].split == "val"
    assert records[0].train_metrics == {"best/val_acc": 0.85} and records[1].status == "trained"
    tables = compute(records, chance=1 / 3)
    assert [r["acc"] for r in tables.rows] == pytest.approx([0.9, 0.9])
    assert [r["val_acc"] for r in tables.rows] == [0.85, 0.85] and tables.split == "val"


def test_regime_pairs_and_the_reported_split(tiny_root, tmp_path):
    assert regime_pairs(list(REGIMES.names())) == [("unmasked", "masked"), ("unmasked+aug", "unmasked"),
                                                   ("unmasked+aug", "masked+aug"), ("masked+aug", "masked")]
    assert report_split(tiny_root) == "val"
    import shutil

    root = tmp_path / "with-test"
    shutil.copytree(tiny_root, root)
    shutil.copytree(root / "val", root / "test")  # a test split written with the shard writer's files
    assert report_split(root) == "test"
    assert columns("test")[2].header == "test acc, own images"


def test_intervals_say_what_they_cover():
    rows = fake_rows()
    summary = summarize(rows)
    [table, _] = report_tables(rows, summary, chance=0.25)
    assert table.title == "Summary across 2 seeds" and "seed-level 95% t-interval" in table.note
    one = fake_rows()[:1]
    [table, _] = report_tables(one, summarize(one), chance=0.25)
    assert table.title == "Summary (one seed)" and "images only" in table.note
    assert "do not cover training randomness" in table.note or "does not cover training randomness" in table.note


def test_analyze_prints_each_methods_headline_numbers_with_intervals():
    from fgvc.tasks.analyze import AnalysisOutcome, describe_outcome

    outcome = AnalysisOutcome("rec1", {"gradcam": {"num_images": 24.0, "bg_preference_mean": 0.818,
                                                   "bg_preference_mean_low": 0.756, "bg_preference_mean_high": 0.882},
                                       "shortcut": {"num_images": 24.0, "bg_gap": 0.25, "bg_gap_low": 0.1,
                                                    "bg_gap_high": 0.4, "chance": 0.2}},
                              {"gradcam": "a", "shortcut": "b"}, shown={"gradcam": True}, reused={"shortcut": "rec0"})
    text = describe_outcome(outcome)
    assert "analysis record run rec1" in text and "gradcam (shown on the training run; 24 images)" in text
    assert "bg_preference_mean" in text and "0.818 [0.756, 0.882]" in text
    assert "shortcut (record only, reused record rec0; 24 images)" in text and "0.250 [0.100, 0.400]" in text
    assert "chance" not in text  # a number without an interval is not a headline


# --- the study end to end ------------------------------------------------------------------

@pytest.fixture(scope="module")
def study_store(tmp_path_factory, store_template):
    """A tiny four-regime study, run through `fgvc study`, in a module-wide store."""
    store = tmp_path_factory.mktemp("study")
    mp = pytest.MonkeyPatch()
    mp.chdir(store)
    mp.setenv("MLFLOW_TRACKING_URI", new_store(store_template, store))
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    from fgvc.cli import main

    result = CliRunner().invoke(main, ["study", *TINY_ARGS], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # the terminal says what was found: the verdict table and the report's local path
    assert "verdict" in result.output and "fn-small-masked-s0" in result.output and "runs:/" not in result.output
    report = next(line for line in result.output.splitlines() if line.startswith("report: "))[len("report: "):]
    assert report.endswith("study/report.html") and os.path.isfile(report), result.output
    parent = mlflow.search_runs(experiment_names=["fgvc-study"], filter_string="tags.`fgvc.task` = 'study'")
    yield parent.run_id[0]
    mp.undo()


def test_study_run_holds_the_tables_figures_report_and_verdicts(study_store):
    client = MlflowClient()
    parent = client.get_run(study_store)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "study-quick"
    assert client.get_experiment(parent.info.experiment_id).name == "fgvc-study"
    p = parent.data.params
    assert p["preset"] == "quick" and p["archs"] == "auto" and p["archs_effective"] == "fn-small"
    assert p["segmenter_effective"] == "groundtruth" and p["cells"] == "4"
    assert p["data_root_effective"].endswith("data/" + demo_root_for(DemoConfig(**TINY_DEMO)).name)
    assert parent.data.metrics["study/cells_trained"] == 4 and parent.data.metrics["study/cells_reused"] == 0
    description = parent.data.tags["mlflow.note.content"]
    assert description.count("fn-small-") == 4
    assert any(v in description for v in ("reads the", "undecided", "no verdict (did not learn)"))
    assert "Attribution and the swap tests" in description
    files = {a.path for a in client.list_artifacts(study_store, "study")}
    assert files == {f"study/{f}" for f in ("results.csv", "results.md", "summary.csv", "report.html",
                                            "regime_differences.csv", "accuracy_vs_background_reliance.png",
                                            "accuracy_vs_background_reliance.svg", "regime_bars.png",
                                            "regime_bars.svg", "per_designer.csv", "backdrop_follow.png",
                                            "backdrop_follow.svg", "designers", "no_fg_confusion")}
    unmasked = [r for r in REGIMES.names() if not REGIMES.get(r).masked]
    for folder in ("designers", "no_fg_confusion"):  # one figure per unmasked cell (it has a masked twin)
        assert {a.path for a in client.list_artifacts(study_store, f"study/{folder}")} == \
            {f"study/{folder}/fn-small-{r}-s0.png" for r in unmasked}

    rows = list(csv.DictReader(io.StringIO(artifact_text(study_store, "study/results.csv"))))
    assert list(rows[0])[:len(KEY_COLUMNS)] == KEY_COLUMNS
    assert {"verdict", "no_fg_acc_low", "no_fg_acc_high", "bg_gap_low", "gradcam_bg_preference", "backdrop_follow",
            "backdrop_follow_low", "backdrop_follow_high", "backdrop_follow_twin", "backdrop_follow_vs_twin_low",
            "instruments"} <= set(rows[0])
    assert [(r["arch"], r["regime"], r["seed"]) for r in rows] == [("fn-small", r, "0") for r in REGIMES.names()]
    for row in rows:
        assert row["verdict"] in (RUNWAY, GARMENT, UNDECIDED, NO_VERDICT)
        assert row["split"] == "test" and row["quality"] in (LEARNED, DID_NOT_LEARN)  # the preset's test split
        low, rate, high = (float(row[f"backdrop_follow{end}"]) for end in ("_low", "", "_high"))
        assert 0 <= low <= rate <= high <= 1
        assert (row["verdict"] == NO_VERDICT) == (row["quality"] == DID_NOT_LEARN)
        assert float(row["no_fg_acc_low"]) <= float(row["no_fg_acc"]) <= float(row["no_fg_acc_high"])
        assert float(row["chance"]) == pytest.approx(1 / 3) and -1 <= float(row["bg_gap"]) <= 1
    summary = list(csv.DictReader(io.StringIO(artifact_text(study_store, "study/summary.csv"))))
    assert [s["regime"] for s in summary] == list(REGIMES.names()) and {"no_fg_acc_mean", "verdict"} <= set(summary[0])
    markdown = artifact_text(study_store, "study/results.md")
    assert "| fn-small | masked+aug |" in markdown and "No-FG acc" in markdown and "best/val_acc" in markdown

    page = artifact_text(study_store, "study/report.html")
    # 3 figures and the sanity curve, per unmasked cell its designers and No-FG confusion, 2 Grad-CAM + 2
    # occlusion examples per regime, the swap variants
    assert assert_self_contained(page) == 4 + 2 * len(unmasked) + 4 * len(REGIMES) + 1
    assert page.index("The answer, one line per cell") < page.index("<h2>Figures</h2>") < page.index("<details")
    for r in unmasked:  # one sentence per unmasked cell, beside chance and its twin
        assert f"fn-small-{r}-s0 (" in page
    assert page.count("it names the backdrop&#39;s designer in") == len(unmasked) and "; chance 33 %" in page
    assert "Sanity check (fn-small" in page and "excess vs masked twin" in page
    assert "32×24 (height × width)" in page and "planted shortcut strength" in page and "torch " in page
    assert "one seed" in page.lower() and "images only" in page
    for row in rows:
        assert row["run_id"] in page
    assert "No-FG" in page and "bounding" in page and "verdict" in page
    assert "Grad-CAM and occlusion can disagree" in page


def test_per_designer_csv_has_a_row_per_cell_and_designer_as_the_swap_records_count_them(study_store):
    """study/per_designer.csv, computed from the swap records' per-image tables, holds a row per
    cell and designer with the same numbers as each record's own per_designer.csv."""
    table = list(csv.DictReader(io.StringIO(artifact_text(study_store, "study/per_designer.csv"))))
    cells = {r.data.tags["fgvc.study_cell"]: r for r in children(study_store)}
    assert sorted((r["cell"], r["label"]) for r in table) == sorted((key, str(d)) for key in cells for d in range(3))
    for key, run in cells.items():
        record = run.data.tags["fgvc.analysis.shortcut"]
        own = list(csv.DictReader(io.StringIO(artifact_text(record, "analysis/shortcut/per_designer.csv"))))
        mine = [r for r in table if r["cell"] == key]
        assert [r["designer"] for r in mine] == [r["designer"] for r in own]
        for ours, theirs in zip(mine, own, strict=True):
            assert (ours["images"], ours["backdrop_swaps"]) == (theirs["images"], theirs["backdrop_swaps"]), key
            for column in ("acc_original", "acc_no_fg", "backdrop_follow"):
                assert (ours[column] == theirs[column] == "") or \
                    float(ours[column]) == pytest.approx(float(theirs[column])), (key, column)


def test_cells_are_child_runs_with_the_same_params_and_one_chart_line_each(study_store):
    client = MlflowClient()
    cells = children(study_store)
    experiment = client.get_run(study_store).info.experiment_id
    assert sorted(r.data.tags["fgvc.study_cell"] for r in cells) == sorted(f"fn-small/{r}/seed0"
                                                                        for r in REGIMES.names())
    assert {r.info.run_name for r in cells} == {f"fn-small-{r}-s0" for r in REGIMES.names()}
    assert {r.data.params["regime"] for r in cells} == set(REGIMES.names())  # one vocabulary everywhere
    assert {r.data.tags["fgvc.regime"] for r in cells} == set(REGIMES.names())
    assert len({frozenset(r.data.params) for r in cells}) == 1  # comparable side by side in the UI
    assert len({frozenset(r.data.metrics) for r in cells}) == 1
    # the study's experiment holds the study and its cells only, all top-level (the UI charts
    # top-level runs by default): one chart line per cell
    runs = client.search_runs([experiment])
    assert len(runs) == 1 + len(cells) and not any("mlflow.parentRunId" in r.data.tags for r in runs)
    metrics = cells[0].data.metrics
    for key in ("val/acc", "best/val_acc", "best/val_balanced_acc", "gradcam/bg_preference_mean",
                "occlusion/bg_preference_mean", "neighbors/precision_at_1", "shortcut/acc_no_fg", "shortcut/bg_gap"):
        assert key in metrics, key
    for cell in cells:  # the UI can filter and group by outcome; comparisons chart as bars (one step, 0)
        assert cell.data.tags["fgvc.verdict"] in (RUNWAY, GARMENT, UNDECIDED, NO_VERDICT)
        assert cell.data.tags["fgvc.quality"] in (LEARNED, DID_NOT_LEARN)
        assert cell.data.tags["fgvc.report_split"] == "test"
        for key in ("across_regimes/test_acc", "across_regimes/gradcam_excess_vs_masked_twin",
                    "across_regimes/bg_gap", "across_regimes/backdrop_follow", "across_regimes/backdrop_follow_vs_twin",
                    "best/val_acc", "best/epoch"):  # one value per cell, at step 0: a bar per cell in the chart view
            assert [m.step for m in client.get_metric_history(cell.info.run_id, key)] == [0], key
        [output] = cell.outputs.model_outputs  # the MLflow model keeps the best epoch's step and its metrics
        assert output.step == cell.data.metrics["best/epoch"]
        assert {m.key for m in mlflow.get_logged_model(output.model_id).metrics} >= {"best/val_acc", "best/epoch"}
    masked = next(r for r in cells if r.data.params["regime"] == "masked")
    assert masked.data.params["data_root"].endswith("-masked")
    assert masked.data.tags["fgvc.model_version"].startswith("fgvc-study-fn-small/")


def test_the_table_the_ui_and_the_records_agree_and_reanalysis_leaves_them(study_store):
    client = MlflowClient()
    rows = {r["regime"]: r for r in csv.DictReader(io.StringIO(artifact_text(study_store, "study/results.csv")))}
    cell = next(r for r in children(study_store) if r.data.params["regime"] == "unmasked")
    table_value = float(rows["unmasked"]["occlusion_bg_preference"])
    assert cell.data.metrics["occlusion/bg_preference_mean"] == pytest.approx(table_value, abs=1e-6)
    record = client.get_run(cell.data.tags["fgvc.analysis.occlusion"])
    assert record.data.metrics["occlusion/bg_preference_mean"] == pytest.approx(table_value, abs=1e-6)

    # a user analyses the cell again with other settings
    run_analyze(AnalyzeConfig(model=f"models:/{cell.data.tags['fgvc.model_version']}", method=("occlusion",),
                              num_images=9, window=8, stride=4))
    again = client.get_run(cell.info.run_id)
    assert again.data.metrics["occlusion/bg_preference_mean"] == cell.data.metrics["occlusion/bg_preference_mean"]
    assert again.data.tags["fgvc.analysis.occlusion"] == record.info.run_id
    assert client.get_run(record.info.run_id).data.metrics == record.data.metrics
    rows_after = list(csv.DictReader(io.StringIO(artifact_text(study_store, "study/results.csv"))))
    assert float(next(r for r in rows_after if r["regime"] == "unmasked")["occlusion_bg_preference"]) == table_value


def test_a_single_train_and_a_study_cell_log_the_same_params_and_config_id(study_store, tmp_path):
    from fgvc.cli import main

    cell = next(r for r in children(study_store) if r.data.params["regime"] == "unmasked+aug")
    args = ["train"]
    for name in ("arch", "pretrained", "data_root", "aug", "epochs", "batch_size", "lr_head", "seed", "num_workers",
                 "registered_model"):
        args += [f"--{name.replace('_', '-')}", cell.data.params[name]]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    single = mlflow.search_runs(experiment_names=["fgvc-train"], output_format="list")[0]
    assert single.data.tags["fgvc.config_id"] == cell.data.tags["fgvc.config_id"]
    per_run = {"data_root_abs", "git_commit", "device_effective"}
    assert {k: v for k, v in single.data.params.items() if k not in per_run} == \
        {k: v for k, v in cell.data.params.items() if k not in per_run}


def test_rerun_reuses_finished_cells_and_their_records(study_store):
    client = MlflowClient()
    before = {r.data.tags["fgvc.study_cell"]: r.info.run_id for r in children(study_store)}
    trainings = len(mlflow.search_runs(experiment_names=["fgvc-study"], filter_string="tags.`fgvc.config_id` != ''"))
    records = len(client.search_runs([client.get_experiment_by_name("fgvc-analysis").experiment_id]))
    again = run_study(tiny_study(), progress=False)
    assert again.run_id != study_store and [c.status for c in again.cells] == ["reused"] * 4
    assert {c.cell.key: c.run_id for c in again.cells} == before
    assert len(mlflow.search_runs(experiment_names=["fgvc-study"],
                                  filter_string="tags.`fgvc.config_id` != ''")) == trainings
    assert len(client.search_runs([client.get_experiment_by_name("fgvc-analysis").experiment_id])) == records
    assert {r.info.run_id for r in children(again.run_id)} == set(before.values())
    old = list(csv.DictReader(io.StringIO(artifact_text(study_store, "study/results.csv"))))
    new = list(csv.DictReader(io.StringIO(artifact_text(again.run_id, "study/results.csv"))))
    assert [r["val_acc"] for r in new] == [r["val_acc"] for r in old]
    assert [r["occlusion_bg_preference"] for r in new] == [r["occlusion_bg_preference"] for r in old]
    assert [r["status"] for r in new] == ["reused"] * 4


class InterruptSeed1AfterEpoch1:
    def on_epoch_end(self, record, session):
        if session.cfg.seed == 1 and record.epoch == 1:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_interrupted_study_continues_where_it_stopped_under_mlflow_run(tiny_root, mlflow_store, monkeypatch):
    """Ctrl-C in the second cell's second epoch; the rerun (as `mlflow run` would start it)
    reuses the first cell and resumes the second from its checkpoint, in the same run."""
    from fgvc.tasks import study_cell

    cfg = StudyConfig(data_root=str(tiny_root), regimes=("unmasked",), seeds=(0, 1), epochs=2, batch_size=8,
                      num_images=6)
    real_run_train = study_cell.run_train
    monkeypatch.setattr(study_cell, "run_train", lambda c, **kw: real_run_train(
        c, callbacks=[InterruptSeed1AfterEpoch1()], **kw))
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, progress=False)
    monkeypatch.setattr(study_cell, "run_train", real_run_train)
    first = mlflow.search_runs(experiment_names=["fgvc-study"], filter_string="tags.`fgvc.task` = 'study'")
    assert first.status.tolist() == ["KILLED"]
    killed = mlflow.search_runs(experiment_names=["fgvc-study"], filter_string="tags.`fgvc.study_cell` LIKE '%seed1'")
    assert killed.status.tolist() == ["KILLED"]

    client = MlflowClient()
    study_experiment = client.get_experiment_by_name("fgvc-study").experiment_id
    env_run = client.create_run(study_experiment)  # what `mlflow run --experiment-name fgvc-study` hands over
    client.log_param(env_run.info.run_id, "archs", "auto")
    monkeypatch.setenv("MLFLOW_RUN_ID", env_run.info.run_id)
    result = run_study(cfg, progress=False)
    assert result.run_id == env_run.info.run_id
    assert [c.status for c in result.cells] == ["reused", "resumed"]
    assert result.cells[1].run_id == killed.run_id[0]
    assert os.environ["MLFLOW_RUN_ID"] == env_run.info.run_id  # handed back afterwards
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "study-quick"
    assert parent.data.params["archs"] == "auto" and parent.data.params["archs_effective"] == "fn-small"
    resumed = client.get_run(killed.run_id[0])
    assert resumed.info.status == "FINISHED" and resumed.data.tags["fgvc.study"] == result.run_id
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "val/acc")] == [1, 2]
    assert "shortcut/acc_no_fg" in resumed.data.metrics
    assert {r.info.run_id for r in children(result.run_id)} == {c.run_id for c in result.cells}
    assert {r.info.experiment_id for r in children(result.run_id)} == {study_experiment}


def test_a_study_leaves_the_users_candidate_where_their_training_put_it(tiny_root, mlflow_store):
    from fgvc.tasks.train import run_train
    from fgvc.training.config import TrainConfig

    mine = run_train(TrainConfig(arch="fn-small", data_root=str(tiny_root), epochs=1, batch_size=8, num_workers=0),
                     progress=False)
    result = run_study(StudyConfig(data_root=str(tiny_root), regimes=("unmasked", "masked"), epochs=1, batch_size=8,
                                   num_images=6), progress=False)
    client = MlflowClient()
    user = client.get_registered_model("fgvc-fn-small")
    assert {a: str(v) for a, v in user.aliases.items()} == {"candidate": mine.model_version}
    assert [str(v.version) for v in client.search_model_versions("name = 'fgvc-fn-small'")] == [mine.model_version]
    cells = client.search_model_versions("name = 'fgvc-study-fn-small'")
    assert len(cells) == 2 and not client.get_registered_model("fgvc-study-fn-small").aliases
    assert {v.tags["fgvc.study"] for v in cells} == {result.run_id}
    masked = next(v for v in cells if v.tags["regime"] == "masked")
    assert "Background removed" in masked.description and "no alias points at it" in masked.description
    assert masked.tags["background_removed"] == "true"
    for cell in result.cells:
        assert "(alias" not in client.get_run(cell.run_id).data.tags["mlflow.note.content"]


def test_cell_training_config_is_what_train_would_build(tiny_root):
    plan = StudyConfig(data_root=str(tiny_root)).plan()
    roots = type("Roots", (), {"root": lambda self, cell: tiny_root})()
    cfg = train_config(plan, Cell("fn-small", "unmasked+aug", 3), roots)
    assert cfg.aug == "heavy" and cfg.params()["aug"] == "true" and cfg.seed == 3 and cfg.epochs == plan.epochs
