"""``/dev/kvm``: the KVM system object, its capabilities and the host's CPU flavour."""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass
from functools import cached_property

from hlpool.errors import KvmError, KvmUnavailableError
from hlpool.kvm import abi
from hlpool.kvm.absence import missing_device_error
from hlpool.kvm.pvm import detect_flavour

log = logging.getLogger(__name__)

KVM_DEVICE = "/dev/kvm"


@dataclass(frozen=True)
class KvmInfo:
    """What this host's KVM offers (read once per process)."""

    api_version: int
    flavour: str  # "pvm" (paravirtual nested, see PVM.md) or "hardware" (VMX/SVM)
    vcpu_mmap_size: int
    max_memslots: int
    sync_regs: int  # bitmask of KVM_SYNC_X86_* supported
    readonly_memory: bool
    manual_dirty_log_protect: int


class Kvm:
    """An open ``/dev/kvm``. One per process is enough; see :func:`system`."""

    def __init__(self, path: str = KVM_DEVICE) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise missing_device_error(path) from None
        except PermissionError:
            raise KvmUnavailableError(f"no permission to open {path}: run as root or add the user "
                                      "to the 'kvm' group") from None
        except OSError as exc:
            raise KvmUnavailableError(f"cannot open {path}: {exc.strerror}") from None
        version = abi.ioctl(self.fd, abi.KVM_GET_API_VERSION)
        if version != abi.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError(f"KVM API version {version}, expected {abi.KVM_API_VERSION}")

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION``: 0 if the capability is missing, else its value."""
        return abi.ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap)

    @cached_property
    def vcpu_mmap_size(self) -> int:
        return abi.ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE)

    @cached_property
    def supported_cpuid(self) -> ctypes.Structure:
        """``KVM_GET_SUPPORTED_CPUID``, given to every vCPU as its CPUID."""
        cpuid = abi.cpuid_struct(256)
        abi.ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, cpuid)
        return cpuid

    @cached_property
    def xsave_components(self) -> dict[int, tuple[int, int]]:
        """XSAVE component number (>= 2) -> (offset, size) in the standard form (CPUID leaf 0xD)."""
        cpuid = self.supported_cpuid
        out: dict[int, tuple[int, int]] = {}
        for i in range(cpuid.nent):
            entry = cpuid.entries[i]
            if entry.function == 0xD and 2 <= entry.index < 63 and entry.eax:
                out[entry.index] = (entry.ebx, entry.eax)
        return out

    @cached_property
    def msr_index_list(self) -> tuple[int, ...]:
        """Every MSR this KVM saves and restores for a vCPU (``KVM_GET_MSR_INDEX_LIST``)."""
        probe = abi.msr_list_struct(0)
        try:
            abi.ioctl(self.fd, abi.KVM_GET_MSR_INDEX_LIST, probe)
        except OSError:
            pass  # E2BIG: nmsrs now holds the count
        full = abi.msr_list_struct(probe.nmsrs)
        abi.ioctl(self.fd, abi.KVM_GET_MSR_INDEX_LIST, full)
        return tuple(full.indices[i] for i in range(full.nmsrs))

    @cached_property
    def supported_xcr0(self) -> int:
        """The XSAVE components KVM lets a guest enable (CPUID leaf 0xD, sub-leaf 0)."""
        cpuid = self.supported_cpuid
        for i in range(cpuid.nent):
            entry = cpuid.entries[i]
            if entry.function == 0xD and entry.index == 0:
                return entry.eax | entry.edx << 32
        return 3

    @cached_property
    def info(self) -> KvmInfo:
        info = KvmInfo(
            api_version=abi.KVM_API_VERSION,
            flavour=detect_flavour(self.fd),
            vcpu_mmap_size=self.vcpu_mmap_size,
            max_memslots=self.check_extension(abi.KVM_CAP_NR_MEMSLOTS),
            sync_regs=self.check_extension(abi.KVM_CAP_SYNC_REGS),
            readonly_memory=bool(self.check_extension(abi.KVM_CAP_READONLY_MEM)),
            manual_dirty_log_protect=self.check_extension(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2),
        )
        needed = abi.KVM_SYNC_X86_REGS | abi.KVM_SYNC_X86_SREGS
        if info.sync_regs & needed != needed:
            raise KvmError("KVM lacks KVM_CAP_SYNC_REGS for regs and sregs (Linux 4.17+ needed)")
        if not info.readonly_memory:
            raise KvmError("KVM lacks KVM_CAP_READONLY_MEM")
        log.debug("KVM: %s", info)
        return info

    @cached_property
    def tsc_khz(self) -> int:
        """The guest TSC frequency KVM reports (0 if unknown), from a throw-away vCPU."""
        vm_fd = self.create_vm_fd()
        try:
            vcpu_fd = abi.ioctl(vm_fd, abi.KVM_CREATE_VCPU, 0)
            try:
                return abi.ioctl(vcpu_fd, abi.KVM_GET_TSC_KHZ)
            except OSError:
                return 0
            finally:
                os.close(vcpu_fd)
        finally:
            os.close(vm_fd)

    def create_vm_fd(self) -> int:
        try:
            return abi.ioctl(self.fd, abi.KVM_CREATE_VM, 0)
        except OSError as exc:
            raise KvmError(f"KVM_CREATE_VM failed: {exc.strerror}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_system: Kvm | None = None
_system_pid = 0
_system_lock = threading.Lock()


def system() -> Kvm:
    """The process-wide ``/dev/kvm`` handle (reopened after fork)."""
    global _system, _system_pid
    with _system_lock:
        if _system is None or _system_pid != os.getpid():
            _system = Kvm()
            _system_pid = os.getpid()
        return _system
