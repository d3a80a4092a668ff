"""Interpretation of trained classifiers: does the model look at the garment or the runway?

Every attribution method shares one calling shape,
``Method(model, ...).attribute(images [B, 3, H, W] in [0, 1], targets=None)``, returning an
:class:`AttributionResult`. Nothing here logs anywhere; :mod:`fgvc.tracking` decides that.

The names below are imported on first use (PEP 562), so importing a light submodule
(the config, read by the command line) does not import torch."""

from fgvc.registry import lazy_exports

_EXPORTS = {
    "AttributionResult": "fgvc.analysis.common",
    "GradCAM": "fgvc.analysis.gradcam",
    "bg_energy_fraction": "fgvc.analysis.metrics",
    "bg_preference": "fgvc.analysis.metrics",
    "deletion_insertion_auc": "fgvc.analysis.metrics",
    "cosine_topk": "fgvc.analysis.neighbors",
    "embed": "fgvc.analysis.neighbors",
    "map_at_r": "fgvc.analysis.neighbors",
    "retrieval_metrics": "fgvc.analysis.neighbors",
    "Occlusion": "fgvc.analysis.occlusion",
    "VARIANT_NAMES": "fgvc.analysis.shortcut",
    "evaluate_variants": "fgvc.analysis.shortcut",
    "make_variants": "fgvc.analysis.shortcut",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
