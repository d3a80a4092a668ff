"""Interpretation of trained classifiers: does the model look at the garment or the runway?

Every attribution method shares one calling shape,
``Method(model, ...).attribute(images [B, 3, H, W] in [0, 1], targets=None)``, returning an
:class:`AttributionResult`. Nothing here logs anywhere; :mod:`fgvc.tracking` decides that.
"""

from fgvc.analysis.common import AttributionResult
from fgvc.analysis.gradcam import GradCAM
from fgvc.analysis.metrics import bg_energy_fraction, bg_preference, deletion_insertion_auc
from fgvc.analysis.neighbors import cosine_topk, embed, map_at_r, retrieval_metrics
from fgvc.analysis.occlusion import Occlusion
from fgvc.analysis.shortcut import VARIANT_NAMES, evaluate_variants, make_variants

__all__ = [
    "AttributionResult",
    "GradCAM",
    "Occlusion",
    "VARIANT_NAMES",
    "bg_energy_fraction",
    "bg_preference",
    "cosine_topk",
    "deletion_insertion_auc",
    "embed",
    "evaluate_variants",
    "make_variants",
    "map_at_r",
    "retrieval_metrics",
]
