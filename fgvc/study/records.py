"""The study's records, shared by the command's steps (fgvc.tasks.study, study_cell,
study_roots, study_report) and the computation of its tables: where a strength's regimes get
their images (:class:`Roots`), the study run and what it studies (:class:`StudyContext`), what
one cell produced (:class:`CellResult`), what the study reads back of a finished cell to compute
its tables (:class:`CellRecord`) and what the study produced (:class:`StudyResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fgvc.data.config import DemoConfig
from fgvc.study.config import Cell, StudyPlan


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

    # A masked cell's root, digest and pixels are None while the masked root is not built yet
    # (`fgvc study --collect` before its cells ran): no run matches them.
    def root(self, cell: Cell) -> Path | None:
        return self.masked if cell.spec.masked else self.source

    def digest(self, cell: Cell) -> str | None:
        return self.masked_digest if cell.spec.masked else self.source_digest

    def pixels(self, cell: Cell) -> str | None:
        return self.masked_pixels if cell.spec.masked else self.source_pixels

    def built(self, cell: Cell) -> tuple[Path, str]:
        """The cell's root and pixel digest, once its root exists (a cell that trains or is analysed)."""
        root, pixels = self.root(cell), self.pixels(cell)
        if root is None or pixels is None:
            raise ValueError(f"study cell {cell.key}: its masked root has not been built")
        return root, pixels

    def mask_root_for(self, root: Path) -> str | None:
        """A root with person masks for `root`'s images, when its own shards have none."""
        if root == self.source and not self.source_has_masks and self.masked is not None:
            return str(self.masked)
        return None


@dataclass(frozen=True)
class StudyContext:
    """The study run and what it studies: where its cells are logged, its plan, its data (per
    shortcut strength and split, ``Cell.data``) and what the data are (image size, classes)."""

    run_id: str
    experiment: str  # the experiment's name
    plan: StudyPlan
    roots: dict[tuple[float | None, str | None], Roots]
    image_size: tuple[int, int]
    num_classes: int

    @property
    def chance(self) -> float:
        return 1.0 / self.num_classes


@dataclass
class CellResult:
    cell: Cell
    run_id: str
    status: str  # trained | resumed | reused
    model_uri: str
    analyses: dict[str, dict[str, float]]  # method -> metrics of its record
    records: dict[str, str]  # method -> record run id


@dataclass
class CellRecord:
    """A finished cell as the study's tables read it: plain values gathered from its training
    run and its analysis records (fgvc.tasks.study_report.gather), so the computation
    (fgvc.study.results.compute) needs no tracking store."""

    cell: Cell
    run_id: str
    status: str  # trained | resumed | reused
    model_uri: str
    train_metrics: dict[str, float]  # the training run's metrics (best/val_acc, ...)
    analyses: dict[str, dict[str, float]]  # method -> metrics of its record
    records: dict[str, str]  # method -> record run id
    per_image: dict[str, dict[str, list]]  # method -> columns of its per_image.csv (absent: none could be read)
    split: str = "val"  # the reported split: test when the cell's root has one, else val
    designers: list[str] = field(default_factory=list)  # class names by index, of the root its swap test ran on


@dataclass
class StudyResult:
    run_id: str
    experiment_id: str
    cells: list[CellResult]
    rows: list[dict]
    summary: list[dict]
    seconds: float
