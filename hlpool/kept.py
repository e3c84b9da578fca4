"""Equal immutable values kept once.

A worker keeps thousands of tenant snapshots of one family open, and most of what each one
carries besides its own pages is equal across the family: vCPU state blobs, entry pages,
export tables. :class:`KeptValues` hands out one object per distinct value, so equal values
cost memory once. A table is bounded (cleared when full: a value is then simply kept again)
and only for values nobody changes after they are handed out.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, TypeVar

T = TypeVar("T")


class KeptValues:
    """A bounded table of values kept once (see the module's description)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._values: dict[Hashable, Any] = {}

    def one(self, value: T) -> T:
        """The kept object equal to ``value`` (``value`` itself the first time)."""
        kept = self._values.get(value)  # type: ignore[arg-type]
        return kept if kept is not None else self._keep(value, value)

    def one_for(self, key: Hashable, make: Callable[[], T]) -> T:
        """The value kept under ``key``, made by ``make()`` the first time."""
        kept = self._values.get(key)
        return kept if kept is not None else self._keep(key, make())

    def _keep(self, key: Hashable, value: T) -> T:
        if len(self._values) >= self._limit:
            self._values.clear()
        self._values[key] = value
        return value
