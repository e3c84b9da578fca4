"""The pool: a supervisor, forked worker processes and the shared-memory channels between them.

:mod:`.supervisor` (:class:`Pool`: snapshot store, routing, futures, worker lifecycle),
:mod:`.spawner` (forks workers from a single-threaded process), :mod:`.worker` (a worker's
loop over its warm sandboxes), :mod:`.channel` (posix_ipc shared memory + semaphores). Script snapshots come from
:mod:`hlpool.sandbox.scripts`.

May import: :mod:`hlpool.sandbox` and everything below it.
"""
