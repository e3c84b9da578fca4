"""Snapshot builds in a short-lived builder process, with a deadline and memory limits.

Building a snapshot runs untrusted code (an ELF's ``hl_main``, a script's top level)
and allocates as much memory as the image and the memory configuration ask for. None
of that happens in the supervisor: for each build the spawner forks a builder
(``hlpool-builder``), which builds, writes the snapshot file into the store, pins it
(:mod:`hlpool.pool.store`), reports its path and exits once the supervisor has pinned
it too; the supervisor then opens (validates) the file.

Scripts are the exception: they go to one long-lived builder (a loader per language in it)
(:mod:`hlpool.pool.scriptbuilder`, served through :data:`LONG_LIVED`), same limits.

Why fork from the spawner rather than start a fresh interpreter: the supervisor has
threads and must not fork itself, while the spawner is single-threaded and already
forks every worker; the builder needs the pool's host functions (``hl_main`` and a
script's top level may call them), Python callables that only a fork carries over (the
workers get them the same way); and a fork costs milliseconds where a new interpreter
would spend ~0.3 s importing hlpool for every build.

Limits, and what they really bound:

- ``max_guest_memory``: checked in the supervisor before any process starts, for the
  memory configuration and for the ELF's image (its program headers: bss included;
  one 4 KiB read). A guest can only touch pages inside its KVM memory slots, so this
  is the hard bound on guest pages; the host side of a build (the loader copies the
  image about three times: segments, one whole-image buffer, the boot memfd) grows
  with the image, which the same check bounds.
- ``build_memory``: the supervisor reads the builder's ``RssAnon + RssShmem`` from
  ``/proc/PID/status`` every 10 ms and kills it once that grew by more than the limit
  since it started. Guest memory is MAP_PRIVATE (anonymous, or over a memfd/file), so
  the pages a guest touches appear there; between two reads a guest touching memory
  at ~2 GB/s overshoots by ~20 MB. Pages written into a memfd but never mapped, and
  page cache, are not counted (the former are bounded by the image size above).
- ``RLIMIT_DATA`` (set in the builder): its private writable address space may grow by
  ``max_guest_memory + build_memory``. Guest mappings count at their full configured
  size whether touched or not, so this is a kernel-enforced ceiling, not a measure.
- ``build_timeout``: the waiting thread kills the builder (``pidfd_send_signal``,
  SIGKILL) at the deadline; the guest's own init deadline is set past it.

A memory cgroup would bound everything above, page cache included; it is not used:
the only writable hierarchy on the hosts this runs on belongs to the session manager.

A killed or failed build leaves nothing: the builder's temporary files are removed
by pid, it has no shared memory, and the supervisor waits until it is gone.
Identical builds running at once are done once (by content key); different builds
run concurrently, at most ``max_builds`` at a time.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import resource
import select
import signal
import socket
import struct
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import msgspec
import prctl

from hlpool import defaults, errors
from hlpool.errors import CallError, GuestImageError, HlpoolError, SnapshotError, SnapshotTooLargeError
from hlpool.guest.build import sdk_fingerprint
from hlpool.guest.elf import MAX_FILE_SIZE as ELF_MAX_FILE_SIZE
from hlpool.guest.layout import PAGE, Layout, MemoryConfig, page_up
from hlpool.pool.store import SnapshotStore
from hlpool.pool.worker import WorkerConfig
from hlpool.sandbox import Sandbox
from hlpool.snapshot.snapshot import Snapshot

log = logging.getLogger(__name__)

POLL = 0.01  # seconds between two looks at a running builder
EXIT_WAIT = 5.0  # seconds a builder gets to exit after its answer before it is killed
FRAME = struct.Struct("<I")
MAX_FRAME = 64 << 20

# Job kinds served by a long-lived builder: kind -> serve(sock, job, config). Filled in by the
# modules that implement them (hlpool.pool.scriptbuilder), which import this one, not the reverse.
LONG_LIVED: dict[str, Callable[[socket.socket, dict[str, Any], WorkerConfig], None]] = {}


@dataclass(frozen=True)
class BuildLimits:
    timeout: float = defaults.BUILD_TIMEOUT
    memory: int = defaults.BUILD_MEMORY
    max_guest_memory: int = defaults.MAX_GUEST_MEMORY
    concurrency: int = defaults.MAX_BUILDS

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError("build_timeout must be positive")
        if self.memory < 1 << 20 or self.max_guest_memory < 1 << 20:
            raise ValueError("build_memory and max_guest_memory must be at least 1 MiB")
        if self.concurrency < 1:
            raise ValueError("max_builds must be >= 1")

    @property
    def data_allowance(self) -> int:
        """RLIMIT_DATA growth allowed to a builder: guest mappings, the build's own memory, and the ELF
        loader's read buffer (it asks for its file-size limit in one read, reserved but not touched)."""
        return self.max_guest_memory + self.memory + ELF_MAX_FILE_SIZE


class BuilderTraceback(Exception):
    """The traceback of an exception raised in a builder process (the cause of the re-raised error)."""

    def __str__(self) -> str:
        return f"\n\"\"\"\n{self.args[0]}\"\"\""


# ---- checks made before anything runs --------------------------------------------------------


def guest_memory_needed(config: MemoryConfig, image_size: int = PAGE) -> int:
    """Bytes of guest memory (system + main + io slots) a guest of ``image_size`` bytes needs."""
    return Layout(config, PAGE).guest_memory_size - PAGE + page_up(max(image_size, PAGE))


def _limit_hint(limit: int) -> str:
    return f"the pool's max_guest_memory of {limit} bytes (Pool(max_guest_memory=...), hlpool serve --max-guest-memory)"


def check_memory_config(config: MemoryConfig, limit: int, what: str) -> None:
    need = guest_memory_needed(config)
    if need > limit:
        raise SnapshotTooLargeError(
            f"{what}: the memory configuration needs {need} bytes of guest memory (heap {config.heap_size}, "
            f"stack {config.stack_size}, in/out/reply {config.in_size}/{config.out_size}/{config.reply_size}, "
            f"log {config.log_size}), over {_limit_hint(limit)}")


def elf_image_size(path: str) -> int | None:
    """Bytes from the image base to the end of the last PT_LOAD segment (bss included), from the
    program headers alone; None if the file does not look like a 64-bit ELF (the builder then
    reports what is wrong with it)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return None
            (phoff,) = struct.unpack_from("<Q", head, 32)
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            if phentsize != 56 or not 0 < phnum <= 64:
                return None
            f.seek(phoff)
            table = f.read(56 * phnum)
    except (OSError, ValueError, OverflowError):
        return None
    if len(table) < 56 * phnum:
        return None
    end = None
    for i in range(phnum):
        (p_type,) = struct.unpack_from("<I", table, 56 * i)
        if p_type == 1:  # PT_LOAD
            (vaddr,) = struct.unpack_from("<Q", table, 56 * i + 16)
            (memsz,) = struct.unpack_from("<Q", table, 56 * i + 40)
            end = max(end or 0, page_up(vaddr + memsz))
    return end


def check_elf(path: str, config: MemoryConfig, limit: int) -> None:
    size = elf_image_size(path)
    if size is None:
        return
    need = guest_memory_needed(config, size)
    if need > limit:
        raise SnapshotTooLargeError(
            f"{path}: its image takes {size} bytes of guest memory (segments and bss), {need} bytes with the "
            f"memory configuration, over {_limit_hint(limit)}")


def content_name(snap: Snapshot) -> str:
    """The store name of a snapshot's own layer (its content hash and registers)."""
    return hashlib.sha256(snap.layers[-1].sha256 + snap.vcpu.regs).hexdigest()[:32]


def elf_name(path: str, config: MemoryConfig) -> str:
    """The store name of the snapshot an ELF builds into: its content, the memory settings, the SDK."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(msgspec.msgpack.encode(config.to_dict()))
    digest.update(sdk_fingerprint().encode())
    return digest.hexdigest()[:32]


# ---- the supervisor's side ---------------------------------------------------------------------


class SnapshotBuilder:
    """Runs builds for a pool: checks, deduplication, the builder process, quota admission."""

    def __init__(self, spawn_builder: Callable[[int], int], store: SnapshotStore, limits: BuildLimits) -> None:
        """``spawn_builder(fd)`` forks a builder talking over socket ``fd`` and returns its pid
        (:meth:`hlpool.pool.spawner.Spawner.spawn_builder`)."""
        self.spawn_builder = spawn_builder
        self.store = store
        self.limits = limits
        self._slots = threading.BoundedSemaphore(limits.concurrency)
        self._lock = threading.Lock()
        self._running: dict[tuple, concurrent.futures.Future] = {}
        self.builds = 0  # builder processes started
        self.stopped = 0  # builds killed at a limit

    def build_elf(self, path: str, config: MemoryConfig) -> Snapshot:
        """The stored snapshot of the guest ELF ``path`` with ``config`` (built now if needed)."""
        check_memory_config(config, self.limits.max_guest_memory, path)
        check_elf(path, config, self.limits.max_guest_memory)
        try:
            stored = self.store.path_for(elf_name(path, config))
        except OSError as exc:
            raise GuestImageError(f"{path}: cannot read: {exc.strerror}") from None

        def make() -> Snapshot:
            if self.store.pin(stored):  # built before (by this pool, an earlier one, another process)
                try:
                    return self._open(stored)
                except SnapshotError as exc:
                    log.warning("rebuilding stored snapshot %s: %s", stored, exc)
                    self.store.remove(stored)
            job = {"kind": "elf", "elf": path, "config": config.to_dict(), "output": stored,
                   "init_timeout": self.limits.timeout + 5.0}
            return self._build(job, path, GuestImageError)

        return self._once(("elf", stored), make)

    def build_child(self, base: str, calls: list[tuple[str, list]], map_files: list[str],
                    retain: dict[tuple[int, int, str], bool] | None, call_timeout: float) -> Snapshot:
        """The stored layer of a sandbox of the store file ``base`` after mapping ``map_files`` and running
        ``calls`` (name, args) with restore=False; ``retain``: decisions per parent region
        (:func:`retain_decisions`). Errors of the calls raise as themselves (GuestError...)."""
        if not self.store.contains(base):
            raise SnapshotError(f"{base}: a derived snapshot's base must be in the snapshot store "
                                f"{self.store.directory} (built from an ELF, a script or derived)")
        what = f"a snapshot derived from {os.path.basename(base)}"
        items = sorted((list(k) + [v]) for k, v in (retain or {}).items())
        job = {"kind": "derive", "base": base, "calls": [[fn, list(args)] for fn, args in calls],
               "map_files": list(map_files), "retain": items, "call_timeout": call_timeout}
        key = ("derive", hashlib.sha256(msgspec.msgpack.encode(job)).hexdigest())
        return self._once(key, lambda: self._build(job, what, SnapshotError))

    def persist(self, snap: Snapshot) -> Snapshot:
        """Write an in-memory snapshot (parents first) into the store; it stays pinned."""
        if snap.parent is not None and snap.parent.path is None:
            self.persist(snap.parent)
        if snap.path is not None:
            return snap
        path = self.store.path_for(content_name(snap))
        if self.store.pin(path):
            return self._open(path)
        self.store.make_room(PAGE + snap.layers[-1].size, "this snapshot")
        persisted = snap.persist(path)
        if not self.store.pin(path):
            raise SnapshotError(f"{path}: removed while it was being stored")
        self._admit(path, "this snapshot")
        return persisted

    # ---- internals ---------------------------------------------------------------------------

    def _once(self, key: tuple, make: Callable[[], Snapshot]) -> Snapshot:
        """``make()``, or wait for the same build already running in another thread."""
        with self._lock:
            future = self._running.get(key)
            owner = future is None
            if owner:
                future = self._running[key] = concurrent.futures.Future()
        if not owner:
            return future.result()
        try:
            result = make()
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(result)
            return result
        finally:
            with self._lock:
                del self._running[key]

    def _open(self, path: str) -> Snapshot:
        try:
            return Snapshot.open(path, max_memory=self.limits.max_guest_memory)
        except BaseException:
            self.store.unpin(path)
            raise

    def _build(self, job: dict[str, Any], what: str, error: type[HlpoolError]) -> Snapshot:
        self.store.make_room(0, what)  # a full store is collected first, refused if still full
        job["budget"] = self.store.quota  # a file larger than the whole quota is never written
        job["store"] = self.store.directory
        job["data_allowance"] = self.limits.data_allowance
        with self._slots:
            reply = self._run(job, what, error)
        path = reply["path"]
        if reply.get("created"):
            self._admit(path, what)
        try:
            snap = self._open(path)
        except SnapshotError:
            if reply.get("created"):
                self.store.remove(path)
            raise
        log.info("stored snapshot of %s as %s", what, path)
        return snap

    def _admit(self, path: str, what: str) -> None:
        """A new file made the store go over its quota: collect garbage, else take the file back."""
        quota = self.store.quota
        if quota is None:
            return
        size = os.stat(path).st_size
        self.store.note_added(size)
        if self.store.usage(fresh=False) <= quota:  # (a scan per file would cost O(files) per registration)
            return
        self.store.collect()
        used = self.store.usage()
        if used > quota:
            self.store.remove(path)
            raise self.store.full_error(used - size, size, what)

    def _run(self, job: dict[str, Any], what: str, error: type[HlpoolError]) -> dict[str, Any]:
        """Start a builder, give it ``job``, watch it; returns its answer (the result is pinned)."""
        process = start_builder(self.spawn_builder, what, error)
        pid = process.pid
        self.builds += 1
        started = time.monotonic()
        try:
            deadline = started + self.limits.timeout
            if process.receive(deadline, None) is None:
                raise process.failure(what, error, self.limits)
            process.baseline = _resident(pid)
            process.send(job, deadline)
            reply = process.receive(deadline, self.limits.memory)
            if reply is None:
                raise process.failure(what, error, self.limits)
            if "error" in reply:
                raise _rebuild(reply, what, error, self.limits)
            path = reply.get("path")
            if not isinstance(path, str) or not self.store.contains(path) or not self.store.pin(path):
                raise error(f"{what}: the builder answered without a stored snapshot")
            log.debug("build of %s took %.3f s (pid %d)", what, time.monotonic() - started, pid)
            return reply
        finally:
            process.stop()
            if process.killed:
                self.stopped += 1
                log.warning("builder %d for %s stopped (%s) after %.3f s, %d bytes resident beyond its start",
                            pid, what, process.killed, time.monotonic() - started, process.peak)
            for leftover in self.store.remove_temp_files(pid):
                log.info("removed %s, left by builder %d", leftover, pid)


def start_builder(spawn_builder: Callable[[int], int], what: str, error: type[HlpoolError]) -> "_Builder":
    """Fork a builder process (through the spawner) and connect to it over a socket pair."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        pid = spawn_builder(theirs.fileno())
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    try:
        return _Builder(pid, ours)
    except ProcessLookupError:
        ours.close()
        raise error(f"{what}: the builder process died as it started") from None


class _Builder:
    """One builder process, seen from the supervisor: its socket, pidfd and resident memory."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock
        self.pidfd = os.pidfd_open(pid)
        self.buffer = bytearray()
        self.baseline = 0
        self.killed: str | None = None  # "time" or "memory"
        self.peak = 0

    def send(self, message: Any, deadline: float) -> None:
        data = msgspec.msgpack.encode(message)
        self.sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            self.sock.sendall(FRAME.pack(len(data)) + data)
        except socket.timeout:
            self.kill("time")
        except OSError:
            pass  # it died; receive() says so

    def receive(self, deadline: float, memory_limit: int | None) -> Any | None:
        """The next message; None if the builder died or was killed (see ``killed``)."""
        self.sock.setblocking(False)
        while self.killed is None:
            if len(self.buffer) >= FRAME.size:
                (size,) = FRAME.unpack_from(self.buffer)
                if size > MAX_FRAME:
                    self.kill("protocol")
                    return None
                if len(self.buffer) >= FRAME.size + size:
                    data = bytes(self.buffer[FRAME.size:FRAME.size + size])
                    del self.buffer[:FRAME.size + size]
                    return msgspec.msgpack.decode(data)
            ready, _, _ = select.select([self.sock, self.pidfd], [], [], POLL)
            if self.sock in ready:
                try:
                    chunk = self.sock.recv(1 << 20)
                except (BlockingIOError, InterruptedError):
                    chunk = None
                except OSError:
                    chunk = b""
                if chunk:
                    self.buffer += chunk
                    continue
                if chunk == b"":
                    return None  # it closed its end: it is dying
            elif self.pidfd in ready:
                return None
            if memory_limit is not None:
                grown = _resident(self.pid) - self.baseline
                self.peak = max(self.peak, grown)
                if grown > memory_limit:
                    self.kill("memory")
            if time.monotonic() > deadline:
                self.kill("time")
        return None

    def kill(self, reason: str) -> None:
        if self.killed is None:
            self.killed = reason
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def failure(self, what: str, error: type[HlpoolError], limits: BuildLimits) -> HlpoolError:
        if self.killed == "time":
            return error(f"{what}: the build did not finish within the build timeout of {limits.timeout:g} s and "
                         f"was stopped (Pool(build_timeout=...), hlpool serve --build-timeout)")
        if self.killed == "memory":
            return error(f"{what}: the build used more than its memory limit of {limits.memory} bytes "
                         f"({self.peak} bytes resident beyond the builder's start) and was stopped "
                         f"(Pool(build_memory=...), hlpool serve --build-memory)")
        if self.killed == "protocol":
            return error(f"{what}: the builder process sent a malformed answer")
        return error(f"{what}: the builder process died before it answered")

    def stop(self) -> None:
        """Let it exit (closing our end tells it the result is pinned), make sure it is gone."""
        self.sock.close()
        if not select.select([self.pidfd], [], [], 0 if self.killed else EXIT_WAIT)[0]:
            self.kill(self.killed or "exit")
            select.select([self.pidfd], [], [], EXIT_WAIT)
        os.close(self.pidfd)


def _resident(pid: int) -> int:
    """Bytes of anonymous and shmem pages resident in ``pid`` (0 if it is gone)."""
    total = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith((b"RssAnon:", b"RssShmem:")):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return 0
    return total


def _rebuild(reply: dict[str, Any], what: str, error: type[HlpoolError], limits: BuildLimits) -> HlpoolError:
    wire = reply.get("error")
    if reply.get("out_of_memory"):
        exc: HlpoolError = error(f"{what}: the build ran out of memory: the builder's private address space may "
                                 f"grow by {limits.data_allowance} bytes (RLIMIT_DATA; max_guest_memory + "
                                 f"build_memory + the ELF loader's read buffer)")
    else:
        exc = errors.from_wire(wire if isinstance(wire, dict) else {})
    text = wire.get("traceback") if isinstance(wire, dict) else None
    if isinstance(text, str):
        exc.__cause__ = BuilderTraceback(text)
    return exc


# ---- the builder process ----------------------------------------------------------------------


def builder_main(fd: int, config: WorkerConfig) -> None:
    """The builder: forked by the spawner with one end of a socketpair (``fd``)."""
    sock = socket.socket(fileno=fd)
    try:
        _serve_one_build(sock, config)
    except OSError:
        pass  # the supervisor went away (or killed us): nobody to answer


def _serve_one_build(sock: socket.socket, config: WorkerConfig) -> None:
    prctl.set_pdeathsig(signal.SIGKILL)  # dies with the spawner, which dies with the supervisor
    if os.getppid() == 1:
        return
    prctl.set_name("hlpool-builder")
    try:
        prctl.set_proctitle("hlpool-builder")
    except Exception:
        pass
    prctl.set_no_new_privs(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor ends builders (SIGKILL), see the spawner
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _send(sock, {"ready": True})
    job = _receive(sock)
    if not isinstance(job, dict):
        return
    serve = LONG_LIVED.get(job.get("kind"))  # type: ignore[arg-type]
    if serve is not None:  # a long-lived builder (hlpool.pool.scriptbuilder)
        serve(sock, job, config)
        return
    try:
        data_now = _status_bytes("VmData")
        limit = data_now + int(job["data_allowance"])
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        path, created = _build_in_builder(job, config)
        reply: dict[str, Any] = {"path": path, "created": created}
    except MemoryError as exc:
        reply = {"error": _wire(exc), "out_of_memory": True}
    except BaseException as exc:
        reply = {"error": _wire(exc)}
    try:
        _send(sock, reply)
        sock.recv(1)  # keep our pins until the supervisor has pinned the result and closed its end
    except OSError:
        pass


def _build_in_builder(job: dict[str, Any], config: WorkerConfig) -> tuple[str, bool]:
    store = SnapshotStore(job["store"])
    budget = job.get("budget")
    if job["kind"] == "elf":
        out = job["output"]
        if store.pin(out):
            return out, False  # another process stored it meanwhile; the supervisor validates it
        snap = Snapshot.from_elf(job["elf"], config=MemoryConfig(**job["config"]),
                                 host_functions=config.host_functions, timeout=job["init_timeout"])
        return _store(snap, out, store, budget, job["elf"]), True
    if job["kind"] == "derive":
        return _derive_in_builder(job, config, store, budget)
    raise SnapshotError(f"unknown build kind {job['kind']!r}")  # scripts: hlpool.pool.scriptbuilder


def _derive_in_builder(job: dict[str, Any], config: WorkerConfig, store: SnapshotStore,
                       budget: int | None) -> tuple[str, bool]:
    base_path = job["base"]
    if not store.pin(base_path):  # the child will name it as its parent
        raise SnapshotError(f"{base_path}: no such file")
    base = Snapshot.open(base_path)
    decisions = {(a, s, area): d for a, s, area, d in job["retain"]}
    retain = (lambda r: decisions.get((r.guest_address, r.size, r.area))) if decisions else None
    with Sandbox(base, host_functions=config.host_functions, timeout=job["call_timeout"], name="derive") as sb:
        for path in job["map_files"]:
            sb.map_file(path)
        for fn, args in job["calls"]:
            sb.call(fn, *args, restore=False)
        child = sb.snapshot(retain=retain)
    out = store.path_for(content_name(child))
    if store.pin(out):
        return out, False
    return _store(child, out, store, budget, "the derived snapshot"), True


def retain_decisions(snapshot: Snapshot, retain: Any) -> dict[tuple[int, int, str], bool] | None:
    """``retain`` for a derived snapshot as decisions per region of its base ``snapshot``: a callable on a
    :class:`~hlpool.snapshot.regions.Region` (True: keep the parent's bytes, False: copy, None: default),
    evaluated here, or layout area names (``["heap"]``) whose regions keep the parent's bytes."""
    if retain is None:
        return None
    regions = snapshot.regions
    if callable(retain):
        decide = retain
    else:
        names = [retain] if isinstance(retain, str) else list(retain)
        known = {r.area for r in regions} | set(defaults.SNAPSHOT_AREAS)
        unknown = sorted(str(n) for n in names if n not in known)
        if unknown:
            raise CallError(f"retain: unknown area(s) {', '.join(unknown)}; use {', '.join(sorted(known))}")
        decide = (lambda r: True if r.area in names else None)  # noqa: E731
    out = {}
    for region in regions:
        decision = decide(region)
        if decision not in (True, False, None):
            raise TypeError(f"retain() must return True, False or None, not {decision!r}")
        if decision is not None:
            out[(region.guest_address, region.size, region.area)] = decision
    return out


def _store(snap: Snapshot, out: str, store: SnapshotStore, budget: int | None, what: str) -> str:
    needed = PAGE + snap.layers[-1].size
    if budget is not None and needed > budget:
        raise SnapshotError(f"{what}: the snapshot takes {needed} bytes, more than the snapshot store's whole quota "
                            f"of {budget} bytes (Pool(store_quota=...), hlpool serve --store-quota)")
    for _attempt in range(3):
        snap.persist(out)
        if store.pin(out):  # collected between the rename and the pin: write it again
            return out
    raise SnapshotError(f"{out}: removed from the store as soon as it was written")


def _wire(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, HlpoolError):
        info = exc.to_wire()
    else:
        info = {"type": type(exc).__name__, "code": HlpoolError.code, "message": str(exc)}
    info["traceback"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return info


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _send(sock: socket.socket, message: Any) -> None:
    data = msgspec.msgpack.encode(message)
    sock.sendall(FRAME.pack(len(data)) + data)


def _receive(sock: socket.socket) -> Any | None:
    head = _read_exactly(sock, FRAME.size)
    if head is None:
        return None
    (size,) = FRAME.unpack(head)
    if size > MAX_FRAME:
        return None
    data = _read_exactly(sock, size)
    return None if data is None else msgspec.msgpack.decode(data)


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    parts = bytearray()
    while len(parts) < size:
        chunk = sock.recv(min(size - len(parts), 1 << 20))
        if not chunk:
            return None
        parts += chunk
    return bytes(parts)
