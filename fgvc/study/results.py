"""The study's results from its gathered records: one pure computation, no tracking store and
no file access, so it runs the same on records read from MLflow and on records made by hand.

:func:`compute` turns the finished cells (:class:`fgvc.study.records.CellRecord`: the training
run's metrics, the analysis records' metrics and per-image tables, the reported split) into
:class:`StudyTables`: a row per cell with its verdict, the summary across seeds, the paired
regime differences, the show leak and the paragraphs that relate attribution to the swap test
and report the leak. It calls the study's helpers in order: :func:`cell_row` (fgvc.study.tables:
columns and verdict from the metrics), :func:`complete` (the quality gate, the masked twin, the
sanity columns and the differences from the per-image tables, fgvc.study.tables and
fgvc.study.pairing; then the show leak, fgvc.study.leak), the summary and its show leak, and the
swap test per designer (fgvc.study.designers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fgvc.study.designers import no_fg_confusions, per_designer
from fgvc.study.leak import annotate_summary, leak_paragraph, show_leak
from fgvc.study.pairing import PerImage, with_labels
from fgvc.study.records import CellRecord
from fgvc.study.tables import (
    DID_NOT_LEARN,
    INSTRUMENTS_DISAGREE,
    NO_DATA,
    RUNWAY,
    TableColumn,
    add_comparisons,
    attribution_vs_swap,
    cell_values,
    columns,
    summarize,
    verdict,
    verdict_reason,
)

STATUSES = ("trained", "resumed", "reused")


@dataclass
class StudyTables:
    """Everything the study's tables, figures, report, tags and description are made of."""

    chance: float
    rows: list[dict]  # one per cell, grid order: fgvc.study.tables' columns, quality, verdict, twin, show leak
    summary: list[dict]  # one per (arch, regime, strength, split) across seeds
    differences: list[dict]  # paired regime differences (fgvc.study.tables.regime_differences)
    leak: list[dict]  # the show leak per (arch, regime, strength); [] without the split axis
    relation: str  # how the attribution excess and the swap-test verdicts relate
    leak_text: str  # the show leak in a paragraph; "" without the split axis
    statuses: dict[str, int] = field(default_factory=dict)  # trained | resumed | reused -> cells
    per_designer: list[dict] = field(default_factory=list)  # a row per cell and designer (fgvc.study.designers)
    confusions: dict[str, list[list[int]]] = field(default_factory=dict)  # cell key -> No-FG confusion [C, C]
    designers: dict[str, list[str]] = field(default_factory=dict)  # cell key -> class names by index

    @property
    def split(self) -> str:
        """The reported split (test, or val where the roots have no test split)."""
        return self.rows[0].get("split", "val") if self.rows else "val"

    @property
    def columns(self) -> list[TableColumn]:
        """The measured columns, their headers naming the reported split."""
        return columns(self.split)

    @property
    def findings(self) -> tuple[str, ...]:
        """The paragraphs that follow the method: attribution against the swap test, the show leak."""
        return (self.relation, *([self.leak_text] if self.leak_text else []))

    @property
    def reading_the_runway(self) -> int:
        return sum(r["verdict"] == RUNWAY for r in self.rows)

    @property
    def instruments_disagree(self) -> list[dict]:
        """The rows whose swap verdict and attribution excess point opposite ways."""
        return [r for r in self.rows if str(r.get("instruments", "")).startswith(INSTRUMENTS_DISAGREE)]

    @property
    def did_not_learn(self) -> int:
        return sum(r.get("quality") == DID_NOT_LEARN for r in self.rows)

    @property
    def no_data(self) -> int:
        return sum(r.get("quality") == NO_DATA for r in self.rows)

    @property
    def only_on_random_split(self) -> int:
        """Verdicts that hold only on the random split (0 without the split axis)."""
        return sum(e["only_on_random_split"] for e in self.leak)


def cell_row(record: CellRecord, chance: float) -> dict:
    """The study-table row of a finished cell: best-epoch metrics from its training run, every
    analysis number from the records the study computed (or reused), the verdict those give,
    and the split the numbers are reported on."""
    cell = record.cell
    row = {"arch": cell.arch, "regime": cell.regime, "bg_correlation": cell.bg_correlation, "split_by": cell.split,
           "seed": cell.seed, "cell": cell.key, "run_name": cell.run_name, "run_id": record.run_id,
           "status": record.status, "model": record.model_uri, "chance": chance,
           **cell_values(record.train_metrics, record.analyses)}
    row["verdict"] = verdict(row, chance)
    row["verdict_reason"] = verdict_reason(row, chance)
    row["split"] = record.split
    return row


def complete(rows: Sequence[dict], per_image: PerImage, chance: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Finish the rows in place from the per-image tables (accuracy, quality gate and verdict,
    excess over the masked twin, sanity columns, show leak) and return the paired regime
    differences and the show leak ([] without the split axis)."""
    differences = add_comparisons(rows, per_image, chance, seed=seed)
    return differences, show_leak(rows, per_image, seed=seed)


def compute(cells: Sequence[CellRecord], chance: float, seed: int = 0) -> StudyTables:
    """The study's tables from its finished cells (grid order); ``seed`` seeds the bootstraps."""
    rows = [cell_row(c, chance) for c in cells]
    per_image = {(c.cell.key, method): with_labels(table, c.designers) for c in cells
                 for method, table in c.per_image.items()}
    differences, leak = complete(rows, per_image, chance, seed)
    summary = summarize(rows)
    annotate_summary(summary, leak)
    statuses = {s: sum(c.status == s for c in cells) for s in STATUSES}
    designers = {c.cell.key: list(c.designers) for c in cells}
    return StudyTables(chance, rows, summary, differences, leak, attribution_vs_swap(rows), leak_paragraph(leak),
                       statuses, per_designer(rows, per_image, designers), no_fg_confusions(rows, per_image, designers),
                       designers)
