"""The supervisor's :class:`Pool` (kept at this path by the product design; the code is in
:mod:`hlpool.pool.supervisor`)."""

from hlpool.pool.supervisor import Pool, SnapshotHandle  # noqa: F401
