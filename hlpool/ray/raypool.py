""":class:`RayPool`: the :class:`~hlpool.pool.supervisor.Pool` interface over a Ray cluster.

The process that creates a RayPool is the driver. It keeps no workers: each Ray node
runs one :class:`~hlpool.ray.node.NodeHost` actor owning that node's Pool (workers,
VMs, snapshot store), found and replaced by :class:`~hlpool.ray.members.Members`.

Snapshots are registered once: an ELF or a script is built on one node, a ``.hlsnap``
is read where the driver finds it; the files of its chain go into the driver's own store
(``snapshot_dir``, so a handle's path is a local file as with Pool) and, once, into the
Ray object store. A node fetches a file the first time a call of it lands there
(:mod:`hlpool.ray.shipping`); the driver tracks which files each node holds.

Calls wait in the driver's queue until a node has room (:mod:`hlpool.ray.routing`):
at most ``max_in_flight_per_node`` outstanding per node, so a node that dies fails only
the calls it was running (:class:`~hlpool.errors.NodeLostError`), and the queue goes to
the nodes left, or to nodes that join later.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import ray

from hlpool import defaults
from hlpool.errors import (
    CallError,
    GuestTimeout,
    HlpoolError,
    NodeLostError,
    PoolClosedError,
    PoolOverloadedError,
    SnapshotError,
    from_wire,
)
from hlpool.guest.build import cache_dir
from hlpool.guest.layout import MemoryConfig
from hlpool.pool.calls import check_call, results_in_order
from hlpool.pool.registry import SnapshotHandle
from hlpool.pool.store import SnapshotStore
from hlpool.ray.routing import choose, preference
from hlpool.ray.catalog import Catalog
from hlpool.ray.members import ACTOR_ERRORS, Members
from hlpool.snapshot.snapshot import Snapshot

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 10.0  # seconds past the call timeout that shutdown waits for calls in flight


@dataclass
class _Call:
    future: concurrent.futures.Future
    handle: SnapshotHandle
    fn: str
    args: tuple
    timeout: float | None
    expires: float  # monotonic end of the whole call (0: none)
    ident: int


@dataclass
class _Node:
    node_id: str
    index: int
    actor: Any
    info: dict
    inflight: dict = field(default_factory=dict)  # call ident -> _Call
    files: set = field(default_factory=set)  # chain file hashes the node holds (as far as the driver knows)
    calls: int = 0
    errors: int = 0
    lost: bool = False
    last_stats: dict = field(default_factory=dict)

    @property
    def load(self) -> int:
        return len(self.inflight)


class RayPool:
    """A pool of hlpool Pools, one per Ray node, behind the :class:`~hlpool.pool.supervisor.Pool` interface.

    >>> with RayPool("auto", workers_per_node=2) as pool:
    ...     snap = pool.snapshot("add.elf")
    ...     pool.submit(snap, "add", (2, 3)).result()
    5

    ``address``: the Ray cluster (``"auto"``, ``"HOST:PORT"``; None: ``$RAY_ADDRESS`` or a new local
    cluster); ignored when this process is connected to Ray already. ``ray_init``: more arguments of
    ``ray.init`` (e.g. ``{"_node_ip_address": "127.0.0.1"}``). ``workers_per_node``: hlpool workers on
    each node. ``snapshot_dir``: the driver's store (default ``~/.cache/hlpool/ray/driver``);
    ``node_snapshot_dir``: each node's store (``{node_id}`` is replaced; default:
    ``$HLPOOL_RAY_NODE_SNAPSHOT_DIR``, else the node's ``~/.cache/hlpool/ray/snapshots``, apart from local
    Pools' stores). ``pool_options``: more keyword arguments of each node's Pool
    (``max_sandboxes_per_worker``, ``build_timeout``...); ``host_functions`` are sent to every node.
    ``max_in_flight_per_node``: calls sent to a node at once (default 4 per worker: a call's Ray round trip
    costs more than the call); a node's own
    snapshots' calls go elsewhere once it has ``spill_at`` (default ``workers_per_node``) outstanding.
    ``min_nodes``: nodes that must be up before the constructor returns (within ``start_timeout``).
    ``poll_interval``: seconds between looks at the cluster's membership.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        workers_per_node: int = 2,
        snapshot_dir: str | os.PathLike | None = None,
        node_snapshot_dir: str | None = None,
        host_functions: Mapping[str, Any] | None = None,
        max_pending: int = defaults.MAX_PENDING,
        call_timeout: float | None = defaults.CALL_TIMEOUT,
        block: bool = True,
        memory: MemoryConfig | None = None,
        max_payload: int = 1 << 20,
        pool_options: Mapping[str, Any] | None = None,
        max_in_flight_per_node: int | None = None,
        spill_at: int | None = None,
        min_nodes: int = 1,
        start_timeout: float = 120.0,
        poll_interval: float = 5.0,
        actor_options: Mapping[str, Any] | None = None,
        ray_init: Mapping[str, Any] | None = None,
    ) -> None:
        if workers_per_node < 1:
            raise ValueError("workers_per_node must be >= 1")
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self.workers_per_node = workers_per_node
        self.call_timeout = call_timeout
        self.block = block
        self.memory_config = memory or MemoryConfig()
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir else cache_dir() / "ray" / "driver"
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        self.store = SnapshotStore(self.snapshot_dir, (pool_options or {}).get("store_quota", defaults.STORE_QUOTA))
        self._max_payload = max_payload
        self._max_pending = max_pending
        self._pending = threading.BoundedSemaphore(max_pending)
        self.max_in_flight_per_node = self._limit = max_in_flight_per_node or 4 * workers_per_node
        self._spill_at = min(spill_at or workers_per_node, self._limit)
        self._lock = threading.RLock()
        self._wakeup = threading.Condition(self._lock)
        self._queue: collections.deque[_Call] = collections.deque()
        self._nodes: dict[str, _Node] = {}
        self._indexes = itertools.count()
        self._ids = itertools.count(1)
        self._closed = False
        self.lost_nodes = 0
        self.actor_restarts = 0  # hlpool actors started again on a node that had one
        self._seen_nodes: set[str] = set()
        max_guest_memory = (pool_options or {}).get("max_guest_memory", defaults.MAX_GUEST_MEMORY)
        self._owns_ray = False
        self._catalog = Catalog(self.store, self.memory_config, max_guest_memory, self._build_on_node)
        if not ray.is_initialized():
            ray.init(address=address, **{"log_to_driver": False, **dict(ray_init or {})})
            self._owns_ray = True
        options = {"num_cpus": 0, "max_concurrency": 1000, **dict(actor_options or {})}
        node_pool_options = {"call_timeout": call_timeout, "max_payload": max_payload, "memory": memory,
                             "host_functions": dict(host_functions or {}), **dict(pool_options or {})}
        node_snapshot_dir = node_snapshot_dir or os.environ.get("HLPOOL_RAY_NODE_SNAPSHOT_DIR") or None
        self._members = Members(lambda node_id: (node_id, workers_per_node, node_snapshot_dir, node_pool_options),
                                options, self._join, self._lose, self._known_nodes, poll_interval, start_timeout)
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="hlpool-ray-dispatch", daemon=True)
        self._completed: queue.SimpleQueue = queue.SimpleQueue()  # (node, call, Ray's future) of answered calls
        self._completer = threading.Thread(target=self._complete_loop, name="hlpool-ray-complete", daemon=True)
        try:
            waited = self._members.wait_for(min_nodes, start_timeout)
            if len(self._nodes) < min_nodes:
                reasons = "".join(f"; node {node_id[:12]}: {reason}"
                                  for node_id, reason in sorted(self._members.start_errors.items()))
                raise HlpoolError(f"only {len(self._nodes)} of {min_nodes} Ray node(s) started an hlpool actor "
                                  + (f"within {start_timeout:g} s" if waited else "(each node that has not joined refused it)")
                                  + reasons)
        except BaseException:
            self._stop_nodes()
            raise
        self._members.start()
        self._completer.start()
        self._dispatcher.start()

    # ---- membership (called by Members) ---------------------------------------------------------

    def _known_nodes(self) -> set[str]:
        with self._lock:
            return {n for n, node in self._nodes.items() if not node.lost}

    def _join(self, node_id: str, actor: Any, info: dict) -> None:
        with self._lock:
            if self._closed:
                _kill(actor)
                return
            self._nodes[node_id] = _Node(node_id, next(self._indexes), actor, info)
            if node_id in self._seen_nodes:
                self.actor_restarts += 1
            self._seen_nodes.add(node_id)
            self._wakeup.notify_all()
        log.info("node %s joined (%d worker(s))", node_id[:12], info.get("workers", 0))

    def _lose(self, node_id: str, reason: str) -> None:
        """Take a node away: fail its in-flight calls; the queue goes to the others."""
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None or node.lost:
                return
            node.lost = True
            del self._nodes[node_id]
            lost = list(node.inflight.values())
            node.inflight.clear()
            self.lost_nodes += 1
            self._wakeup.notify_all()
        log.warning("node %s lost (%s): failing its %d call(s) in flight", node_id[:12], reason, len(lost))
        for call in lost:
            _fail(call.future, NodeLostError(f"node {node_id[:12]} was lost while running the call ({reason})"))
        _kill(node.actor)
        self._members.wake()

    # ---- snapshots -------------------------------------------------------------------------------

    def snapshot(self, source: "str | os.PathLike | Snapshot | SnapshotHandle", *,
                 memory: MemoryConfig | None = None) -> SnapshotHandle:
        """A handle for ``source``: a guest ELF (built once, on one node), a ``.hlsnap`` file (with the
        parents its metadata names, in its directory), or a persisted :class:`Snapshot`."""
        return self._catalog.get(source, memory)

    def script(self, language: str, source: str, *, timeout: float | None | object = ...) -> SnapshotHandle:
        """A handle for a JavaScript or Lua script (loaded once, on one node; see ``Pool.script``)."""
        return self._catalog.script(language, source, self.call_timeout if timeout is ... else timeout)

    def derive(self, base: Any, calls: Iterable[Any] = (), *, map_files: Iterable[Any] = (), retain: Any = None,
               timeout: float | None | object = ...) -> SnapshotHandle:
        """A stored child of ``base``, built on the node preferred for ``base`` (see ``Pool.derive``).
        ``map_files`` is not supported (they are paths on the driver; the child is built on a node)."""
        if list(map_files):
            raise CallError("RayPool.derive does not map files (map_files): they are paths on the driver and the "
                            "child is built on a Ray node; derive it with a local Pool and register the .hlsnap")
        load_timeout = self.call_timeout if timeout is ... else timeout
        return self._catalog.derive(self.snapshot(base), [_call_pair(c) for c in calls], retain,
                                    load_timeout or defaults.INIT_TIMEOUT)

    def _build_on_node(self, method: str, args: tuple, key: str, known: set) -> tuple[list, Mapping[str, Any]]:
        """Run a build ``method`` on the node preferred for ``key``; (chain files, handle fields)."""
        with self._lock:
            nodes = preference(key, list(self._nodes.values()))
        if not nodes:
            raise PoolClosedError("no Ray node is serving this pool")
        node = nodes[0]
        try:
            ok, answer = ray.get(getattr(node.actor, method).remote(*args, known))
        except ACTOR_ERRORS as exc:
            self._lose(node.node_id, f"{type(exc).__name__} while building a snapshot")
            raise NodeLostError(f"node {node.node_id[:12]} was lost while building a snapshot") from None
        if not ok:
            raise from_wire(answer)
        with self._lock:
            node.files.update(f[1] for f in answer["files"])
        return answer["files"], answer

    def remove_snapshot(self, snapshot: Any) -> bool:
        """Forget a snapshot on the driver and on every node; True if the driver's store file was deleted.
        Refused (:class:`SnapshotError`) while calls for it are queued or running."""
        handle = self.snapshot(snapshot)
        path = handle.path
        with self._lock:
            busy = sum(c.handle.path == path for c in self._queue) + sum(
                c.handle.path == path for n in self._nodes.values() for c in n.inflight.values())
            if busy:
                raise SnapshotError(f"{path}: {busy} queued or running call(s) need it; remove it once they finish")
            top = self._catalog.forget(handle)
            nodes = list(self._nodes.values())
        if top is None:
            return False
        try:
            ray.get([n.actor.remove.remote(top) for n in nodes], timeout=30)
        except Exception as exc:
            log.warning("removing %s on the nodes: %s", path, exc)
        with self._lock:
            for n in nodes:
                n.files.discard(top)
        return self.store.remove(path) if self.store.contains(path) else False

    def collect_garbage(self) -> list[str]:
        """Collect unreferenced files of every node's store and of the driver's; the driver's paths."""
        with self._lock:
            nodes = list(self._nodes.values())
        try:
            ray.get([n.actor.collect_garbage.remote() for n in nodes], timeout=60)
        except Exception as exc:
            log.warning("collecting garbage on the nodes: %s", exc)
        return self.store.collect()

    # ---- submitting ------------------------------------------------------------------------------

    def submit(self, snapshot: Any, fn: str, args: Iterable[Any] = (), *,
               timeout: float | None | object = ..., deadline: float | None = None) -> concurrent.futures.Future:
        """Schedule ``fn(*args)`` on some node; returns a Future (see ``Pool.submit``)."""
        if self._closed:
            raise PoolClosedError("the pool is shut down")
        handle = self.snapshot(snapshot)
        timeout = self.call_timeout if timeout is ... else timeout
        fn, args, _payload = check_call(handle, fn, args, self._max_payload, timeout, deadline)
        if not self._pending.acquire(blocking=self.block):
            raise PoolOverloadedError(f"{self._max_pending} calls are pending")
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.add_done_callback(lambda _f: self._pending.release())
        call = _Call(future, handle, fn, args, timeout, time.monotonic() + deadline if deadline else 0.0,
                     next(self._ids))
        with self._lock:
            if self._closed:
                future.cancel()
                raise PoolClosedError("the pool is shut down")
            if handle.path in self._catalog.removed:
                future.cancel()
                raise SnapshotError(f"{handle.path}: the snapshot was removed (RayPool.remove_snapshot)")
            self._queue.append(call)
            batch = self._route_some_locked()  # straight to a node with room: no hop through the dispatcher
            if self._queue:
                self._wakeup.notify_all()
        self._send(batch)
        return future

    def map(self, snapshot: Any, fn: str, iterable: Iterable[Iterable[Any]], *,
            timeout: float | None | object = ...) -> Iterator[Any]:
        """Like ``Executor.map``: ``fn(*args)`` for each ``args`` of ``iterable``, results in order.
        ``timeout`` bounds each call once a node's worker runs it, as in :meth:`submit`; it is not,
        as in ``Executor.map``, a bound on the wait for the results."""
        futures = [self.submit(snapshot, fn, args, timeout=timeout) for args in iterable]
        return results_in_order(futures)

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

    def call_future(self, snapshot: Any, fn: str, args: Iterable[Any] = (), *,
                    timeout: float | None | object = ..., deadline: float | None = None) -> asyncio.Future:
        """Like ``Pool.call_future``: :meth:`submit` from inside a running event loop, as an asyncio
        future of that loop (the answer comes through Ray's own threads)."""
        return asyncio.wrap_future(self.submit(snapshot, fn, args, timeout=timeout, deadline=deadline))

    # ---- dispatching -----------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        """Send queued calls to nodes with room, in order; wait while none has room. Routes are chosen
        under the lock; the Ray submissions happen outside it."""
        while True:
            with self._lock:
                while True:
                    batch = self._route_some_locked()
                    if batch:
                        break
                    if self._closed and not self._queue:
                        return
                    self._wakeup.wait(0.25)
            self._send(batch)

    def _send(self, batch: list[tuple[_Node, _Call, float | None, bool]]) -> None:
        for node, call, left, with_refs in batch:
            try:
                ref = node.actor.call.remote(self._catalog.chain_arg(call.handle, with_refs), call.fn, call.args,
                                             call.timeout, left)
            except Exception as exc:  # e.g. the snapshot was removed meanwhile
                with self._lock:
                    node.inflight.pop(call.ident, None)
                _fail(call.future, exc if isinstance(exc, HlpoolError) else
                      HlpoolError(f"cannot send the call: {exc}"))
                continue
            # Ray runs done-callbacks on its own thread: hand the result over, nothing more there.
            ref.future().add_done_callback(lambda f, n=node, c=call: self._completed.put((n, c, f)))

    def _route_some_locked(self) -> list[tuple[_Node, _Call, float | None, bool]]:
        """Take the queued calls some node has room for (in order; the rest stay queued)."""
        batch = []
        nodes = list(self._nodes.values())
        kept: collections.deque[_Call] = collections.deque()
        now = time.monotonic()
        while self._queue:
            call = self._queue.popleft()
            if call.future.done():
                continue  # cancelled while queued
            if call.expires and call.expires <= now:
                _fail(call.future, GuestTimeout(f"{call.fn}: deadline passed while the call was queued"))
                continue
            node = choose(call.handle.sha256, nodes, self._spill_at, self._limit)
            if node is None:
                kept.append(call)
                kept.extend(self._queue)
                self._queue.clear()
                break
            if not call.future.set_running_or_notify_cancel():
                continue
            node.inflight[call.ident] = call
            # object references only when the node may lack a file (they cost Ray bookkeeping per call)
            with_refs = not node.files.issuperset(cf.sha256 for cf in self._catalog.chain_files(call.handle))
            batch.append((node, call, (call.expires - now) if call.expires else None, with_refs))
        self._queue = kept
        return batch

    def _complete_loop(self) -> None:
        while True:
            item = self._completed.get()
            if item is None:
                return
            try:
                self._finished(*item)
            except Exception:  # a bug: never leave a future unresolved, never stop this thread
                log.exception("resolving a call failed")
                _fail(item[1].future, HlpoolError("the driver failed to resolve the call"))

    def _finished(self, node: _Node, call: _Call, done: concurrent.futures.Future) -> None:
        try:
            ok, value = done.result()
        except ACTOR_ERRORS as exc:
            # The node is gone: take it away before its slot frees (no call may follow this one there);
            # this call fails with the node's other in-flight calls.
            self._lose(node.node_id, type(exc).__name__)
            _fail(call.future, NodeLostError(f"node {node.node_id[:12]} was lost while running the call "
                                             f"({type(exc).__name__})"))
            return
        except Exception as exc:  # a bug in the actor: the call fails clearly, the node goes on
            log.error("node %s failed a call: %r", node.node_id[:12], exc)
            ok, value = False, HlpoolError(f"node {node.node_id[:12]} failed the call: {type(exc).__name__}").to_wire()
        if ok is None:  # the node lacks a file it was sent no reference for (e.g. its store was cleaned)
            with self._lock:
                node.files.difference_update(value)
                resend = node.inflight.get(call.ident) is call
            if resend:
                self._send([(node, call, (call.expires - time.monotonic()) if call.expires else None, True)])
            return
        with self._lock:
            mine = node.inflight.pop(call.ident, None) is not None
            if mine:
                node.calls += 1
                node.errors += not ok
                node.files.update(cf.sha256 for cf in self._catalog.chain_files(call.handle))  # it holds them now
            self._wakeup.notify_all()
        if not mine:
            return  # the node was lost meanwhile: the call failed already
        if ok:
            _resolve(call.future, value)
        else:
            _fail(call.future, from_wire(value))

    # ---- shutting down ---------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting calls; finish (or cancel) queued ones; stop every node's pool."""
        with self._lock:
            already = self._closed
            self._closed = True
            cancelled = list(self._queue) if cancel_futures else []
            if cancel_futures:
                self._queue.clear()
            self._wakeup.notify_all()
        for call in cancelled:
            call.future.cancel()
        if already and not wait:
            return
        if wait:
            self._finish_shutdown()
        else:
            threading.Thread(target=self._finish_shutdown, name="hlpool-ray-shutdown", daemon=True).start()

    def _finish_shutdown(self) -> None:
        if self._dispatcher.is_alive() and self._dispatcher is not threading.current_thread():
            self._dispatcher.join()
        # Calls in flight end within their timeout (a node runs them under it); past that and a grace
        # period their nodes are stopped and the calls fail.
        limit = (self.call_timeout or 0) + SHUTDOWN_GRACE
        with self._lock:
            busy = [c.future for n in self._nodes.values() for c in n.inflight.values()]
        _done, late = concurrent.futures.wait(busy, timeout=limit)
        for future in late:
            _fail(future, PoolClosedError("the pool was shut down while the call ran"))
        self._stop_nodes()
        self._completed.put(None)

    def _stop_nodes(self) -> None:
        for actor in self._members.stop():
            _kill(actor)
        with self._lock:
            nodes = list(self._nodes.values())
            self._nodes.clear()
        try:
            ray.get([n.actor.stop.remote() for n in nodes], timeout=30)
        except Exception as exc:
            log.warning("stopping the nodes' pools: %s", exc)
        for n in nodes:
            _kill(n.actor)
        self.store.release()
        if self._owns_ray and ray.is_initialized():
            self._owns_ray = False
            ray.shutdown()

    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(wait=True)

    # ---- introspection ---------------------------------------------------------------------------

    def stats(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """One dict per node (nodes lost are left out): ``node_id``, ``index``, ``alive``, ``calls``, ``errors``
        (as the driver counted them), ``workers``, ``live_vms`` (also as ``vms``), ``in_flight``, ``queued`` (0:
        the queue is the driver's, see :attr:`queued`), ``crashes`` and ``rss_kib``/``pss_kib`` summed over the
        node's workers, ``fetches``/``fetched_bytes`` (snapshot files it received), ``uploaded_bytes`` (files
        it built and sent), ``files`` (chain files the driver knows it holds), ``actor_pid``, ``worker_pids``
        (pids on that node) and ``pid`` (0: no local process, for code that treats entries as local
        workers). A node that does not answer within ``timeout`` seconds shows its last figures, not alive."""
        with self._lock:
            nodes = sorted(self._nodes.values(), key=lambda n: n.index)
        refs = [n.actor.stats.remote() for n in nodes]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout) if refs else ([], [])
        ready_set = set(ready)
        out = []
        for node, ref in zip(nodes, refs):
            alive = ref in ready_set
            if alive:
                try:
                    node.last_stats = ray.get(ref)
                except Exception:
                    alive = False
            s = node.last_stats
            with self._lock:
                entry = {"node_id": node.node_id, "index": node.index, "pid": 0, "alive": alive and not node.lost,
                         "calls": node.calls, "errors": node.errors, "in_flight": node.load, "queued": 0,
                         "files": len(node.files)}
            entry.update({"workers": s.get("workers", self.workers_per_node), "live_vms": s.get("live_vms", 0),
                          "vms": s.get("live_vms", 0), "crashes": s.get("crashes", 0),
                          "rss_kib": s.get("rss_kib", 0), "pss_kib": s.get("pss_kib", 0),
                          "fetches": s.get("fetches", 0), "fetched_bytes": s.get("fetched_bytes", 0),
                          "uploaded_bytes": s.get("uploaded_bytes", 0), "node_restarts": s.get("restarts", 0),
                          "actor_pid": s.get("pid", 0), "worker_pids": s.get("worker_pids", [])})
            out.append(entry)
        return out

    @property
    def restarts(self) -> int:
        """Worker restarts on the nodes (as last reported) plus hlpool actors started again on a node."""
        with self._lock:
            return sum(n.last_stats.get("restarts", 0) for n in self._nodes.values()) + self.actor_restarts

    @property
    def workers(self) -> int:
        with self._lock:
            return self.workers_per_node * len(self._nodes)

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._queue)




def _call_pair(item: Any) -> tuple[str, list]:
    fn, args = (item, ()) if isinstance(item, str) else item
    return fn, list(args)


def _fail(future: concurrent.futures.Future, exc: BaseException) -> None:
    if not future.done():
        try:
            future.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass


def _resolve(future: concurrent.futures.Future, value: Any) -> None:
    if not future.done():
        try:
            future.set_result(value)
        except concurrent.futures.InvalidStateError:
            pass


def _kill(actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:
        pass
