"""A named registry: the one front door pattern shared by models, datasets and attacks."""

from __future__ import annotations

from fnmatch import fnmatch
from typing import Generic, TypeVar

from robustse.core.errors import RobustseError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by unique name; an unknown name raises ``error`` listing the valid ones.

    Args:
        kind: what the entries are, for messages (``"architecture"``).
        error: the :class:`RobustseError` subclass raised for an unknown name.
        hint: appended to the list of valid names (``"or torchvision:<name>"``).
    """

    def __init__(self, kind: str, error: type[RobustseError], *, hint: str = "") -> None:
        self.kind, self.error, self.hint = kind, error, hint
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> None:
        """Register ``entry``; a duplicate name is a programming error (ValueError)."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry

    def remove(self, name: str) -> None:
        """Take ``name`` out (nothing happens if it is not there)."""
        self._entries.pop(name, None)

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted names matching a glob pattern."""
        return sorted(n for n in self._entries if fnmatch(n, pattern))

    def get(self, name: str) -> T:
        """The entry of ``name``, or ``error`` naming the valid choices."""
        try:
            return self._entries[name]
        except KeyError:
            hint = f", {self.hint}" if self.hint else ""
            raise self.error(f"unknown {self.kind} {name!r} (valid: {', '.join(self.names())}{hint})") from None
