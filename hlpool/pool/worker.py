"""A pool worker: a forked process that owns KVM VMs and runs calls from its channel.

Workers are forked by the spawner (see :mod:`hlpool.spawner`) before any KVM
state exists in it. Each worker: dies with its parent (``PR_SET_PDEATHSIG``),
is named ``hlpool-worker-N``, sets ``no_new_privs``, keeps a warm sandbox per
snapshot it serves (least recently used evicted beyond a bound), and puts the
sandbox back to its snapshot after every call (the sandbox does that itself).

Arguments arrive MessagePack-encoded and results leave encoded: a worker
never decodes values, so nothing a guest writes is interpreted here.
"""

from __future__ import annotations

import collections
import errno
import gc
import logging
import os
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Mapping

import msgspec
import prctl

from hlpool.errors import GuestTimeout, HlpoolError, SandboxBrokenError, SnapshotIncompatibleError
from hlpool.kvm.system import system as kvm_system
from hlpool.machine.switching import EntryHost, prepare_target
from hlpool.memory.guest_memory import RestorePolicy
from hlpool.pool import _slots, confine
from hlpool.pool import channel as ipc
from hlpool.pool.spin import NextRequestWait
from hlpool.sandbox import HostFunction, Sandbox
from hlpool.snapshot.snapshot import Snapshot

log = logging.getLogger(__name__)

MAX_CACHED_PARENTS = 64  # base snapshots a worker keeps open for their children (cleared beyond)
FREEZE_EVERY = 256  # snapshots opened between two gc.freeze() calls (see _freeze_long_lived)


@dataclass
class WorkerConfig:
    """What every worker of a pool is configured with (inherited over fork)."""

    host_functions: Mapping[str, HostFunction] = field(default_factory=dict)
    max_sandboxes: int = 32
    # Switch a VM between snapshots of one family instead of keeping a VM per snapshot (SandboxCache).
    switch_tenants: bool = True
    max_open_snapshots: int = 4096
    restore_policy: RestorePolicy = field(default_factory=RestorePolicy)
    strict_cpu_reset: bool = False
    max_log_bytes: int = 1 << 20
    # Poll briefly for the next request when requests usually follow answers closely (hlpool.pool.spin).
    spin_wait: bool = True
    # Confine each worker before its first call (see hlpool.pool.confine): no capabilities, not
    # dumpable, inherited fds closed, Landlock, a seccomp allowlist. ``user``: a user name or uid
    # the workers switch to (only for a pool started as root), checked here, in the supervisor.
    confine: bool = True
    user: str | int | None = None
    user_ids: tuple[int, int] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.user is not None and not self.confine:
            raise ValueError("worker_user needs confine_workers=True")
        self.user_ids = confine.prepare(self.user) if self.confine else None


class SandboxCache:
    """A worker's warm VMs, grouped by snapshot family, and the snapshots it has open.

    With ``switch_tenants`` (the default) a call for a snapshot no VM is at takes
    the least recently used VM of the snapshot's family (:attr:`Snapshot.family`:
    scripts on one interpreter base, children of one C base) and switches it
    (:meth:`Sandbox.switch`: only the pages where the two differ are put back); a
    VM is created only for a family this worker has none of, and beyond
    ``max_sandboxes`` the least recently used VM is closed. Calls in a worker run
    one at a time, so every VM is free between calls: a family has one VM per
    worker. Without ``switch_tenants`` every snapshot gets a VM of its own (the
    design before switching, kept as the benchmark's baseline).

    Snapshots are opened when a call needs them and kept in a bounded LRU
    (``max_open_snapshots``): tenants cost open files only while they are hot.
    """

    def __init__(self, config: WorkerConfig, name: str) -> None:
        self.config = config
        self.name = name
        self._at: dict[str, Sandbox] = {}  # snapshot path -> the VM that is at it now
        self._vms: collections.OrderedDict[int, Sandbox] = collections.OrderedDict()  # id -> VM, LRU first
        self._snapshots: collections.OrderedDict[str, Snapshot] = collections.OrderedDict()
        self._parents: dict[bytes, Snapshot] = {}  # parents opened once for all their children
        self._opened = 0  # snapshots opened (see _freeze_long_lived)
        self.created = 0  # VMs made
        self.switches = 0  # VMs moved to another snapshot of their family

    def get(self, path: str) -> Sandbox:
        """A VM at the snapshot ``path``: warm, switched from its family, or new."""
        sb = self._at.get(path)
        if sb is not None:
            self._vms.move_to_end(id(sb))
            return sb
        snapshot = self._snapshot(path)
        if self.config.switch_tenants:
            sb = self._switch_family_vm(snapshot, path)
            if sb is not None:
                return sb
        while len(self._vms) >= self.config.max_sandboxes:
            self._evict_oldest()
        sb = self._with_free_fds(lambda: Sandbox(
            snapshot, host_functions=self.config.host_functions, timeout=None,
            restore_policy=self.config.restore_policy, strict_cpu_reset=self.config.strict_cpu_reset,
            max_log_bytes=self.config.max_log_bytes, name=f"{self.name}:{os.path.basename(path)}"))
        self.created += 1
        self._vms[id(sb)] = sb
        self._at[path] = sb
        return sb

    def open(self, path: str) -> None:
        """Open the snapshot at ``path`` now (ahead of its first call), keeping it in the LRU of open
        snapshots (a snapshot already open is left where it is in that order), and prepare what a
        switch to it needs of it alone (:func:`hlpool.machine.switching.prepare_target`)."""
        if path in self._snapshots or path in self._at:
            return
        snapshot = self._snapshot(path)
        if self.config.switch_tenants:  # a later switch to it computes only what the VM's tenant adds
            prepare_target(snapshot, EntryHost(kvm_system(), snapshot.layout, self.config.strict_cpu_reset))

    def _snapshot(self, path: str) -> Snapshot:
        snapshot = self._snapshots.get(path)
        if snapshot is not None:
            self._snapshots.move_to_end(path)
            return snapshot
        if len(self._parents) > MAX_CACHED_PARENTS:
            self._parents.clear()
        snapshot = self._with_free_fds(lambda: Snapshot.open(path, parents=self._parents))
        self._snapshots[path] = snapshot
        self._opened += 1
        if self._opened % FREEZE_EVERY == 0:
            _freeze_long_lived()
        while len(self._snapshots) > self.config.max_open_snapshots:
            # A VM at an evicted snapshot keeps it alive; the others' files close with the object.
            self._snapshots.popitem(last=False)
        return snapshot

    def _switch_family_vm(self, snapshot: Snapshot, path: str) -> Sandbox | None:
        """Switch the least recently used VM of ``snapshot``'s family to it, if there is one."""
        family = snapshot.family
        for key, sb in self._vms.items():  # least recently used first
            current = sb.snapshot_in_use
            if current.family != family:
                continue
            try:
                sb.switch(snapshot)
            except SnapshotIncompatibleError:
                log.warning("%s: %s has the family of %s but cannot switch to it", self.name, path, current.path)
                return None
            except HlpoolError as exc:  # the VM is not trusted after a failed switch: close it
                log.warning("%s: switching a VM to %s failed (%s); closing it", self.name, path, exc)
                self._forget(sb)
                sb.close()
                return None
            self._at.pop(current.path, None)
            self._at[path] = sb
            self._vms.move_to_end(key)
            self.switches += 1
            return sb
        return None

    def _forget(self, sb: Sandbox) -> None:
        self._vms.pop(id(sb), None)
        for path, held in list(self._at.items()):
            if held is sb:
                del self._at[path]

    def _evict_oldest(self) -> None:
        _, old = self._vms.popitem(last=False)
        self._forget(old)
        old.close()

    def _with_free_fds(self, make):
        """``make()``, evicting warm sandboxes (2+ fds each) while it fails for lack of file descriptors."""
        while True:
            try:
                return make()
            except Exception as exc:
                if not (_out_of_fds(exc) and (self._vms or self._snapshots)):
                    raise
                log.warning("%s: out of file descriptors; closing the least recently used sandbox", self.name)
                if self._vms:
                    self._evict_oldest()
                else:
                    self._snapshots.clear()
                    self._parents.clear()

    def discard(self, path: str) -> None:
        """Close the VM at ``path`` (it failed in a way restore cannot repair)."""
        sb = self._at.get(path)
        if sb is not None:
            self._forget(sb)
            sb.close()

    def __len__(self) -> int:
        return len(self._vms)

    def close(self) -> None:
        for sb in self._vms.values():
            sb.close()
        self._vms.clear()
        self._at.clear()
        self._snapshots.clear()
        self._parents.clear()


def _freeze_long_lived() -> None:
    """Move the objects alive now out of the garbage collector's sight (``gc.freeze``).

    Each open (and prepared) snapshot is a dozen or so objects the collector tracks, and a
    worker keeps thousands open: full collections then take milliseconds to tens of
    milliseconds (~55-80 ms measured with 1,000 open before runs became one array), a pause in
    whatever call they land in. Snapshots form no reference cycles (they
    are freed by reference counting when the LRU drops them), so frozen ones are not leaked;
    the young generations are collected first so that recent cyclic garbage is not frozen."""
    gc.collect(1)
    gc.freeze()


def _out_of_fds(exc: BaseException | None) -> bool:
    """True if ``exc`` or an exception it was raised from is EMFILE/ENFILE (errors are often rewrapped)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            return True
        if "Too many open files" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def error_blob(exc: BaseException) -> bytes:
    """Describe an exception for the supervisor: its wire form (:meth:`HlpoolError.to_wire`),
    the traceback and the cause's. A non-hlpool exception keeps its type name."""
    if isinstance(exc, HlpoolError):
        info: dict[str, Any] = exc.to_wire()
    else:
        info = {"type": type(exc).__name__, "code": HlpoolError.code, "message": str(exc)}
    info["traceback"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    cause = exc.__cause__
    if cause is not None:
        info["cause"] = {"type": type(cause).__name__, "message": str(cause),
                         "traceback": "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))}
    return msgspec.msgpack.encode(info)


def _prepare_process(index: int) -> None:
    """Process hygiene for a fresh worker."""
    prctl.set_pdeathsig(signal.SIGKILL)  # die with the spawner (which dies with the supervisor)
    if os.getppid() == 1:
        os._exit(1)  # the parent died before PDEATHSIG was armed
    prctl.set_name(f"hlpool-worker-{index}")
    try:
        prctl.set_proctitle(f"hlpool-worker-{index}")
    except Exception:  # not all platforms allow changing argv
        pass
    prctl.set_no_new_privs(1)
    # Ctrl-C and SIGTERM are the supervisor's business (see the spawner): it stops this worker
    # through its channel or with SIGKILL, and PDEATHSIG ends it with the spawner.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def serve(index: int, channel: ipc.Channel, config: WorkerConfig, notify_fd: int = -1) -> None:
    """The worker's main loop: one call per request, in slot order, until told to stop.

    ``notify_fd``: an eventfd of the supervisor's; an answer to a request that asks for it
    (an event loop collects that answer, see :mod:`hlpool.pool.loopcollect`) is also signalled there."""
    _prepare_process(index)
    if config.confine:  # it holds its channel; /dev/kvm is opened and kept before confining
        own = {f"/dev/shm{channel.names.shm}"}  # its semaphores are in that mapping
        confine.confine_worker(user=config.user_ids, keep_paths=own, keep_fds=(notify_fd,) if notify_fd >= 0 else (),
                               unmap_prefixes=(f"/dev/shm/{ipc.PREFIX}", f"/dev/shm/sem.{ipc.PREFIX}"))
    cache = SandboxCache(config, f"worker-{index}")
    next_request = NextRequestWait(config.spin_wait)
    # The channel's records are read and written through hlpool.pool._slots directly (no method
    # call per record): slot ``i`` of the channel is at offsets[i % depth].
    view, offsets, depth, capacity = channel.view, channel.offsets, channel.depth, channel.data_capacity
    requests, responses = channel.requests, channel.responses
    slot = 0
    try:
        while True:
            next_request.wait(requests)
            base = offsets[slot % depth]
            # a call or an open is marked taken here: from then on a crash may have run part of it
            op, request_id, timeout_ns, expires_ns, path, function, payload, notify = _slots.take_request(
                view, base, capacity, ipc.OP_CALL, ipc.OP_OPEN)
            if op == ipc.OP_STOP:
                _slots.write_response(view, base, capacity, ipc.STATUS_OK, 0, b"", len(cache), 0, 0, 0)
                responses.release()
                return
            if op == ipc.OP_OPEN:
                status, data = _open_one(cache, path)
                _slots.write_response(view, base, capacity, status, request_id, data, len(cache), 0, cache.created,
                                      cache.switches)
                responses.release()
                slot += 1
                continue
            began = time.monotonic_ns()
            if expires_ns:  # the total deadline counts the time the call waited in the channel
                left = expires_ns - began
                timeout_ns = max(1, min(timeout_ns, left) if timeout_ns else left)
            if expires_ns and began >= expires_ns:
                status, data = ipc.STATUS_ERROR, error_blob(GuestTimeout(
                    f"{function}: deadline passed while the call was queued"))
            else:
                status, data = _run_one(cache, path, function, payload, timeout_ns)
            _slots.write_response(view, base, capacity, status, request_id, data, len(cache),
                                  time.monotonic_ns() - began, cache.created, cache.switches)
            responses.release()
            if notify and notify_fd >= 0:
                _signal(notify_fd)
            slot += 1
    finally:
        cache.close()


def _signal(fd: int) -> None:
    """Add one to the eventfd ``fd`` (the supervisor's event loop wakes on it)."""
    try:
        os.eventfd_write(fd, 1)
    except OSError:  # not an eventfd any more, or its counter is full: the loop's safety net collects
        pass


def _open_one(cache: SandboxCache, path: str) -> tuple[int, bytes]:
    """Open the snapshot at ``path`` ahead of its first call (see Pool's ``open_on_register``)."""
    try:
        cache.open(path)
        return ipc.STATUS_OK, b""
    except Exception as exc:  # a hint: the call that needs the snapshot reports the problem
        return ipc.STATUS_ERROR, error_blob(exc)


def _run_one(cache: SandboxCache, path: str, function: str, payload: bytes,
             timeout_ns: int) -> tuple[int, bytes]:
    """Run one call; the deadline starts when the worker starts it (not while it was queued)."""
    try:
        timeout = timeout_ns / 1e9 if timeout_ns else None
        sb = cache.get(path)
        return ipc.STATUS_OK, sb.call_encoded(function, payload, timeout=timeout)
    except HlpoolError as exc:
        if isinstance(exc, SandboxBrokenError):
            cache.discard(path)
        return ipc.STATUS_ERROR, error_blob(exc)
    except Exception as exc:  # a bug or an environment problem: report it, keep serving
        log.exception("worker: unexpected error")
        cache.discard(path)
        return ipc.STATUS_ERROR, error_blob(exc)
