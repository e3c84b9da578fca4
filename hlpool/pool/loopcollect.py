"""Answers collected by an asyncio event loop itself, without the pool's threads.

``await pool.call(...)`` in an event loop (the HTTP service's handlers) used to
wait on a ``concurrent.futures`` Future resolved by the pool's per-worker thread:
the worker woke that thread, which took the answer and woke the loop through its
self-pipe, and the two threads handed the GIL back and forth — about a dozen
futex calls per request, each a costly exit on a nested hypervisor.

Here the loop takes the answers. Every worker has an eventfd (made once per
worker slot, passed to each process that fills the slot, see
:meth:`Spawner.spawn <hlpool.pool.spawner.Spawner.spawn>`); a request written
by the loop asks the worker to signal it after answering. The loop watches the
eventfds (``add_reader``); when one is readable it takes every answer of that
worker posted so far under the worker's reader lock, exactly as a caller in
``result()`` does, and resolves the asyncio futures directly. The pool's thread
stays out of the way: it steps in only when a worker has made no progress for
:data:`LOOP_WATCH` seconds (a long call, a dead or stuck worker, a loop that is
blocked or gone), so every guarantee (worker death, deadlines, watchdog) is
kept. Whoever releases a worker's reader lock while answers wait pokes its
eventfd, so no answer waits for the watch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from typing import TYPE_CHECKING, Any

import posix_ipc

from hlpool.pool.routing import DEFAULT_CALL_COST
from hlpool.pool.spin import BATCH_WAIT_MAX

if TYPE_CHECKING:
    from hlpool.pool.calls import WorkerLink
    from hlpool.pool.supervisor import Pool

log = logging.getLogger(__name__)

LOOP_WATCH = 0.02  # seconds the pool's thread leaves a worker to the loop while that worker makes no progress
# The loop lets a worker's answers gather only for at least this many more: a pause costs two epoll_ctl
# calls and a timer (with 4 calls per worker, HTTP K=2, pauses for one or two answers cost more CPU than
# they saved: 117-118 -> 126-131 us per request in the front end).
LOOP_GATHER_MIN = 4


class LoopCollector:
    """One event loop's watch on a pool's workers (made by :meth:`Pool.call_future`)."""

    def __init__(self, pool: "Pool", loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.thread_id = threading.get_ident()  # made in the loop's thread (call_future runs there)
        self._watched: list[int] = []
        # workers whose eventfd is not watched for a moment while their answers gather: fd -> timer
        self._gathering: dict[int, asyncio.TimerHandle] = {}
        for w in pool._workers:
            loop.add_reader(w.notify_fd, self._ready, w)
            self._watched.append(w.notify_fd)

    def new_future(self, pool: "Pool") -> "LoopCallFuture":
        """The future of a call made from this loop (see :class:`LoopCallFuture`)."""
        return LoopCallFuture(pool, self)

    def _ready(self, w: "WorkerLink") -> None:
        """The worker signalled answers: take every one posted so far (in the loop's thread), or,
        while a backlog keeps the worker busy, come back once more of them were posted."""
        try:
            os.eventfd_read(w.notify_fd)
        except (BlockingIOError, OSError):
            pass  # already drained by an earlier wake-up
        pause = self._gather_pause(w)
        if pause > 0:
            # Answers gather meanwhile: the loop wakes once for many instead of once per answer
            # (89 -> 40-44 us of the loop's CPU per call, 64 calls outstanding on one worker).
            # The worker never waits (the answers taken refill its channel, half of it is left)
            # and the calls behind the answered ones wait for the backlog anyway.
            fd = w.notify_fd
            self.loop.remove_reader(fd)
            self._gathering[fd] = self.loop.call_later(pause, self._gathered, w)
            return
        self._take(w)

    def _gather_pause(self, w: "WorkerLink") -> float:
        """Seconds to let ``w``'s answers gather before taking them: about the time the worker
        needs to answer half of what it still has beyond two calls, if that is at least
        :data:`LOOP_GATHER_MIN` answers; 0 to take them now."""
        channel = w.channel
        inflight = w.inflight
        if channel is None:
            return 0.0
        unanswered = len(inflight) - channel.responses.value
        expected = (unanswered - 2) // 2  # answers the pause is for
        if expected < LOOP_GATHER_MIN or channel.responses.value * 2 >= len(inflight):
            return 0.0
        try:
            head = inflight[0]
        except IndexError:
            return 0.0
        per_call = self.pool._call_cost.get(head.handle.path, DEFAULT_CALL_COST)
        return min(BATCH_WAIT_MAX, per_call * expected)

    def _gathered(self, w: "WorkerLink") -> None:
        """The pause is over: watch the worker's eventfd again and take what was posted."""
        fd = w.notify_fd
        if self._gathering.pop(fd, None) is None:
            return  # detached meanwhile
        self.loop.add_reader(fd, self._ready, w)
        try:
            os.eventfd_read(fd)
        except (BlockingIOError, OSError):
            pass
        self._take(w)

    def _take(self, w: "WorkerLink") -> None:
        """Take every answer of ``w`` posted so far, unless someone else reads them now."""
        if not w.reader.acquire(blocking=False):
            return  # a caller or the pool's thread reads now; it pokes the eventfd when it stops
        try:
            channel = w.channel
            while channel is not None and w.inflight and channel.responses.value:
                try:
                    channel.responses.acquire(0)
                except posix_ipc.BusyError:
                    break
                before = w.received
                self.pool._take_answers(w)
                w.loop_answers += max(0, w.received - before)
                channel = w.channel
        except Exception:  # nothing a worker sends may end the loop: the pool's thread takes over
            log.exception("collecting answers of worker %d in the event loop failed", w.index)
        finally:
            w.reader.release()

    def detach(self) -> None:
        """Stop watching (in the loop's thread, or while the loop does not run)."""
        for timer in self._gathering.values():
            timer.cancel()
        self._gathering.clear()
        for fd in self._watched:
            try:
                self.loop.remove_reader(fd)
            except Exception:  # the loop is closed
                pass
        self._watched.clear()


_PENDING, _RUNNING, _CANCELLED, _FINISHED = range(4)
_STATES = threading.Lock()  # the state changes of every LoopCallFuture (a few at a time, never nested)


class LoopCallFuture:
    """The future of a pool call made from the event loop (:meth:`Pool.call_future`).

    The pool sets it as it sets a ``concurrent.futures.Future`` (``set_running_or_notify_cancel``,
    ``set_result``, ``set_exception``, ``cancel``, ``done``), and it settles the loop's asyncio
    future (:attr:`waiter`) directly: in the loop's thread at once (the loop takes most answers
    itself), from another thread (the pool's, stepping in) through ``call_soon_threadsafe``. No
    condition variable, no callback list and no second future per call: a front end makes one
    per request. Cancelling the waiter cancels the call if it has not started; a finished call
    frees its pending slot as a CallFuture does.
    """

    __slots__ = ("_pool", "_collector", "waiter", "_state")

    def __init__(self, pool: "Pool", collector: LoopCollector) -> None:
        self._pool = pool
        self._collector = collector
        self._state = _PENDING
        self.waiter: asyncio.Future = collector.loop.create_future()
        self.waiter.add_done_callback(self._waiter_done)

    def _waiter_done(self, waiter: asyncio.Future) -> None:
        if waiter.cancelled():
            self.cancel()  # a queued call is dropped; a running one finishes unobserved

    def set_running_or_notify_cancel(self) -> bool:
        with _STATES:
            if self._state == _CANCELLED:
                return False
            if self._state != _PENDING:
                raise RuntimeError(f"call future in state {self._state} cannot start")
            self._state = _RUNNING
            return True

    def cancel(self) -> bool:
        with _STATES:
            if self._state == _CANCELLED:
                return True
            if self._state != _PENDING:
                return False
            self._state = _CANCELLED
        self._finish(None, None, True)
        return True

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def done(self) -> bool:
        return self._state >= _CANCELLED

    def set_result(self, value: Any) -> None:
        self._end(value, None)

    def set_exception(self, exc: BaseException) -> None:
        self._end(None, exc)

    def _end(self, value: Any, exc: BaseException | None) -> None:
        with _STATES:
            if self._state >= _CANCELLED:
                ended = "cancelled" if self._state == _CANCELLED else "finished"
                raise concurrent.futures.InvalidStateError(f"call future already {ended}")
            self._state = _FINISHED
        self._finish(value, exc, False)

    def _finish(self, value: Any, exc: BaseException | None, cancel: bool) -> None:
        self._pool._release_pending()
        collector = self._collector
        if threading.get_ident() == collector.thread_id:
            _settle(self.waiter, value, exc, cancel)
        else:  # the pool's thread took the answer (the safety net): hand it to the loop
            try:
                collector.loop.call_soon_threadsafe(_settle, self.waiter, value, exc, cancel)
            except RuntimeError:  # the loop is closed: no one waits any more
                pass


def _settle(waiter: asyncio.Future, value: Any, exc: BaseException | None, cancel: bool) -> None:
    if waiter.done():
        return
    if cancel:
        waiter.cancel()
    elif exc is not None:
        waiter.set_exception(exc)
    else:
        waiter.set_result(value)


def poke(w: "WorkerLink") -> None:
    """Make the loop look at ``w``'s answers now (they were left while someone else held its reader lock)."""
    try:
        os.eventfd_write(w.notify_fd, 1)
    except OSError:
        pass


def any_in_loop(calls: Any) -> bool:
    return any(c.in_loop for c in calls)
