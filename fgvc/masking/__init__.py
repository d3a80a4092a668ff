"""Person segmentation and background removal: builds the masked dataset root.

Core only: nothing here talks to MLflow (``fgvc.tracking.mask_run`` wraps it in a run).
"""

from fgvc.masking.background import DEFAULT_MIN_PERSON_RATIO, person_ratio, remove_background
from fgvc.masking.config import MaskConfig
from fgvc.masking.execute import MaskReport, execute, mask_dataset, mask_shard
from fgvc.masking.plan import MaskError, MaskPlan, plan_masking
from fgvc.masking.segmenters import (
    DEFAULT_SEG_SIZE,
    SEGMENTERS,
    GroundTruthSegmenter,
    Segmenter,
    SegmenterWeightsError,
    TorchvisionSegmenter,
    build_segmenter,
    cached_weights_path,
    preprocess,
    resolve_weights,
)
from fgvc.masking.sidecars import ShardStats

__all__ = [
    "DEFAULT_MIN_PERSON_RATIO", "DEFAULT_SEG_SIZE", "person_ratio", "remove_background", "MaskConfig",
    "MaskError", "MaskPlan", "MaskReport", "ShardStats", "execute", "mask_dataset", "mask_shard", "plan_masking",
    "SEGMENTERS", "GroundTruthSegmenter", "Segmenter", "SegmenterWeightsError", "TorchvisionSegmenter",
    "build_segmenter", "cached_weights_path", "preprocess", "resolve_weights",
]
