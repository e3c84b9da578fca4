"""The actor that owns one Ray node's hlpool :class:`~hlpool.pool.supervisor.Pool`.

:class:`NodeHost` runs as an async Ray actor pinned to its node
(``NodeAffinitySchedulingStrategy(soft=False)``). It creates the node's Pool (its
spawner and worker processes, which die with the actor's process), keeps the node's
snapshot store, fetches a snapshot's chain files from the object store the first time
a call needs them (:mod:`hlpool.ray.shipping`), and runs calls. Every answer is a plain
``(ok, value)`` pair: ``(True, result)`` or ``(False, HlpoolError.to_wire())``, so an
hlpool error crosses Ray unchanged and anything else that escapes is a fault of the node.

Ray workers set their process title themselves; python-prctl's ``set_proctitle`` (which
the pool's spawner, workers and builders call) rewrites the argv area and crashes in such
a process, so the actor makes it set only the thread name (``PR_SET_NAME``) before it
starts the pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Mapping

from hlpool.errors import HlpoolError, SnapshotError
from hlpool.guest.build import cache_dir
from hlpool.guest.layout import MemoryConfig
from hlpool.pool.registry import SnapshotHandle
from hlpool.pool.supervisor import Pool
from hlpool.ray.shipping import ChainFile, FileHashes, chain_paths, content_name, have, install

log = logging.getLogger(__name__)

Answer = tuple  # (True, value) or (False, wire error)


def _safe_proctitles() -> None:
    import prctl

    if getattr(prctl.set_proctitle, "__module__", "") != __name__:
        prctl.set_proctitle = _set_name


def _set_name(title: str) -> None:
    import prctl

    prctl.set_name(title[:15])


def _link(source: str, target: str) -> bool:
    os.link(source, target)
    return True


class _Missing(Exception):
    """Files of a chain are not here and came without object references."""

    def __init__(self, hashes: list[str]) -> None:
        super().__init__(f"{len(hashes)} file(s) missing")
        self.hashes = hashes


def _failure(exc: HlpoolError) -> Answer:
    return (False, exc.to_wire())


class NodeHost:
    """One node's pool, snapshot files and counters (the body of the Ray actor)."""

    def __init__(self, node_id: str, workers: int, snapshot_dir: str | None, pool_options: Mapping[str, Any]) -> None:
        _safe_proctitles()
        self.node_id = node_id
        directory = snapshot_dir.format(node_id=node_id) if snapshot_dir else str(cache_dir() / "ray" / "snapshots")
        self.pool = Pool(workers, snapshot_dir=directory, block=False, **dict(pool_options))
        self.directory = str(self.pool.snapshot_dir)
        self.hashes = FileHashes()
        self.handles: dict[str, SnapshotHandle] = {}  # top file's sha256 -> local handle
        self.have: set[tuple[str, str]] = set()  # (name, hash) of the chain files in the local store
        self.locks: dict[str, asyncio.Lock] = {}
        self.fetches = 0  # files fetched from the object store
        self.fetched_bytes = 0
        self.uploaded_bytes = 0  # bytes of files built here and returned to the driver
        self.calls = 0
        self.errors = 0
        log.info("hlpool node %s: %d worker(s), store %s", node_id[:12], workers, self.directory)

    # ---- liveness and introspection ------------------------------------------------------------

    async def info(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "pid": os.getpid(), "snapshot_dir": self.directory,
                "workers": self.pool.workers}

    def _drop_stale(self, path: str) -> bool:
        """Remove another build's file of a shipped name if no pool of this node (nor anyone) uses it."""
        store = self.pool.store
        return not store.pinned(path) and store.remove(path)

    async def stats(self) -> dict[str, Any]:
        workers = self.pool.stats()
        alive = [w for w in workers if w["alive"]]
        return {"node_id": self.node_id, "pid": os.getpid(), "workers": len(workers), "workers_alive": len(alive),
                "live_vms": sum(w["vms"] for w in alive), "node_calls": self.calls, "node_errors": self.errors,
                "crashes": sum(w["crashes"] for w in workers), "restarts": self.pool.restarts,
                "rss_kib": sum(w["rss_kib"] for w in workers), "pss_kib": sum(w["pss_kib"] for w in workers),
                "fetches": self.fetches, "fetched_bytes": self.fetched_bytes,
                "uploaded_bytes": self.uploaded_bytes, "files": len(self.have),
                "worker_pids": [w["pid"] for w in workers if w["alive"]]}

    # ---- snapshot files ---------------------------------------------------------------------

    async def _ensure(self, chain: list) -> SnapshotHandle:
        """The local handle of a chain's top file; fetch and install each missing file first."""
        files = [ChainFile(*entry[:3]) for entry in chain]
        top = files[-1].sha256
        handle = self.handles.get(top)
        if handle is not None:
            return handle
        if any(not entry[3] for entry in chain):  # sent without references: the driver sends them now
            raise _Missing([cf.sha256 for cf in files])
        loop = asyncio.get_running_loop()
        for entry, cf in zip(chain, files):
            if (cf.name, cf.sha256) in self.have:
                continue
            lock = self.locks.setdefault(cf.sha256, asyncio.Lock())
            async with lock:
                if (cf.name, cf.sha256) in self.have:
                    continue
                if not await loop.run_in_executor(None, have, self.directory, cf, self.hashes):
                    ref = entry[3][0]  # nested in a list: Ray passes the reference, the bytes come only now
                    data = await ref
                    if not isinstance(data, bytes) or len(data) != cf.size:
                        raise SnapshotError(f"{cf.name}: the object store gave {type(data).__name__} "
                                            f"of the wrong size")
                    _path, written = await loop.run_in_executor(None, install, self.directory, cf.name, cf.sha256,
                                                                data, self.hashes, self._drop_stale)
                    if written:
                        self.fetches += 1
                        self.fetched_bytes += len(data)
                self.have.add((cf.name, cf.sha256))
        path = os.path.join(self.directory, files[-1].name)
        handle = await loop.run_in_executor(None, self.pool.snapshot, path)
        self.handles[top] = handle
        return handle

    def _built(self, handle: SnapshotHandle, known: set[str]) -> Answer:
        """A snapshot built here, for the driver: its handle's fields and its chain's files
        (bytes for the files the driver does not know yet)."""
        files = []
        paths = chain_paths(handle.path)
        for path in paths:
            sha = self.hashes.of(path)
            if sha is None:
                raise SnapshotError(f"{path}: vanished from the store")
            self.have.add((os.path.basename(path), sha))
            data = None
            if sha not in known:
                with open(path, "rb") as f:
                    data = f.read()
                self.uploaded_bytes += len(data)
            name = content_name(sha) if path == paths[-1] else os.path.basename(path)
            files.append((name, sha, os.path.getsize(path), data))
        handle = self._under_content_name(handle, sha)
        self.handles[sha] = handle
        return (True, {"exports": handle.exports, "sha256": handle.sha256, "input_capacity": handle.input_capacity,
                       "language": handle.language, "files": files})

    def _under_content_name(self, handle: SnapshotHandle, sha: str) -> SnapshotHandle:
        """The handle of a file built here, under the name it travels by (a hard link: one inode, one page
        cache copy), so that children derived here name their parent as every other node stores it."""
        named = os.path.join(self.directory, content_name(sha))
        if handle.path == named:
            return handle
        try:
            os.link(handle.path, named)
        except FileExistsError:
            if self.hashes.of(named) != sha and not (self._drop_stale(named) and _link(handle.path, named)):
                raise SnapshotError(f"{named} exists with other contents") from None
        self.have.add((content_name(sha), sha))
        return self.pool.snapshot(named)

    async def build_elf(self, data: bytes, memory: MemoryConfig | None, known: set[str]) -> Answer:
        """Build a guest ELF (its bytes) into a snapshot of the local store."""
        loop = asyncio.get_running_loop()

        def build() -> Answer:
            tmp = os.path.join(self.directory, f".ray-upload-{os.getpid()}-{id(data):x}.elf")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                return self._built(self.pool.snapshot(tmp, memory=memory), known)
            finally:
                os.unlink(tmp)

        try:
            return await loop.run_in_executor(None, build)
        except HlpoolError as exc:
            return _failure(exc)

    async def build_script(self, language: str, source: str, timeout: float | None, known: set[str]) -> Answer:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                None, lambda: self._built(self.pool.script(language, source, timeout=timeout), known))
        except HlpoolError as exc:
            return _failure(exc)

    async def derive(self, chain: list, calls: list, retain: Any, timeout: float | None, known: set[str]) -> Answer:
        loop = asyncio.get_running_loop()
        try:
            base = await self._ensure(chain)
            return await loop.run_in_executor(
                None, lambda: self._built(self.pool.derive(base, calls, retain=retain, timeout=timeout), known))
        except HlpoolError as exc:
            return _failure(exc)

    async def remove(self, sha256: str) -> bool:
        """Forget a snapshot (by its top file's hash) and delete its file if nothing needs it."""
        handle = self.handles.pop(sha256, None)
        if handle is None:
            return False
        self.have = {entry for entry in self.have if entry[1] != sha256}
        try:
            return self.pool.remove_snapshot(handle)
        except HlpoolError as exc:
            log.info("node %s keeps %s: %s", self.node_id[:12], handle.path, exc)
            return False

    async def collect_garbage(self) -> list[str]:
        loop = asyncio.get_running_loop()
        removed = await loop.run_in_executor(None, self.pool.collect_garbage)
        if removed:  # what is left decides what must be fetched again
            present = await loop.run_in_executor(
                None, lambda: {(os.path.basename(p), self.hashes.of(p)) for p in self.pool.store.files()})
            self.have &= present
        return removed

    # ---- calls ----------------------------------------------------------------------------------

    async def call(self, chain: list, fn: str, args: tuple, timeout: float | None, deadline: float | None) -> Answer:
        """Run ``fn(*args)`` in a sandbox of the chain's snapshot on this node. ``(None, [hashes])``: files
        missing here that came without a reference (the driver sends the call again with them)."""
        try:
            handle = await self._ensure(chain)
        except _Missing as missing:
            return (None, missing.hashes)
        except HlpoolError as exc:
            self.calls += 1
            self.errors += 1
            return _failure(exc)
        try:
            future = self.pool.submit(handle, fn, args, timeout=timeout, deadline=deadline)
            value = await asyncio.wrap_future(future)
        except HlpoolError as exc:
            self.calls += 1
            self.errors += 1
            return _failure(exc)
        self.calls += 1
        return (True, value)

    async def stop(self) -> bool:
        """Shut the node's pool down (its workers exit); the actor is killed afterwards."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, lambda: self.pool.shutdown(wait=True, cancel_futures=True))
        return True
