"""Snapshots: the immutable, shareable state of an initialised guest, and its files.

:mod:`.snapshot` (the :class:`Snapshot` value), :mod:`.regions` (:class:`Region`), :mod:`.initialise`
(ELF -> boot snapshot -> ``hl_main`` in a machine -> snapshot), :mod:`.capture` (a
layered snapshot of a live machine: only what changed), :mod:`.snapfile` (the file
format: persist and open, validated before anything is mapped).

May import: everything below it (:mod:`hlpool.machine` and lower).
"""

from hlpool.snapshot.snapshot import Region, Snapshot

__all__ = ["Region", "Snapshot"]
