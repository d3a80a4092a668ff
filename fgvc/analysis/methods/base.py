"""What every analysis method is: a registered object with one calling shape.

``method.run(model, data, cfg) -> MethodResult`` (numbers and what the figures need), then
``method.write_artifacts(result, data, folder)`` (pictures and tables). A method declares
the config fields its numbers depend on (``settings``: they key its record, so a number
computed with other settings never replaces one silently) and the study-table columns it
contributes (``columns``). Register a method with ``@register`` in any module of this
package: the CLI's choices, the study table and the report read the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from fgvc.analysis.config import AnalyzeConfig
from fgvc.analysis.data import AnalysisData
from fgvc.catalog import METHODS


@dataclass(frozen=True)
class Column:
    """A study-table column: the method's metric, its header and what it measures. With
    ``interval``, the method also reports ``<metric>_low`` / ``<metric>_high`` (bootstrap 95%)."""

    metric: str
    header: str
    what: str
    interval: bool = True


@dataclass
class MethodResult:
    metrics: dict[str, float]  # relative keys ("bg_preference_mean"); the caller prefixes the method
    per_image: dict[str, list] = field(default_factory=dict)  # columns of per_image.csv
    payload: Any = None  # what write_artifacts draws (maps, variants, neighbour lists)
    info: dict[str, str] = field(default_factory=dict)  # how it was computed (layer, map size, mode)


class AnalysisMethod:
    name: ClassVar[str]
    description: ClassVar[str]
    in_all: ClassVar[bool] = True  # part of method=all
    needs_masks: ClassVar[bool] = False
    settings: ClassVar[tuple[str, ...]] = ()
    fixed_settings: ClassVar[dict[str, str]] = {}  # how the method computes (a version), part of the key

    @property
    def columns(self) -> dict[str, Column]:
        """The study-table columns this method contributes (a subclass sets its own)."""
        return {}

    def run(self, model: nn.Module, data: AnalysisData, cfg: AnalyzeConfig) -> MethodResult:
        raise NotImplementedError

    def write_artifacts(self, result: MethodResult, data: AnalysisData, folder: Path) -> None:
        raise NotImplementedError




def register(cls: type[AnalysisMethod]) -> type[AnalysisMethod]:
    """Class decorator: register one instance of an analysis method under its ``name``."""
    METHODS.register(cls.name, cls())
    return cls


def study_columns() -> dict[str, tuple[str, Column]]:
    """Every method's study-table columns: column name -> (method, column)."""
    return {name: (method_name, column) for method_name, method in METHODS.items()
            for name, column in method.columns.items()}
