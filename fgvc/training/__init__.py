"""Training: the typed config, the loop, the augmentation recipes, checkpoints, and a
`train()` that runs without any tracking store (fgvc.tracking records it when asked)."""

from fgvc.training.config import TrainConfig
from fgvc.training.session import Session, TrainingData, TrainOutcome, build_session, train

__all__ = ["Session", "TrainConfig", "TrainOutcome", "TrainingData", "build_session", "train"]
