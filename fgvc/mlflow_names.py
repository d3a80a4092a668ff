"""Every name fgvc gives in MLflow, in one place: the experiments it writes to, its registered
models and their aliases.

A team server that makes READ the default must grant writers EDIT on each experiment of
:data:`WRITTEN` and on the registered models (docs/team.md, "Permissions": its grant script
lists them, and tests/test_team.py runs that script as written and checks the list against
this one).
"""

from __future__ import annotations

import re

DATA = "fgvc-data"  # prepare
MASK = "fgvc-mask"  # mask
TRAIN = "fgvc-train"  # train, register
REGISTRY = "fgvc-registry"  # promote
ANALYSIS = "fgvc-analysis"  # analyze: the analysis records
PREDICT = "fgvc-predict"  # predict
STUDY = "fgvc-study"  # study: the study runs and their cells' trainings
CLAIMS = "fgvc-claims"  # the claims ledger (fgvc.tracking.claims)

WRITTEN = (DATA, MASK, TRAIN, REGISTRY, ANALYSIS, PREDICT, STUDY, CLAIMS)

# Aliases: `candidate` is the newest version of a user's training, `champion` the one `promote` chose.
CANDIDATE, CHAMPION = "candidate", "champion"
STUDY_PREFIX = "fgvc-study-"


def registered_name(arch: str) -> str:
    """`fgvc-<arch>` with characters the registry dislikes replaced (`timm:x` -> `fgvc-timm-x`)."""
    return "fgvc-" + re.sub(r"[^A-Za-z0-9_.-]", "-", arch)


def study_registered_name(arch_name: str) -> str:
    """The registered model of a study's cells: `fgvc-study-<arch>` beside the user's `fgvc-<arch>`."""
    return STUDY_PREFIX + arch_name.removeprefix("fgvc-")
