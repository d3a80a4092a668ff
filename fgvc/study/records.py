"""The study's records, shared by the command's steps (fgvc.tasks.study, study_cell,
study_roots, study_report) and the computation of its tables: where a strength's regimes get
their images (:class:`Roots`), what one cell produced (:class:`CellResult`) and what the study
produced (:class:`StudyResult`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fgvc.data.config import DemoConfig
from fgvc.study.config import Cell


@dataclass
class Roots:
    """Where one shortcut strength's regimes get their images, and the roots' digests (of the
    files, and of the pixels a training sees)."""

    source: Path
    source_digest: str
    source_has_masks: bool
    masked: Path | None
    masked_digest: str | None
    segmenter: str | None
    demo: DemoConfig | None
    source_pixels: str = ""
    masked_pixels: str | None = None

    def root(self, cell: Cell) -> Path:
        return self.masked if cell.spec.masked else self.source

    def digest(self, cell: Cell) -> str:
        return self.masked_digest if cell.spec.masked else self.source_digest

    def pixels(self, cell: Cell) -> str:
        return self.masked_pixels if cell.spec.masked else self.source_pixels

    def mask_root_for(self, root: Path) -> str | None:
        """A root with person masks for `root`'s images, when its own shards have none."""
        if root == self.source and not self.source_has_masks and self.masked is not None:
            return str(self.masked)
        return None


@dataclass
class CellResult:
    cell: Cell
    run_id: str
    status: str  # trained | resumed | reused
    model_uri: str
    analyses: dict[str, dict[str, float]]  # method -> metrics of its record
    records: dict[str, str]  # method -> record run id


@dataclass
class StudyResult:
    run_id: str
    experiment_id: str
    cells: list[CellResult]
    rows: list[dict]
    summary: list[dict]
    seconds: float
