"""Writing a snapshot file's bytes into place, and captured layers kept in memory until then.

:func:`publish` writes a file atomically: nothing appears under ``path`` until every byte is
written. Where the file system has ``O_TMPFILE`` (ext4, xfs, btrfs, tmpfs) the file is made
without a name, written with as few system calls as the data allows (one ``pwritev`` for a
script's layer) and linked into the directory when complete, so a writer that dies half-way
(killed, out of space) leaves nothing in the store at all; elsewhere (or if ``path`` exists,
which a link cannot replace) through a temporary name and ``rename``, as before.

:class:`PendingLayer` is a captured layer whose pages are still bytes in this process (copied
out of the guest at capture time, so as immutable as a sealed memfd). A snapshot made to be
stored (a script's layer) is written from them straight into its file; anything that needs
the layer as a file descriptor (a sandbox of the snapshot, a view) turns it into a sealed
memfd first, once, and then sees exactly what the memfd path always gave.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
import time
from typing import Callable, Iterable, Sequence

from hlpool.errors import SnapshotError
from hlpool.guest.layout import PAGE
from hlpool.memory.layers import F_ADD_SEALS, F_SEAL_GROW, F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_WRITE, Layer

IOV_MAX = 1024  # buffers one pwritev takes (Linux UIO_MAXIOV)
SPARE_WORTH_NS = 200_000  # creates slower than this on average are made ahead by a thread (_Spares)
# errno of an O_TMPFILE open or a /proc link that says "not here": use a temporary name instead
_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT, errno.EXDEV, errno.EPERM, errno.ENOSYS}
_tmpfile_works: dict[str, bool] = {}  # directory -> O_TMPFILE and linking through /proc worked there


class PendingLayer(Layer):
    """A new layer's pages as bytes in memory (see the module docstring); a :class:`Layer` in every
    other respect. ``fd`` (and so ``view``/``read``) makes the sealed memfd on first use;
    ``sha256`` (of the page bytes, as for a memfd layer) is computed on first use."""

    def __init__(self, chunks: Sequence[bytes], name: str = "hlpool-snapshot") -> None:
        for chunk in chunks:
            if len(chunk) % PAGE:
                raise ValueError("layer chunks must be whole pages")
        self._chunks: list[bytes] | None = list(chunks)
        self._memfd_name = name
        self._make_lock = threading.Lock()
        self._digest: bytes | None = None
        super().__init__(-1, sum(len(c) for c in self._chunks), b"")

    # Layer.__init__ assigns fd and sha256: both are properties here, made on first read.
    @property  # type: ignore[override]
    def fd(self) -> int:
        if self._resources[0] < 0:
            self._materialise()
        return self._resources[0]

    @fd.setter
    def fd(self, value: int) -> None:
        if value >= 0:
            raise ValueError("a pending layer gets its descriptor by itself")

    @property  # type: ignore[override]
    def sha256(self) -> bytes:
        if self._digest is None:
            chunks = self._chunks
            if chunks is None:  # (materialising takes the digest first: this one was closed)
                raise ValueError("the layer was closed")
            digest = hashlib.sha256()
            for chunk in chunks:
                digest.update(chunk)
            self._digest = digest.digest()
        return self._digest

    @sha256.setter
    def sha256(self, value: bytes) -> None:
        self._digest = value or None

    def close(self) -> None:
        with self._make_lock:
            if not self._pins:  # (a sandbox holding it holds its memfd: the bytes went already)
                self._chunks = None  # its bytes go now, not when the object does
        super().close()

    def __repr__(self) -> str:
        digest = self._digest.hex()[:12] if self._digest else "(not hashed)"
        return f"<Layer {digest} {self.size} bytes in memory>"

    def pending_chunks(self) -> list[bytes] | None:
        """The page bytes, if no memfd was made of them (then write these, else read the memfd)."""
        return self._chunks

    def _materialise(self) -> None:
        with self._make_lock:
            chunks = self._chunks
            if self._resources[0] >= 0:
                return
            if chunks is None or self.closed:  # (a memfd made now would never be released)
                raise SnapshotError(f"{self!r} was closed")
            self.sha256  # noqa: B018 -- taken before the bytes go
            fd = os.memfd_create(self._memfd_name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                write_all_at(fd, chunks, 0)
                fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL)
            except BaseException:
                os.close(fd)
                raise
            self._resources[0] = fd
            self._resources[3] = os.getpid()  # (made in a forked child: the child's to release)
            self._chunks = None  # the memfd holds them now (a big flattened image is not kept twice)


def write_all_at(fd: int, buffers: Sequence[bytes | memoryview], offset: int) -> int:
    """``pwritev`` every byte of ``buffers`` at ``offset`` (groups of IOV_MAX, short writes retried);
    returns the offset after them."""
    pending = [memoryview(b) for b in buffers if len(b)]
    while pending:
        group = pending[:IOV_MAX]
        written = os.pwritev(fd, group, offset)
        if written <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += written
        while written:  # drop what was written, keep the rest of a partly written buffer
            head = pending[0]
            if written >= len(head):
                written -= len(head)
                pending.pop(0)
            else:
                pending[0] = head[written:]
                written = 0
    return offset


class _Spares:
    """Unnamed files made ahead, one per directory, by a background thread of this process.

    Making a file costs ~50 us on a quiet ext4, but far more where many files were deleted in the
    last minutes: without a journal, ext4 skips every recently deleted inode when it picks one for
    a new file (``recently_deleted`` in ``find_inode_bit``), so with thousands deleted a create
    took ~1.3 ms here. A writer that makes one file after another (the script builder) takes a
    spare made while it was idle; the ``open`` itself runs without the GIL, on another core.

    Only while creating files is slow: handing each file over between two threads (a notify, a
    wake-up, the GIL back and forth) cost the builder more than a quick create (~8% of its time
    per script). Every create is timed, by the thread or by the writer (:meth:`note`); while
    their moving average is below :data:`SPARE_WORTH_NS` the writer makes its file itself.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ready: dict[str, int] = {}
        self._wanted: list[str] = []
        self._thread: threading.Thread | None = None
        self._create_ns: dict[str, float] = {}  # directory -> moving average of a create's time
        os.register_at_fork(after_in_child=self._forget)

    def worth_it(self, directory: str) -> bool:
        """True if files in ``directory`` are slow to create (or a spare is ready): use :meth:`take`."""
        return self._slow(directory) or directory in self._ready

    def _slow(self, directory: str) -> bool:
        return self._create_ns.get(directory, 0.0) >= SPARE_WORTH_NS

    def note(self, directory: str, nanoseconds: int) -> None:
        """Record how long creating a file in ``directory`` took."""
        self._create_ns[directory] = 0.75 * self._create_ns.get(directory, 0.0) + 0.25 * nanoseconds

    def take(self, directory: str) -> int | None:
        """A spare unnamed file in ``directory`` (None if none is ready); the next one is made meanwhile
        if creates there are still slow."""
        with self._cond:
            fd = self._ready.pop(directory, None)
            if directory not in self._wanted and self._slow(directory):
                self._wanted.append(directory)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._make, name="hlpool-spare-files", daemon=True)
                    self._thread.start()
                self._cond.notify()
        return fd

    def _make(self) -> None:
        while True:
            with self._cond:
                while not self._wanted:
                    self._cond.wait()
                directory = self._wanted[0]
            started = time.monotonic_ns()
            try:
                fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o444)
            except OSError:
                fd = -1  # (the writer finds out by itself, and says why)
            self.note(directory, time.monotonic_ns() - started)
            with self._cond:
                self._wanted.remove(directory)
                if fd >= 0:
                    old = self._ready.pop(directory, -1)
                    self._ready[directory] = fd
                    if old >= 0:
                        os.close(old)

    def _forget(self) -> None:
        """In a forked child: the parent's spares are the parent's (a shared inode), its thread is gone."""
        for fd in self._ready.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._cond = threading.Condition()
        self._ready, self._wanted, self._thread = {}, [], None
        self._create_ns = {}


_spares = _Spares()


def publish(path: str, write: Callable[[int], None], *, sync: bool, ahead: bool = False) -> None:
    """Create ``path`` (an absolute path) read-only, its bytes written by ``write(fd)``, atomically:
    a reader never finds a partial file under ``path``; an existing file is replaced. ``ahead``:
    while creating files in its directory is slow, use an unnamed file made in the background and
    have the next one made (see :class:`_Spares`)."""
    directory = os.path.dirname(path)
    if _tmpfile_works.get(directory, True):
        fd = _spares.take(directory) if ahead and _spares.worth_it(directory) else None
        try:
            if fd is None:
                started = time.monotonic_ns()
                fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o444)
                if ahead:
                    _spares.note(directory, time.monotonic_ns() - started)
        except OSError as exc:
            if exc.errno not in _NO_TMPFILE:
                raise
            _tmpfile_works[directory] = False
        else:
            try:
                write(fd)
                if sync:
                    os.fsync(fd)
                os.fchmod(fd, 0o444)  # whatever the umask
                _link(fd, path, directory)
            finally:
                os.close(fd)
            if sync:
                _sync_directory(directory)
            return
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        write(fd)
        if sync:
            os.fsync(fd)
        os.fchmod(fd, 0o444)
        os.close(fd)
        fd = -1
        os.rename(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if sync:
        _sync_directory(directory)


def _link(fd: int, path: str, directory: str) -> None:
    """Give the unnamed file ``fd`` the name ``path`` (replacing a file there)."""
    source = f"/proc/self/fd/{fd}"
    try:  # (a dir fd makes os.link use linkat with AT_SYMLINK_FOLLOW; an absolute source ignores it)
        os.link(source, path, src_dir_fd=fd, follow_symlinks=True)
        _tmpfile_works[directory] = True
        return
    except FileExistsError:
        pass
    except OSError as exc:
        if exc.errno not in _NO_TMPFILE:
            raise
        _tmpfile_works[directory] = False  # no /proc here: name it as the fallback does
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        os.link(source, tmp, src_dir_fd=fd, follow_symlinks=True)
    except OSError as exc:
        if exc.errno not in _NO_TMPFILE:
            raise
        raise OSError(errno.EOPNOTSUPP, f"cannot link a finished snapshot file into {directory}") from None
    try:
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _sync_directory(directory: str) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def layer_chunks(layer: Layer, limit: int = 8 << 20) -> tuple[list[bytes] | None, int]:
    """(the layer's page bytes as a list, if it is pending or at most ``limit`` bytes, else None; its size)."""
    if isinstance(layer, PendingLayer):
        chunks = layer.pending_chunks()
        if chunks is not None:
            return chunks, layer.size
    if layer.size > limit:
        return None, layer.size
    out, offset = [], 0
    while offset < layer.size:
        chunk = layer.read(offset, min(8 << 20, layer.size - offset))
        if not chunk:
            raise OSError(errno.EIO, "layer shrank while being read")
        out.append(chunk)
        offset += len(chunk)
    return out, layer.size


def stream_chunks(layer: Layer) -> Iterable[bytes]:
    """A big layer's page bytes, 8 MiB at a time."""
    offset = 0
    while offset < layer.size:
        chunk = layer.read(offset, min(8 << 20, layer.size - offset))
        if not chunk:
            raise OSError(errno.EIO, "layer shrank while being read")
        yield chunk
        offset += len(chunk)
