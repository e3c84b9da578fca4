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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import msgspec
import posix_ipc

from hlpool import defaults, errors
from hlpool.errors import (
    CallError,
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
from hlpool.pool.builder import BuildLimits, SnapshotBuilder, check_memory_config
from hlpool.pool.procinfo import memory_of as _memory_of
from hlpool.pool.procinfo import process_state as _process_state
from hlpool.pool.procinfo import raise_fd_limit as _raise_fd_limit
from hlpool.pool.registry import SnapshotHandle, SnapshotRegistry
from hlpool.pool.spawner import Spawner
from hlpool.pool.store import SnapshotStore
from hlpool.pool.worker import WorkerConfig
from hlpool.sandbox import HostFunction, scripts
from hlpool.snapshot.snapshot import Snapshot

log = logging.getLogger(__name__)

WATCHDOG_GRACE = 5.0  # a worker silent this long past a call's deadline is killed
PIPELINE_DEPTH = 2  # calls queued inside a worker's channel
COLD_START_COST = 0.003  # seconds to make a sandbox in a worker that has none for the snapshot (measured ~2.5 ms)
DEFAULT_CALL_COST = 0.001  # assumed duration of a call until one of its snapshot was measured


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker (the cause of the re-raised error)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n\"\"\"\n{self.text}\"\"\""


@dataclass
class _Call:
    future: concurrent.futures.Future
    handle: SnapshotHandle
    function: str
    payload: bytes
    timeout_ns: int
    request_id: int
    started: float = 0.0
    expires: float = 0.0  # monotonic time by which the whole call (queue + run) must end; 0: none


@dataclass
class _Worker:
    index: int
    channel: ipc.Channel | None = None
    pid: int = 0
    pidfd: int = -1
    queue: collections.deque = field(default_factory=collections.deque)
    inflight: collections.deque = field(default_factory=collections.deque)
    warm: "collections.OrderedDict[str, None]" = field(default_factory=collections.OrderedDict)
    sent: int = 0
    received: int = 0
    calls: int = 0
    errors: int = 0
    crashes: int = 0
    sandboxes: int = 0
    alive: bool = False
    thread: threading.Thread | None = None
    wakeup: threading.Condition | None = None  # shares the pool's lock
    stopped_since: float = 0.0  # when the watchdog first saw the process stopped (0: running)
    queued_deadlines: bool = False  # some queued call has a total deadline (see _expire_queued_locked)

    @property
    def load(self) -> int:
        return len(self.queue) + len(self.inflight)


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
    worker keeps (least recently used evicted). ``confine_workers``: confine each
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
        self._pending = threading.BoundedSemaphore(max_pending)
        self._max_pending = max_pending
        # One re-entrant lock guards every worker's queue, in-flight list and channel writes
        # (re-entrant: a future's done-callback may submit again while it is held).
        self._lock = threading.RLock()
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
        _raise_fd_limit(64 + workers * (4 * max_sandboxes_per_worker + 16))
        self._worker_config = WorkerConfig(
            host_functions=self.host_functions, max_sandboxes=max_sandboxes_per_worker,
            restore_policy=restore_policy or RestorePolicy(), strict_cpu_reset=strict_cpu_reset,
            confine=confine_workers, user=worker_user)
        self._max_warm = max_sandboxes_per_worker
        self._spawner = Spawner(self._worker_config)
        self._snapshots = SnapshotRegistry(SnapshotBuilder(self._spawner.spawn_builder, self.store, limits), self.memory_config)
        self._workers = [_Worker(index=i, wakeup=threading.Condition(self._lock)) for i in range(workers)]
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
        if self._closed:
            raise PoolClosedError("the pool is shut down")
        if self._broken:
            raise PoolClosedError(f"the pool is broken: {self._broken}")
        handle = self.snapshot(snapshot)
        args = tuple(args) if not isinstance(args, tuple) else args
        if handle.language is not None and fn not in handle.exports:
            fn, args = "call", (fn, list(args))  # a script's own function: the interpreter's call(name, args)
        if fn not in handle.exports:
            raise CallError(f"unknown function {fn!r}; the snapshot exports {sorted(handle.exports)}")
        try:
            payload = codec.encode_args(args)
        except codec.ValueTypeError as exc:
            raise CallError(f"{fn}: {exc}") from None
        limit = min(handle.input_capacity, self._max_payload)
        if len(payload) > limit:
            raise PayloadTooLargeError(f"{fn}: encoded arguments are {len(payload)} bytes, more than {limit}")
        timeout = self.call_timeout if timeout is ... else timeout
        if timeout is not None and timeout <= 0:
            raise CallError(f"timeout must be positive, got {timeout}")
        if deadline is not None and not deadline > 0:
            raise CallError(f"deadline must be positive, got {deadline}")
        if not self._pending.acquire(blocking=self.block):
            raise PoolOverloadedError(f"{self._max_pending} calls are pending")
        future: concurrent.futures.Future = concurrent.futures.Future()
        call = _Call(future, handle, fn, payload, int(timeout * 1e9) if timeout else 0, next(self._ids),
                     expires=time.monotonic() + deadline if deadline else 0.0)
        future.add_done_callback(self._release_pending)
        with self._lock:
            if self._closed or self._broken:
                future.cancel()  # releases the pending slot
                raise PoolClosedError("the pool is shut down")
            if handle.path in self._snapshots.removed:
                future.cancel()
                raise SnapshotError(f"{handle.path}: the snapshot was removed (Pool.remove_snapshot)")
            worker = self._route(handle)
            if worker.alive and not worker.queue and len(worker.inflight) < PIPELINE_DEPTH:
                self._dispatch_locked(worker, call)  # straight into the channel: no thread hop
            else:
                worker.queue.append(call)
                worker.queued_deadlines |= bool(call.expires)
            worker.wakeup.notify()
        return future

    def map(self, snapshot: Any, fn: str, iterable: Iterable[Iterable[Any]], *,
            timeout: float | None | object = ...) -> Iterator[Any]:
        """Like ``Executor.map``: ``fn(*args)`` for each ``args`` of ``iterable``, results in order."""
        futures = [self.submit(snapshot, fn, args, timeout=timeout) for args in iterable]

        def results() -> Iterator[Any]:
            try:
                for f in futures:
                    yield f.result()
            finally:
                for f in futures:
                    f.cancel()

        return results()

    async def call(self, snapshot: Any, fn: str, *args: Any, timeout: float | None | object = ...,
                   deadline: float | None = None) -> Any:
        """``await pool.call(snap, "fn", 1, 2)``: submit without blocking the event loop."""
        loop = asyncio.get_running_loop()
        if self.block:
            future = await loop.run_in_executor(
                None, lambda: self.submit(snapshot, fn, args, timeout=timeout, deadline=deadline))
        else:
            future = self.submit(snapshot, fn, args, timeout=timeout, deadline=deadline)
        return await asyncio.wrap_future(future)

    def _release_pending(self, _future: concurrent.futures.Future) -> None:
        self._pending.release()

    def _route(self, handle: SnapshotHandle) -> _Worker:
        """The worker expected to finish the call first: queued work (calls x their measured
        duration) plus the cost of a cold start where the worker has no warm VM for the snapshot."""
        per_call = self._call_cost.get(handle.path, DEFAULT_CALL_COST)
        best, best_cost = None, None
        for w in self._workers:
            cost = w.load * per_call + (0.0 if handle.path in w.warm else COLD_START_COST)
            if not w.alive:
                cost += 1000.0
            if best_cost is None or cost < best_cost:
                best, best_cost = w, cost
        assert best is not None
        if handle.path in best.warm:
            best.warm.move_to_end(handle.path)
        else:
            best.warm[handle.path] = None
            while len(best.warm) > self._max_warm:
                best.warm.popitem(last=False)
        return best

    # ---- workers -----------------------------------------------------------------------------

    def _start_worker(self, w: _Worker) -> None:
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

    def _dispatch_locked(self, w: _Worker, call: _Call) -> None:
        """Write a call into the worker's channel (the caller holds the pool's lock)."""
        if not call.future.set_running_or_notify_cancel():
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
                                    call.payload, call.timeout_ns)
        except ValueError as exc:
            call.future.set_exception(PayloadTooLargeError(str(exc)))
            return
        w.sent += 1
        w.inflight.append(call)
        w.channel.requests.release()

    def _run_worker(self, w: _Worker) -> None:
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
                self._kill(w)
                self._replace(w, f"was replaced after a host-side error ({type(exc).__name__}: {exc})")
        self._stop_worker(w)

    def _serve_worker_once(self, w: _Worker) -> bool:
        """One round of :meth:`_run_worker`; False when the worker's thread should end."""
        with self._lock:
            while not w.queue and not w.inflight and not self._closed and not self._broken:
                w.wakeup.wait(0.25)
                if not self._worker_alive(w):
                    break
            if (self._closed or self._broken) and not w.queue and not w.inflight:
                return False
            if w.queued_deadlines:
                self._expire_queued_locked(w)
            while w.queue and w.alive and len(w.inflight) < PIPELINE_DEPTH:
                self._dispatch_locked(w, w.queue.popleft())
            busy = bool(w.inflight)
        if busy:
            self._collect(w)
        elif not self._worker_alive(w):
            self._replace(w, None)
        return True

    def _expire_queued_locked(self, w: _Worker) -> None:
        """Fail the queued calls of ``w`` whose total deadline has passed (the pool's lock is held)."""
        now = time.monotonic()
        kept = collections.deque()
        for call in w.queue:
            if call.expires and call.expires <= now:
                if call.future.set_running_or_notify_cancel():
                    call.future.set_exception(GuestTimeout(f"{call.function}: deadline passed while the call "
                                                           "was queued"))
            else:
                kept.append(call)
        w.queue = kept
        w.queued_deadlines = any(call.expires for call in kept)

    def _stuck_reason(self, w: _Worker, call: _Call) -> str | None:
        """Why the worker running ``call`` must be replaced, if it must: past the call's deadline
        plus a grace period, or stopped (SIGSTOP, a debugger) for longer than the grace period."""
        now = time.monotonic()
        limit = call.timeout_ns / 1e9 if call.timeout_ns else None
        if limit is not None and now - call.started > limit + WATCHDOG_GRACE:
            return "stuck past a call's deadline"
        if now - call.started > WATCHDOG_GRACE / 5:
            stopped_since = w.stopped_since
            if _process_state(w.pid) in ("T", "t"):
                if not stopped_since:
                    w.stopped_since = now
                elif now - stopped_since > WATCHDOG_GRACE:
                    return "stopped (no progress) while running a call"
            else:
                w.stopped_since = 0.0
        return None

    def _collect(self, w: _Worker) -> None:
        """Wait briefly for the next response of ``w`` and resolve its future (outside the lock)."""
        try:
            w.channel.responses.acquire(0.05)
        except posix_ipc.BusyError:
            if not self._worker_alive(w):
                self._replace(w, "died")
                return
            with self._lock:
                call = w.inflight[0] if w.inflight else None
            reason = self._stuck_reason(w, call) if call is not None else None
            if reason is not None:
                log.error("worker %d (pid %d) is %s; killing it", w.index, w.pid, reason)
                self._kill(w)
                self._replace(w, f"was killed: {reason}")
            return
        with self._lock:
            call = w.inflight.popleft()
            status, request_id, data, sandboxes = w.channel.read_response(w.received)
            w.received += 1
            w.sandboxes = sandboxes
            w.calls += 1
            if status != ipc.STATUS_OK:
                w.errors += 1
        if request_id != call.request_id:
            call.future.set_exception(WorkerCrashed(f"worker {w.index} answered out of order"))
            self._kill(w)
            self._replace(w, "answered out of order")
            return
        elapsed = time.monotonic() - call.started
        previous = self._call_cost.get(call.handle.path)
        self._call_cost[call.handle.path] = elapsed if previous is None else 0.8 * previous + 0.2 * elapsed
        if status == ipc.STATUS_OK:
            try:
                value = codec.decode_value(data)
            except errors.GuestProtocolError as exc:
                call.future.set_exception(errors.GuestProtocolError(f"{call.function}: guest returned a "
                                                                    f"malformed result: {exc}"))
                return
            call.future.set_result(value)
        else:
            call.future.set_exception(_rebuild_error(data))

    def _worker_alive(self, w: _Worker) -> bool:
        if not w.alive:
            return False
        ready, _, _ = select.select([w.pidfd], [], [], 0)
        return not ready

    def _kill(self, w: _Worker) -> None:
        try:
            os.kill(w.pid, 9)
        except ProcessLookupError:
            pass

    def _replace(self, w: _Worker, reason: str | None) -> None:
        """The worker died: fail its in-flight calls, start a replacement, keep its queue."""
        with self._lock:
            w.alive = False
            w.crashes += 1
            lost = list(w.inflight)
            w.inflight.clear()
            self._close_channel(w)
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
            if call.future.set_running_or_notify_cancel():
                call.future.set_exception(WorkerCrashed(f"the pool is broken: {reason}"))

    def _close_channel(self, w: _Worker) -> None:
        if w.channel is not None:
            w.channel.close()
            w.channel = None
        if w.pidfd >= 0:
            os.close(w.pidfd)
            w.pidfd = -1

    def _stop_worker(self, w: _Worker) -> None:
        """Ask the worker to exit, wait briefly, then make sure it is gone."""
        if w.alive and w.channel is not None:
            try:
                w.channel.write_stop(w.sent)
                w.channel.requests.release()
                select.select([w.pidfd], [], [], 2.0)
            except (OSError, posix_ipc.Error):
                pass
            if self._worker_alive(w):
                self._kill(w)
                select.select([w.pidfd], [], [], 2.0)
        w.alive = False
        self._close_channel(w)

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
            call.future.cancel()
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
                     "crashes": w.crashes, "vms": w.sandboxes, "queued": len(w.queue),
                     "in_flight": len(w.inflight)}
            entry.update(_memory_of(w.pid) if w.alive else {"rss_kib": 0, "pss_kib": 0})
            out.append(entry)
        return out

    @property
    def workers(self) -> int:
        return len(self._workers)


def _rebuild_error(blob: bytes) -> BaseException:
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


def _emergency_stop(spawner: Spawner) -> None:
    """At interpreter exit (or if the Pool is garbage collected): stop the spawner and all workers."""
    try:
        spawner.close(timeout=1.0)
    except Exception:
        pass
