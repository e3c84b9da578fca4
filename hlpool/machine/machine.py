"""A machine: one KVM VM with one vCPU running a guest from a snapshot's memory.

A call: encode the arguments into IN, load the snapshot's registers through
sync regs, KVM_RUN until the guest signals its result (serving host calls,
log flushes and randomness requests on the way), decode the result, then
put the dirty pages back. Every error leaves the machine back at its
snapshot, ready for the next call.

This is the mechanism under :class:`hlpool.Sandbox`. It reads the fields of the
snapshot it is made from (layout, runs, layers, vCPU state, exports, mapped files;
typed as :class:`hlpool.memory.image.SnapshotImage`) and never imports
:mod:`hlpool.snapshot`, which sits above it: the snapshot layer boots guests and
captures state through this class's public methods (:meth:`Machine.run_init`, :meth:`Machine.save_vcpu_state`,
:meth:`Machine.dirty_pages`, :attr:`Machine.mapped_files`).
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import struct
import threading
import time
from typing import Any, Callable, Mapping

from hlpool import _mapping, defaults
from hlpool.errors import (
    CallError,
    GuestError,
    GuestFault,
    GuestProtocolError,
    GuestTimeout,
    HlpoolError,
    HostFunctionError,
    KvmError,
    PayloadTooLargeError,
    SandboxBrokenError,
    SandboxClosedError,
    SnapshotFormatError,
)
from hlpool.guest import abi, codec, faults
from hlpool.guest.boot import CR0_WP
from hlpool.guest.layout import PAGE, VIF_PAGE
from hlpool.guest.log import GuestLog, LogHandler
from hlpool.kvm import _vcpu_run
from hlpool.kvm import abi as kvm_abi
from hlpool.kvm.vcpu import SAVED_SYNC_PARTS, Vcpu
from hlpool.kvm.vm import Vm
from hlpool.machine.switching import entry_for, switch_machine
from hlpool.memory.guest_memory import GuestMemory, RestorePolicy, RestoreStats
from hlpool.memory.image import SnapshotImage
from hlpool.memory.mapped_files import MappedFile, SandboxFiles, check_unchanged
from hlpool.memory.switch import MemorySwitcher, SwitchStats

log = logging.getLogger(__name__)

HostFunction = Callable[..., Any]


_HDR = abi.MSG_HEADER
_U64 = struct.Struct("<Q")
_MAGIC = abi.HL_MSG_MAGIC
_PORT = abi.HL_PORT
_INLINE = abi.HL_CALL_PAGE_INLINE
_INLINE_MAX = abi.HL_INLINE_MAX
_INTERRUPTED = _vcpu_run.RUN_INTERRUPTED
_getpid = os.getpid
_time_ns = time.time_ns
_names = itertools.count(1)


class SandboxStatus(enum.Enum):
    READY = "ready"        # at its snapshot, or after a successful call with restore=False
    BROKEN = "broken"      # could not be put back to its snapshot; discard it
    CLOSED = "closed"


class Machine:
    """A micro-VM running one guest from a snapshot's memory (see :class:`hlpool.Sandbox`).

    ``host_functions`` maps names to Python callables the guest may call with
    ``hl_call_host``. ``timeout`` (seconds) is the default deadline of a call
    (None: no deadline). ``restore_policy`` sets how many restored pages stay
    resident. ``log_handler`` receives each line the guest prints (default:
    the ``hlpool.guest`` logger).

    Every call starts from the snapshot: memory, general registers, segment
    and control registers, x87/SSE/AVX state. ``strict_cpu_reset=True`` also
    reloads the full vCPU state after each call (XSAVE, XCR0, debug registers,
    every MSR KVM saves, CR8): the registers a guest can change only on purpose
    with privileged instructions, which the default mode leaves (README,
    "Isolation between calls"). Guest MSR writes are refused in both modes.

    ``private_memory=True`` copies the snapshot into private anonymous memory
    instead of mapping its files (no sharing; the baseline for benchmarks).
    """

    def __init__(
        self,
        snapshot: SnapshotImage,
        *,
        host_functions: Mapping[str, HostFunction] | None = None,
        timeout: float | None = defaults.CALL_TIMEOUT,
        restore_policy: RestorePolicy | None = None,
        log_handler: LogHandler | None = None,
        max_log_bytes: int = defaults.MAX_LOG_BYTES,
        max_host_calls: int = defaults.MAX_HOST_CALLS,
        strict_cpu_reset: bool = False,
        private_memory: bool = False,
        name: str | None = None,
    ) -> None:
        check_unchanged(snapshot.layers, snapshot.mapped_files)
        self.base_snapshot = snapshot  # what restore() returns to
        self.name = name or f"sandbox-{next(_names)}"
        self.host_functions: dict[str, HostFunction] = dict(host_functions or {})
        for key, fn in self.host_functions.items():
            if not isinstance(key, str) or not callable(fn):
                raise TypeError("host_functions must map names (str) to callables")
        self.timeout = timeout
        self.max_host_calls = max_host_calls
        self.strict_cpu_reset = strict_cpu_reset
        self._private_memory = private_memory
        self.status = SandboxStatus.READY
        self.last_restore = RestoreStats()
        self._log = GuestLog(self.name, log_handler, max_log_bytes)
        self._exports = {n: i for i, n in enumerate(snapshot.exports or ())}
        self._pid = os.getpid()
        self._lock = threading.RLock()  # calls, restores, snapshots and close take turns
        self._in_call = False  # set while a call runs (host functions run inside it, on this thread)
        self.vm = self.vcpu = self.memory = None
        layout = snapshot.layout
        self.layout = layout
        try:
            self.vm = Vm()
            policy = restore_policy or RestorePolicy()
            GuestMemory.enable_dirty_ring(self.vm, policy, layout.logged.size)
            self.memory = GuestMemory(self.vm, layout, snapshot.runs, snapshot.layers, policy,
                                      private_copy=private_memory)
            self._mapped_files = SandboxFiles(self.vm, self.memory, layout, snapshot.mapped_files)
            self.vcpu = Vcpu(self.vm)
            if self.vcpu.dirty_ring:
                self.memory.attach_dirty_ring(self.vcpu.dirty_ring, self.vm.dirty_ring_entries)
            try:
                self.vcpu.load_state(snapshot.vcpu)
            except (OSError, KvmError) as exc:  # KVM refused what the snapshot holds
                raise SnapshotFormatError(f"KVM refused the snapshot's vCPU state: {exc}") from None
            self.vcpu.enable_native_execution(VIF_PAGE)
            if snapshot.exports is not None:  # a finished snapshot: its calls need no MSR writes
                self.vm.deny_guest_msr_writes()
            # strict_cpu_reset reloads every MSR of KVM's index list, as this fresh vCPU has them now
            self._strict_msrs = self.vcpu.get_msrs(self.vcpu.resettable_msrs()) if strict_cpu_reset else {}
        except BaseException:
            self._release()
            raise
        self._out = self.memory.view(layout.out)
        self._call_page = self.memory.view(layout.call)
        self._logbuf = self.memory.view(layout.log)
        self._in_addr = self.memory.host_address(layout.input.start, layout.input.size)
        self._in_size = layout.input.size
        self._in_capacity = layout.input.size - abi.HL_MSG_HEADER_SIZE
        self._reply_addr = self.memory.host_address(layout.reply.start, layout.reply.size)
        self._reply_size = layout.reply.size
        self._control_addr = self.memory.host_address(layout.control.start, PAGE)  # the host writes the stub here
        self._reply_capacity = layout.reply.size - abi.HL_MSG_HEADER_SIZE
        self._in_used = 0
        self._reply_used = 0
        self._reload_registers = False
        self._host_calls = 0
        self._entry_regs = b""
        self._switcher: MemorySwitcher | None = None  # made at the first switch
        self._control_after_switch: bytes | None = None  # the plain control page, put back after that call
        if snapshot.exports is not None:  # a finished snapshot: calls enter through the stub
            page, self._entry_regs, _ = entry_for(self, snapshot)
            self.memory.write(layout.control.start, page)

    # ---- public API -------------------------------------------------------------------

    @property
    def exports(self) -> list[str]:
        """Names of the functions the guest exported."""
        return list(self._exports)

    def call(self, name: str, *args: Any, timeout: float | None | object = ..., restore: bool = True) -> Any:
        """Call the guest function ``name`` with ``args`` and return its result.

        ``timeout`` overrides the sandbox's default deadline (seconds; None for
        none). With ``restore=False`` the guest's memory and registers are left
        as the call left them (e.g. to take a snapshot after an initialisation
        call); by default every call starts from the snapshot.
        """
        try:
            payload = codec.encode_args(args)
        except codec.ValueTypeError as exc:
            raise CallError(f"{name}: {exc}") from None
        return self._call(name, payload, timeout, restore, decode=True)

    def call_encoded(self, name: str, payload: bytes, *, timeout: float | None | object = ...,
                     restore: bool = True) -> bytes:
        """Like :meth:`call`, with the arguments already MessagePack-encoded (an array).

        Returns the guest's result still encoded (untrusted bytes: decode them
        with :func:`hlpool.guest.codec.decode_value`). The pool's workers use this so
        that values are encoded and decoded once, in the supervisor.
        """
        return self._call(name, payload, timeout, restore, decode=False)

    def _call(self, name: str, payload: bytes, timeout: float | None | object, restore: bool,
              decode: bool) -> Any:
        with self._lock:  # one vCPU: calls from several threads take turns
            if self._in_call:
                self._refuse_reentry("call")
            self._in_call = True
            try:
                return self._call_locked(name, payload, timeout, restore, decode)
            finally:
                self._in_call = False

    def _refuse_reentry(self, what: str) -> None:
        """A host function runs inside a call, on the calling thread (which holds the lock):
        it must not call, restore, snapshot, map into or close the machine running it."""
        if self._in_call:
            raise CallError(f"{self.name}: {what} from inside a call of this sandbox (a host function called "
                            "back into the sandbox running it); use another sandbox")

    def _call_locked(self, name: str, payload: bytes, timeout: float | None | object, restore: bool,
                     decode: bool) -> Any:
        if self.status is not SandboxStatus.READY or self._pid != _getpid():
            self._check_usable()
        if self._mapped_files.watched:  # a mapped file changed under the sandbox: refuse the call
            self._mapped_files.check()
        index = self._exports.get(name)
        if index is None:
            raise CallError(f"{self.name}: unknown function {name!r}; the guest exports "
                            f"{sorted(self._exports) or 'nothing'}")
        if len(payload) > self._in_capacity:
            raise PayloadTooLargeError(f"{name}: encoded arguments are {len(payload)} bytes; the input buffer "
                                       f"holds {self._in_capacity} (raise MemoryConfig.in_size)")
        _mapping.write_record(self._in_addr, self._in_size, _MAGIC, abi.HL_MSG_CALL, payload, index, _time_ns())
        self._in_used = abi.HL_MSG_HEADER_SIZE + len(payload)
        return self._run_call(self.timeout if timeout is ... else timeout, restore, name, decode)

    def restore(self) -> RestoreStats:
        """Put the sandbox back to its snapshot (memory pages the guest wrote, then registers;
        files mapped since the snapshot are unmapped)."""
        with self._lock:
            self._refuse_reentry("restore")
            return self._restore_locked()

    def _restore_locked(self) -> RestoreStats:
        self._check_open()
        stats = self.memory.restore()
        if self._mapped_files.extra:  # files mapped since the snapshot go with the restore
            self._mapped_files.reset()
        self._clear_io()
        self._reload_registers = True
        self.last_restore = stats
        return stats

    def switch(self, target: SnapshotImage) -> SwitchStats:
        """Move this sandbox to ``target``, another snapshot of its family (hlpool.memory.switch).

        Afterwards the sandbox behaves exactly like a fresh sandbox of ``target`` with this
        sandbox's options (host functions, timeout, policies): the guest sees the target's
        memory (every page it can reach, the VIF page included), its mapped files, empty I/O
        buffers and the target's vCPU state; :meth:`restore` returns to ``target``
        (:attr:`base_snapshot`). Only the pages where the two snapshots (and the last call's
        writes) differ are put back. Switching to the snapshot held is a :meth:`restore` that
        also resets the vCPU state a call leaves (debug registers, CR8, ...) as a switch does.

        A target of another family (layout, memory configuration, base layer, or a boot image)
        raises :class:`SnapshotIncompatibleError` naming what differs; a target whose files
        changed raises :class:`SnapshotIntegrityError`/:class:`SnapshotParentError`. Either way
        nothing was changed and the sandbox goes on serving its snapshot. A broken sandbox is
        refused (:class:`SandboxBrokenError`), as by every other method; if the switch itself
        fails half-way (an mmap or KVM error) the sandbox is marked broken.

        vCPU state: debug registers and XCR0 are loaded with one ioctl each, other MSRs only if
        the target's differ (the guest cannot write them: the host denies MSR writes), general,
        segment and control registers through sync regs at the next call, and the first call
        after the switch enters through a control page that also loads the target's XSAVE
        image, CR8 (KVM_SET_SREGS does not reach it on PVM) and KERNEL_GS_BASE (swapgs can
        change it without an MSR write); the plain control page is put back after that call.
        """
        with self._lock:
            if self._in_call:
                self._refuse_reentry("switch")
            if self.status is not SandboxStatus.READY or self._pid != _getpid():
                self._check_usable()
            return switch_machine(self, target)

    def map_file(self, path: str, *, name: str | None = None,
                 guest_address: int | None = None) -> tuple[int, int]:
        """Map a host file read-only into the guest; returns (guest_address, size).

        The guest finds it with ``hl_mapped_file(name, &size)``; ``name``
        defaults to the file's basename (1-47 bytes, printable, no '/'; a name
        already mapped is refused). A guest write to it is a :class:`GuestFault`.
        Snapshots taken afterwards reference the file (path + content hash);
        they never copy it. The mapping lasts until the next restore (the one
        after every call included) unless a snapshot is taken first: every call
        starts from the snapshot, its mappings included (README, "Layered
        snapshots and mapped files"). The file must not change while mapped:
        each call first checks it (inode, size, mtime) and fails with
        :class:`SnapshotParentError` if it did.
        """
        with self._lock:
            self._refuse_reentry("map_file")
            self._check_usable()
            return self._mapped_files.map(path, guest_address, name)

    def unmap_file(self, name_or_path: str) -> None:
        """Unmap a file mapped since the snapshot, by its guest name or its path.

        A file of the snapshot this sandbox was made from cannot be unmapped
        (:class:`HlpoolError`): calls must start from the snapshot.
        """
        with self._lock:
            self._refuse_reentry("unmap_file")
            self._check_usable()
            self._mapped_files.unmap(name_or_path)

    def close(self) -> None:
        """Destroy the VM and release its memory (idempotent)."""
        with self._lock:
            if self.status is SandboxStatus.CLOSED:
                return
            self._refuse_reentry("close")
            self.status = SandboxStatus.CLOSED
            self._release()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "status", SandboxStatus.CLOSED) is not SandboxStatus.CLOSED and hasattr(self, "_lock"):
            try:
                self.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.status.value} exports={self.exports}>"

    # ---- what the snapshot layer uses: boot and capture ---------------------------------

    @property
    def mapped_files(self) -> tuple[MappedFile, ...]:
        """The host files mapped into this machine now (inherited and mapped since)."""
        return self._mapped_files.files

    def save_vcpu_state(self):
        """The vCPU's full state, after completing the guest's last `out` (see :meth:`finish_pending_io`).

        After a restore (and before the next call) the machine is at its snapshot: memory is
        put back at once, registers only when the next call starts (``_reload_registers``), so
        the vCPU still holds the last call's registers. The machine's state is then the
        snapshot's, and that is what this returns, so a capture is of one consistent state.
        """
        if self._reload_registers:
            return self.base_snapshot.vcpu
        synced = self.vm.kvm.info.sync_regs & SAVED_SYNC_PARTS  # (the run below stores them for us)
        self.finish_pending_io(synced)
        return self.vcpu.save_state(synced)

    def dirty_pages(self) -> list[int]:
        """Main-slot pages (indices, sorted) written by the guest since the last restore."""
        self.memory.collect_dirty()
        return self.memory.pending_dirty_pages()

    def slot_host_address(self, slot: str) -> int:
        """Where this process sees a memory slot ("system" or "main") of the guest."""
        return self.memory.slot_runs_host(slot).host

    def run_init(self, timeout: float | None) -> tuple[list[str], int]:
        """Run a boot snapshot until hl_main finishes; returns (exports, hl_main's return value)."""
        _mapping.write_record(self._in_addr, self._in_size, _MAGIC, 0, b"", 0, time.time_ns())
        deadline = _deadline(timeout)
        if deadline:
            _vcpu_run.arm_deadline(deadline)
        try:
            kind, payload, aux0 = self._run_until(abi.HL_EV_INIT_DONE, deadline)
        finally:
            if deadline:
                _vcpu_run.arm_deadline(0)
            self._log.end_call()
        try:
            exports = codec.decode_value(payload)
        except GuestProtocolError as exc:
            raise GuestProtocolError(f"malformed list of exports: {exc}") from None
        if not isinstance(exports, list) or not all(isinstance(e, str) for e in exports):
            raise GuestProtocolError("malformed list of exports")
        if len(exports) > abi.HL_EXPORTS_MAX or len(set(exports)) != len(exports) or not all(
                0 < len(e) <= abi.HL_NAME_MAX and e.isprintable() for e in exports):
            raise GuestProtocolError(f"invalid list of exports (at most {abi.HL_EXPORTS_MAX} unique printable "
                                     f"names of 1-{abi.HL_NAME_MAX} characters)")
        rc = aux0 - (1 << 64) if aux0 >= 1 << 63 else aux0
        self.finish_pending_io()
        return exports, rc

    # ---- the call loop -------------------------------------------------------------------

    def _run_call(self, timeout: float | None, restore: bool, name: str, decode: bool) -> Any:
        if self._reload_registers:
            if self.strict_cpu_reset:
                self.vcpu.load_state(self.base_snapshot.vcpu)
                self.vcpu.set_msrs(self._strict_msrs)
            self.vcpu.load_sync_regs(self._entry_regs, self.base_snapshot.vcpu.sregs)
            self._reload_registers = False
        deadline = _deadline(timeout)
        if deadline:
            _vcpu_run.arm_deadline(deadline)
        self._host_calls = 0
        try:
            kind, payload, aux0 = self._run_until(abi.HL_EV_RESULT, deadline)
            value = self._result(kind, payload, aux0, name, decode)
        except BaseException:
            self._recover()
            raise
        finally:
            if deadline:
                _vcpu_run.arm_deadline(0)
            self._log.end_call()
            if self._control_after_switch is not None:  # the first call after a switch is done
                _mapping.write_bytes(self._control_addr, self._control_after_switch)
                self._control_after_switch = None
        if restore:
            self._restore_locked()
        else:
            self._clear_io()
        return value

    def _run_until(self, event: int, deadline: int) -> tuple[int, memoryview, int]:
        """Run the vCPU until the guest signals ``event``; serve everything in between."""
        run_io = self.vcpu.run_io
        while True:
            reason, port, code = run_io()
            if port == _PORT and code >= 0:
                if code == event:
                    self._drain_log()
                    return self._read_out()
                self._serve_event(code, event)
            elif reason == _INTERRUPTED:
                if deadline and _vcpu_run.monotonic_ns() >= deadline:
                    self._drain_log()
                    raise GuestTimeout(f"{self.name}: call exceeded its deadline and was stopped"
                                       f"{self._why_stuck()}")
                _vcpu_run.clear_kick(self.vcpu.run_address)  # a stale kick from an earlier deadline
            elif reason == kvm_abi.KVM_EXIT_DIRTY_RING_FULL:
                self.memory.collect_dirty()  # harvest; KVM resumes the guest on the next run
            elif reason == kvm_abi.KVM_EXIT_IO:
                if port < 0:
                    raise GuestProtocolError(f"guest read from unknown I/O port {-port:#x} (`in` is not part "
                                             "of the protocol)")
                if port != _PORT:
                    raise GuestProtocolError(f"guest wrote to unknown I/O port {port:#x}")
                raise GuestProtocolError("guest signalled with a wrong access size (expected one 4-byte out)")
            else:
                self._drain_log()
                raise self._exit_error(reason)

    def _serve_event(self, code: int, expected: int) -> None:
        if code == abi.HL_EV_HOSTCALL:
            self._host_call()
        elif code == abi.HL_EV_LOG_FULL:
            self._drain_log()
        elif code == abi.HL_EV_RANDOM:
            kind, _payload, want = self._read_out()
            if kind != abi.HL_MSG_RANDOM or want > self._reply_capacity:
                raise GuestProtocolError(f"malformed randomness request ({want} bytes)")
            _mapping.write_record(self._reply_addr, self._reply_size, _MAGIC, abi.HL_MSG_RANDOM, os.urandom(want),
                                  0, 0)
            self._reply_used = max(self._reply_used, abi.HL_MSG_HEADER_SIZE + want)
        elif code == abi.HL_EV_FAULT:
            self._drain_log()
            raise self._fault_from_record()
        elif code == abi.HL_EV_RESULT and expected == abi.HL_EV_INIT_DONE:
            self._drain_log()
            kind, payload, aux0 = self._read_out()
            try:
                self._result(kind, payload, aux0, "hl_main")
            except HlpoolError as exc:
                raise type(exc)(f"guest initialisation failed: {exc}") from None
            raise GuestProtocolError("guest initialisation ended without reporting its exports")
        else:
            raise GuestProtocolError(f"guest signalled unexpected event {code}")

    def _host_call(self) -> None:
        kind, payload, _ = self._read_out()
        if kind != abi.HL_MSG_HOSTCALL:
            raise GuestProtocolError(f"host call signalled with a record of kind {kind}")
        try:
            request = codec.decode_value(payload)
        except GuestProtocolError as exc:
            raise GuestProtocolError(f"malformed host call: {exc}") from None
        if not (isinstance(request, list) and len(request) == 2 and isinstance(request[0], str)
                and isinstance(request[1], list)):
            raise GuestProtocolError("malformed host call (expected [name, [args...]])")
        fname, args = request
        self._host_calls += 1
        if self._host_calls > self.max_host_calls:
            raise HostFunctionError(f"guest made more than {self.max_host_calls} host calls in one call")
        fn = self.host_functions.get(fname)
        if fn is None:
            raise HostFunctionError(f"guest called unknown host function {fname!r}; available: "
                                    f"{sorted(self.host_functions) or 'none'}")
        try:
            result = fn(*args)
        except Exception as exc:
            raise HostFunctionError(f"host function {fname!r} raised {type(exc).__name__}: {exc}") from exc
        try:
            data = codec.encode_value(result, f"result of host function {fname!r}")
        except codec.ValueTypeError as exc:
            raise HostFunctionError(str(exc)) from None
        if len(data) > self._reply_capacity:
            raise HostFunctionError(f"result of host function {fname!r} is {len(data)} bytes, more than "
                                    f"the {self._reply_capacity}-byte reply buffer")
        _mapping.write_record(self._reply_addr, self._reply_size, _MAGIC, abi.HL_MSG_REPLY_OK, data, 0, 0)
        self._reply_used = max(self._reply_used, abi.HL_MSG_HEADER_SIZE + len(data))

    # ---- records -----------------------------------------------------------------------

    def _read_out(self) -> tuple[int, memoryview, int]:
        """The record the guest wrote (header on the call page): (kind, payload, aux0).

        Never trusts the guest: the payload is inline on the call page if its
        length is at most HL_INLINE_MAX, else in the OUT area, and it must fit.
        """
        magic, kind, length, aux0, *_ = _HDR.unpack_from(self._call_page, 0)
        if magic != _MAGIC:
            raise GuestProtocolError("guest signalled without writing a valid record (bad magic)")
        if length <= _INLINE_MAX:
            return kind, self._call_page[_INLINE:_INLINE + length], aux0
        if length > len(self._out):
            raise GuestProtocolError(f"guest claims a {length}-byte record; the output buffer holds {len(self._out)}")
        return kind, self._out[:length], aux0

    def _result(self, kind: int, payload: memoryview, aux0: int, name: str, decode: bool = True) -> Any:
        if kind == abi.HL_MSG_OK:
            if not decode:
                return bytes(payload)  # copied: restore overwrites the guest's buffers
            try:
                return codec.decode_value(payload)
            except GuestProtocolError as exc:
                raise GuestProtocolError(f"{name}: guest returned a malformed result: {exc}") from None
        message = bytes(payload).decode("utf-8", "replace")
        if kind == abi.HL_MSG_GUEST_ERROR:
            raise GuestError(f"{name}: {message}")
        if kind == abi.HL_MSG_CALL_ERROR:
            raise CallError(f"{name}: {message}")
        if kind == abi.HL_MSG_EXIT:
            status = aux0 - (1 << 64) if aux0 >= 1 << 63 else aux0
            raise GuestError(f"{name}: guest called exit({status})")
        if kind == abi.HL_MSG_SIGNAL:
            raise GuestError(f"{name}: guest raised {message or 'signal %d' % aux0}")
        raise GuestProtocolError(f"{name}: guest wrote a record of unknown kind {kind}")

    def _fault_from_record(self) -> GuestFault:
        magic, kind, length, vector, error_code, rip, cr2, _ = _HDR.unpack_from(self._call_page, 0)
        if magic != abi.HL_MSG_MAGIC or kind != abi.HL_MSG_FAULT:
            return GuestFault("guest fault (the guest's fault report is unreadable)")
        return faults.exception_fault(vector, error_code, rip, cr2, self.layout, self._mapped_files.describe)

    def _exit_error(self, reason: int) -> HlpoolError:
        run = self.vcpu.run_struct
        rip = self.vcpu.get_regs().rip
        if reason == kvm_abi.KVM_EXIT_MMIO:
            mmio = run.exit.mmio
            return faults.memory_fault(mmio.phys_addr, bool(mmio.is_write), rip,
                                       self._describe_address(mmio.phys_addr))
        if reason == kvm_abi.KVM_EXIT_SHUTDOWN:
            return GuestFault(f"guest fault: triple fault (the guest's own exception handling failed) "
                              f"near rip={rip:#x}", vector_name="triple fault", rip=rip)
        if reason == kvm_abi.KVM_EXIT_HLT:
            return GuestFault(f"guest halted (hlt) at rip={rip:#x}", vector_name="hlt", rip=rip)
        name = kvm_abi.EXIT_REASON_NAMES.get(reason, str(reason))
        if reason == kvm_abi.KVM_EXIT_INTERNAL_ERROR:
            name += f" (suberror {run.exit.internal.suberror})"
        if reason == kvm_abi.KVM_EXIT_FAIL_ENTRY:
            name += f" (reason {run.exit.fail_entry.hardware_entry_failure_reason:#x})"
        return GuestFault(f"guest stopped with KVM exit {name} at rip={rip:#x}", vector_name=name, rip=rip)

    def _why_stuck(self) -> str:
        """A hint for a timeout whose cause the vCPU state shows (only read on the timeout path)."""
        try:
            cr0 = self.vcpu.get_sregs().cr0
        except OSError:
            return ""
        if not cr0 & CR0_WP and self.vm.kvm.info.flavour == "pvm":
            return (" (the guest cleared CR0.WP: on PVM a supervisor write to a read-only page then "
                    "never completes, so the call spins until its deadline)")
        return ""

    def _describe_address(self, address: int) -> str:
        described = self._mapped_files.describe(address)
        if described:
            return described
        layout = self.layout
        for area, what in ((layout.control, "the read-only control page (the host's entry stub)"),
                           (layout.input, "the read-only call input"),
                           (layout.reply, "the read-only host-call reply buffer")):
            if area.start <= address < area.end:
                return what
        if layout.io.start <= address < layout.io.end:
            return "the read-only io slot"
        if address // PAGE == VIF_PAGE // PAGE:
            return "the hypervisor's VIF page"
        if layout.system.start <= address < layout.system.end:
            return "read-only system memory (boot info, GDT, files table, page tables)"
        return "no memory at this guest-physical address"

    # ---- log and I/O buffers --------------------------------------------------------------

    def _drain_log(self) -> None:
        used = _U64.unpack_from(self._logbuf, 0)[0]
        if not used:
            return
        capacity = len(self._logbuf) - abi.HL_LOG_HEADER_SIZE
        used = min(used, capacity)  # untrusted length: clamp to the buffer
        self._log.feed(bytes(self._logbuf[abi.HL_LOG_HEADER_SIZE:abi.HL_LOG_HEADER_SIZE + used]))

    def _clear_io(self) -> None:
        """Zero what the host wrote into IN/REPLY, so no call sees another's data."""
        if self._in_used:
            _mapping.zero_bytes(self._in_addr, self._in_used)
            self._in_used = 0
        if self._reply_used:
            _mapping.zero_bytes(self._reply_addr, self._reply_used)
            self._reply_used = 0

    def finish_pending_io(self, store_sync: int = 0) -> None:
        """Complete the guest's last `out` without running it (KVM_RUN with immediate_exit).

        After an I/O exit KVM advances RIP only on the next KVM_RUN; a state
        saved before that would replay the `out`. ``store_sync``: KVM_SYNC_X86_* parts
        this run stores into the run structure for :meth:`Vcpu.save_state`.
        """
        if self.vcpu.run_immediate_exit(store_sync) != _vcpu_run.RUN_INTERRUPTED:
            raise SandboxBrokenError(f"{self.name}: vCPU ran although immediate_exit was set")

    def mark_broken(self, why: str) -> None:
        """Mark the machine unusable (it could not be put into a known state): discard it."""
        self.status = SandboxStatus.BROKEN
        log.error("%s: %s", self.name, why)

    def _recover(self) -> None:
        """After a failed call: back to the snapshot, or mark the sandbox broken."""
        try:
            self.finish_pending_io()
            self.memory.restore()
            if self._mapped_files.extra:
                self._mapped_files.reset()
            self._clear_io()
            self.vcpu.load_state(self.base_snapshot.vcpu)
            self._reload_registers = False
        except Exception as exc:
            self.status = SandboxStatus.BROKEN
            log.error("%s: cannot restore after a failed call: %s", self.name, exc)
            raise SandboxBrokenError(f"{self.name}: cannot be restored after a failed call: {exc}") from exc

    # ---- state checks and teardown ---------------------------------------------------------

    def _check_open(self) -> None:
        if self.status is SandboxStatus.CLOSED:
            raise SandboxClosedError(f"{self.name} is closed")
        if self._pid != os.getpid():
            raise SandboxClosedError(f"{self.name} belongs to process {self._pid}; a VM cannot cross fork()")

    def _check_usable(self) -> None:
        self._check_open()
        if self.status is SandboxStatus.BROKEN:
            raise SandboxBrokenError(f"{self.name} is broken (an earlier restore failed); discard it")

    def _release(self) -> None:
        if self._pid != os.getpid():
            return  # a forked child must not tear down its parent's VM
        for attr in ("vcpu", "memory", "vm"):
            obj = getattr(self, attr, None)
            if obj is not None:
                obj.close()
                setattr(self, attr, None)
        files = getattr(self, "_mapped_files", None)
        if files is not None:
            files.close()


def _deadline(timeout: float | None) -> int:
    if timeout is None:
        return 0
    if timeout <= 0:
        raise CallError(f"timeout must be positive, got {timeout}")
    return _vcpu_run.monotonic_ns() + int(timeout * 1e9)
