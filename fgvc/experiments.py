"""Every MLflow experiment fgvc writes to, named once.

A team server that makes READ the default must grant writers EDIT on each of these
(docs/team.md, "Permissions": its grant script lists them, and tests/test_team.py runs that
script as written and checks the list against this one).
"""

DATA = "fgvc-data"  # prepare
MASK = "fgvc-mask"  # mask
TRAIN = "fgvc-train"  # train, register
REGISTRY = "fgvc-registry"  # promote
ANALYSIS = "fgvc-analysis"  # analyze: the analysis records
PREDICT = "fgvc-predict"  # predict
STUDY = "fgvc-study"  # study: the study runs and their cells' trainings
CLAIMS = "fgvc-claims"  # the claims ledger (fgvc.tracking.claims)

WRITTEN = (DATA, MASK, TRAIN, REGISTRY, ANALYSIS, PREDICT, STUDY, CLAIMS)
