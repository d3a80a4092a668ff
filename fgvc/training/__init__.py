"""Training: the typed config, the loop, the augmentation recipes, checkpoints, and a
`train()` that runs without any tracking store (fgvc.tracking records it when asked).

The names below are imported on first use (PEP 562), so importing a light submodule
(the config, read by the command line) does not import torch."""

from fgvc.registry import lazy_exports

_EXPORTS = {
    "TrainConfig": "fgvc.training.config",
    "Session": "fgvc.training.session",
    "TrainingData": "fgvc.training.session",
    "TrainOutcome": "fgvc.training.session",
    "build_session": "fgvc.training.session",
    "train": "fgvc.training.session",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
