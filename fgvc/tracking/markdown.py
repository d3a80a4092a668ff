"""Values written into Markdown (run summaries, descriptions, results.md) stay text.

A data root, a designer or a run name may hold backticks, pipes or HTML; rendered raw they
break out of their code span or table cell, or become markup in the MLflow UI.
"""

from __future__ import annotations

import html
import re

_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|>~$])")


def text(value: object) -> str:
    """Plain text: HTML escaped, Markdown punctuation backslash-escaped, one line."""
    flat = " ".join(str(value).split())
    return _SPECIAL.sub(r"\\\1", html.escape(flat, quote=False))


def code(value: object) -> str:
    """An inline code span no content can break out of (nor out of a table cell)."""
    flat = " ".join(str(value).split()).replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", flat)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if flat.startswith("`") or flat.endswith("`") or not flat else ""
    return f"{fence}{pad}{flat}{pad}{fence}"
