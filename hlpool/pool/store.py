"""The snapshot store: a directory of immutable snapshot files named by content hash,
with pins, a quota and garbage collection.

Files are ``<name>.hlsnap`` (written to ``<name>.hlsnap.tmp-<pid>-<tid>``, fsync'ed,
made read-only and renamed by :mod:`hlpool.snapshot.snapfile`); a layered file names
its parents (by relative path and content hash) in its metadata.

Pins. A process that needs a stored file holds it open with a shared ``flock``: a
:class:`~hlpool.pool.supervisor.Pool` pins the file of every handle it gave out, a
builder pins the file it wrote (and the base it layered a script on) until the
supervisor has pinned the result. A flock belongs to the open file description, so
it goes away with the process however the process ends, and it works between the
processes (pools, servers) that share one store directory.

Garbage collection (:meth:`SnapshotStore.collect`) takes an exclusive, non-blocking
flock on every file: one it cannot lock is pinned by someone, a root. Roots and
every file their metadata names as a parent (transitively) stay; every other file
is unlinked while its exclusive lock is held. A concurrent :meth:`pin` waits for
the shared lock and then checks that the path still names the inode it locked, so
it never ends up holding a file that was just removed.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import threading
from typing import Any, Iterable

import msgspec

from hlpool.errors import SnapshotError
from hlpool.snapshot.snapfile import HEADER, MAGIC, MAX_META_SIZE

log = logging.getLogger(__name__)

SUFFIX = ".hlsnap"
_TEMP = re.compile(r"\.hlsnap\.tmp-(\d+)-\d+$")

# Every pin descriptor of this process (all stores): a forked spawner closes its
# copies (closing a copy does not release the lock; the parent's descriptor holds it).
_pin_fds: set[int] = set()


def close_inherited_pins() -> None:
    """In a freshly forked child: drop the copies of the parent's pin descriptors, so that a
    pin the parent releases is released (the spawner calls this before it forks anything)."""
    for fd in list(_pin_fds):
        try:
            os.close(fd)
        except OSError:
            pass
    _pin_fds.clear()


class SnapshotStore:
    """The store directory of one pool (or one builder): pins, usage, quota, garbage collection."""

    def __init__(self, directory: str | os.PathLike, quota: int | None = None) -> None:
        if quota is not None and quota < 0:
            raise ValueError("store_quota must be >= 0 bytes (or None for no quota)")
        self.directory = os.path.abspath(os.fspath(directory))
        os.makedirs(self.directory, exist_ok=True)
        self.quota = quota
        self._pins: dict[str, int] = {}  # path -> descriptor holding LOCK_SH
        self._lock = threading.RLock()  # the pins map, and one sweep at a time in this process
        self._parents: dict[tuple[int, int, int], tuple[str, ...]] = {}  # (ino, size, mtime) -> parents

    # ---- names ------------------------------------------------------------------------------

    def path_for(self, name: str) -> str:
        return os.path.join(self.directory, name + SUFFIX)

    def contains(self, path: str | os.PathLike) -> bool:
        """True if ``path`` is a snapshot file of this store (by location, not by existence)."""
        path = os.path.abspath(os.fspath(path))
        return os.path.dirname(path) == self.directory and path.endswith(SUFFIX)

    # ---- pins -------------------------------------------------------------------------------

    def pin(self, path: str | os.PathLike) -> bool:
        """Hold ``path`` (shared flock) until :meth:`unpin`; False if the file does not exist."""
        path = os.path.abspath(os.fspath(path))
        with self._lock:
            if path in self._pins:
                return True
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a sweep holds LOCK_EX (never long)
                held, now = os.fstat(fd), os.stat(path)
                if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino):
                    raise FileNotFoundError(path)  # removed (or replaced) before the lock was granted
            except FileNotFoundError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            self._pins[path] = fd
            _pin_fds.add(fd)
            return True

    def unpin(self, path: str | os.PathLike) -> None:
        path = os.path.abspath(os.fspath(path))
        with self._lock:
            fd = self._pins.pop(path, None)
            if fd is not None:
                _pin_fds.discard(fd)
                os.close(fd)

    def pinned(self, path: str | os.PathLike) -> bool:
        """True if this store object pins ``path``."""
        return os.path.abspath(os.fspath(path)) in self._pins

    def release(self) -> None:
        """Drop every pin (the pool shuts down)."""
        with self._lock:
            for path in list(self._pins):
                self.unpin(path)

    # ---- contents ---------------------------------------------------------------------------

    def files(self) -> dict[str, os.stat_result]:
        """Every snapshot file of the store, with its stat."""
        out = {}
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return out
        for entry in entries:
            if not entry.name.endswith(SUFFIX) or entry.name.startswith("."):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if entry.is_file(follow_symlinks=False):
                out[entry.path] = st
        return out

    def usage(self) -> int:
        """Bytes the store's snapshot files take (their sizes)."""
        return sum(st.st_size for st in self.files().values())

    def remaining(self) -> int | None:
        """Bytes left under the quota (None: no quota)."""
        return None if self.quota is None else max(0, self.quota - self.usage())

    def parents_of(self, path: str, st: os.stat_result | None = None) -> tuple[str, ...]:
        """The files ``path``'s metadata names as its parents (absolute paths; unreadable: none)."""
        try:
            st = st or os.stat(path)
        except OSError:
            return ()
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        known = self._parents.get(key)
        if known is None:
            known = self._parents[key] = _read_parents(path)
        return known

    def children_of(self, path: str | os.PathLike) -> list[str]:
        """Store files layered on ``path`` (naming it as a parent)."""
        path = os.path.abspath(os.fspath(path))
        return sorted(f for f, st in self.files().items() if f != path and path in self.parents_of(f, st))

    # ---- removal ----------------------------------------------------------------------------

    def collect(self, keep: Iterable[str] = ()) -> list[str]:
        """Remove every store file that no pin (of any process) and no kept file needs; returns
        the removed paths. Stale temporary files of dead writers go too."""
        with self._lock:
            self._remove_stale_temp_files()
            files = self.files()
            locks: dict[str, int] = {}  # unpinned files, held with LOCK_EX during the sweep
            roots = {os.path.abspath(k) for k in keep}
            try:
                for path in files:
                    fd = _try_exclusive(path)
                    if fd is None:
                        roots.add(path)
                    else:
                        locks[path] = fd
                live: set[str] = set()
                todo = [p for p in roots if p in files]
                while todo:
                    path = todo.pop()
                    if path in live:
                        continue
                    live.add(path)
                    todo.extend(p for p in self.parents_of(path, files.get(path)) if p in files)
                removed = []
                for path, fd in locks.items():
                    if path not in live and _unlink_locked(path, fd):
                        removed.append(path)
            finally:
                for fd in locks.values():
                    os.close(fd)
        if removed:
            log.info("snapshot store %s: collected %d unreferenced file(s)", self.directory, len(removed))
        return removed

    def remove(self, path: str | os.PathLike) -> bool:
        """Unpin ``path`` and delete it unless another process pins it; True if deleted."""
        path = os.path.abspath(os.fspath(path))
        with self._lock:
            self.unpin(path)
            fd = _try_exclusive(path)
            if fd is None:
                return False
            try:
                return _unlink_locked(path, fd)
            finally:
                os.close(fd)

    def remove_temp_files(self, pid: int) -> list[str]:
        """Delete the temporary files a (dead) writer process ``pid`` left in the store."""
        removed = []
        for entry in os.scandir(self.directory):
            match = _TEMP.search(entry.name)
            if match and int(match.group(1)) == pid:
                try:
                    os.unlink(entry.path)
                    removed.append(entry.path)
                except FileNotFoundError:
                    pass
        return removed

    def _remove_stale_temp_files(self) -> None:
        for entry in os.scandir(self.directory):
            match = _TEMP.search(entry.name)
            if match and not _alive(int(match.group(1))):
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    pass

    # ---- quota ------------------------------------------------------------------------------

    def make_room(self, needed: int, what: str) -> int | None:
        """Check that ``needed`` more bytes fit under the quota (collecting garbage first if they
        do not); returns the bytes left (None: no quota). Raises :class:`SnapshotError` if the
        store is still too full."""
        if self.quota is None:
            return None
        used = self.usage()
        if used + max(needed, 1) > self.quota:
            self.collect()
            used = self.usage()
            if used + max(needed, 1) > self.quota:
                raise self.full_error(used, needed, what)
        return self.quota - used

    def full_error(self, used: int, needed: int, what: str) -> SnapshotError:
        need = f"{needed} more bytes" if needed > 0 else "room"
        return SnapshotError(f"the snapshot store is full: {what} needs {need}, and the snapshots still in "
                             f"use take {used} of its {self.quota}-byte quota after garbage collection "
                             f"(Pool(store_quota=...), hlpool serve --store-quota); remove snapshots with "
                             f"Pool.remove_snapshot()")

    def describe(self) -> dict[str, Any]:
        files = self.files()
        return {"directory": self.directory, "files": len(files), "bytes": sum(st.st_size for st in files.values()),
                "quota": self.quota, "pinned": len(self._pins)}


def _try_exclusive(path: str) -> int | None:
    """An fd on ``path`` holding LOCK_EX, or None if someone pins it (or it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def _unlink_locked(path: str, fd: int) -> bool:
    """Unlink ``path`` if it still names the inode ``fd`` (holding LOCK_EX) is open on."""
    try:
        held, now = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino):
        return False
    os.unlink(path)
    return True


def _read_parents(path: str) -> tuple[str, ...]:
    """The parent paths named in a snapshot file's metadata (no validation: it only decides what
    garbage collection keeps; Snapshot.open validates before anything is used)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER.size)
            if len(raw) < HEADER.size or raw[:len(MAGIC)] != MAGIC:
                return ()
            fields = HEADER.unpack_from(raw, 0)
            meta_offset, meta_size = fields[4], fields[5]
            if meta_size > MAX_META_SIZE:
                return ()
            f.seek(meta_offset)
            meta = msgspec.msgpack.decode(f.read(meta_size))
    except Exception:
        return ()
    parents = meta.get("parents") if isinstance(meta, dict) else None
    if not isinstance(parents, list):
        return ()
    directory = os.path.dirname(path)
    return tuple(os.path.normpath(os.path.join(directory, p["path"])) for p in parents
                 if isinstance(p, dict) and isinstance(p.get("path"), str))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
