"""The analysis methods, each a registered entry (see base.py).

Every module of this package is imported here, so a new method is one new file in this folder
that registers itself: `analyze --method <name>`, the study table and the report find it in
``METHODS`` with no edit elsewhere.
"""

import importlib
import pkgutil

from fgvc.analysis.methods.base import METHODS, AnalysisMethod, Column, MethodResult, register, study_columns

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "AnalysisMethod", "Column", "MethodResult", "register", "study_columns"]
