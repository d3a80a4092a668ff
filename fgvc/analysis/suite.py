"""Run the chosen analysis methods on a model and a set of images, writing each method's files
into ``folder/<method>/``. Pure: tensors and files in, records out; fgvc.tasks.analyze
decides where the records live."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from fgvc.analysis.config import AnalyzeConfig
from fgvc.analysis.data import AnalysisData
from fgvc.analysis.methods import METHODS, MethodResult
from fgvc.data.shards import ShardError
from fgvc.devices import model_device, to_device

log = logging.getLogger("fgvc")


def check_inputs(data: AnalysisData, methods: tuple[str, ...]) -> None:
    """Refuse, before any work, a method whose inputs are missing (person masks)."""
    for name in methods:
        if METHODS.get(name).needs_masks and data.masks is None:
            raise ShardError(f"{data.root}/{data.split}: the {name} method needs person masks; the shards have "
                             f"none, so pass --mask-root <a masked root built from this data>")


def run_methods(model: nn.Module, data: AnalysisData, cfg: AnalyzeConfig, folder: Path,
                methods: tuple[str, ...] | None = None) -> dict[str, MethodResult]:
    """Each method runs where the model is: the analysed images, masks and labels go to the
    model's device here, once, and each result comes back to the CPU once, before its files
    are drawn from it."""
    methods = methods or cfg.method
    check_inputs(data, methods)
    on_device = to_device(data, model_device(model))
    results = {}
    for name in methods:
        method = METHODS.get(name)
        log.info("analysis: %s on %d %s images", name, len(data.labels), data.split)
        results[name] = to_device(method.run(model, on_device, cfg), torch.device("cpu"))
        out = folder / name
        out.mkdir(parents=True, exist_ok=True)
        method.write_artifacts(results[name], data, out)
    return results
