"""The snapshot store: a directory of immutable snapshot files named by content hash,
with pins, a quota and garbage collection.

Files are ``<name>.hlsnap`` (written to ``<name>.hlsnap.tmp-<pid>-<tid>``, made
read-only and renamed by :mod:`hlpool.snapshot.snapfile`); a layered file names
its parents (by relative path and content hash) in its metadata.

Pins. A process that needs a stored file pins it: a :class:`~hlpool.pool.supervisor.Pool`
pins the file of every handle it gave out, a builder pins the file it wrote (and the
base it layered a script on) until the supervisor has pinned the result. A store
object keeps its pins as lines in one pin file of its own, ``.pins/<pid>-<n>.pins``
(``+name`` pins, ``-name`` unpins; rewritten compactly once mostly stale), which it
holds open with an exclusive ``flock``: one descriptor however many files it pins
(10,000 tenants are 10,000 lines, not 10,000 descriptors). The flock belongs to the
open file description, so it goes away with the process however the process ends;
a pin file is locked before it gets its name (``.new`` -> ``.pins``), so one that nobody
holds locked is a dead process's, and is deleted by the next sweep or new pin file.
This works between the processes (pools, servers, builders) that share one store
directory.

Garbage collection (:meth:`SnapshotStore.collect`) holds ``.pins/gc.lock``
exclusively while it reads every live pin file (its names are the roots), keeps
the roots and every file their metadata names as a parent (transitively), and
unlinks the rest. :meth:`pin` takes the same lock shared while it checks that the
file exists and writes its line, so a pin and a sweep never interleave: either the
sweep sees the pin, or the pin sees the file gone and fails.

Usage (for the quota) is the sum of the files' sizes, rescanned at most every
:data:`USAGE_TTL` seconds in between plus what this process noted it added
(:meth:`SnapshotStore.note_added`); a refusal is always decided on a fresh scan.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import os
import re
import stat
import threading
import time
from typing import Any, Iterable

import msgspec

from hlpool.errors import SnapshotError
from hlpool.snapshot.snapfile import HEADER, MAGIC, MAX_META_SIZE

log = logging.getLogger(__name__)

SUFFIX = ".hlsnap"
PIN_DIR = ".pins"
PIN_SUFFIX = ".pins"
USAGE_TTL = 1.0  # seconds a usage scan is reused (plus what this process added since)...
USAGE_SCAN_SHARE = 100  # ...or this many times as long as the scan took, if that is longer
_TEMP = re.compile(r"\.hlsnap\.tmp-(\d+)-\d+$")
_serial = itertools.count(1)

# Every pin-file and lock descriptor of this process (all stores): a forked spawner closes
# its copies (a copy of the pin file's descriptor would keep the parent's pins locked alive).
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
        self.pin_directory = os.path.join(self.directory, PIN_DIR)
        os.makedirs(self.pin_directory, exist_ok=True)
        self.quota = quota
        self._pins: set[str] = set()  # paths pinned by this store object
        self._pin_fd = -1  # our pin file, held with LOCK_EX while we live (opened at the first pin)
        self._pin_path = ""
        self._pin_lines = 0  # lines in our pin file (compacted when mostly stale)
        self._gc_fd = -1  # .pins/gc.lock: LOCK_SH to pin, LOCK_EX to sweep
        self._owner = os.getpid()
        self._lock = threading.RLock()  # the pins, and one sweep at a time in this process
        self._parents: dict[tuple[int, int, int], tuple[str, ...]] = {}  # (ino, size, mtime) -> parents
        self._scanned: dict[str, tuple[int, tuple[str, ...]]] = {}  # path -> (inode, parents), for children_of
        self._children: dict[str, set[str]] = {}
        self._usage: int | None = None
        self._usage_at = 0.0
        self._usage_ttl = USAGE_TTL
        self._sizes: dict[tuple[str, int], int] = {}  # (name, inode) -> size, from the last usage scan
        self._added = 0

    # ---- names ------------------------------------------------------------------------------

    def path_for(self, name: str) -> str:
        return os.path.join(self.directory, name + SUFFIX)

    def contains(self, path: str | os.PathLike) -> bool:
        """True if ``path`` is a snapshot file of this store (by location, not by existence)."""
        path = os.path.abspath(os.fspath(path))
        return os.path.dirname(path) == self.directory and path.endswith(SUFFIX)

    # ---- pins -------------------------------------------------------------------------------

    def pin(self, path: str | os.PathLike) -> bool:
        """Pin ``path`` until :meth:`unpin`; False if the file does not exist."""
        path = os.path.abspath(os.fspath(path))
        with self._lock:
            if path in self._pins:
                return True
            if not self.contains(path):  # not ours to collect: only check it is there
                if not os.path.isfile(path):
                    return False
                self._pins.add(path)
                return True
            with self._gc_lock(fcntl.LOCK_SH):
                try:
                    st = os.stat(path, follow_symlinks=False)
                except FileNotFoundError:
                    return False
                if not stat.S_ISREG(st.st_mode):
                    return False
                self._write_pin_line(b"+" + os.path.basename(path).encode() + b"\n")
            self._pins.add(path)
            return True

    def unpin(self, path: str | os.PathLike) -> None:
        path = os.path.abspath(os.fspath(path))
        with self._lock:
            if path not in self._pins:
                return
            self._pins.discard(path)
            if not self.contains(path) or self._pin_fd < 0:
                return
            with self._gc_lock(fcntl.LOCK_SH):
                if self._pin_lines > 1024 and self._pin_lines > 4 * len(self._pins):
                    self._compact()
                else:
                    self._write_pin_line(b"-" + os.path.basename(path).encode() + b"\n")

    def unpin_many(self, paths: Iterable[str | os.PathLike]) -> None:
        """:meth:`unpin` each of ``paths``, with one pin-file write (a builder drops its pins of an
        answer at once)."""
        with self._lock:
            names = []
            for p in paths:
                path = os.path.abspath(os.fspath(p))
                if path in self._pins:
                    self._pins.discard(path)
                    if self.contains(path):
                        names.append(os.path.basename(path))
            if not names or self._pin_fd < 0:
                return
            with self._gc_lock(fcntl.LOCK_SH):
                if self._pin_lines > 1024 and self._pin_lines > 4 * len(self._pins):
                    self._compact()
                else:
                    self._write_pin_line(b"".join(b"-" + n.encode() + b"\n" for n in names))
                    self._pin_lines += len(names) - 1

    def pinned(self, path: str | os.PathLike) -> bool:
        """True if this store object pins ``path``."""
        return os.path.abspath(os.fspath(path)) in self._pins

    def release(self) -> None:
        """Drop every pin (the pool shuts down): the pin file goes, with its descriptors."""
        with self._lock:
            self._pins.clear()
            if self._pin_fd >= 0 and os.getpid() == self._owner:
                try:
                    os.unlink(self._pin_path)
                except FileNotFoundError:
                    pass
            for attr in ("_pin_fd", "_gc_fd"):
                fd = getattr(self, attr)
                if fd >= 0:
                    _pin_fds.discard(fd)
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                    setattr(self, attr, -1)
            self._pin_lines = 0

    def _gc_lock(self, mode: int) -> "_Flock":
        if self._gc_fd < 0:
            self._gc_fd = os.open(os.path.join(self.pin_directory, "gc.lock"),
                                  os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            _pin_fds.add(self._gc_fd)
        return _Flock(self._gc_fd, mode)

    def _write_pin_line(self, line: bytes) -> None:
        """Append to our pin file (created, and locked, on first use); the caller holds gc.lock shared."""
        if self._pin_fd < 0 or os.getpid() != self._owner:
            self._owner = os.getpid()
            name = f"{self._owner}-{next(_serial)}"
            fresh = os.path.join(self.pin_directory, name + ".new")
            fd = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._pin_path = os.path.join(self.pin_directory, name + PIN_SUFFIX)
            os.rename(fresh, self._pin_path)  # locked before it is visible: an unlocked pin file is a dead one's
            self._pin_fd = fd
            _pin_fds.add(fd)
            self._pin_lines = 0
            if len(self._pins):  # (after a fork) our pins so far
                self._compact()
            self.pinned_by_anyone(read=False)  # delete the pin files of dead processes (one-shot builders)
        _write_all(self._pin_fd, line)
        self._pin_lines += 1

    def _compact(self) -> None:
        os.ftruncate(self._pin_fd, 0)
        names = [os.path.basename(p) for p in self._pins if self.contains(p)]
        _write_all(self._pin_fd, b"".join(b"+" + n.encode() + b"\n" for n in names))
        self._pin_lines = len(names)

    def pinned_by_anyone(self, read: bool = True) -> set[str]:
        """Store files pinned by any live process (ours included; the caller holds gc.lock exclusively
        for the answer to stay true). Pin files of dead processes (nobody holds their flock) are deleted."""
        out: set[str] = set()
        try:
            entries = list(os.scandir(self.pin_directory))
        except FileNotFoundError:
            return out
        for entry in entries:
            if not entry.name.endswith((PIN_SUFFIX, ".new")):
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                    if read and entry.name.endswith(PIN_SUFFIX):
                        out |= _read_pin_file(fd)  # its owner lives
                else:
                    if entry.name.endswith(PIN_SUFFIX) or not _alive(int(entry.name.split("-", 1)[0])):
                        os.unlink(entry.path)  # its owner is gone (a .new one may be about to be locked)
            except OSError:
                pass
            finally:
                os.close(fd)
        return {os.path.join(self.directory, n) for n in out}

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

    def usage(self, fresh: bool = True) -> int:
        """Bytes the store's snapshot files take (their sizes). ``fresh=False``: a scan up to
        :data:`USAGE_TTL` seconds old, or older while scans are slow (a scan may take at most
        1/:data:`USAGE_SCAN_SHARE` of the time), plus what :meth:`note_added` counted since.

        A fresh scan stats every file; a periodic one (``fresh=False``) stats only files it has
        not seen (by name and inode: store files are immutable), so with 10,000 tenants it is
        a directory listing, not 10,000 ``stat`` calls."""
        now = time.monotonic()
        if fresh or self._usage is None or now - self._usage_at > self._usage_ttl:
            self._usage = self._scan_usage(full=fresh or self._usage is None)
            done = time.monotonic()
            self._usage_at, self._added = done, 0
            self._usage_ttl = max(USAGE_TTL, USAGE_SCAN_SHARE * (done - now))
        return self._usage + self._added

    def _scan_usage(self, full: bool) -> int:
        known = {} if full else self._sizes
        sizes: dict[tuple[str, int], int] = {}
        try:
            entries = os.scandir(self.directory)
        except FileNotFoundError:
            self._sizes = sizes
            return 0
        with entries:
            for entry in entries:
                if not entry.name.endswith(SUFFIX) or entry.name.startswith("."):
                    continue
                key = (entry.name, entry.inode())
                size = known.get(key)
                if size is None:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    size = st.st_size
                sizes[key] = size
        self._sizes = sizes
        return sum(sizes.values())

    def note_added(self, size: int) -> None:
        """A file of ``size`` bytes was just added to the store (counted until the next scan)."""
        self._added += size

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
        with self._lock:
            return sorted(c for c in self._child_index().get(path, ()) if c != path)

    def _child_index(self) -> dict[str, set[str]]:
        """Parent path -> the store files naming it, kept up to date from one directory listing
        (no stat: files are immutable, a replaced one has a new inode): removing one of 10,000
        tenants reads only the metadata of files it has not seen."""
        current = {}
        for entry in os.scandir(self.directory):
            if entry.name.endswith(SUFFIX) and not entry.name.startswith(".") and entry.is_file(follow_symlinks=False):
                current[entry.path] = entry.inode()
        for child, (inode, parents) in list(self._scanned.items()):
            if current.get(child) != inode:
                del self._scanned[child]
                for parent in parents:
                    self._children[parent].discard(child)
        for child, inode in current.items():
            if child not in self._scanned:
                parents = _read_parents(child)
                self._scanned[child] = (inode, parents)
                for parent in parents:
                    self._children.setdefault(parent, set()).add(child)
        return self._children

    # ---- removal ----------------------------------------------------------------------------

    def collect(self, keep: Iterable[str] = ()) -> list[str]:
        """Remove every store file that no pin (of any process) and no kept file needs; returns
        the removed paths. Stale temporary files of dead writers go too."""
        with self._lock, self._gc_lock(fcntl.LOCK_EX):
            self._remove_stale_temp_files()
            files = self.files()
            roots = {os.path.abspath(k) for k in keep} | self.pinned_by_anyone()
            live: set[str] = set()
            todo = [p for p in roots if p in files]
            while todo:
                path = todo.pop()
                if path in live:
                    continue
                live.add(path)
                todo.extend(p for p in self.parents_of(path, files.get(path)) if p in files)
            removed = []
            for path in files:
                if path not in live:
                    try:
                        os.unlink(path)
                        removed.append(path)
                    except FileNotFoundError:
                        pass
            self._usage = None
        if removed:
            log.info("snapshot store %s: collected %d unreferenced file(s)", self.directory, len(removed))
        return removed

    def remove(self, path: str | os.PathLike) -> bool:
        """Unpin ``path`` and delete it unless another process pins it; True if deleted."""
        path = os.path.abspath(os.fspath(path))
        with self._lock:
            self.unpin(path)
            with self._gc_lock(fcntl.LOCK_EX):
                if path in self.pinned_by_anyone():
                    return False
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    return False
                self._usage = None
                return True

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
        used = self.usage(fresh=False)
        if used + max(needed, 1) > self.quota:
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


class _Flock:
    """``with``: hold flock ``mode`` on ``fd`` (released on exit)."""

    __slots__ = ("fd", "mode")

    def __init__(self, fd: int, mode: int) -> None:
        self.fd, self.mode = fd, mode

    def __enter__(self) -> None:
        fcntl.flock(self.fd, self.mode)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_pin_file(fd: int) -> set[str]:
    """The names a pin file pins: ``+name`` lines add, ``-name`` lines remove (a torn last line is ignored)."""
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    names: set[str] = set()
    for line in b"".join(chunks).split(b"\n")[:-1]:
        name = line[1:].decode("utf-8", "replace")
        if "/" in name or not name.endswith(SUFFIX):
            continue
        if line[:1] == b"+":
            names.add(name)
        elif line[:1] == b"-":
            names.discard(name)
    return names


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
