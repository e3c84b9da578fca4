"""The snapshots a pool knows: handles by source, registration, removal and garbage collection.

:class:`~hlpool.pool.supervisor.Pool` delegates here. A guest ELF, a script or a derived
snapshot (calls run on a stored base with their state kept, captured as a layer) is built
by a builder process (:mod:`hlpool.pool.builder`) into the snapshot store
(:mod:`hlpool.pool.store`); a ``.hlsnap`` file is opened (validated) in place; an
in-memory :class:`Snapshot` is written into the store. Every store file a handle
names stays pinned until the handle is removed, so garbage collection, in this
process or another one sharing the store, never takes it.

No lock is held while a snapshot is built: registrations of different sources build
at once, and the same source registered twice at once is built once. Scripts go to
one long-lived builder (:mod:`hlpool.pool.scriptbuilder`; a loader per language), one after
another, and the registry keeps only a small handle per script (no open file, no
mapping, no :class:`Snapshot`): 10,000 tenants are 10,000 handles and pin lines.
"""

from __future__ import annotations

import hashlib
import os
import threading
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

from hlpool.defaults import SCRIPT_LANGUAGES
from hlpool.errors import CallError, SnapshotError, SnapshotTooLargeError
from hlpool.guest import abi as guest_abi
from hlpool.guest import codec
from hlpool.guest.layout import MemoryConfig
from hlpool.pool.builder import SnapshotBuilder, retain_decisions
from hlpool.pool.scriptbuilder import ScriptBuilders
from hlpool.pool.store import SnapshotStore
from hlpool.snapshot.snapfile import looks_like_snapshot
from hlpool.snapshot.snapshot import Snapshot


@dataclass(frozen=True)
class SnapshotHandle:
    """A snapshot known to a pool: pass it to :meth:`Pool.submit`."""

    path: str
    exports: tuple[str, ...]
    sha256: str
    input_capacity: int
    language: str | None = None  # "js" or "lua" for a script made by Pool.script()
    family: str = ""  # Snapshot.family where known: VMs of a family switch between its snapshots
    # Derived once, used by every call: the path as sent to workers, and its hash (the home worker)
    path_bytes: bytes = field(init=False, repr=False, compare=False)
    path_hash: int = field(init=False, repr=False, compare=False)
    # Which VMs can serve it after a switch: its family; the scripts of a language share the
    # pool's interpreter base; else only VMs at its own path (see hlpool.pool.routing)
    family_key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        encoded = self.path.encode()
        object.__setattr__(self, "path_bytes", encoded)  # frozen: set once, here
        object.__setattr__(self, "path_hash", zlib.crc32(encoded))
        key = self.family or (f"script:{self.language}" if self.language else self.path)
        object.__setattr__(self, "family_key", key)

    @property
    def id(self) -> str:
        return self.sha256[:16]


class SnapshotRegistry:
    """Handles by source for one pool, and the pins that keep their store files."""

    def __init__(self, builder: SnapshotBuilder, memory_config: MemoryConfig) -> None:
        self.builder = builder
        self.store: SnapshotStore = builder.store
        self.max_guest_memory = builder.limits.max_guest_memory
        self.memory_config = memory_config
        self.scripts = ScriptBuilders(builder.spawn_builder, self.store, builder.limits)
        self._handles: dict[tuple, SnapshotHandle] = {}
        self._lock = threading.Lock()
        self.removed: set[str] = set()  # paths of removed handles (submit refuses them)

    # ---- registering ---------------------------------------------------------------------------

    def get(self, source: Any, memory: MemoryConfig | None = None) -> SnapshotHandle:
        if isinstance(source, SnapshotHandle):
            return source
        if isinstance(source, Snapshot):
            return self._from_snapshot(source)
        path = os.path.abspath(os.fspath(source))
        try:
            st = os.stat(path)
        except OSError as exc:
            raise SnapshotError(f"{path}: {exc.strerror}") from None
        config = memory or self.memory_config
        key = (path, st.st_ino, st.st_size, st.st_mtime_ns, config)
        with self._lock:
            handle = self._handles.get(key)
        if handle is not None:
            return handle
        if looks_like_snapshot(path):
            snap = self._open_file(path)
        else:
            snap = self.builder.build_elf(path, config)
        return self._remember(key, snap)

    def script(self, language: str, source: str, load_timeout: float) -> SnapshotHandle:
        if language not in SCRIPT_LANGUAGES:
            raise CallError(f"unknown script language {language!r}; use one of {', '.join(SCRIPT_LANGUAGES)}")
        if not isinstance(source, str):
            raise CallError("a script's source must be a str")
        key = ("script", language, hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest())
        with self._lock:
            handle = self._handles.get(key)
        if handle is not None:
            return handle
        layer = self.scripts.build(language, source, load_timeout)
        handle = SnapshotHandle(path=layer.path, exports=layer.exports, sha256=layer.sha256,
                                input_capacity=layer.input_capacity, language=language, family=layer.family)
        with self._lock:
            self._handles[key] = handle
            self.removed.discard(handle.path)
        return handle

    def derive(self, base: SnapshotHandle, calls: Any, map_files: Any, retain: Any,
               call_timeout: float) -> SnapshotHandle:
        """A stored child of ``base``: files mapped, calls run with restore=False, captured (in a builder)."""
        if base.path in self.removed:
            raise SnapshotError(f"{base.path}: the snapshot was removed (Pool.remove_snapshot)")
        checked = []
        for item in calls:
            fn, args = (item, ()) if isinstance(item, str) else item
            if not isinstance(fn, str):
                raise CallError(f"a call is (function name, args), not {item!r}")
            if fn not in base.exports and base.language is not None:
                fn, args = "call", (fn, list(args))  # a script's own function, as Pool.submit does
            if fn not in base.exports:
                raise CallError(f"unknown function {fn!r}; the snapshot exports {sorted(base.exports)}")
            try:
                codec.encode_args(tuple(args))
            except codec.ValueTypeError as exc:
                raise CallError(f"{fn}: {exc}") from None
            checked.append((fn, list(args)))
        files = [os.path.abspath(os.fspath(p)) for p in map_files]
        for path in files:
            if not os.path.isfile(path):
                raise SnapshotError(f"{path}: not a regular file")
        decisions = None if retain is None else retain_decisions(Snapshot.open(base.path,
                                                                              max_memory=self.max_guest_memory), retain)
        snap = self.builder.build_child(base.path, checked, files, decisions, call_timeout)
        return self._remember(("derived", snap.path), snap, base.language)

    def _from_snapshot(self, snap: Snapshot) -> SnapshotHandle:
        if snap.layout.guest_memory_size > self.max_guest_memory:
            raise SnapshotTooLargeError(f"{snap!r} has {snap.layout.guest_memory_size} bytes of guest memory, over "
                                        f"the pool's max_guest_memory of {self.max_guest_memory} bytes")
        if snap.path is None:
            snap = self.builder.persist(snap)
        elif self.store.contains(snap.path) and not self.store.pin(snap.path):
            raise SnapshotError(f"{snap.path}: no such file")
        return self._remember(("file", snap.path), snap)

    def _open_file(self, path: str) -> Snapshot:
        pinned_now = self.store.contains(path) and not self.store.pinned(path)
        if pinned_now and not self.store.pin(path):
            raise SnapshotError(f"{path}: no such file")
        try:
            return Snapshot.open(path, max_memory=self.max_guest_memory)
        except BaseException:
            if pinned_now:
                self.store.unpin(path)
            raise

    def _remember(self, key: tuple, snap: Snapshot, language: str | None = None) -> SnapshotHandle:
        assert snap.path is not None
        handle = SnapshotHandle(path=snap.path, exports=tuple(snap.exports or ()), sha256=snap.layers[-1].sha256.hex(),
                                input_capacity=snap.layout.input.size - guest_abi.HL_MSG_HEADER_SIZE,
                                language=language, family=snap.family)
        with self._lock:
            self._handles[key] = handle
            self.removed.discard(handle.path)
        return handle

    # ---- removing ------------------------------------------------------------------------------

    def resolve(self, target: Any) -> str:
        """The snapshot file a handle, a snapshot file's path or a registered source path names."""
        if isinstance(target, SnapshotHandle):
            return target.path
        path = os.path.abspath(os.fspath(target))
        with self._lock:
            known = {h.path for h in self._handles.values()}
            sources = {k[0]: h.path for k, h in self._handles.items() if k[0] == path}
        if path in known or self.store.contains(path):
            return path
        if path in sources:
            return sources[path]
        raise SnapshotError(f"{path}: not a snapshot of this pool")

    def remove(self, target: Any, lock: Any, calls_using: Callable[[str], int]) -> tuple[str, bool]:
        """Forget the handles of ``target`` and delete its store file (unless another process
        pins it). Refused while layered snapshots name it as their parent, or while
        ``calls_using(path)`` (evaluated under ``lock``, the lock submit routes under) is not 0."""
        path = self.resolve(target)
        children = self.store.children_of(path) if self.store.contains(path) else []
        if children:
            names = ", ".join(os.path.basename(c) for c in children[:3]) + (", ..." if len(children) > 3 else "")
            raise SnapshotError(f"{path}: {len(children)} layered snapshot(s) name it as their parent ({names}); "
                                f"remove them first")
        with lock:
            busy = calls_using(path)
            if busy:
                raise SnapshotError(f"{path}: {busy} queued or running call(s) need it; remove it once they finish")
            self.removed.add(path)
        with self._lock:
            for key in [k for k, h in self._handles.items() if h.path == path]:
                del self._handles[key]
        if not self.store.contains(path):
            return path, False
        deleted = self.store.remove(path)
        if not deleted and os.path.exists(path):  # a script builder may still pin it (its last answer)
            self.scripts.settle(wait=False)
            deleted = self.store.remove(path)
        return path, deleted

    def collect(self) -> list[str]:
        self.scripts.settle()
        return self.store.collect()

    def release(self) -> None:
        self.scripts.close()
        self.store.release()
