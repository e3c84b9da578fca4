"""Spin-then-sleep waits on a channel's semaphores.

Putting a thread to sleep on a semaphore and waking it costs more here than
the work around it: on PVM a semaphore ping-pong between two processes takes
~22 us per round trip and ~10 us of CPU per side, against ~2 us when one side
polls (``bench/throughput.py`` and the closing notes of issue 12 have the
figures). When an answer or the next request is due within a short, known
time, polling the semaphore (``sem_trywait``: no system call, a few ns)
saves a sleep and a wake-up; when it is not, polling only burns CPU. So every
poll here is bounded by what is known about the wait, and a wait that is not
short goes to sleep at once:

- a caller in ``result()`` whose call is the only one in its worker's channel
  polls for about the call's usual duration (the worker's own measured time),
  and only while the host has a core to spare (fewer busy workers than CPUs);
- a worker that has just answered polls for its next request for about twice
  the gap it usually sees between an answer and the next request, and not at
  all while that gap is long (an idle or lightly used worker sleeps at once).

Polling threads call ``sched_yield`` every few microseconds, so a process that
shares the core (a front end, another worker) still gets it, and poll without the
GIL (:meth:`hlpool.pool._slots.SharedSemaphore.poll`), so their process's other
threads run meanwhile.
"""

from __future__ import annotations

import time

from hlpool.pool._slots import SharedSemaphore

_monotonic_ns = time.monotonic_ns
YIELD_EVERY = 1  # polls between sched_yield calls: every poll lets a process sharing the core run
WORKER_SPIN_MAX_NS = 200_000  # a worker never polls longer than this for its next request
CALLER_SPIN_MAX_NS = 400_000  # nor a caller for an answer (longer calls: it sleeps at once)
# The longest a reader of a worker's answers (the pool's thread, a caller in result(), an event loop)
# lets them gather while a backlog keeps the worker busy (hlpool.pool.answers, hlpool.pool.loopcollect).
BATCH_WAIT_MAX = 0.002


def poll(semaphore: SharedSemaphore, until_ns: int) -> bool:
    """Take ``semaphore`` if it becomes positive before the CLOCK_MONOTONIC instant ``until_ns``;
    False (nothing taken) once that instant has passed."""
    return semaphore.poll(until_ns, YIELD_EVERY)


class NextRequestWait:
    """A worker's wait for its next request: poll for a while when requests usually come
    soon after an answer, else sleep on the semaphore at once.

    The gap between an answer and the next request is learnt as a moving average
    (the time the last wait took, however it ended); the poll lasts about twice
    that, at most :data:`WORKER_SPIN_MAX_NS`, and only while the average is below it.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.gap_ns = WORKER_SPIN_MAX_NS  # no polling until short gaps were seen
        self.polled = 0  # waits ended by polling (each one a sleep and a wake-up saved)

    def wait(self, semaphore: SharedSemaphore) -> None:
        """Return once a request was posted on ``semaphore`` (taken)."""
        start = _monotonic_ns()
        if self.enabled and self.gap_ns < WORKER_SPIN_MAX_NS:
            if semaphore.poll(start + min(2 * self.gap_ns + 20_000, WORKER_SPIN_MAX_NS), YIELD_EVERY):  # (poll())
                self.polled += 1
                self._learn(_monotonic_ns() - start)
                return
        semaphore.acquire()
        self._learn(_monotonic_ns() - start)

    def _learn(self, gap_ns: int) -> None:
        self.gap_ns = (3 * self.gap_ns + min(gap_ns, 4 * WORKER_SPIN_MAX_NS)) // 4
