"""The registries whose entries live in torch modules, with their built-in names declared.

The command line lists and checks architectures, segmenters, augmentation recipes and analysis
methods from these names, so `fgvc --help`, `fgvc train --help` and a refused option answer
without importing torch; the module that registers the entries (``loader``) is imported the
first time an entry is used. An entry registered in a new file is found once its module is
imported; list it here too to offer it on the command line (tests/test_cli.py checks that the
declared names are exactly the registered ones).
"""

from __future__ import annotations

import difflib

from fgvc.registry import Registry

TIMM_PREFIX = "timm:"

ARCHS: Registry = Registry("architecture", ("resnet18", "resnet34", "resnet50", "fn-small", "fn-medium"),
                           loader="fgvc.models.architectures")
SEGMENTERS: Registry = Registry("segmenter", ("deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large", "groundtruth"),
                                loader="fgvc.masking.segmenters")
PRESETS: Registry = Registry("augmentation recipe", ("heavy",), loader="fgvc.training.augment")
# The architectures of the original project's checkpoints (`fgvc register`).
ORIGINAL_ARCHS = ("resnet18", "resnet34", "resnet50", "fn-small", "fn-medium")
METHODS: Registry = Registry("analysis method", ("gradcam", "occlusion", "shortcut", "neighbors", "sanity"),
                             loader="fgvc.analysis.methods")


def arch_problem(arch: str) -> str | None:
    """None for a buildable architecture name, else what is wrong with it (for option checks).
    Registered names are checked here; a `timm:<name>` is checked by timm itself."""
    if arch in ARCHS:
        return None
    if arch.startswith(TIMM_PREFIX):
        return timm_name_problem(arch[len(TIMM_PREFIX):])
    close = difflib.get_close_matches(arch, ARCHS.names(), n=2, cutoff=0.6)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    return (f"Unknown arch {arch!r}{hint}. Valid names: {', '.join(sorted(ARCHS.names()))}; "
            f"or any timm model as '{TIMM_PREFIX}<name>' (e.g. '{TIMM_PREFIX}convnext_atto').")


def timm_name_problem(model_name: str) -> str | None:
    """None for a model timm can build (a pretrained tag allowed: ``resnet10t.c3_in1k``), else
    what is wrong with the name; timm is imported only when such a name is checked."""
    import timm

    base_name, _ = timm.models.split_model_name_tag(model_name)
    if not timm.is_model(base_name):
        close = timm.list_models(f"*{base_name[:8]}*")[:10]
        hint = f" Similar timm names: {', '.join(close)}." if close else ""
        return f"Unknown timm model {model_name!r}.{hint} See timm.list_models() for every name."
    try:
        timm.models.get_pretrained_cfg(model_name)
    except RuntimeError as error:  # a pretrained tag timm does not know
        tags = timm.list_pretrained(f"{base_name}.*")
        return f"{error} Known tags: {', '.join(tags) or 'none'}."
    return None
