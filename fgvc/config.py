"""Typed task configuration: one frozen dataclass per task, parsed once, rendered once.

Each option is a dataclass field whose metadata holds its :class:`Kind`: how the option is
parsed from text (the command line, an MLproject parameter), how its value is rendered for
MLflow params, and which MLproject type it has. So

- the CLI parses every option exactly once, into real types (bool, int, float, None for
  ``auto``/``all``/``none``); nothing behind the CLI sees those strings;
- params are rendered from the typed config by :func:`render_params`, so one setting always
  logs one string, whether it came from ``fgvc train``, ``mlflow run`` or a study cell
  (``render(parse(text))`` is the canonical spelling of ``text``);
- :func:`config_id` digests the rendered values of the fields that change a result.

Range rules (``check=``) run in ``__post_init__`` via :func:`validate`, so a config built
in Python is checked as strictly as one parsed from the command line, and the error names
the option.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fgvc.errors import ConfigError

TRUE_WORDS = ("true", "yes", "1", "on")
FALSE_WORDS = ("false", "no", "0", "off")


class Kind:
    """How one option is typed. ``parse`` raises ValueError with a short reason."""

    name = "text"
    mlproject_type = "string"

    def parse(self, text: str) -> Any:
        return text

    def render(self, value: Any) -> str:
        return str(value)


class _Int(Kind):
    name, mlproject_type = "integer", "int"

    def parse(self, text):
        try:
            return int(str(text).strip())
        except ValueError:
            raise ValueError(f"{text!r} is not an integer") from None


class _Float(Kind):
    name, mlproject_type = "number", "float"

    def parse(self, text):
        try:
            return float(str(text).strip())
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None

    def render(self, value):
        return repr(float(value))


class _Bool(Kind):
    name = "true|false"

    def parse(self, text):
        word = str(text).strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ValueError(f"{text!r} is not true or false")

    def render(self, value):
        return "true" if value else "false"


class _Str(Kind):
    name = "text"

    def parse(self, text):
        text = str(text).strip()
        if not text:
            raise ValueError("empty value")
        return text


INT, FLOAT, BOOL, STR = _Int(), _Float(), _Bool(), _Str()


class Choice(Kind):
    """One of fixed words; ``values`` may be a callable (read from a registry when parsing)."""

    def __init__(self, values: Iterable[str] | Callable[[], Iterable[str]]):
        self._values = values

    @property
    def values(self) -> tuple[str, ...]:
        return tuple(self._values() if callable(self._values) else self._values)

    @property
    def name(self) -> str:  # type: ignore[override]
        return "|".join(self.values)

    def parse(self, text):
        text = str(text).strip()
        if text not in self.values:
            close = difflib.get_close_matches(text, self.values, n=2, cutoff=0.6)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ValueError(f"{text!r} is not one of {', '.join(self.values)}{hint}")
        return text


class Maybe(Kind):
    """``word`` (``auto``, ``all``, ``none``) means None; ``also`` maps further words to
    values (``{"none": False}``); anything else is ``inner``."""

    def __init__(self, inner: Kind, word: str = "auto", also: dict[str, Any] | None = None):
        self.inner, self.word = inner, word
        self.words = {word: None, **(also or {})}

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{'|'.join(self.words)}|{self.inner.name}"

    def parse(self, text):
        key = str(text).strip().lower()
        if key in self.words:
            return self.words[key]
        try:
            return self.inner.parse(text)
        except ValueError as e:
            raise ValueError(f"{e} (or {' or '.join(self.words)})") from None

    def render(self, value):
        for word, meaning in self.words.items():
            if value is meaning:
                return word
        return self.inner.render(value)


class ListOf(Kind):
    """A comma-separated list, as a tuple; empty items are ignored."""

    def __init__(self, inner: Kind):
        self.inner = inner

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"comma list of {self.inner.name}"

    def parse(self, text):
        items = tuple(self.inner.parse(part) for part in str(text).split(",") if part.strip())
        if not items:
            raise ValueError("empty list")
        return items

    def render(self, value):
        return ",".join(self.inner.render(v) for v in value)


class FlagOr(Kind):
    """``true``/``false`` as a bool, any other text as ``inner`` (a run id, a path)."""

    def __init__(self, inner: Kind = STR, what: str = "text"):
        self.inner, self.what = inner, what

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"true|false|{self.what}"

    def parse(self, text):
        try:
            return BOOL.parse(text)
        except ValueError:
            return self.inner.parse(text)

    def render(self, value):
        return BOOL.render(value) if isinstance(value, bool) else self.inner.render(value)


# --------------------------------------------------------------------------------- checks

def positive(value) -> str | None:
    return None if value is None or value > 0 else "must be positive"


def non_negative(value) -> str | None:
    return None if value is None or value >= 0 else "must be >= 0"


def fraction(value) -> str | None:
    return None if value is None or 0.0 <= value <= 1.0 else "must be in [0, 1]"


def below_one(value) -> str | None:
    return None if value is None or 0.0 <= value < 1.0 else "must be in [0, 1)"


def each(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """Apply ``check`` to every item of a tuple value."""
    def check_items(values):
        for v in values or ():
            problem = check(v)
            if problem:
                return f"{problem} (got {v!r})"
        return None
    return check_items


# ---------------------------------------------------------------------------------- fields

def option(kind: Kind, default: Any, help: str, *, check: Callable[[Any], str | None] | None = None,
           identity: bool = True) -> Any:
    """A config field. ``identity=False``: the option does not change the result (device,
    loader threads, where things are logged), so it is left out of :func:`config_id`."""
    return dataclasses.field(default=default,
                             metadata={"kind": kind, "help": help, "check": check, "identity": identity})


def options(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "kind" in f.metadata]


def cli_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate(cfg) -> None:
    """Run every field's ``check``; raise ConfigError naming the option and the rule."""
    for f in options(cfg):
        check = f.metadata["check"]
        value = getattr(cfg, f.name)
        problem = check(value) if check else None
        if problem:
            shown = f.metadata["kind"].render(value)
            got = "" if shown in problem else f", got {shown}"
            raise ConfigError(f"{cli_name(f.name)} ({f.name}): {problem}{got}")


def render_params(cfg) -> dict[str, str]:
    """Every option's canonical text: what MLflow logs as the run's params."""
    return {f.name: f.metadata["kind"].render(getattr(cfg, f.name)) for f in options(cfg)}


def parse_value(cls, name: str, text: str) -> Any:
    """Parse one option of ``cls`` from text; ConfigError naming the option on bad input."""
    field = next((f for f in options(cls) if f.name == name), None)
    if field is None:
        raise ConfigError(f"{cls.__name__} has no option {name!r}")
    try:
        return field.metadata["kind"].parse(text)
    except ValueError as e:
        raise ConfigError(f"{cli_name(name)}: {e}") from None


def digest(values: dict[str, str]) -> str:
    """16 hex chars of sha256 over a canonical JSON of `values`."""
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def config_id(cfg, extra: dict[str, str] | None = None) -> str:
    """The digest of the rendered identity options (and ``extra``)."""
    identity = {f.name: f.metadata["kind"].render(getattr(cfg, f.name))
                for f in options(cfg) if f.metadata["identity"]}
    return digest({**identity, **(extra or {})})


@dataclass(frozen=True)
class Config:
    """Base of the task configs: validates on construction."""

    def __post_init__(self):
        validate(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def params(self) -> dict[str, str]:
        return render_params(self)
