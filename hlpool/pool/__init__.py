"""The pool: a supervisor, forked worker and builder processes, and the channels between them.

:mod:`.supervisor` (:class:`Pool`: routing, futures, worker lifecycle, the watchdog),
:mod:`.registry` (the snapshots a pool knows: registration, removal, garbage collection),
:mod:`.store` (the content-addressed snapshot directory: pins, quota, collection),
:mod:`.builder` (snapshot builds in a short-lived process with time and memory limits),
:mod:`.spawner` (forks workers and builders from a single-threaded process),
:mod:`.worker` (a worker's loop over its warm sandboxes), :mod:`.confine` (seccomp,
capabilities and the rest of a worker's confinement), :mod:`.channel` (posix_ipc shared
memory + semaphores). Script snapshots come from :mod:`hlpool.sandbox.scripts`.

May import: :mod:`hlpool.sandbox` and everything below it.
"""
