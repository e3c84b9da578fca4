"""The driver's snapshots: handles by source, their chains of files, and those files' object references.

A handle's path is a file of the driver's store (or the ``.hlsnap`` the user named), as
with :class:`~hlpool.pool.supervisor.Pool`, so whatever reads a handle's file locally
(the HTTP service describes snapshots that way) works unchanged. Each chain file is put
into the Ray object store once (the driver owns the object, so it outlives any node);
a call carries the chain as references and a node fetches only what it lacks.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any, Callable, Mapping

import ray

from hlpool.errors import CallError, SnapshotError
from hlpool.guest import abi as guest_abi
from hlpool.guest.layout import MemoryConfig
from hlpool.pool.registry import SnapshotHandle
from hlpool.pool.store import SnapshotStore
from hlpool.ray.shipping import ChainFile, FileHashes, chain_paths, content_name, install
from hlpool.snapshot.snapfile import looks_like_snapshot
from hlpool.snapshot.snapshot import Snapshot

# build(method, args, key) -> (files, fields): runs ``method`` on a node (the one preferred for ``key``)
# with the file hashes the driver knows appended, returns the chain files [(name, sha, size, bytes|None)]
# and the handle's fields, and records that the node holds those files.
Builder = Callable[[str, tuple, str, set], tuple[list, Mapping[str, Any]]]


class Catalog:
    """Handles, chains and object references of one RayPool."""

    def __init__(self, store: SnapshotStore, memory_config: MemoryConfig, max_guest_memory: int,
                 build: Builder) -> None:
        self.store = store
        self.directory = store.directory
        self.memory_config = memory_config
        self.max_guest_memory = max_guest_memory
        self._build = build
        self.hashes = FileHashes()
        self._lock = threading.Lock()
        self._handles: dict[tuple, SnapshotHandle] = {}
        self._chains: dict[str, list[tuple[ChainFile, Any]]] = {}  # handle path -> [(file, object ref)]
        self._objects: dict[str, Any] = {}  # file hash -> object ref
        self.removed: set[str] = set()

    # ---- registering -------------------------------------------------------------------------

    def get(self, source: Any, memory: MemoryConfig | None = None) -> SnapshotHandle:
        if isinstance(source, SnapshotHandle):
            with self._lock:
                known = source.path in self._chains
            if not known:
                raise SnapshotError(f"{source.path}: not a snapshot of this pool")
            return source
        if isinstance(source, Snapshot):
            if source.path is None:
                raise SnapshotError("RayPool takes a persisted Snapshot (save it first) or its file")
            source = source.path
        path = os.path.abspath(os.fspath(source))
        try:
            st = os.stat(path)
        except OSError as exc:
            raise SnapshotError(f"{path}: {exc.strerror}") from None
        key = (path, st.st_ino, st.st_size, st.st_mtime_ns, memory or self.memory_config)
        with self._lock:
            handle = self._handles.get(key)
        if handle is None:
            if looks_like_snapshot(path):
                handle = self._open_file(path)
            else:
                with open(path, "rb") as f:
                    data = f.read()
                key_hash = hashlib.sha256(data).hexdigest()  # builds of different guests spread over the nodes
                handle = self._built(*self._build("build_elf", (data, memory), key_hash, self.known()))
            with self._lock:
                self._handles[key] = handle
        return handle

    def script(self, language: str, source: str, load_timeout: float | None) -> SnapshotHandle:
        if not isinstance(source, str):
            raise CallError("a script's source must be a str")
        key = ("script", language, source)
        with self._lock:
            handle = self._handles.get(key)
        if handle is None:
            # Every script of a language is built on the same node (the language's first choice), so the
            # interpreter's base snapshot, every script's parent, is built once and travels from there.
            handle = self._built(*self._build("build_script", (language, source, load_timeout), f"script:{language}",
                                              self.known()))
            with self._lock:
                self._handles[key] = handle
        return handle

    def derive(self, base: SnapshotHandle, calls: list, retain: Any, load_timeout: float | None) -> SnapshotHandle:
        if base.path in self.removed:
            raise SnapshotError(f"{base.path}: the snapshot was removed (RayPool.remove_snapshot)")
        args = (self.chain_arg(base), calls, retain, load_timeout)
        return self._built(*self._build("derive", args, base.sha256, self.known()))

    def known(self) -> set[str]:
        with self._lock:
            return set(self._objects)

    def _open_file(self, path: str) -> SnapshotHandle:
        snap = Snapshot.open(path, max_memory=self.max_guest_memory)
        chain = []
        chain_paths_list = chain_paths(path, self.max_guest_memory)
        for member in chain_paths_list:
            with open(member, "rb") as f:
                data = f.read()
            sha = self.hashes.of(member)
            if sha is None:
                raise SnapshotError(f"{member}: no such file")
            name = content_name(sha) if member == chain_paths_list[-1] else os.path.basename(member)
            chain.append((name, sha, len(data), data))
        fields = {"exports": tuple(snap.exports or ()), "sha256": snap.layers[-1].sha256.hex(),
                  "input_capacity": snap.layout.input.size - guest_abi.HL_MSG_HEADER_SIZE, "language": None}
        return self._built(chain, fields, keep_path=path)

    def _built(self, files: list, fields: Mapping[str, Any], keep_path: str | None = None) -> SnapshotHandle:
        """Store a chain's new files (object store; the driver's store unless ``keep_path`` is the
        user's own file) and make the handle of its top file."""
        chain = []
        for name, sha, size, data in files:
            cf = ChainFile(name, sha, size)
            with self._lock:
                ref = self._objects.get(sha)
            if ref is None:
                if data is None:
                    raise SnapshotError(f"{name}: a node did not send a file the driver lacks")
                ref = ray.put(data)
                with self._lock:
                    ref = self._objects.setdefault(sha, ref)
            if data is not None and keep_path is None:
                install(self.directory, name, sha, data, self.hashes, self._drop_stale)
            chain.append((cf, ref))
        top = keep_path or os.path.join(self.directory, chain[-1][0].name)
        if self.store.contains(top):
            self.store.pin(top)
        with self._lock:
            self._chains[top] = chain
            self.removed.discard(top)
        return SnapshotHandle(path=top, exports=tuple(fields["exports"]), sha256=fields["sha256"],
                              input_capacity=fields["input_capacity"], language=fields["language"])

    def _drop_stale(self, path: str) -> bool:
        return not self.store.pinned(path) and self.store.remove(path)

    # ---- using -------------------------------------------------------------------------------

    def chain_files(self, handle: SnapshotHandle) -> list[ChainFile]:
        with self._lock:
            return [cf for cf, _ref in self._chains.get(handle.path, ())]

    def chain_arg(self, handle: SnapshotHandle, with_refs: bool = True) -> list:
        """The chain as a node method's argument: ``(name, sha256, size, [ref])`` each. A reference is nested
        in a list, so Ray passes it as a reference and the node fetches the bytes only if it lacks them.
        Without references (the node holds every file): only the top file, ``(name, sha256, size, None)``, so
        a call costs Ray no reference bookkeeping and little serialization."""
        with self._lock:
            chain = self._chains.get(handle.path)
        if chain is None:
            raise SnapshotError(f"{handle.path}: not a snapshot of this pool")
        if not with_refs:  # the node holds the chain: naming the top file is enough
            top = chain[-1][0]
            return [(top.name, top.sha256, top.size, None)]
        return [(cf.name, cf.sha256, cf.size, [ref]) for cf, ref in chain]

    # ---- removing ------------------------------------------------------------------------------

    def forget(self, handle: SnapshotHandle) -> str | None:
        """Forget a handle; the hash of its top file (None if it was not known). Object references of
        files no other chain uses are dropped (the object store frees them)."""
        with self._lock:
            chain = self._chains.pop(handle.path, None)
            self.removed.add(handle.path)
            for key in [k for k, h in self._handles.items() if h.path == handle.path]:
                del self._handles[key]
            if chain is None:
                return None
            used = {cf.sha256 for c in self._chains.values() for cf, _ref in c}
            for cf, _ref in chain:
                if cf.sha256 not in used:
                    self._objects.pop(cf.sha256, None)
        return chain[-1][0].sha256
