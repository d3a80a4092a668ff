"""Named registries for the extension points (architectures, attribution methods, regimes,
segmenters, augmentation recipes), in the style of timm's ``@register_model``.

An entry registers itself where it is defined::

    METHODS = Registry("attribution method")

    @METHODS.register("gradcam")
    class GradCAMMethod: ...

and everything that offers a choice (the CLI, the study table, the report) reads
``METHODS.names()``, so adding an entry is one file and no edit elsewhere.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from fgvc.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """An ordered name -> entry map; names are case-sensitive and unique."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

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
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose from {', '.join(self._entries)}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._entries.items())

    def where(self, predicate: Callable[[T], bool]) -> tuple[str, ...]:
        """Names of the entries for which ``predicate(entry)`` holds."""
        return tuple(name for name, entry in self._entries.items() if predicate(entry))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)
