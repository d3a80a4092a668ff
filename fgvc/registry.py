"""Named registries for the extension points (architectures, attribution methods, regimes,
segmenters, augmentation recipes), in the style of timm's ``@register_model``.

An entry registers itself where it is defined::

    METHODS = Registry("attribution method")

    @METHODS.register("gradcam")
    class GradCAMMethod: ...

and everything that offers a choice (the CLI, the study table, the report) reads
``METHODS.names()``, so adding an entry is one file and no edit elsewhere.

A registry whose entries live in heavy modules (torch, torchvision) is lazy: it is created with
``loader`` (the module that registers the entries) and the ``declared`` names of its built-in
entries, so the CLI lists and checks names without importing torch; the module is imported the
first time an entry itself is needed (fgvc.catalog holds these registries).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from fgvc.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """An ordered name -> entry map; names are case-sensitive and unique."""

    def __init__(self, kind: str, declared: Iterable[str] = (), loader: str | None = None):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._declared = tuple(declared)
        self._loader = loader

    def load(self) -> None:
        """Import the module that registers the entries (once; a no-op for an eager registry)."""
        if self._loader is not None:
            loader, self._loader = self._loader, None
            importlib.import_module(loader)

    def register(self, name: str, entry: T | None = None):
        """``register(name, entry)``, or ``@register(name)`` as a decorator."""
        if entry is not None:
            self._add(name, entry)
            return entry

        def decorate(obj: T) -> T:
            self._add(name, obj)
            return obj

        return decorate

    def _add(self, name: str, entry: T) -> None:
        if name in self._entries and self._entries[name] is not entry:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry

    def get(self, name: str) -> T:
        if name not in self._entries:
            self.load()
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(self.unknown(name)) from None

    def unknown(self, name: str) -> str:
        """The one-line refusal of an unknown name, with the nearest names when there are any."""
        close = difflib.get_close_matches(str(name), self.names(), n=2, cutoff=0.6)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        return f"unknown {self.kind} {name!r}{hint}; choose from {', '.join(self.names())}"

    def names(self) -> tuple[str, ...]:
        """The declared and registered names, without importing anything."""
        return tuple(dict.fromkeys((*self._declared, *self._entries)))

    def items(self) -> Iterator[tuple[str, T]]:
        self.load()
        return iter(self._entries.items())

    def where(self, predicate: Callable[[T], bool]) -> tuple[str, ...]:
        """Names of the entries for which ``predicate(entry)`` holds."""
        return tuple(name for name, entry in self.items() if predicate(entry))

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._declared

    def __len__(self) -> int:
        return len(self.names())


def lazy_exports(package: str, exports: dict[str, str], namespace: dict):
    """A package's ``__getattr__`` (PEP 562) that imports ``exports[name]`` (a module path) on
    first use of ``name`` and keeps the value in ``namespace`` (the package's globals), so
    importing a light submodule of the package (a config the command line reads) does not
    import the heavy ones."""
    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value
        return value
    return __getattr__
