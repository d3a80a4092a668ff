"""`study`: the grid, the parent and child runs, reuse of finished cells, the table and the report."""

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

from fgvc.data.demo import DemoConfig
from fgvc.tracking import train_run
from fgvc.tracking.study_run import PRESETS, REGIMES, StudyConfig, demo_root_for, run_study
from fgvc.viz.report import Example, build_report, save_regime_bars, save_reliance_scatter, summarize

torch.set_num_threads(1)

TINY_DEMO = dict(num_designers=3, train_per_class=8, val_per_class=4, height=32, width=24)
TINY_ARGS = ["--num-designers", "3", "--train-per-class", "8", "--val-per-class", "4", "--height", "32",
             "--width", "24", "--epochs", "1", "--batch-size", "8", "--num-images", "6"]
TABLE_COLUMNS = ["arch", "regime", "seed", "run_id", "status", "model", "val_acc", "val_balanced_acc",
                 "gradcam_bg_fraction", "occlusion_bg_fraction", "no_fg_acc", "no_fg_vs_chance", "only_fg_acc",
                 "bg_gap", "precision_at_1", "chance"]


def tiny_study(**overrides) -> StudyConfig:
    opts = dict(epochs=1, batch_size=8, num_images=6)
    opts.update(overrides)
    return StudyConfig.from_preset("quick", demo=TINY_DEMO, **opts)


def children(parent_id: str) -> list:
    experiment_id = MlflowClient().get_run(parent_id).info.experiment_id
    return MlflowClient().search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


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
    quick = StudyConfig.from_preset("quick")
    assert quick.archs == ("fn-small",) and quick.regimes == REGIMES and quick.seeds == (0,)
    assert [c.key for c in quick.cells()] == [f"fn-small/{r}/seed0" for r in REGIMES]
    full = StudyConfig.from_preset("full")
    assert full.archs == ("resnet18", "resnet34", "fn-small", "fn-medium") and full.seeds == (0, 1, 2)
    assert len(full.cells()) == 4 * 4 * 3 and full.demo == DemoConfig()
    mine = StudyConfig.from_preset("full", archs=("fn-small",), regimes=("masked",), epochs=2,
                                   demo={"num_designers": 4})
    assert mine.archs == ("fn-small",) and mine.regimes == ("masked",) and mine.epochs == 2
    assert mine.seeds == (0, 1, 2) and mine.demo == DemoConfig(num_designers=4)
    assert mine.cells()[0].masked and not mine.cells()[0].aug


@pytest.mark.parametrize("overrides, message", [
    (dict(regimes=("unmasked", "bg-only")), "unknown regime.*'bg-only'.*unmasked, masked"),
    (dict(seeds=(0, 0)), "seeds lists a value twice"),
    (dict(archs=()), "at least one of archs"),
    (dict(epochs=0), "epochs must be positive"),
])
def test_bad_grids_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        StudyConfig.from_preset("quick", **overrides)
    with pytest.raises(ValueError, match="unknown preset 'huge'; choose from quick, full"):
        StudyConfig.from_preset("huge")


def test_each_demo_configuration_has_its_own_root():
    assert str(demo_root_for(DemoConfig())) == "data/demo"
    assert str(demo_root_for(PRESETS["quick"]["demo"])) == "data/demo-quick"
    other = demo_root_for(DemoConfig(num_designers=3))
    assert other.name.startswith("demo-") and other != demo_root_for(DemoConfig(num_designers=4))


# --- numbers, figures, report --------------------------------------------------------------

def fake_rows() -> list[dict]:
    rows = []
    for regime, acc, no_fg in (("unmasked", 0.9, 0.8), ("masked", 0.8, 0.2)):
        for seed, delta in ((0, -0.05), (1, 0.05)):
            rows.append({"arch": "fn-small", "regime": regime, "seed": seed, "run_id": f"run-{regime}-{seed}",
                         "status": "trained", "val_acc": acc + delta, "val_balanced_acc": acc,
                         "gradcam_bg_fraction": 0.5, "occlusion_bg_fraction": 0.4, "no_fg_acc": no_fg,
                         "no_fg_vs_chance": no_fg * 4, "only_fg_acc": 0.5, "bg_gap": 0.1,
                         "precision_at_1": float("nan") if seed else 0.7})
    return rows


def test_summary_gives_mean_and_spread_across_seeds():
    summary = summarize(fake_rows())
    assert [(s["arch"], s["regime"], s["seeds"]) for s in summary] == [("fn-small", "unmasked", 2),
                                                                      ("fn-small", "masked", 2)]
    assert summary[0]["val_acc_mean"] == pytest.approx(0.9)
    assert summary[0]["val_acc_std"] == pytest.approx(math.sqrt(2 * 0.05 ** 2))  # sample std
    assert summary[1]["no_fg_acc_mean"] == pytest.approx(0.2) and summary[1]["no_fg_acc_std"] == 0
    assert summary[0]["precision_at_1_mean"] == pytest.approx(0.7)  # the NaN seed is left out


def test_report_is_self_contained_and_lists_every_cell(tmp_path):
    rows = fake_rows()
    summary = summarize(rows)
    figures = [Example("scatter", save_reliance_scatter(tmp_path / "a.png", rows, chance=0.25)),
               Example("bars", save_regime_bars(tmp_path / "b.png", summary, chance=0.25))]
    page = build_report("Study <x>", {"data": "demo & more"}, rows, summary, figures,
                        {"unmasked": [Example("gradcam <0>", figures[0].path)]}, notes=["a note"], chance=0.25)
    assert assert_self_contained(page) == 3
    for row in rows:
        assert row["run_id"] in page
    assert "0.900 ± 0.071" in page  # mean ± spread of val acc, unmasked
    assert "Study &lt;x&gt;" in page and "demo &amp; more" in page and "gradcam &lt;0&gt;" in page


# --- the study end to end ------------------------------------------------------------------

@pytest.fixture(scope="module")
def study_store(tmp_path_factory):
    """A tiny four-regime study, run through `fgvc study`, in a module-wide store."""
    store = tmp_path_factory.mktemp("study")
    mp = pytest.MonkeyPatch()
    mp.chdir(store)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}/mlflow.db")
    mp.delenv("MLFLOW_RUN_ID", raising=False)
    from fgvc.cli import main

    result = CliRunner().invoke(main, ["study", *TINY_ARGS], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    parent = mlflow.search_runs(experiment_names=["fgvc-study"], filter_string="tags.`fgvc.task` = 'study'")
    yield parent.run_id[0]
    mp.undo()


def test_study_run_holds_the_table_figures_and_report(study_store):
    client = MlflowClient()
    parent = client.get_run(study_store)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "study-quick"
    assert client.get_experiment(parent.info.experiment_id).name == "fgvc-study"
    p = parent.data.params
    assert p["preset"] == "quick" and p["archs"] == "fn-small" and p["regimes"] == ",".join(REGIMES)
    assert p["segmenter_effective"] == "groundtruth" and p["cells"] == "4"
    assert p["data_root_effective"].endswith("data/" + demo_root_for(DemoConfig(**TINY_DEMO)).name)
    assert parent.data.metrics["study/cells_trained"] == 4 and parent.data.metrics["study/cells_reused"] == 0
    files = {a.path for a in client.list_artifacts(study_store, "study")}
    assert files == {f"study/{f}" for f in ("results.csv", "results.md", "summary.csv", "report.html",
                                            "accuracy_vs_background_reliance.png", "regime_bars.png")}

    rows = list(csv.DictReader(io.StringIO(artifact_text(study_store, "study/results.csv"))))
    assert list(rows[0]) == TABLE_COLUMNS
    assert [(r["arch"], r["regime"], r["seed"]) for r in rows] == [("fn-small", r, "0") for r in REGIMES]
    for row in rows:
        for key in TABLE_COLUMNS[6:]:
            assert 0 <= float(row[key]) <= 3 or key in ("bg_gap", "no_fg_vs_chance"), (key, row[key])
        assert float(row["chance"]) == pytest.approx(1 / 3) and -1 <= float(row["bg_gap"]) <= 1
    summary = list(csv.DictReader(io.StringIO(artifact_text(study_store, "study/summary.csv"))))
    assert [s["regime"] for s in summary] == list(REGIMES) and {"no_fg_acc_mean", "bg_gap_std"} <= set(summary[0])
    markdown = artifact_text(study_store, "study/results.md")
    assert "| fn-small | masked+aug | 0 |" in markdown and "No-FG acc" in markdown

    page = artifact_text(study_store, "study/report.html")
    # 2 figures, 2 Grad-CAM + 2 occlusion examples per regime, the swap variants
    assert assert_self_contained(page) == 2 + 4 * len(REGIMES) + 1
    for row in rows:
        assert row["run_id"] in page
    assert "No-FG" in page and "mirroring" in page


def test_cells_are_child_runs_with_the_same_params_and_metrics(study_store):
    client = MlflowClient()
    cells = children(study_store)
    assert sorted(r.data.tags["fgvc.study_cell"] for r in cells) == sorted(f"fn-small/{r}/seed0" for r in REGIMES)
    assert {r.info.run_name for r in cells} == {f"fn-small-{r}-s0" for r in REGIMES}
    assert {r.info.experiment_id for r in cells} == {client.get_run(study_store).info.experiment_id}
    assert len({frozenset(r.data.params) for r in cells}) == 1  # comparable side by side in the UI
    assert len({frozenset(r.data.metrics) for r in cells}) == 1
    metrics = cells[0].data.metrics
    for key in ("val/acc", "best/val_acc", "gradcam/bg_energy_fraction_mean", "occlusion/bg_energy_fraction_mean",
                "neighbors/precision_at_1", "shortcut/acc_no_fg", "shortcut/bg_gap", "shortcut/no_fg_vs_chance"):
        assert key in metrics, key
    regimes = {r.data.tags["fgvc.study_regime"]: r.data.params["regime"] for r in cells}
    assert regimes == {"unmasked": "unmasked-noaug", "masked": "masked-noaug", "unmasked+aug": "unmasked-aug",
                       "masked+aug": "masked-aug"}
    masked = next(r for r in cells if r.data.tags["fgvc.study_regime"] == "masked")
    assert masked.data.params["data_root"].endswith("-masked")
    assert masked.data.tags["fgvc.model_version"].startswith("fgvc-fn-small/")


def test_rerun_reuses_finished_cells_and_moves_them_under_the_new_study(study_store):
    client = MlflowClient()
    before = {r.data.tags["fgvc.study_cell"]: r.info.run_id for r in children(study_store)}
    trainings = len(mlflow.search_runs(experiment_names=["fgvc-study"], filter_string="tags.`fgvc.config_id` != ''"))
    again = run_study(tiny_study(), progress=False)
    assert again.run_id != study_store
    assert [c.status for c in again.cells] == ["reused"] * 4
    assert {c.cell.key: c.run_id for c in again.cells} == before
    assert len(mlflow.search_runs(experiment_names=["fgvc-study"],
                                  filter_string="tags.`fgvc.config_id` != ''")) == trainings
    assert {r.info.run_id for r in children(again.run_id)} == set(before.values())
    assert client.get_run(again.run_id).data.metrics["study/cells_reused"] == 4
    old = list(csv.DictReader(io.StringIO(artifact_text(study_store, "study/results.csv"))))
    new = list(csv.DictReader(io.StringIO(artifact_text(again.run_id, "study/results.csv"))))
    assert [r["val_acc"] for r in new] == [r["val_acc"] for r in old]
    assert [r["status"] for r in new] == ["reused"] * 4


def test_interrupted_study_continues_where_it_stopped_under_mlflow_run(tiny_root, mlflow_store, monkeypatch):
    """Ctrl-C in the second cell's second epoch; the rerun (as `mlflow run` would start it)
    reuses the first cell and resumes the second from its checkpoint, in the same run."""
    cfg = StudyConfig.from_preset("quick", data_root=str(tiny_root), regimes=("unmasked",), seeds=(0, 1),
                                  epochs=2, batch_size=8, num_images=6)
    real_save = train_run._Checkpointer.save

    def interrupt_seed1_after_epoch1(self, record, best):
        real_save(self, record, best)
        if self.cfg.seed == 1 and record.epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_run._Checkpointer, "save", interrupt_seed1_after_epoch1)
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, progress=False)
    monkeypatch.setattr(train_run._Checkpointer, "save", real_save)
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
    assert resumed.info.status == "FINISHED" and resumed.data.tags["mlflow.parentRunId"] == result.run_id
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "val/acc")] == [1, 2]
    assert "shortcut/acc_no_fg" in resumed.data.metrics
    assert {r.info.run_id for r in children(result.run_id)} == {c.run_id for c in result.cells}
    assert {r.info.experiment_id for r in children(result.run_id)} == {study_experiment}
