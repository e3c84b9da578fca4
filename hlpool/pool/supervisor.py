"""The supervisor: :class:`Pool`, a ``concurrent.futures``-style pool of sandbox workers.

The process that creates a Pool is the supervisor. It keeps the snapshot
store (:mod:`hlpool.pool.registry`; a guest ELF or a script is built once, by a
short-lived builder process with a deadline and memory limits, and stored under
its content hash), forks worker processes through the spawner, routes calls to
workers (preferring one with a warm VM for the snapshot), and resolves futures.
One thread per worker moves calls through that worker's shared-memory channel
(:mod:`hlpool.pool.channel`) and watches the worker's pidfd: if the worker dies,
its in-flight calls fail with :class:`WorkerCrashed`, a replacement is started,
and queued calls go on.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import itertools
import logging
import os
import select
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import posix_ipc

from hlpool import defaults
from hlpool.errors import (
    GuestTimeout,
    HlpoolError,
    PayloadTooLargeError,
    PoolClosedError,
    PoolOverloadedError,
    SnapshotError,
    WorkerCrashed,
)
from hlpool.guest.build import cache_dir
from hlpool.guest.layout import MemoryConfig
from hlpool.kvm.absence import require_kvm_device
from hlpool.memory.guest_memory import RestorePolicy
from hlpool.pool import channel as ipc
from hlpool.pool import _slots, loopcollect, routing
from hlpool.pool.answers import (  # noqa: F401 (WATCHDOG_GRACE, BATCH_WAIT_MAX: re-exported)
    BATCH_WAIT_MAX, CALLER_GRACE, PIPELINE_DEPTH, WATCHDOG_GRACE, AnswerPath)

HINT_GROUP = 16  # open hints sent together (see Pool._open_ahead)
HINT_DELAY = 0.02  # or this long after the first of them was made
from hlpool.pool.builder import BuildLimits, SnapshotBuilder, check_memory_config
from hlpool.pool.calls import (  # noqa: F401 (RemoteTraceback: re-exported)
    Call, CallFuture, RemoteTraceback, WorkerLink, check_call, rebuild_error, results_in_order)
from hlpool.pool.procinfo import memory_of as _memory_of
from hlpool.pool.procinfo import raise_fd_limit as _raise_fd_limit
from hlpool.pool.registry import SnapshotHandle, SnapshotRegistry
from hlpool.pool.spawner import Spawner
from hlpool.pool.store import SnapshotStore
from hlpool.pool.worker import WorkerConfig
from hlpool.sandbox import HostFunction, scripts
from hlpool.snapshot.snapshot import Snapshot

log = logging.getLogger(__name__)


class Pool(AnswerPath):
    """A pool of worker processes running calls in sandboxes.

    >>> with Pool(workers=2) as pool:
    ...     snap = pool.snapshot("add.elf")
    ...     pool.submit(snap, "add", (2, 3)).result()
    5

    ``snapshot_dir``: where snapshots built from ELF files are stored (default
    ``~/.cache/hlpool/snapshots``). ``host_functions``: Python callables the
    guests may call; they run in the workers, which inherit them. ``max_pending``:
    calls submitted but not finished; beyond it ``submit`` blocks (or raises
    :class:`PoolOverloadedError` with ``block=False``). ``call_timeout``: default
    deadline of a call in seconds (None: none). ``memory``: the MemoryConfig used
    for snapshots built from ELF files. ``max_sandboxes_per_worker``: warm VMs a
    worker keeps (least recently used evicted). ``switch_tenants``: a worker switches
    a VM between snapshots of one family (scripts of one language, children of one
    base) instead of keeping a VM per snapshot; ``max_open_snapshots``: snapshots a
    worker keeps open (see :class:`hlpool.pool.worker.SandboxCache`). ``confine_workers``: confine each
    worker before its first call (:mod:`hlpool.pool.confine`). ``worker_user``: a
    user name or uid the workers run as (a pool started as root only; snapshot
    files must be readable by that user). ``spin_wait``: a caller in ``result()`` and a
    worker waiting for its next request poll briefly instead of sleeping when the wait
    is known to be short and a core is free (:mod:`hlpool.pool.spin`: two process
    wake-ups less per isolated call, paid in CPU while polling); False sleeps always.
    ``open_on_register``: a snapshot registered through this pool (``snapshot``,
    ``script``, ``derive``) is opened right away by the worker its calls will go to,
    so its first call does not wait for that (~0.3-0.4 ms for a script tenant).

    Snapshot builds (see :mod:`hlpool.pool.builder`): ``build_timeout`` seconds,
    ``build_memory`` bytes a builder may grow by, ``max_guest_memory`` bytes of guest
    memory a snapshot may have, ``max_builds`` at once; ``store_quota``: bytes the
    store's files may take (None: no limit).
    """

    def __init__(
        self,
        workers: int = 2,
        *,
        snapshot_dir: str | os.PathLike | None = None,
        host_functions: Mapping[str, HostFunction] | None = None,
        max_pending: int = defaults.MAX_PENDING,
        call_timeout: float | None = defaults.CALL_TIMEOUT,
        block: bool = True,
        memory: MemoryConfig | None = None,
        max_sandboxes_per_worker: int = 32,
        switch_tenants: bool = True,
        max_open_snapshots: int = 4096,
        restore_policy: RestorePolicy | None = None,
        strict_cpu_reset: bool = False,
        max_payload: int = 1 << 20,
        confine_workers: bool = True,
        worker_user: str | int | None = None,
        build_timeout: float = defaults.BUILD_TIMEOUT,
        build_memory: int = defaults.BUILD_MEMORY,
        max_guest_memory: int = defaults.MAX_GUEST_MEMORY,
        store_quota: int | None = defaults.STORE_QUOTA,
        max_builds: int = defaults.MAX_BUILDS,
        spin_wait: bool = True,
        open_on_register: bool = True,
    ) -> None:
        if workers < 1 or max_pending < 1:
            raise ValueError("workers and max_pending must be >= 1")
        require_kvm_device()  # one clear error here, not one per worker and builder started
        self.memory_config = memory or MemoryConfig()
        self.call_timeout = call_timeout
        self.block = block
        self.host_functions = dict(host_functions or {})
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir else cache_dir() / "snapshots"
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        self._max_payload = max_payload
        self._max_pending = max_pending
        # One token per call that may still be submitted: a call takes one and its Future gives
        # it back when it ends. deque.pop/append are atomic under the GIL, so neither side takes
        # the pool's lock; only a caller that finds none left waits (on _slot_free).
        self._pending_tokens: collections.deque = collections.deque([None] * max_pending)
        self._pending_waiters = 0
        # One re-entrant lock guards every worker's queue, in-flight list and channel writes
        # (re-entrant: a future's done-callback may submit again while it is held).
        self._lock = threading.RLock()
        self._slot_free = threading.Condition(self._lock)  # a pending slot was freed
        self._closed = False
        self._broken: str | None = None
        self.collector_failures = 0  # host-side errors survived by a worker's thread (see _run_worker)
        self._ids = itertools.count(1)
        self._call_cost: dict[str, float] = {}  # snapshot path -> moving average of call seconds
        self._spin_wait = spin_wait
        self._open_on_register = open_on_register
        self._opened_ahead: set[str] = set()  # snapshots a worker was asked to open (see _open_ahead)
        self._cpus = len(os.sched_getaffinity(0))
        self.store = SnapshotStore(self.snapshot_dir, store_quota)
        limits = BuildLimits(build_timeout, build_memory, max_guest_memory, max_builds)
        check_memory_config(self.memory_config, max_guest_memory, "the pool's memory configuration")
        self.restarts = 0
        ipc.remove_stale_names()
        # Per process: a worker's VMs (4 fds each), its open snapshots, and the supervisor's per-worker fds.
        _raise_fd_limit(128 + workers * 16 + 4 * max_sandboxes_per_worker + max_open_snapshots)
        self._worker_config = WorkerConfig(
            host_functions=self.host_functions, max_sandboxes=max_sandboxes_per_worker,
            switch_tenants=switch_tenants, max_open_snapshots=max_open_snapshots,
            restore_policy=restore_policy or RestorePolicy(), strict_cpu_reset=strict_cpu_reset,
            confine=confine_workers, user=worker_user, spin_wait=spin_wait)
        self._max_warm = max_sandboxes_per_worker
        self._spawner = Spawner(self._worker_config)
        self._snapshots = SnapshotRegistry(SnapshotBuilder(self._spawner.spawn_builder, self.store, limits), self.memory_config)
        self._workers = [WorkerLink(index=i, wakeup=threading.Condition(self._lock),
                                    notify_fd=os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
                         for i in range(workers)]
        self._router = routing.Router(self._workers)
        self._loop_collector: loopcollect.LoopCollector | None = None
        try:
            for w in self._workers:
                self._start_worker(w)
        except BaseException:
            self._spawner.close()
            self._close_notify_fds()
            raise
        for w in self._workers:
            w.thread = threading.Thread(target=self._run_worker, args=(w,), name=f"hlpool-pool-{w.index}",
                                        daemon=True)
            w.thread.start()
        self._finalizer = weakref.finalize(self, _emergency_stop, self._spawner)
        atexit.register(self._finalizer)

    # ---- snapshots ---------------------------------------------------------------------

    def snapshot(self, source: "str | os.PathLike | Snapshot | SnapshotHandle", *,
                 memory: MemoryConfig | None = None) -> SnapshotHandle:
        """A handle for ``source``: a guest ELF (built by a builder process, initialised and stored
        once per content hash and memory settings: ``memory``, default the pool's), a ``.hlsnap``
        file, or a :class:`Snapshot`. Over ``max_guest_memory``: :class:`SnapshotTooLargeError`."""
        return self._open_ahead(self._snapshots.get(source, memory))

    def script(self, language: str, source: str, *, timeout: float | None | object = ...) -> SnapshotHandle:
        """A handle for a JavaScript (``"js"``) or Lua (``"lua"``) script.

        The script is loaded once (by a builder process) into a sandbox of the
        interpreter's base snapshot and captured as a layer on it (only the pages
        the script changed), stored in the snapshot store; every call then starts
        from that layer. Submit calls by the script's function names:
        ``pool.submit(handle, "handler", (event,))``. Errors in the script
        (syntax, an exception while loading) raise :class:`GuestError` here.
        """
        load_timeout = self.call_timeout if timeout is ... else timeout
        return self._open_ahead(self._snapshots.script(language, source, load_timeout or scripts.DEFAULT_LOAD_TIMEOUT))

    def remove_snapshot(self, snapshot: "SnapshotHandle | str | os.PathLike") -> bool:
        """Forget a snapshot (a handle, its file, or the source it was registered from) and delete its
        store file; True if the file was deleted (False: not in the store, or another process uses
        it). Refused (:class:`SnapshotError`) while layered snapshots name it as their parent or
        calls for it are queued or running; submitting its handle afterwards is refused too."""
        path, deleted = self._snapshots.remove(snapshot, self._lock, self._calls_using_locked)
        self._call_cost.pop(path, None)
        self._opened_ahead.discard(path)
        return deleted

    def collect_garbage(self) -> list[str]:
        """Delete the store's files that no handle (of any pool sharing the store) and no layered
        child needs; returns their paths."""
        return self._snapshots.collect()

    def derive(self, base: Any, calls: Iterable[Any] = (), *, map_files: Iterable[Any] = (), retain: Any = None,
               timeout: float | None | object = ...) -> SnapshotHandle:
        """A stored child of ``base``: in a builder process, a sandbox of ``base`` maps ``map_files``, runs
        ``calls`` (``(fn, args)`` pairs) keeping their state, and is captured as a layer (``retain``: a
        callable on a Region, or layout area names such as ``["heap"]`` whose parent bytes are kept).
        Errors of the calls raise here (GuestError...) and leave nothing behind (see SnapshotBuilder.build_child)."""
        load_timeout = self.call_timeout if timeout is ... else timeout
        return self._open_ahead(self._snapshots.derive(self._snapshots.get(base), list(calls), list(map_files),
                                                       retain, load_timeout or defaults.INIT_TIMEOUT))

    def _calls_using_locked(self, path: str) -> int:
        return sum(c.handle.path == path and c.op == ipc.OP_CALL
                   for w in self._workers for c in itertools.chain(w.queue, w.inflight))

    # ---- submitting ----------------------------------------------------------------------

    def submit(self, snapshot: Any, fn: str, args: Iterable[Any] = (), *,
               timeout: float | None | object = ..., deadline: float | None = None) -> concurrent.futures.Future:
        """Schedule ``fn(*args)`` in a sandbox of ``snapshot``; returns a Future.

        ``timeout`` bounds the call once a worker runs it; ``deadline`` (seconds from
        now) bounds the whole call, time in the queue included: a call still queued
        then fails with :class:`GuestTimeout`, and a call that starts gets at most
        what is left. Errors in the arguments (unknown function, unencodable values,
        payload too large) raise here; errors of the call are set on the future.
        """
        return self._submit(snapshot, fn, args, timeout, deadline, block=self.block)

    def _submit(self, snapshot: Any, fn: str, args: Iterable[Any], timeout: float | None | object,
                deadline: float | None, block: bool, eager: bool = False,
                loop: "loopcollect.LoopCollector | None" = None) -> Any:
        if self._closed:
            raise PoolClosedError("the pool is shut down")
        if self._broken:
            raise PoolClosedError(f"the pool is broken: {self._broken}")
        handle = snapshot if type(snapshot) is SnapshotHandle else self._snapshots.get(snapshot)
        timeout = self.call_timeout if timeout is ... else timeout
        fn, args, payload = check_call(handle, fn, args, self._max_payload, timeout, deadline)
        self._take_pending_slot(block)
        if loop is None:
            future: Any = CallFuture(self)
        else:  # an event loop's call: that loop collects the answer and settles its own future
            future = loop.new_future(self)
        call = Call(future, handle, fn, payload, int(timeout * 1e9) if timeout else 0, next(self._ids),
                    expires=time.monotonic() + deadline if deadline else 0.0, eager=eager, in_loop=loop is not None)
        if loop is None:
            future._call = call
        with self._lock:
            if self._closed or self._broken:
                future.cancel()  # releases the pending slot
                raise PoolClosedError("the pool is shut down")
            if handle.path in self._snapshots.removed:
                future.cancel()
                raise SnapshotError(f"{handle.path}: the snapshot was removed (Pool.remove_snapshot)")
            worker = self._router.choose(handle, self._call_cost.get(handle.path, routing.DEFAULT_CALL_COST),
                                         self._worker_config.switch_tenants, self._max_warm)
            self._enqueue_locked(worker, call)
        return future

    def _enqueue_locked(self, worker: WorkerLink, call: Call) -> None:
        """Hand ``call`` to ``worker``: straight into its channel when nothing is queued before it
        (no thread hop), else into its queue for the worker's thread."""
        if worker.alive and not worker.queue and len(worker.inflight) < PIPELINE_DEPTH:
            self._dispatch_locked(worker, call)
            if call.eager:  # else the caller collects in result(), or a callback/waiter wakes the thread
                worker.wakeup.notify()
        else:
            worker.queue.append(call)
            worker.queued_deadlines |= bool(call.expires)
            if len(worker.queue) == 1:
                # Behind other queued calls it needs no wake-up: the thread does not wait on its
                # condition while its queue holds calls (it moves them into the channel as answers
                # come), except while a caller reads the answers, and that caller wakes it.
                worker.wakeup.notify()

    def _open_ahead(self, handle: SnapshotHandle) -> SnapshotHandle:
        """Have the worker that will serve ``handle``'s calls (its home worker, see
        :mod:`hlpool.pool.routing`) open its snapshot now, so that the first call does not pay
        for it (``open_on_register``). A hint: skipped when the pool is closing, and
        its outcome is not reported (a call that needs the snapshot reports any problem);
        it does not count against ``max_pending``."""
        if not self._open_on_register or handle.path in self._opened_ahead:
            return handle
        # A plain Future: no one waits for it, and it takes no pending slot (not a user's call).
        # Not eager: its answer waits in the channel for whoever reads the worker's answers next.
        # Hints are sent by the worker's thread in groups (HINT_GROUP, or HINT_DELAY after the
        # first): a burst of registrations neither wakes the worker once per tenant nor has the
        # registering thread post to it, and opens run after short quiet spells.
        call = Call(concurrent.futures.Future(), handle, "", b"", 0, next(self._ids), op=ipc.OP_OPEN,
                    started=time.monotonic())
        with self._lock:
            if self._closed or self._broken:
                return handle
            self._opened_ahead.add(handle.path)
            w = self._workers[routing.home_index(handle, len(self._workers))]
            w.hints.append(call)
            if len(w.hints) == 1 or len(w.hints) >= HINT_GROUP:
                w.wakeup.notify()
        return handle

    def _hints_due_locked(self, w: WorkerLink) -> float:
        """Seconds until ``w``'s waiting hints are to be sent (0: now; inf: none waiting)."""
        if not w.hints:
            return float("inf")
        if len(w.hints) >= HINT_GROUP:
            return 0.0
        return max(0.0, w.hints[0].started + HINT_DELAY - time.monotonic())

    def map(self, snapshot: Any, fn: str, iterable: Iterable[Iterable[Any]], *,
            timeout: float | None | object = ...) -> Iterator[Any]:
        """Like ``Executor.map``: ``fn(*args)`` for each ``args`` of ``iterable``, results in order;
        ``timeout`` bounds each call once a worker runs it (as in :meth:`submit`), not the wait."""
        futures = [self.submit(snapshot, fn, args, timeout=timeout) for args in iterable]
        return results_in_order(futures)

    async def call(self, snapshot: Any, fn: str, *args: Any, timeout: float | None | object = ...,
                   deadline: float | None = None) -> Any:
        """``await pool.call(snap, "fn", 1, 2)``: submit without blocking the event loop."""
        try:  # a free pending slot: submit right here (no executor thread on the way)
            waiter = self.call_future(snapshot, fn, args, timeout=timeout, deadline=deadline)
        except PoolOverloadedError:
            if not self.block:
                raise
            loop = asyncio.get_running_loop()  # wait for a slot without blocking the event loop
            waiter = asyncio.wrap_future(await loop.run_in_executor(
                None, lambda: self.submit(snapshot, fn, args, timeout=timeout, deadline=deadline)))
        return await waiter

    def call_future(self, snapshot: Any, fn: str, args: Iterable[Any] = (), *,
                    timeout: float | None | object = ..., deadline: float | None = None) -> asyncio.Future:
        """Like :meth:`submit`, from inside a running event loop: an asyncio future of that loop.

        The loop collects the answer itself (:mod:`hlpool.pool.loopcollect`: the worker
        signals an eventfd the loop watches; no other thread on the way). Never blocks:
        at ``max_pending`` it raises :class:`PoolOverloadedError`. Cancelling the future
        drops the call if it has not started. One loop at a time is served this way;
        another loop gets the answer through the pool's thread."""
        collector = self._collector_for(asyncio.get_running_loop())
        if collector is None:
            return asyncio.wrap_future(self._submit(snapshot, fn, args, timeout, deadline, block=False, eager=True))
        return self._submit(snapshot, fn, args, timeout, deadline, block=False, loop=collector).waiter

    def _collector_for(self, loop: asyncio.AbstractEventLoop) -> "loopcollect.LoopCollector | None":
        collector = self._loop_collector
        if collector is not None and collector.loop is loop:
            return collector
        if collector is not None and not collector.loop.is_closed():
            return None  # another live loop is served: this one takes the pool's thread path
        with self._lock:
            if self._closed or self._broken or any(w.notify_fd < 0 for w in self._workers):
                return None
            if collector is not None:
                collector.detach()
            self._loop_collector = loopcollect.LoopCollector(self, loop)
            return self._loop_collector

    def _take_pending_slot(self, block: bool) -> None:
        """Count a new pending call; at ``max_pending`` wait for one to finish (or refuse)."""
        tokens = self._pending_tokens
        try:
            tokens.pop()
            return
        except IndexError:
            pass
        with self._lock:
            # Counted as a waiter before looking again: a call that ends after this look sees the
            # count and notifies (see _release_pending), so no wake-up is lost.
            self._pending_waiters += 1
            try:
                while True:
                    try:
                        tokens.pop()
                        return
                    except IndexError:
                        pass
                    if not block:
                        raise PoolOverloadedError(f"{self._max_pending} calls are pending")
                    if self._closed:
                        raise PoolClosedError("the pool is shut down")
                    self._slot_free.wait(0.5)
            finally:
                self._pending_waiters -= 1

    @property
    def _pending(self) -> int:
        """Calls submitted and not done yet."""
        return self._max_pending - len(self._pending_tokens)

    def _release_pending(self) -> None:
        """A call's future is done (result, error or cancelled): its pending slot is free
        (called by :meth:`CallFuture._invoke_callbacks`)."""
        self._pending_tokens.append(None)
        if self._pending_waiters:
            with self._lock:
                self._slot_free.notify()

    # ---- workers -----------------------------------------------------------------------------

    def _start_worker(self, w: WorkerLink) -> None:
        channel = ipc.Channel.create(PIPELINE_DEPTH, self._max_payload + ipc.MAX_PATH + ipc.MAX_NAME)
        try:
            pid = self._spawner.spawn(w.index, channel.names, w.notify_fd)
        except BaseException:
            channel.unlink()
            channel.close()
            raise
        channel.unlink()  # both sides hold it now; no name may outlive a killed process
        w.channel, w.pid, w.pidfd = channel, pid, os.pidfd_open(pid)
        w.sent = w.received = 0
        w.sandboxes = 0
        self._router.forget(w)
        w.alive = True
        log.debug("worker %d started (pid %d)", w.index, pid)

    def _dispatch_locked(self, w: WorkerLink, call: Call) -> None:
        """Write a call into the worker's channel (the caller holds the pool's lock)."""
        if not call.retried and not call.future.set_running_or_notify_cancel():
            return  # cancelled while queued
        call.started = time.monotonic()
        if call.expires:
            left = call.expires - call.started
            if left <= 0:
                call.future.set_exception(GuestTimeout(f"{call.function}: deadline passed while the call was "
                                                       "queued"))
                return
            if not call.timeout_ns or call.timeout_ns > left * 1e9:
                call.timeout_ns = max(1, int(left * 1e9))
        channel = w.channel
        try:
            _slots.write_call(channel.view, channel.offsets[w.sent % channel.depth], channel.data_capacity, call)
        except ValueError as exc:
            call.future.set_exception(PayloadTooLargeError(str(exc)))
            return
        w.sent += 1
        call.worker = w
        w.inflight.append(call)
        w.opens_in_flight += call.op == ipc.OP_OPEN
        try:
            channel.requests.release()
        except HlpoolError as exc:  # the worker wrote over its semaphore: it is replaced, and this
            log.error("worker %d (pid %d): %s; killing it", w.index, w.pid, exc)  # call, not taken,
            w.kill()  # runs on the replacement

    def _run_worker(self, w: WorkerLink) -> None:
        """Move queued calls into one worker's channel, resolve their futures, replace the worker if it dies.

        Nothing may end this thread while the pool is open: an unexpected exception
        (a bug; guest data only ever raises hlpool errors) fails the calls in flight
        on this worker, replaces the worker and goes on with its queue.
        """
        while True:
            try:
                if not self._serve_worker_once(w):
                    break
            except Exception as exc:
                self.collector_failures += 1
                log.exception("worker %d: collector failed; failing its calls in flight and replacing it", w.index)
                w.kill()
                self._replace(w, f"was replaced after a host-side error ({type(exc).__name__}: {exc})")
        self._stop_worker(w)

    def _serve_worker_once(self, w: WorkerLink) -> bool:
        """One round of :meth:`_run_worker`; False when the worker's thread should end."""
        with self._lock:
            while not w.queue and not w.inflight and not self._closed and not self._broken:
                due = self._hints_due_locked(w)
                if due <= 0:
                    break
                w.wakeup.wait(min(0.25, due))
                if not w.is_alive():
                    break
            if (self._closed or self._broken) and not w.queue and not w.inflight:
                return False
            if w.queued_deadlines:
                w.expire_queued()
            while w.queue and w.alive and len(w.inflight) < PIPELINE_DEPTH:
                self._dispatch_locked(w, w.queue.popleft())
            if w.hints and not w.queue and w.alive and self._hints_due_locked(w) <= 0:
                while w.hints and len(w.inflight) < PIPELINE_DEPTH:  # calls first; hints in what is left
                    self._dispatch_locked(w, w.hints.popleft())
            busy = bool(w.inflight)
            if busy and w.inflight[0].in_loop and self._loop_collector is not None:
                # An event loop collects these answers (hlpool.pool.loopcollect): step in only when the
                # worker made no progress meanwhile (a long call, a dead worker, a loop that is blocked).
                head = w.inflight[0]
                w.wakeup.wait(loopcollect.LOOP_WATCH)
                if not w.inflight or w.inflight[0] is not head:
                    return True
            elif busy and len(w.inflight) == 1 and not w.inflight[0].eager:
                # A lone call: its caller is probably about to wait in result() and collect the
                # answer itself (one wake-up less); give it a moment to take the reader lock.
                left = w.inflight[0].started + CALLER_GRACE - time.monotonic()
                if left > 0:
                    w.wakeup.wait(left)
                    return True
        if busy:
            if w.reader.acquire(blocking=False):
                try:
                    self._collect(w)
                finally:
                    self._release_reader(w)
            else:  # a caller reads the answers now; it wakes this thread when it stops
                with self._lock:
                    if w.inflight:
                        w.wakeup.wait(0.05)
        elif not w.is_alive():
            self._replace(w, None)
        return True

    def _replace(self, w: WorkerLink, reason: str | None) -> None:
        """The worker died: fail its in-flight calls, start a replacement, keep its queue."""
        if w.pidfd >= 0:  # the worker must be gone before its marks are read (it was killed or died)
            select.select([w.pidfd], [], [], 2.0)
        with w.reader, self._lock:  # a caller reading answers lets go within one wait slice
            w.alive = False
            w.crashes += 1
            lost, retry = [], []
            if w.channel is not None and w.inflight:
                for offset, call in enumerate(w.inflight):
                    # a call the worker never took had no effect anywhere: it goes to the queue again
                    (lost if w.channel.taken(w.received + offset, call.request_id) else retry).append(call)
            w.inflight.clear()
            w.opens_in_flight = 0
            for call in reversed(retry):
                call.worker = None
                call.retried = True
                w.queue.appendleft(call)
            w.close_channel()
        message = f"worker {w.index} (pid {w.pid}) {reason or 'died'} while running the call"
        for call in lost:
            call.future.set_exception(WorkerCrashed(message))
        if self._closed and not w.queue:
            log.info("worker %d (pid %d) %s while the pool shuts down", w.index, w.pid, reason or "died")
            return
        log.warning("worker %d (pid %d) %s; starting a replacement", w.index, w.pid, reason or "died")
        for attempt in range(5):
            try:
                with self._lock:
                    self._start_worker(w)
                self.restarts += 1
                return
            except HlpoolError as exc:
                log.error("cannot restart worker %d: %s", w.index, exc)
                if not self._spawner.alive():
                    break
                time.sleep(0.1 * (attempt + 1))
        self._mark_broken(f"worker {w.index} cannot be restarted")

    def _mark_broken(self, reason: str) -> None:
        with self._lock:
            self._broken = reason
            stranded = [c for w in self._workers for c in w.queue]
            for w in self._workers:
                w.queue.clear()
                w.wakeup.notify()
        for call in stranded:
            if call.retried or call.future.set_running_or_notify_cancel():
                call.future.set_exception(WorkerCrashed(f"the pool is broken: {reason}"))

    def _stop_worker(self, w: WorkerLink) -> None:
        """Ask the worker to exit, wait briefly, then make sure it is gone."""
        if w.alive and w.channel is not None:
            try:
                w.channel.write_stop(w.sent)
                w.channel.requests.release()
                select.select([w.pidfd], [], [], 2.0)
            except (OSError, posix_ipc.Error, HlpoolError):
                pass
            if w.is_alive():
                w.kill()
                select.select([w.pidfd], [], [], 2.0)
        w.alive = False
        with w.reader:
            w.close_channel()

    # ---- shutting down -------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting calls; finish (or with ``cancel_futures``, cancel) queued ones; stop workers."""
        with self._lock:
            already = self._closed
            self._closed = True
            cancelled = []
            if cancel_futures:
                for w in self._workers:
                    cancelled.extend(w.queue)
                    w.queue.clear()
            for w in self._workers:
                w.wakeup.notify()
        for call in cancelled:
            if not call.future.cancel():  # a call queued again after its worker died is running already
                call.future.set_exception(PoolClosedError("the pool shut down before the call ran"))
        if already and not wait:
            return
        if wait:
            for w in self._workers:
                if w.thread is not None:
                    w.thread.join()
            self._spawner_close()
        else:
            threading.Thread(target=self._finish_shutdown, name="hlpool-pool-shutdown", daemon=True).start()

    def _finish_shutdown(self) -> None:
        for w in self._workers:
            if w.thread is not None:
                w.thread.join()
        self._spawner_close()

    def _spawner_close(self) -> None:
        if self._finalizer.alive:
            self._finalizer.detach()
            atexit.unregister(self._finalizer)
            self._spawner.close()
            self._snapshots.release()  # unpin the store's files: another pool's collector may take them now
            self._close_notify_fds()

    def _close_notify_fds(self) -> None:
        """Close the workers' eventfds, after the event loop watching them (if any) stopped watching."""
        collector, self._loop_collector = self._loop_collector, None
        fds = [w.notify_fd for w in self._workers if w.notify_fd >= 0]
        for w in self._workers:
            w.notify_fd = -1

        def close_all() -> None:
            if collector is not None:
                collector.detach()
            for fd in fds:
                os.close(fd)

        loop = collector.loop if collector is not None else None
        if loop is None or loop.is_closed() or not loop.is_running() or threading.get_ident() == collector.thread_id:
            close_all()
            return
        try:  # the loop runs in another thread: it stops watching, then closes them
            loop.call_soon_threadsafe(close_all)
        except RuntimeError:  # closed meanwhile
            close_all()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)

    # ---- introspection -----------------------------------------------------------------------

    def stats(self) -> list[dict[str, Any]]:
        """Per worker: index, pid, alive, calls, errors, crashes, VMs held/made, switches, answers an
        event loop took (``call_future``), reads of its answers (``answer_reads``: each read takes every
        answer posted by then, so calls per read is the batch size), queued, in flight, RSS/PSS."""
        out = []
        for w in self._workers:
            entry = {"index": w.index, "pid": w.pid, "alive": w.alive, "calls": w.calls, "errors": w.errors,
                     "crashes": w.crashes, "vms": w.sandboxes, "vms_created": w.vms_created,
                     "switches": w.switches, "loop_answers": w.loop_answers, "answer_reads": w.answer_reads,
                     "queued": len(w.queue),
                     "in_flight": len(w.inflight)}
            entry.update(_memory_of(w.pid) if w.alive else {"rss_kib": 0, "pss_kib": 0})
            out.append(entry)
        return out

    @property
    def workers(self) -> int:
        return len(self._workers)


def _emergency_stop(spawner: Spawner) -> None:
    """At interpreter exit (or if the Pool is garbage collected): stop the spawner and all workers."""
    try:
        spawner.close(timeout=1.0)
    except Exception:
        pass
