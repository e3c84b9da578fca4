"""How a pool takes its workers' answers: in batches by the pool's thread, in the caller's thread
(``result()``), or by an event loop (:mod:`hlpool.pool.loopcollect`); then resolves the futures.

:class:`AnswerPath` is a part of :class:`hlpool.pool.supervisor.Pool` (a mixin kept in its own
module): it uses the pool's lock, workers, cost estimates and ``_replace``/``_dispatch_locked``.
Whoever reads a worker's answers holds that worker's reader lock (``WorkerLink.reader``), taken
before the pool's lock, never after it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import posix_ipc

from hlpool import errors
from hlpool.errors import WorkerCrashed
from hlpool.guest import codec
from hlpool.pool import channel as ipc
from hlpool.pool import _slots, loopcollect, routing, spin
from hlpool.pool.spin import BATCH_WAIT_MAX
from hlpool.pool.calls import Call, WorkerLink, rebuild_error

if TYPE_CHECKING:
    pass

log = logging.getLogger("hlpool.pool.supervisor")

WATCHDOG_GRACE = 5.0  # a worker silent this long past a call's deadline is killed
PIPELINE_DEPTH = 16  # calls in a worker's channel at once (answers are collected in batches)
CALLER_GRACE = 0.0001  # how long the pool's thread leaves a lone call's answer to its caller (see CallFuture)


class AnswerPath:
    """The answer-taking half of :class:`~hlpool.pool.supervisor.Pool`."""

    def _collect(self, w: WorkerLink) -> None:
        """Wait briefly for responses of ``w``; take every response that is ready in one batch.

        One wake-up of this thread serves as many responses as the worker has posted
        by then: they are read under one acquisition of the lock, the channel is
        refilled from the queue before any future is resolved (the worker never
        waits for the callbacks), then the futures are resolved outside the lock.
        """
        responses = w.channel.responses
        self._let_answers_gather(w, None)
        try:
            responses.acquire(0.05)
        except posix_ipc.BusyError:
            if not w.is_alive():
                self._replace(w, "died")
                return
            with self._lock:
                call = w.inflight[0] if w.inflight else None
            reason = w.stuck_reason(call, WATCHDOG_GRACE) if call is not None else None
            if reason is not None:
                log.error("worker %d (pid %d) is %s; killing it", w.index, w.pid, reason)
                w.kill()
                self._replace(w, f"was killed: {reason}")
            return
        self._take_answers(w)

    def _let_answers_gather(self, w: WorkerLink, deadline: float | None, in_caller: "Call | None" = None) -> None:
        """Before a reader takes ``w``'s answers: while more than two calls in the channel are
        unanswered and fewer than half of its calls are answered, sleep until about two are left
        (the worker's measured call time, at most BATCH_WAIT_MAX), so that one wake-up takes
        many answers (a wake-up costs more CPU than an answer: a caller in ``result()`` with 64
        calls outstanding that woke for each answer spent ~80 us of CPU per call, against ~28
        in batches). The worker never waits meanwhile (two calls are left, and the channel is
        refilled before the answers are resolved), and the calls behind would wait for the
        backlog anyway. (It used to wait only while no answer was posted: a big batch was then
        followed by the one or two answers posted while it was resolved, 7 answers per read
        with 64 outstanding on one worker, 13.5 now.)

        A caller in ``result()`` (``in_caller``, its call given) waits so only when its call is
        the head and the call after it is not awaited by another thread or an event loop (the
        caller takes that answer next, or a callback does: one caller going through its calls in
        order, as ``Pool.map`` does). Otherwise the answers it would wait for are other threads',
        each woken on its own anyway: waiting would only delay them (threads each blocked on
        their own call: p99 2.5-2.9 -> 4.4-5.4 ms with 16 such threads when they waited too)."""
        inflight = w.inflight
        posted = w.channel.responses.value
        unanswered = len(inflight) - posted
        if unanswered <= 2 or 2 * posted >= len(inflight):
            return
        try:
            head, after = inflight[0], inflight[1]
        except IndexError:  # taken meanwhile by another reader
            return
        if in_caller is not None and (head is not in_caller or after.in_loop
                                      or getattr(after.future, "_watched", False)):
            return
        per_call = self._call_cost.get(head.handle.path, routing.DEFAULT_CALL_COST)
        pause = min(BATCH_WAIT_MAX, per_call * (unanswered - 2))
        if deadline is not None:
            pause = min(pause, deadline - time.monotonic())
        if pause > 0:
            time.sleep(pause)

    def _take_answers(self, w: WorkerLink, in_caller: bool = False) -> None:
        """After one answer was signalled: take it and every answer already posted, refill the
        channel from the queue, then resolve the futures outside the pool's lock (reader held)."""
        channel = w.channel
        inflight = w.inflight
        # the answers posted already, besides the one signalled (never more than the calls in flight)
        ready = 1 + channel.responses.take(min(len(inflight), PIPELINE_DEPTH) - 1)
        with self._lock:
            now = time.monotonic()
            batch, trusted, calls, errors, opens, figures = _slots.read_answers(
                channel.view, channel.offsets, channel.data_capacity, w.received, inflight, min(ready, len(inflight)),
                ipc.OP_CALL, ipc.STATUS_OK, self._call_cost)
            w.received += len(batch)
            w.answer_reads += 1
            w.calls += calls
            w.errors += errors
            w.opens_in_flight -= opens
            if figures is not None:
                w.sandboxes, w.vms_created, w.switches = figures
            if inflight:  # the worker starts the next call about now (the watchdog measures from here)
                inflight[0].started = now
            if w.queue and w.alive and trusted:
                if w.queued_deadlines:
                    w.expire_queued()
                while w.queue and len(inflight) < PIPELINE_DEPTH:
                    self._dispatch_locked(w, w.queue.popleft())
        if not trusted:  # the worker broke the channel's protocol: nothing it answered is trusted
            for call, *_ in batch:
                if not call.future.done():
                    call.future.set_exception(WorkerCrashed(f"worker {w.index} broke the channel's protocol "
                                                            "(an answer out of order or malformed)"))
            w.kill()
            self._replace(w, "broke the channel's protocol")
            return
        resolved = 0
        try:
            for item in batch:
                try:  # done-callbacks run here: what they raise must not end a thread or lose answers
                    self._resolve(*item)
                except BaseException as exc:  # noqa: BLE001 (SystemExit and the like from user callbacks)
                    if in_caller and isinstance(exc, KeyboardInterrupt):
                        raise  # the caller's own Ctrl-C (the finally still delivers the rest)
                    log.exception("a done-callback of a pool call raised; the pool goes on")
                resolved += 1
        finally:  # a caller collecting here may be interrupted (KeyboardInterrupt in result()):
            for item in batch[resolved:]:  # the answers it took out of the channel are still delivered
                if not item[0].future.done():
                    self._resolve(*item)

    def _wake_collector(self, call: Call, blocking: bool = True) -> None:
        """Make the pool's thread collect ``call``'s answer now (it may be waiting for a caller).

        ``blocking=False`` is for callers that hold the call's Future condition
        (``concurrent.futures.wait`` adds its waiter under it): the pool's lock is taken
        before a Future's condition everywhere else, so waiting for it here could deadlock;
        when it is busy, a short-lived thread delivers the wake-up instead.

        ``call.eager`` is set before this is called, and the pool's thread reads it under the
        lock before it waits for a caller, so the wake-up is skipped (no lock, no notify: most
        calls with a callback) where that thread cannot be waiting on this call: the call is
        still queued (the thread dispatches it, then sees it eager), or others are ahead of it
        in the channel and the first of them is not an event loop's (the thread collects them
        all as they come; it waits for a caller only on a lone call)."""
        w = call.worker
        if w is None:
            return
        inflight = w.inflight
        if len(inflight) > 1:
            try:
                if not inflight[0].in_loop:
                    return
            except IndexError:  # emptied meanwhile: wake the thread as usual
                pass
        if not self._lock.acquire(blocking=blocking):
            threading.Thread(target=self._wake_collector, args=(call,), name="hlpool-wake", daemon=True).start()
            return
        try:
            w = call.worker
            if w is not None:
                w.wakeup.notify()
        finally:
            self._lock.release()

    def _collect_for(self, call: "Call | None", timeout: float | None) -> None:
        """In the caller's thread: read the answers of the call's worker until the call is done,
        if no one else reads them now (see :class:`CallFuture`). Gives up on any trouble."""
        w = call.worker if call is not None else None
        if w is None:  # still queued: the pool's thread dispatches it and should answer at once
            if call is not None:
                call.eager = True
            return
        if not w.reader.acquire(blocking=False):
            if not call.eager:
                call.eager = True
                self._wake_collector(call)
            return
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not call.future.done() and call.worker is w and w.channel is not None and w.inflight:
                if not self._poll_answer(w, call, deadline):
                    self._let_answers_gather(w, deadline, in_caller=call)
                    wait = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
                    if wait <= 0:
                        return
                    try:
                        w.channel.responses.acquire(wait)
                    except (posix_ipc.BusyError, errors.HlpoolError):
                        return  # slow, stuck or corrupt: the pool's thread watches the worker
                self._take_answers(w, in_caller=True)
        finally:
            self._release_reader(w)
            if w.inflight:
                with self._lock:
                    w.wakeup.notify()

    def _release_reader(self, w: WorkerLink) -> None:
        """Let go of ``w``'s reader lock; answers left behind for an event loop are signalled to it."""
        w.reader.release()
        channel = w.channel
        if self._loop_collector is not None and channel is not None and w.inflight and channel.responses.value:
            loopcollect.poke(w)

    def _poll_answer(self, w: WorkerLink, call: Call, deadline: float | None) -> bool:
        """Poll for the answer of ``call``, alone in its worker's channel, for about its usual
        duration instead of sleeping (see :mod:`hlpool.pool.spin`); True if an answer was taken."""
        if not self._spin_wait or len(w.inflight) != 1 or w.inflight[0] is not call:
            return False
        usual = self._call_cost.get(call.handle.path, routing.DEFAULT_CALL_COST) * 1e9
        if usual > spin.CALLER_SPIN_MAX_NS:
            return False  # a long call: sleep
        cpus = self._cpus
        # Workers with a call in their channel: no more than the calls pending (open hints aside), so
        # they are counted only when that many are pending (a loop over every worker per lone call:
        # 3.7 us with 64 workers, for one call at a time).
        if self._pending >= cpus:
            busy = 0
            for x in self._workers:  # (a loop, not a generator)
                if x.inflight:
                    busy += 1
                    if busy >= cpus:
                        return False  # no core to spare: sleep
        until = int(call.started * 1e9 + 1.5 * usual) + 50_000
        if deadline is not None:
            until = min(until, int(deadline * 1e9))
        return spin.poll(w.channel.responses, min(until, time.monotonic_ns() + spin.CALLER_SPIN_MAX_NS))

    def _resolve(self, call: Call, status: int, data: bytes) -> None:
        """Set the future of a finished call from the worker's response (the cost estimate of its
        snapshot was updated as the answer was read: :func:`hlpool.pool._slots.read_answers`)."""
        if call.op == ipc.OP_OPEN:
            if status != ipc.STATUS_OK:
                log.debug("opening %s ahead of its calls failed: %s", call.handle.path, rebuild_error(data))
            call.future.set_result(None)
            return
        if status == ipc.STATUS_OK:
            try:
                value = codec.decode_value(data)
            except errors.GuestProtocolError as exc:
                call.future.set_exception(errors.GuestProtocolError(f"{call.function}: guest returned a "
                                                                    f"malformed result: {exc}"))
                return
            call.future.set_result(value)
        else:
            call.future.set_exception(rebuild_error(data))
