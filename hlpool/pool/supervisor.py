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

from hlpool import defaults, errors
from hlpool.errors import (
    GuestTimeout,
    HlpoolError,
    PayloadTooLargeError,
    PoolClosedError,
    PoolOverloadedError,
    SnapshotError,
    WorkerCrashed,
)
from hlpool.guest import codec
from hlpool.guest.build import cache_dir
from hlpool.guest.layout import MemoryConfig
from hlpool.memory.guest_memory import RestorePolicy
from hlpool.pool import channel as ipc
from hlpool.pool import routing
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

WATCHDOG_GRACE = 5.0  # a worker silent this long past a call's deadline is killed
PIPELINE_DEPTH = 16  # calls in a worker's channel at once (answers are collected in batches)
CALLER_GRACE = 0.0001  # how long the pool's thread leaves a lone call's answer to its caller (see CallFuture)
BATCH_WAIT_MAX = 0.002  # longest a collector waits for answers to gather while a backlog is in the channel


class Pool:
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
    files must be readable by that user).

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
        max_open_snapshots: int = 1024,
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
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self.memory_config = memory or MemoryConfig()
        self.call_timeout = call_timeout
        self.block = block
        self.host_functions = dict(host_functions or {})
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir else cache_dir() / "snapshots"
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        self._max_payload = max_payload
        self._max_pending = max_pending
        self._pending = 0  # calls submitted and not done (guarded by the pool's lock)
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
            confine=confine_workers, user=worker_user)
        self._max_warm = max_sandboxes_per_worker
        self._spawner = Spawner(self._worker_config)
        self._snapshots = SnapshotRegistry(SnapshotBuilder(self._spawner.spawn_builder, self.store, limits), self.memory_config)
        self._workers = [WorkerLink(index=i, wakeup=threading.Condition(self._lock)) for i in range(workers)]
        try:
            for w in self._workers:
                self._start_worker(w)
        except BaseException:
            self._spawner.close()
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
        return self._snapshots.get(source, memory)

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
        return self._snapshots.script(language, source, load_timeout or scripts.DEFAULT_LOAD_TIMEOUT)

    def remove_snapshot(self, snapshot: "SnapshotHandle | str | os.PathLike") -> bool:
        """Forget a snapshot (a handle, its file, or the source it was registered from) and delete its
        store file; True if the file was deleted (False: not in the store, or another process uses
        it). Refused (:class:`SnapshotError`) while layered snapshots name it as their parent or
        calls for it are queued or running; submitting its handle afterwards is refused too."""
        path, deleted = self._snapshots.remove(snapshot, self._lock, self._calls_using_locked)
        self._call_cost.pop(path, None)
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
        return self._snapshots.derive(self.snapshot(base), list(calls), list(map_files), retain,
                                      load_timeout or defaults.INIT_TIMEOUT)

    def _calls_using_locked(self, path: str) -> int:
        return sum(c.handle.path == path for w in self._workers for c in itertools.chain(w.queue, w.inflight))

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
                deadline: float | None, block: bool, eager: bool = False) -> concurrent.futures.Future:
        if self._closed:
            raise PoolClosedError("the pool is shut down")
        if self._broken:
            raise PoolClosedError(f"the pool is broken: {self._broken}")
        handle = self.snapshot(snapshot)
        timeout = self.call_timeout if timeout is ... else timeout
        fn, args, payload = check_call(handle, fn, args, self._max_payload, timeout, deadline)
        self._take_pending_slot(block)
        future = CallFuture(self)
        call = Call(future, handle, fn, payload, int(timeout * 1e9) if timeout else 0, next(self._ids),
                     expires=time.monotonic() + deadline if deadline else 0.0, eager=eager)
        future._call = call
        with self._lock:
            if self._closed or self._broken:
                future.cancel()  # releases the pending slot
                raise PoolClosedError("the pool is shut down")
            if handle.path in self._snapshots.removed:
                future.cancel()
                raise SnapshotError(f"{handle.path}: the snapshot was removed (Pool.remove_snapshot)")
            worker = routing.choose_worker(self._workers, handle, self._call_cost.get(handle.path, routing.DEFAULT_CALL_COST),
                                           self._worker_config.switch_tenants, self._max_warm)
            if worker.alive and not worker.queue and len(worker.inflight) < PIPELINE_DEPTH:
                self._dispatch_locked(worker, call)  # straight into the channel: no thread hop
                if eager:  # else the caller collects in result(), or a callback/waiter wakes the thread
                    worker.wakeup.notify()
            else:
                worker.queue.append(call)
                worker.queued_deadlines |= bool(call.expires)
                worker.wakeup.notify()
        return future

    def map(self, snapshot: Any, fn: str, iterable: Iterable[Iterable[Any]], *,
            timeout: float | None | object = ...) -> Iterator[Any]:
        """Like ``Executor.map``: ``fn(*args)`` for each ``args`` of ``iterable``, results in order."""
        futures = [self.submit(snapshot, fn, args, timeout=timeout) for args in iterable]
        return results_in_order(futures)

    async def call(self, snapshot: Any, fn: str, *args: Any, timeout: float | None | object = ...,
                   deadline: float | None = None) -> Any:
        """``await pool.call(snap, "fn", 1, 2)``: submit without blocking the event loop."""
        try:  # a free pending slot: submit right here (no executor thread on the way)
            future = self._submit(snapshot, fn, args, timeout, deadline, block=False, eager=True)
        except PoolOverloadedError:
            if not self.block:
                raise
            loop = asyncio.get_running_loop()  # wait for a slot without blocking the event loop
            future = await loop.run_in_executor(
                None, lambda: self.submit(snapshot, fn, args, timeout=timeout, deadline=deadline))
        return await asyncio.wrap_future(future)

    def _take_pending_slot(self, block: bool) -> None:
        """Count a new pending call; at ``max_pending`` wait for one to finish (or refuse)."""
        with self._lock:
            while self._pending >= self._max_pending:
                if not block:
                    raise PoolOverloadedError(f"{self._max_pending} calls are pending")
                if self._closed:
                    raise PoolClosedError("the pool is shut down")
                self._pending_waiters += 1
                try:
                    self._slot_free.wait(0.5)
                finally:
                    self._pending_waiters -= 1
            self._pending += 1

    def _release_pending(self) -> None:
        """A call's future is done (result, error or cancelled): its pending slot is free
        (called by :meth:`CallFuture._invoke_callbacks`)."""
        with self._lock:
            self._pending -= 1
            if self._pending_waiters:
                self._slot_free.notify()

    # ---- workers -----------------------------------------------------------------------------

    def _start_worker(self, w: WorkerLink) -> None:
        channel = ipc.Channel.create(PIPELINE_DEPTH, self._max_payload + ipc.MAX_PATH + ipc.MAX_NAME)
        try:
            pid = self._spawner.spawn(w.index, channel.names)
        except BaseException:
            channel.unlink()
            channel.close()
            raise
        channel.unlink()  # both sides hold it now; no name may outlive a killed process
        w.channel, w.pid, w.pidfd = channel, pid, os.pidfd_open(pid)
        w.sent = w.received = 0
        w.sandboxes = 0
        w.warm.clear()
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
        try:
            w.channel.write_request(w.sent, call.request_id, call.handle.path.encode(), call.function.encode(),
                                    call.payload, call.timeout_ns, int(call.expires * 1e9) if call.expires else 0)
        except ValueError as exc:
            call.future.set_exception(PayloadTooLargeError(str(exc)))
            return
        w.sent += 1
        call.worker = w
        w.inflight.append(call)
        w.channel.requests.release()

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
                w.wakeup.wait(0.25)
                if not w.is_alive():
                    break
            if (self._closed or self._broken) and not w.queue and not w.inflight:
                return False
            if w.queued_deadlines:
                w.expire_queued()
            while w.queue and w.alive and len(w.inflight) < PIPELINE_DEPTH:
                self._dispatch_locked(w, w.queue.popleft())
            busy = bool(w.inflight)
            if busy and len(w.inflight) == 1 and not w.inflight[0].eager:
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
                    w.reader.release()
            else:  # a caller reads the answers now; it wakes this thread when it stops
                with self._lock:
                    if w.inflight:
                        w.wakeup.wait(0.05)
        elif not w.is_alive():
            self._replace(w, None)
        return True

    def _collect(self, w: WorkerLink) -> None:
        """Wait briefly for responses of ``w``; take every response that is ready in one batch.

        One wake-up of this thread serves as many responses as the worker has posted
        by then: they are read under one acquisition of the lock, the channel is
        refilled from the queue before any future is resolved (the worker never
        waits for the callbacks), then the futures are resolved outside the lock.
        """
        responses = w.channel.responses
        if len(w.inflight) > 2 and not responses.value:
            # A backlog in the channel keeps the worker busy: let answers gather for about half
            # of it instead of waking for each one (a wake-up costs more CPU than the answer).
            head = w.inflight[0]
            per_call = self._call_cost.get(head.handle.path, routing.DEFAULT_CALL_COST)
            time.sleep(min(BATCH_WAIT_MAX, per_call * (len(w.inflight) - 2)))
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

    def _take_answers(self, w: WorkerLink, in_caller: bool = False) -> None:
        """After one answer was signalled: take it and every answer already posted, refill the
        channel from the queue, then resolve the futures outside the pool's lock (reader held)."""
        responses = w.channel.responses
        ready = 1
        for _ in range(min(responses.value, PIPELINE_DEPTH - 1)):  # posted already: no waiting
            responses.acquire(0)
            ready += 1
        batch, in_order = [], True
        with self._lock:
            now = time.monotonic()
            for _ in range(ready):
                call = w.inflight.popleft()
                status, request_id, data, figures = w.channel.read_response(w.received)
                in_order = in_order and request_id == call.request_id
                w.received += 1
                w.calls += 1
                w.errors += status != ipc.STATUS_OK
                batch.append((call, status, data, figures[1]))
            w.sandboxes, _, w.vms_created, w.switches = figures
            if w.inflight:  # the worker starts the next call about now (the watchdog measures from here)
                w.inflight[0].started = now
            if w.queue and w.alive and in_order:
                if w.queued_deadlines:
                    w.expire_queued()
                while w.queue and len(w.inflight) < PIPELINE_DEPTH:
                    self._dispatch_locked(w, w.queue.popleft())
        if not in_order:  # the worker broke the channel's protocol: nothing it answered is trusted
            for call, *_ in batch:
                call.future.set_exception(WorkerCrashed(f"worker {w.index} answered out of order"))
            w.kill()
            self._replace(w, "answered out of order")
            return
        try:
            for item in batch:
                try:  # done-callbacks run here: what they raise must not end a thread or lose answers
                    self._resolve(*item)
                except BaseException as exc:  # noqa: BLE001 (SystemExit and the like from user callbacks)
                    if in_caller and isinstance(exc, KeyboardInterrupt):
                        raise  # the caller's own Ctrl-C (the finally still delivers the rest)
                    log.exception("a done-callback of a pool call raised; the pool goes on")
        finally:  # a caller collecting here may be interrupted (KeyboardInterrupt in result()):
            for item in batch:  # the answers it took out of the channel are still delivered
                if not item[0].future.done():
                    self._resolve(*item)

    def _wake_collector(self, call: Call, blocking: bool = True) -> None:
        """Make the pool's thread collect ``call``'s answer now (it may be waiting for a caller).

        ``blocking=False`` is for callers that hold the call's Future condition
        (``concurrent.futures.wait`` adds its waiter under it): the pool's lock is taken
        before a Future's condition everywhere else, so waiting for it here could deadlock;
        when it is busy, a short-lived thread delivers the wake-up instead."""
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
                wait = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
                if wait <= 0:
                    return
                try:
                    w.channel.responses.acquire(wait)
                except posix_ipc.BusyError:
                    return  # slow or stuck: the pool's thread watches the worker
                self._take_answers(w, in_caller=True)
        finally:
            w.reader.release()
            if w.inflight:
                with self._lock:
                    w.wakeup.notify()

    def _resolve(self, call: Call, status: int, data: bytes, run_ns: int) -> None:
        """Set the future of a finished call from the worker's response."""
        elapsed = min(run_ns / 1e9, 60.0)  # the worker's own time for it (a cost estimate, never trusted further)
        path = call.handle.path
        previous = self._call_cost.get(path)
        self._call_cost[path] = elapsed if previous is None else 0.8 * previous + 0.2 * elapsed
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
            except (OSError, posix_ipc.Error):
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

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)

    # ---- introspection -----------------------------------------------------------------------

    def stats(self) -> list[dict[str, Any]]:
        """Per worker: index, pid, alive, calls, errors, crashes, VMs held, queued, in flight, RSS/PSS."""
        out = []
        for w in self._workers:
            entry = {"index": w.index, "pid": w.pid, "alive": w.alive, "calls": w.calls, "errors": w.errors,
                     "crashes": w.crashes, "vms": w.sandboxes, "vms_created": w.vms_created,
                     "switches": w.switches, "queued": len(w.queue),
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
