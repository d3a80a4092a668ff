"""Person segmentation and background removal: builds the masked dataset root.

Core only: nothing here talks to MLflow (``fgvc.tracking.mask_run`` wraps it in a run).
"""

from fgvc.masking.background import DEFAULT_MIN_PERSON_RATIO, person_ratio, remove_background
from fgvc.masking.pipeline import (
    MaskError,
    MaskPlan,
    MaskReport,
    ShardStats,
    execute,
    mask_dataset,
    mask_shard,
    plan_masking,
)
from fgvc.masking.segmenters import (
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

__all__ = [
    "DEFAULT_MIN_PERSON_RATIO", "person_ratio", "remove_background",
    "MaskError", "MaskPlan", "MaskReport", "ShardStats", "execute", "mask_dataset", "mask_shard",
    "plan_masking",
    "SEGMENTERS", "GroundTruthSegmenter", "Segmenter", "SegmenterWeightsError",
    "TorchvisionSegmenter", "build_segmenter", "cached_weights_path", "preprocess",
    "resolve_weights",
]
