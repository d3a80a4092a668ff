"""Person segmentation and background removal: builds the masked dataset root.

Core only: nothing here talks to MLflow (``fgvc.tasks.mask`` wraps it in a run).

The names below are imported on first use (PEP 562), so importing a light submodule
(the config, read by the command line) does not import torch."""

from fgvc.registry import lazy_exports

_EXPORTS = {
    "DEFAULT_MIN_PERSON_RATIO": "fgvc.masking.background",
    "person_ratio": "fgvc.masking.background",
    "remove_background": "fgvc.masking.background",
    "MaskConfig": "fgvc.masking.config",
    "MaskReport": "fgvc.masking.job",
    "execute": "fgvc.masking.job",
    "mask_dataset": "fgvc.masking.job",
    "mask_shard": "fgvc.masking.job",
    "MaskError": "fgvc.masking.plan",
    "MaskPlan": "fgvc.masking.plan",
    "plan_masking": "fgvc.masking.plan",
    "DEFAULT_SEG_SIZE": "fgvc.masking.segmenters",
    "SEGMENTERS": "fgvc.masking.segmenters",
    "GroundTruthSegmenter": "fgvc.masking.segmenters",
    "Segmenter": "fgvc.masking.segmenters",
    "SegmenterWeightsError": "fgvc.masking.segmenters",
    "TorchvisionSegmenter": "fgvc.masking.segmenters",
    "build_segmenter": "fgvc.masking.segmenters",
    "cached_weights_path": "fgvc.masking.segmenters",
    "preprocess": "fgvc.masking.segmenters",
    "resolve_weights": "fgvc.masking.segmenters",
    "ShardStats": "fgvc.masking.sidecars",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
