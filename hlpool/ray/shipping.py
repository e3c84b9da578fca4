"""Snapshot files by content hash: the chain of files a snapshot needs, and installing one into a store.

A layered ``.hlsnap`` names its parents by relative path (and layer hash) in its
metadata, so a snapshot travels as its *chain*: every ancestor file, then the file
itself, each identified by the SHA-256 of its bytes and kept under its own file name
(the parents' references stay valid when the whole chain lands in one directory).
The driver puts each file into the Ray object store once; a node fetches a file the
first time a call needs it and writes it into its local snapshot store, where its
workers map it (one page cache copy per node).
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

from hlpool.errors import SnapshotError, SnapshotIntegrityError
from hlpool.pool.store import SUFFIX
from hlpool.snapshot.snapshot import Snapshot
from hlpool.snapshot.snapwrite import publish, write_all_at


@dataclass(frozen=True)
class ChainFile:
    """One file of a snapshot's chain: its name in a store, content hash and size."""

    name: str
    sha256: str
    size: int


def file_sha256(path: str) -> str:
    """The SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def chain_paths(path: str, max_memory: int | None = None) -> list[str]:
    """The files of ``path``'s chain, root first, ``path`` last (opened and validated). They must
    share one directory: a node keeps a chain in its one store directory under the same names."""
    path = os.path.abspath(path)
    snap = Snapshot.open(path, max_memory=max_memory)
    paths = [os.path.abspath(layer.path) for layer in snap.layers if layer.path]
    if not paths or paths[-1] != path:
        raise SnapshotError(f"{path}: the snapshot's layers do not end with its own file")
    for member in paths:
        if os.path.dirname(member) != os.path.dirname(path):
            raise SnapshotError(f"{path}: its parent {member} is in another directory; RayPool ships a layered "
                                f"snapshot whose layers are in one directory (a snapshot store)")
    return paths


def check_name(name: Any) -> str:
    """A chain file's name must be a plain ``*.hlsnap`` file name (it comes over the network)."""
    if (not isinstance(name, str) or not name.endswith(SUFFIX) or name.startswith(".") or "/" in name
            or "\0" in name or len(name) > 255):
        raise SnapshotError(f"refusing a shipped snapshot file named {name!r}")
    return name


class FileHashes:
    """SHA-256 of files by (path, inode, size, mtime): a file is hashed once while it is unchanged."""

    def __init__(self) -> None:
        self._known: dict[tuple, str] = {}
        self._lock = threading.Lock()

    def of(self, path: str) -> str | None:
        """The file's hash, or None if it does not exist."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._known.get(key)
        if known is None:
            known = file_sha256(path)
            with self._lock:
                self._known[key] = known
        return known


def content_name(sha256: str) -> str:
    """The store name of a chain's top file: its content hash (no other file names it, so it can be renamed;
    two builds of one source, which share a store name but not their bytes, then never collide)."""
    return sha256 + SUFFIX


def install(directory: str, name: str, sha256: str, data: bytes, hashes: FileHashes,
            drop_stale: Callable[[str], bool] | None = None) -> tuple[str, bool]:
    """Write a shipped file into a store directory (atomically, read-only, checked against its hash);
    returns (path, written). A file already there with the same hash is kept (written False). A file of
    the same name with other bytes (another build of the same source, e.g. left by an earlier driver) is
    replaced if ``drop_stale(path)`` removes it (nobody uses it); else :class:`SnapshotError`."""
    path = os.path.abspath(os.path.join(directory, check_name(name)))
    if hashlib.sha256(data).hexdigest() != sha256:
        raise SnapshotIntegrityError(f"{name}: the shipped bytes do not match their content hash")
    present = hashes.of(path)
    if present == sha256:
        return path, False
    if present is not None and not (drop_stale is not None and drop_stale(path)):
        raise SnapshotError(f"{path} holds another build of {name} (other bytes, in use here); RayPool cannot "
                            f"place the shipped one next to it: give this node's pools their own snapshot "
                            f"directory (RayPool(node_snapshot_dir=...))")
    # atomically and read-only: a writer killed half-way leaves nothing under ``path``
    publish(path, lambda fd: write_all_at(fd, [data], 0), sync=True)
    return path, True


def have(directory: str, chain_file: ChainFile, hashes: FileHashes) -> bool:
    """True if the store directory holds ``chain_file`` (same name, same contents)."""
    return hashes.of(os.path.join(directory, check_name(chain_file.name))) == chain_file.sha256
