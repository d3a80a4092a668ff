"""Weights files: a state_dict read safely and loaded into a network before wrapping."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from fgvc.safeload import load_tensors

from .net import PretrainedWeightsError

logger = logging.getLogger(__name__)

def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file; unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` and a DDP
    ``module.`` prefix. Pickles are read with ``weights_only=True``: a file never runs code."""
    state: object
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = load_tensors(path, what="weights file", error=PretrainedWeightsError)
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise PretrainedWeightsError(f"{path} does not hold a state_dict (found {type(state).__name__})")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def load_weights_file(net: nn.Module, path: Path, classifier_path: str) -> None:
    """Load a backbone state_dict from ``path`` into ``net`` (the raw network, before wrapping).

    Classifier tensors whose shape differs (another class count) are dropped and keep their fresh
    init; any other shape mismatch, or a file sharing no tensor with the model, is an error.
    Other missing / unexpected keys are reported with a warning.
    """
    state = _read_state_dict(path)
    own = net.state_dict()
    prefix = classifier_path + "."
    mismatched = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    wrong = [k for k in mismatched if not k.startswith(prefix)]
    if wrong:
        details = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:5])
        raise PretrainedWeightsError(f"{path} does not fit this architecture: shape mismatch for {details}")
    usable = {k: v for k, v in state.items() if k not in mismatched}
    if not any(k in own for k in usable):
        raise PretrainedWeightsError(f"{path} shares no tensor name with this architecture "
                                     f"(file keys start {list(state)[:3]}, model keys {list(own)[:3]})")
    result = net.load_state_dict(usable, strict=False)
    missing = [k for k in result.missing_keys
               if not k.startswith(prefix) and not k.endswith("num_batches_tracked")]
    if mismatched:
        logger.info("Classifier %s re-initialised: %s has another class count", classifier_path, path)
    if missing or result.unexpected_keys:
        message = (f"Weights file {path}: {len(missing)} model tensors missing from the file "
                   f"{missing[:10]}, {len(result.unexpected_keys)} unexpected file tensors "
                   f"{result.unexpected_keys[:10]}")
        warnings.warn(message, stacklevel=3)
        logger.warning(message)
