"""Script builds in one long-lived builder process, with a warm loader per language.

A script registration (:meth:`Pool.script`) loads the source into the interpreter's
base snapshot and stores what changed as a layer. Forking a builder, booting the
base and fsyncing for every script cost ~45 ms; thousands of tenants need ~1 ms. So
one builder process (forked by the spawner like every builder, ``hlpool-builder``)
keeps, per language it was asked for, one warm sandbox of that language's persisted
base and, per script: loads it (``restore=False``), captures the layer, writes it into the store,
restores the sandbox to the base (only the pages the load wrote) and answers.

Isolation and limits are those of :mod:`hlpool.pool.builder`: the script runs in a
VM of the builder, never in the supervisor; each load starts from the restored base
(a failed or broken load discards the sandbox); the supervisor kills the builder at
``build_timeout`` (the guest's own ``load_timeout`` fires first) or when it grew by
more than ``build_memory`` since it became ready, and the next registration starts a
new one. ``RLIMIT_DATA`` bounds its address space as for any builder.

Layer files are named by what goes in (the base's content hash, the language, the
source: :func:`script_name`), so the same script on the same base is found in the
store again (by a later pool too) and not loaded twice. They are written without
fsync: a file torn by a crash fails its content hash when opened (by a worker, or by
the builder, which checks a stored file before reusing it) and is written again.

The supervisor does not open the result (the builder is our code; the guest cannot
forge a file there, and workers validate every file they open): it pins the file,
checks its header's magic and content hash against the answer. The builder keeps its own
pins of the layer and the base until told (``ack``) that the supervisor's pin holds the
file: with its next request (it drops them once it has answered that one), or, before a
collection or a removal judges files by their pins, by :meth:`ScriptBuilders.settle`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import resource
import select
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from hlpool.defaults import SCRIPT_LANGUAGES
from hlpool.errors import HlpoolError, SnapshotError
from hlpool.guest import abi as guest_abi
from hlpool.guest.interpreters import DEFAULT_CONFIG as SCRIPT_CONFIG
from hlpool.guest.interpreters import interpreter_path
from hlpool.guest.layout import PAGE
from hlpool.machine.machine import SandboxStatus
from hlpool.pool import builder as one_shot
from hlpool.pool.store import SnapshotStore
from hlpool.pool.worker import WorkerConfig
from hlpool.sandbox import Sandbox, scripts
from hlpool.snapshot.snapfile import HEADER, MAGIC, write_snapshot_file
from hlpool.snapshot.snapshot import Snapshot

log = logging.getLogger(__name__)

SETTLE_TIMEOUT = 1.0  # seconds an idle builder has to confirm it dropped its pins when a removal asks


@dataclass(frozen=True)
class ScriptLayer:
    """A stored script layer, as the registry needs it (no open file, no mapping)."""

    path: str
    sha256: str  # hex content hash of the file (its header's)
    exports: tuple[str, ...]
    input_capacity: int
    created: bool
    size: int  # bytes of the file
    family: str = ""  # Snapshot.family of the layer (its base's): VMs of a family switch between them


class ScriptBuilders:
    """The supervisor's side: one builder process for every language (a warm loader per language
    in it, made at the language's first script), one script at a time.

    One process, not one per language: registrations of several languages in turn kept two
    processes taking turns on cold caches (JS and Lua alternated: 2.25 ms and 1.5 ms of builder
    CPU per script, against 1.6 ms and 1.1 ms for JS alone; one process with both loaders:
    ~5-10% over one language)."""

    def __init__(self, spawn_builder: Callable[[int], int], store: SnapshotStore,
                 limits: "one_shot.BuildLimits") -> None:
        self.spawn_builder = spawn_builder
        self.store = store
        self.limits = limits
        self._lock = threading.Lock()
        self._builder: one_shot._Builder | None = None
        self._info: dict[str, dict[str, Any]] = {}  # language -> its base's exports and input capacity
        self._checked: set[str] = set()
        self._closed = False
        self.started = 0  # builder processes started
        self.stopped = 0  # stopped at a limit (time, memory) or found dead
        self.builds = 0  # scripts loaded
        self._unacked = False  # the builder still pins its last answer (and that answer's base)

    def build(self, language: str, source: str, load_timeout: float) -> ScriptLayer:
        what = f"{language} script"
        with self._lock:
            if self._closed:
                raise SnapshotError(f"{what}: the pool is shut down")
            if language not in self._checked:  # our own interpreter: checked once per pool
                one_shot.check_memory_config(SCRIPT_CONFIG, self.limits.max_guest_memory, what)
                one_shot.check_elf(str(interpreter_path(language)), SCRIPT_CONFIG, self.limits.max_guest_memory)
                self._checked.add(language)
            self.store.make_room(0, what)
            process = self._builder
            if process is not None and select.select([process.pidfd], [], [], 0)[0]:  # it died while idle
                self._drop(process)
                self.stopped += 1
                process = None
            if process is None:
                process = self._start(what)
            info = self._info.get(language) or self._warm(process, language, what)
            deadline = time.monotonic() + self.limits.timeout
            request = {"language": language, "source": source, "load_timeout": load_timeout,
                       "budget": self.store.quota}
            if self._unacked:  # the last answer's ack rides on this request (see settle())
                request["ack"] = True
                self._unacked = False
            process.send(request, deadline)
            reply = process.receive(deadline, self.limits.memory)
            if reply is None:
                error = process.failure(what, SnapshotError, self.limits)
                self._drop(process)
                raise error
            self.builds += 1
            if "error" in reply:
                raise one_shot._rebuild(reply, what, SnapshotError, self.limits)
            # Our pin holds the file once accepted: the builder may drop its pins then. It is told with
            # its next request (one wake-up of it, and one send, fewer per registration), or by settle().
            self._unacked = True
            layer = self._accept(reply, info, what)
            if layer.created:
                self._admit(layer, what)
            return layer

    def settle(self, wait: bool = True) -> None:
        """Have the builder drop the pins it still holds for answers already taken, and wait until it
        did (it reads its messages in order: its reply comes after it dropped them). Before anything
        that deletes store files judges them by their pins.

        ``wait=False`` (a removal, which may run on an event loop): a builder busy with a registration is
        left alone; that registration's request carried the same message."""
        if not self._lock.acquire(blocking=wait):
            return
        try:
            process = self._builder
            if process is None:
                return
            self._unacked = False
            deadline = time.monotonic() + (self.limits.timeout if wait else SETTLE_TIMEOUT)
            process.send({"ack": True, "confirm": True}, deadline)
            reply = process.receive(deadline, self.limits.memory)
            if not isinstance(reply, dict) or not reply.get("released"):  # dead or stuck: its pins go
                self._drop(process)  # with the process
        finally:
            self._lock.release()

    def close(self) -> None:
        """Stop the builder (the pool shuts down)."""
        self._closed = True
        with self._lock:
            if self._builder is not None:
                self._drop(self._builder, count=False)

    # ---- internals ---------------------------------------------------------------------------

    def _start(self, what: str) -> one_shot._Builder:
        """A new builder process (its loaders are made by :meth:`_warm`, a language at a time)."""
        process = one_shot.start_builder(self.spawn_builder, what, SnapshotError)
        self.started += 1
        deadline = time.monotonic() + self.limits.timeout
        reply = None
        if process.receive(deadline, None) is not None:  # {"ready"}: forked
            # Room in RLIMIT_DATA for a guest of every language (the loaders' VMs), beyond one build's.
            allowance = self.limits.data_allowance + (len(SCRIPT_LANGUAGES) - 1) * self.limits.max_guest_memory
            process.send({"kind": "scripts", "store": self.store.directory, "data_allowance": allowance}, deadline)
            reply = process.receive(deadline, None)
        self._check_reply(process, reply, what, drop=True)  # (a builder that failed to start is gone)
        self._builder, self._info, self._unacked = process, {}, False
        log.info("script builder started (pid %d)", process.pid)
        return process

    def _warm(self, process: one_shot._Builder, language: str, what: str) -> dict[str, Any]:
        """Have the builder make ``language``'s loader (its base booted, its sandbox warm)."""
        deadline = time.monotonic() + self.limits.timeout
        process.send({"warm": language}, deadline)
        info = process.receive(deadline, None)  # (its growth is the new loader's: measured afresh below)
        self._check_reply(process, info, what)
        process.baseline = one_shot._resident(process.pid)  # a loader more is part of "ready"
        self._info[language] = info
        return info  # type: ignore[return-value]

    def _check_reply(self, process: one_shot._Builder, reply: Any, what: str, drop: bool = False) -> None:
        """Raise the builder's error for a failed step, dropping the builder if it gave no answer
        (or if ``drop``)."""
        if isinstance(reply, dict) and "error" not in reply:
            return
        if isinstance(reply, dict):
            error = one_shot._rebuild(reply, what, SnapshotError, self.limits)
        else:
            error = process.failure(what, SnapshotError, self.limits)
        if drop or not isinstance(reply, dict):
            self._drop(process)
        raise error

    def _drop(self, process: "one_shot._Builder", count: bool = True) -> None:
        if self._builder is process:
            self._builder = None
            self._info = {}
        process.stop()
        if process.killed and count:
            self.stopped += 1
            log.warning("script builder %d stopped: %s, %d bytes resident beyond its start",
                        process.pid, process.killed, process.peak)
        for leftover in self.store.remove_temp_files(process.pid):
            log.info("removed %s, left by builder %d", leftover, process.pid)

    def _accept(self, reply: dict[str, Any], info: dict[str, Any], what: str) -> ScriptLayer:
        path, digest = reply.get("path"), reply.get("sha256")
        if not (isinstance(path, str) and isinstance(digest, str) and self.store.contains(path)
                and self.store.pin(path)):
            raise SnapshotError(f"{what}: the builder answered without a stored snapshot")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                raw = os.pread(fd, HEADER.size, 0)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if len(raw) < HEADER.size or raw[:len(MAGIC)] != MAGIC or HEADER.unpack_from(raw, 0)[9].hex() != digest:
                raise SnapshotError(f"{path}: not the snapshot the builder described")
        except (OSError, SnapshotError) as exc:
            self.store.unpin(path)
            raise SnapshotError(f"{what}: {exc}") from None
        family = reply.get("family")
        return ScriptLayer(path, digest, tuple(info["exports"]), int(info["input_capacity"]), bool(reply["created"]),
                           size, family if isinstance(family, str) else "")

    def _admit(self, layer: ScriptLayer, what: str) -> None:
        """A new file made the store go over its quota: collect garbage, else take the file back."""
        path, size = layer.path, layer.size
        self.store.note_added(size)
        quota = self.store.quota
        if quota is None or self.store.usage(fresh=False) <= quota:
            return
        self.store.collect()
        used = self.store.usage()
        if used > quota:
            self.store.remove(path)
            raise self.store.full_error(used - size, size, what)


# ---- the builder process ----------------------------------------------------------------------


def serve_scripts(sock: socket.socket, job: dict[str, Any], config: WorkerConfig) -> None:
    """The builder's loop (called by :func:`hlpool.pool.builder.builder_main` for a ``scripts`` job):
    a loader per language, made when the supervisor asks (``warm``)."""
    loaders: dict[str, _Loader] = {}
    try:
        limit = one_shot._status_bytes("VmData") + int(job["data_allowance"])
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        store = SnapshotStore(job["store"])
        one_shot._send(sock, {"started": True})
    except BaseException as exc:
        one_shot._send(sock, {"error": one_shot._wire(exc)})
        return
    last: _Loader | None = None  # the loader of the last answer (its pins go on "ack")
    while True:
        message = one_shot._receive(sock)
        if not isinstance(message, dict):
            return  # the supervisor closed its end (or sent garbage): exit
        if "warm" in message:
            try:
                one_shot._send(sock, _warm_loader(loaders, message["warm"], store, config))
            except BaseException as exc:
                one_shot._send(sock, {"error": one_shot._wire(exc)})
            continue
        stale: list[str] = []
        stale_loader = last
        if message.get("ack") and last is not None:  # the supervisor pinned the last answer's file
            if "source" not in message:
                last.release()
                stale_loader = None
            else:
                stale = last.hand_over()  # dropped once this request is answered (off its path)
        if "source" not in message:
            if message.get("confirm"):
                one_shot._send(sock, {"released": True})
            continue
        loader = loaders.get(message.get("language"))  # type: ignore[arg-type]
        if loader is None:
            reply: dict[str, Any] = {"error": one_shot._wire(SnapshotError(
                f"the builder has no loader for {message.get('language')!r} (not warmed)"))}
        else:
            try:
                reply = loader.load(message["source"], message.get("load_timeout"), message.get("budget"))
            except MemoryError as exc:
                loader.discard()
                reply = {"error": one_shot._wire(exc), "out_of_memory": True}
            except BaseException as exc:
                loader.release()
                reply = {"error": one_shot._wire(exc)}
        one_shot._send(sock, reply)
        if stale_loader is not None:
            stale_loader.release(stale)
        if loader is not None:
            loader.reset()  # the next script starts from the base again
            last = loader


def _warm_loader(loaders: "dict[str, _Loader]", language: Any, store: SnapshotStore,
                 config: WorkerConfig) -> dict[str, Any]:
    """Make ``language``'s loader (if new) and warm it; the base's exports and input capacity."""
    if language not in SCRIPT_LANGUAGES:
        raise SnapshotError(f"no script language {language!r}; known: {sorted(SCRIPT_LANGUAGES)}")
    loader = loaders.get(language)
    if loader is None:
        loader = loaders[language] = _Loader(language, store, config)
    loader.warm()
    base = loader.base
    assert base is not None
    loader.release()  # (warm() pinned the base for an answer; the next load pins it again)
    return {"exports": list(base.exports or ()),
            "input_capacity": base.layout.input.size - guest_abi.HL_MSG_HEADER_SIZE}


one_shot.LONG_LIVED["scripts"] = serve_scripts


class _Loader:
    """A warm sandbox of one language's persisted base, in the builder."""

    def __init__(self, language: str, store: SnapshotStore, config: WorkerConfig) -> None:
        self.language = language
        self.store = store
        self.config = config
        self.base: Snapshot | None = None
        self.family = ""
        self.sandbox: Sandbox | None = None
        self._held: list[str] = []  # pins of the last answer, dropped on ack

    def warm(self) -> Sandbox:
        """The sandbox of the base, its file pinned and still the one it maps (else booted again)."""
        base = self.base
        if base is not None and self.store.pin(base.path):
            if _same_file(base):
                self._held.append(base.path)
                if self.sandbox is None:
                    self.sandbox = Sandbox(base, host_functions=self.config.host_functions, name=f"load:{self.language}")
                return self.sandbox
            self.store.unpin(base.path)
        self.discard()
        for _attempt in range(3):
            base = scripts.persisted_base_snapshot(self.language, self.store.directory)
            if self.store.pin(base.path):  # a script's layer will name it as its parent
                break
        else:
            raise SnapshotError(f"the {self.language} base snapshot keeps disappearing from {self.store.directory}")
        self.base = base
        self.family = str(getattr(base, "family", ""))  # a script's layer is of its base's family
        self._held.append(base.path)
        self.sandbox = Sandbox(base, host_functions=self.config.host_functions, name=f"load:{self.language}")
        return self.sandbox

    def load(self, source: str, load_timeout: float | None, budget: int | None) -> dict[str, Any]:
        sb = self.warm()
        assert self.base is not None
        out = self.store.path_for(script_name(self.base, self.language, source))
        stored = self._reuse(out)
        if stored is not None:  # loaded before on this base (by this pool, an earlier one, another process)
            self._held.append(out)
            return {"path": out, "created": False, "sha256": stored.hex(), "family": self.family}
        try:
            sb.call("load", source, restore=False, timeout=load_timeout)
            child = sb.snapshot()
        except BaseException:
            self.reset()
            raise
        child.info["script_sha256"] = hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()
        needed = PAGE + child.layers[-1].size
        if budget is not None and needed > budget:
            raise SnapshotError(f"{self.language} script: the snapshot takes {needed} bytes, more than the "
                                f"snapshot store's whole quota of {budget} bytes (Pool(store_quota=...), "
                                f"hlpool serve --store-quota)")
        for _attempt in range(3):
            digest, _offset, _size = write_snapshot_file(child, out, sync=False, ahead=True)  # (not reopened)
            if self.store.pin(out):  # collected between the rename and the pin: write it again
                break
        else:
            raise SnapshotError(f"{out}: removed from the store as soon as it was written")
        child.layers[-1].close()
        self._held.append(out)
        return {"path": out, "created": True, "sha256": digest.hex(), "family": self.family}

    def _reuse(self, out: str) -> bytes | None:
        """The content hash of ``out`` if it is stored already, whole (its hash checked), and now pinned."""
        if not os.path.exists(out) or not self.store.pin(out):
            return None
        try:
            stored = Snapshot.open(out)
            for layer in stored.layers:
                layer.close()
            return stored.layers[-1].sha256
        except HlpoolError as exc:
            log.warning("rewriting the stored script layer %s: %s", out, exc)
        self.store.unpin(out)
        try:
            os.unlink(out)  # torn (a crash before it reached the disk): written again, atomically, below
        except FileNotFoundError:
            pass
        return None

    def reset(self) -> None:
        """Put the sandbox back to the base (after the answer is sent: off the supervisor's wait)."""
        sb = self.sandbox
        if sb is None:
            return
        if sb.status is SandboxStatus.READY:
            try:
                sb.restore()
                return
            except Exception as exc:
                log.warning("discarding the %s loader sandbox: %s", self.language, exc)
        self.discard()

    def release(self, paths: list[str] | None = None) -> None:
        """Drop the pins of the last answer, or those of ``paths`` (an earlier answer's, from
        :meth:`hand_over`) that the last answer does not hold as well (a pin is not counted)."""
        if paths is None:
            self.store.unpin_many(self._held)
            self._held.clear()
        elif paths:
            self.store.unpin_many([p for p in paths if p not in self._held])

    def hand_over(self) -> list[str]:
        """The last answer's pins, no longer counted as held (the caller releases them later)."""
        held, self._held = self._held, []
        return held

    def discard(self) -> None:
        self.release()
        if self.sandbox is not None:
            try:
                self.sandbox.close()
            except Exception:
                pass
            self.sandbox = None


def script_name(base: Snapshot, language: str, source: str) -> str:
    """The store name of ``source`` loaded into ``base``: by what goes in, not by the bytes that come out
    (a load is not bit-for-bit repeatable: timers, hash seeds), so a stored layer is found again."""
    digest = hashlib.sha256(b"hlpool-script\0" + language.encode() + b"\0" + base.layers[-1].sha256)
    digest.update(source.encode("utf-8", "surrogatepass"))
    return "s" + digest.hexdigest()[:31]


def _same_file(snap: Snapshot) -> bool:
    """True if ``snap``'s file still names the inode it was opened from (not collected and rebuilt)."""
    try:
        held, now = os.fstat(snap.layers[-1].fd), os.stat(snap.path or "")
    except OSError:
        return False
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)
