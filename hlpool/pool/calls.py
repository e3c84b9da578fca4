"""A pool call on its way: the call record, its Future, a worker's link state, worker errors.

:class:`CallFuture` is the ``concurrent.futures.Future`` that :meth:`Pool.submit
<hlpool.pool.supervisor.Pool.submit>` returns. A caller blocked in ``result()``
on a call already in a worker's channel takes that channel's reader lock if it
is free and waits for the worker's answer itself: the answer wakes the caller,
not the pool's thread first (one process wake-up less per call). A callback,
``wait()`` or ``as_completed()`` marks the call *eager*: the pool's thread then
collects its answer as soon as it comes. The pool is reached only through the
two methods named in :class:`CallCollector`, so this module imports nothing of
the supervisor.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import select
import threading
import time
from _thread import RLock as _RLock
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import msgspec

from hlpool import errors
from hlpool.errors import CallError, GuestTimeout, PayloadTooLargeError, WorkerCrashed
from hlpool.guest import codec
from hlpool.pool import channel as ipc
from hlpool.pool._slots import Call  # a C struct: made per call, read by the hot path in C
from hlpool.pool.procinfo import process_state
from hlpool.pool.registry import SnapshotHandle


MAX_SECONDS = 10.0 ** 9  # the longest timeout or deadline a call may have (~31 years: fits in ns)
_NOT_DONE = ("PENDING", "RUNNING")  # concurrent.futures' states of a future that is not done


class CallCollector(Protocol):
    """What a :class:`CallFuture` needs of its pool."""

    def _collect_for(self, call: "Call | None", timeout: float | None) -> None: ...

    def _wake_collector(self, call: "Call", blocking: bool = True) -> None: ...

    def _release_pending(self) -> None: ...


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker (the cause of the re-raised error)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n\"\"\"\n{self.text}\"\"\""


# concurrent.futures' states (module constants of its _base; a Future's _state holds one of them)
_PENDING, _RUNNING, _CANCELLED, _NOTIFIED, _FINISHED = \
    "PENDING", "RUNNING", "CANCELLED", "CANCELLED_AND_NOTIFIED", "FINISHED"
_CANCELLED_STATES = (_CANCELLED, _NOTIFIED)
_DONE_STATES = (_CANCELLED, _NOTIFIED, _FINISHED)
_LOG = logging.getLogger("concurrent.futures")


class CallFuture(concurrent.futures.Future):
    """The Future of a pool call: ``result()`` may collect the answer in the caller's thread.

    A caller blocked in ``result()`` on a call that is in a worker's channel takes
    that channel's reader lock if it is free and waits on the worker's answer
    itself: the answer then wakes the caller directly, not the pool's thread
    first. When the lock is taken, or on any trouble (a timeout slice passes, the
    worker is replaced), it falls back to the plain wait and the pool's thread
    does the rest.

    It behaves as a ``concurrent.futures.Future`` (``wait()``, ``as_completed()``,
    callbacks, cancellation) but is cheaper to make and to end: a Future builds a
    ``threading.Condition`` (a Python object with a lock and six bound methods) and a
    waiter list in ``__init__``, about a third of the supervisor's Python time per
    call with 64 calls outstanding. Here the state is guarded by one C lock, and the
    Condition over that lock is made only when a thread blocks in ``result()`` or
    ``exception()``, the waiter list when ``wait()`` or ``as_completed()`` adds to it; the
    methods below are Future's, with that lock, notifying only a Condition that exists.
    Made at most once: ``dict.setdefault`` is atomic, so two threads racing to make
    it end up with the same one. ``_condition``, which ``wait()`` and ``as_completed()``
    only take and let go of (around their waiter lists; every method that waits on it
    is overridden here), is the lock itself: they made a Condition per future for that
    (as_completed() over 20,000 calls, A/B 2x3: 58-72 -> 40-59 us of supervisor CPU per call).
    """

    _call: "Call | None" = None
    _watched = False  # a Condition or a waiter list was made: a change of state must tell them

    def __init__(self, pool: CallCollector) -> None:  # no super().__init__(): see the class docstring
        self._lock = _RLock()
        self._state = _PENDING
        self._result = None
        self._exception: BaseException | None = None
        self._done_callbacks: list = []
        self._pool = pool

    # -- the Condition and the waiter list, made on first use --------------------------

    @property
    def _condition(self) -> Any:
        """What ``concurrent.futures.wait()``/``as_completed()`` lock around this Future's
        waiter list (they acquire and release it, nothing more): the state lock."""
        return self._lock

    def _waitable(self) -> threading.Condition:
        """The Condition a thread blocked in ``result()``/``exception()`` waits on (made once)."""
        condition = self.__dict__.get("_made_condition")
        if condition is None:
            condition = self.__dict__.setdefault("_made_condition", threading.Condition(self._lock))
            self._watched = True
        return condition

    @property
    def _waiters(self) -> "WaiterList":
        waiters = self.__dict__.get("_made_waiters")
        if waiters is None:
            waiters = self.__dict__.setdefault("_made_waiters", WaiterList(self))
            self._watched = True
        return waiters

    def _notify_locked(self, add: str | None) -> None:
        """With the lock held, after a change of state: wake threads blocked on this Future and tell
        ``wait()``/``as_completed()`` waiters (``add``: the waiter method to call, e.g. ``add_result``)."""
        made = self.__dict__
        waiters = made.get("_made_waiters")
        if waiters and add is not None:
            for waiter in waiters:
                getattr(waiter, add)(self)
        condition = made.get("_made_condition")
        if condition is not None:
            condition.notify_all()

    # -- concurrent.futures.Future, over self._lock ------------------------------------

    def cancel(self) -> bool:
        with self._lock:
            if self._state in (_RUNNING, _FINISHED):
                return False
            if self._state in _CANCELLED_STATES:
                return True
            self._state = _CANCELLED
            self._notify_locked(None)
        self._invoke_callbacks()
        return True

    def cancelled(self) -> bool:
        return self._state in _CANCELLED_STATES

    def running(self) -> bool:
        return self._state == _RUNNING

    def done(self) -> bool:
        return self._state in _DONE_STATES

    def add_done_callback(self, fn: Any) -> None:
        with self._lock:
            if self._state not in _DONE_STATES:
                self._done_callbacks.append(fn)
                added = True
            else:
                added = False
        if added:
            call = self._call
            if call is not None and not call.eager:  # else nothing to do (see _wants_collector)
                self._wants_collector()
            return
        try:
            fn(self)
        except Exception:
            _LOG.exception("exception calling callback for %r", self)

    def result(self, timeout: float | None = None) -> Any:
        if self._state == _FINISHED and self._exception is None:  # the common case, without _wait
            return self._result
        if self._state in _NOT_DONE:
            timeout = self._collect(timeout)
            if self._state == _FINISHED and self._exception is None:  # collected here: no _wait either
                return self._result
        self._wait(timeout)
        if self._exception is not None:
            try:
                raise self._exception
            finally:
                self = None  # type: ignore[assignment]  # no reference cycle through the traceback
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == _FINISHED:
            return self._exception
        if self._state in _NOT_DONE:
            timeout = self._collect(timeout)
        self._wait(timeout)
        return self._exception

    def _collect(self, timeout: float | None) -> float | None:
        """Let the pool collect this call's answer in this thread (see the class docstring);
        returns what is left of ``timeout`` for the plain wait that may follow."""
        if timeout is None:
            self._pool._collect_for(self._call, None)
            return None
        start = time.monotonic()
        self._pool._collect_for(self._call, timeout)
        return max(0.0, timeout - (time.monotonic() - start))

    def _wait(self, timeout: float | None) -> None:
        """Return once finished; CancelledError if cancelled; TimeoutError after ``timeout``."""
        state = self._state
        if state == _FINISHED:
            return
        if state not in _CANCELLED_STATES:
            condition = self._waitable()
            with condition:
                if self._state in _NOT_DONE:
                    condition.wait(timeout)
            state = self._state
            if state == _FINISHED:
                return
            if state not in _CANCELLED_STATES:
                raise concurrent.futures.TimeoutError()
        raise concurrent.futures.CancelledError()

    def set_running_or_notify_cancel(self) -> bool:
        with self._lock:
            if self._state == _CANCELLED:
                self._state = _NOTIFIED
                waiters = self.__dict__.get("_made_waiters")
                for waiter in waiters or ():
                    waiter.add_cancelled(self)
                return False
            if self._state == _PENDING:
                self._state = _RUNNING
                return True
            _LOG.critical("Future %s in unexpected state: %s", id(self), self._state)
            raise RuntimeError("Future in unexpected state")

    def set_result(self, result: Any) -> None:
        with self._lock:
            if self._state in _DONE_STATES:
                raise concurrent.futures.InvalidStateError(f"{self._state}: {self!r}")
            self._result = result
            self._state = _FINISHED
            if self._watched:
                self._notify_locked("add_result")
        self._invoke_callbacks()

    def set_exception(self, exception: BaseException | None) -> None:
        with self._lock:
            if self._state in _DONE_STATES:
                raise concurrent.futures.InvalidStateError(f"{self._state}: {self!r}")
            self._exception = exception
            self._state = _FINISHED
            self._notify_locked("add_exception")
        self._invoke_callbacks()

    def _invoke_callbacks(self) -> None:
        # Every way a Future ends (result, exception, cancel) passes here once: the pending slot
        # is given back first, without a done-callback of its own per call. The call record and
        # this Future point at each other: dropping the link here lets reference counting free
        # both at once instead of leaving a cycle per call to the garbage collector (a
        # collection every ~150 calls was ~10% of the supervisor's CPU).
        self._call = None
        self._pool._release_pending()
        for callback in self._done_callbacks:
            try:
                callback(self)
            except Exception:
                _LOG.exception("exception calling callback for %r", self)

    def _wants_collector(self, blocking: bool = True) -> None:
        """Someone waits without calling result() (a callback, wait(), as_completed()): from now
        on the pool's thread collects this call's answer as soon as it comes. ``blocking=False``
        when this Future's lock is held (see :meth:`Pool._wake_collector`)."""
        call, pool = self._call, self._pool
        if call is not None and pool is not None and not call.eager:
            call.eager = True
            pool._wake_collector(call, blocking)


class WaiterList(list):
    """``Future._waiters`` of a :class:`CallFuture`: an added waiter wakes the pool's thread."""

    def __init__(self, future: CallFuture) -> None:
        super().__init__()
        self.future = future

    def append(self, waiter: Any) -> None:
        super().append(waiter)
        self.future._wants_collector(blocking=False)  # wait() holds this Future's condition here


@dataclass
class WorkerLink:
    index: int
    channel: ipc.Channel | None = None
    pid: int = 0
    pidfd: int = -1
    queue: collections.deque = field(default_factory=collections.deque)
    # OP_OPEN hints waiting to be sent (see Pool._open_ahead): in groups, after a short delay
    hints: collections.deque = field(default_factory=collections.deque)
    inflight: collections.deque = field(default_factory=collections.deque)
    # What the worker holds, as the router expects it: family -> the snapshot path its VM is at
    # (without switching, path -> path), least recently used first.
    warm: "collections.OrderedDict[str, str]" = field(default_factory=collections.OrderedDict)
    sent: int = 0
    received: int = 0
    calls: int = 0
    errors: int = 0
    crashes: int = 0
    sandboxes: int = 0
    vms_created: int = 0  # by the current process (reported with each answer)
    switches: int = 0
    alive: bool = False
    thread: threading.Thread | None = None
    wakeup: threading.Condition | None = None  # shares the pool's lock
    stopped_since: float = 0.0  # when the watchdog first saw the process stopped (0: running)
    queued_deadlines: bool = False  # some queued call has a total deadline (see _expire_queued_locked)
    # Held by whoever waits on and reads the channel's answers: the pool's thread, or a caller
    # in result() (see CallFuture). Taken before the pool's lock, never after it.
    reader: threading.RLock = field(default_factory=threading.RLock)
    # An eventfd of this worker slot, kept across replacements: the worker signals answers an event
    # loop waits for (see hlpool.pool.loopcollect).
    notify_fd: int = -1
    loop_answers: int = 0  # answers an event loop took (the rest: the pool's thread or callers in result())
    answer_reads: int = 0  # reads of the channel's answers (each takes every answer posted by then)
    opens_in_flight: int = 0  # OP_OPEN hints among ``inflight``

    @property
    def load(self) -> int:
        """Calls queued or in the channel (open hints left out: they cost a worker ~0.3 ms, and an
        answered one may wait a moment for its reader; see Pool._open_ahead)."""
        return len(self.queue) + len(self.inflight) - self.opens_in_flight

    def is_alive(self) -> bool:
        """The worker process exists (its pidfd is not readable yet)."""
        if not self.alive:
            return False
        ready, _, _ = select.select([self.pidfd], [], [], 0)
        return not ready

    def kill(self) -> None:
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass

    def close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def expire_queued(self) -> None:
        """Fail the queued calls whose total deadline has passed (the pool's lock is held)."""
        now = time.monotonic()
        kept: collections.deque = collections.deque()
        for call in self.queue:
            if call.expires and call.expires <= now:
                if call.retried or call.future.set_running_or_notify_cancel():
                    call.future.set_exception(GuestTimeout(f"{call.function}: deadline passed while the call "
                                                           "was queued"))
            else:
                kept.append(call)
        self.queue = kept
        self.queued_deadlines = any(call.expires for call in kept)

    def stuck_reason(self, call: Call, grace: float) -> str | None:
        """Why the worker running ``call`` must be replaced, if it must: past the call's deadline
        plus ``grace``, or stopped (SIGSTOP, a debugger) for longer than ``grace``."""
        now = time.monotonic()
        limit = call.timeout_ns / 1e9 if call.timeout_ns else None
        if limit is not None and now - call.started > limit + grace:
            return "stuck past a call's deadline"
        if now - call.started > grace / 5:
            if process_state(self.pid) in ("T", "t"):
                if not self.stopped_since:
                    self.stopped_since = now
                elif now - self.stopped_since > grace:
                    return "stopped (no progress) while running a call"
            else:
                self.stopped_since = 0.0
        return None



def rebuild_error(blob: bytes) -> BaseException:
    """Turn a worker's error report (see :func:`hlpool.pool.worker.error_blob`) back into the
    matching hlpool exception, with the worker's traceback as its cause."""
    try:
        info = msgspec.msgpack.decode(blob)
        exc = errors.from_wire(info)
        cause = info.get("cause") if isinstance(info, dict) else None
        trace = cause["traceback"] if isinstance(cause, dict) else info.get("traceback", "")
        exc.__cause__ = RemoteTraceback(str(trace))
        return exc
    except Exception as exc:  # a corrupt blob must still fail the call clearly
        return WorkerCrashed(f"worker sent an unreadable error report: {exc}")


def results_in_order(futures: list[concurrent.futures.Future]) -> Iterator[Any]:
    """What ``Executor.map`` returns: a generator of the futures' results in order; the
    futures not reached yet are cancelled when the consumer stops early."""
    try:
        for f in futures:
            yield f.result()
    finally:
        for f in futures:
            f.cancel()


def check_call(handle: SnapshotHandle, fn: str, args: Any, max_payload: int, timeout: float | None,
               deadline: float | None) -> tuple[str, tuple, bytes]:
    """The checks every pool makes before accepting a call, raising here (not on the future):
    a script's own function becomes the interpreter's ``call(name, args)``; the function must be
    exported; the arguments must encode and fit; timeout and deadline must be positive.
    Returns (function, args, MessagePack payload)."""
    args = args if isinstance(args, tuple) else tuple(args)
    if handle.language is not None and fn not in handle.exports:
        fn, args = "call", (fn, list(args))  # a script's own function: the interpreter's call(name, args)
    if fn not in handle.exports:
        raise CallError(f"unknown function {fn!r}; the snapshot exports {sorted(handle.exports)}")
    try:
        payload = codec.encode_args(args)
    except codec.ValueTypeError as exc:
        raise CallError(f"{fn}: {exc}") from None
    limit = min(handle.input_capacity, max_payload)
    if len(payload) > limit:
        raise PayloadTooLargeError(f"{fn}: encoded arguments are {len(payload)} bytes, more than {limit}")
    if timeout is not None and not 0 < timeout <= MAX_SECONDS:  # (NaN fails both)
        raise CallError(f"timeout must be positive seconds, at most {MAX_SECONDS:.0f}; got {timeout}")
    if deadline is not None and not 0 < deadline <= MAX_SECONDS:
        raise CallError(f"deadline must be positive seconds, at most {MAX_SECONDS:.0f}; got {deadline}")
    return fn, args, payload
