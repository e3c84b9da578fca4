"""PVM detection and the one PVM-specific step (see ../shared/platform/PVM.md).

The development and CI machines run KVM as ``kvm_pvm``, a paravirtual nested
hypervisor. A guest set up the usual way is instruction-emulated there; it
runs natively once the host registers a "VIF" page through MSR 0x4b564d10.
Everything else hlpool does (U/S=1 page tables, 64-bit mode set straight from
KVM_SET_SREGS, PML4 slot 256 left unused) is harmless on VMX/SVM, so the same
guest setup runs on both.
"""

from __future__ import annotations

import logging
import os

from hlpool.kvm import abi

log = logging.getLogger(__name__)


def detect_flavour(kvm_fd: int) -> str:
    """``"pvm"`` if a throw-away vCPU (of a VM made on ``/dev/kvm`` fd ``kvm_fd``) reads the PVM
    signature MSR, else ``"hardware"``."""
    vm_fd = abi.ioctl(kvm_fd, abi.KVM_CREATE_VM, 0)
    try:
        vcpu_fd = abi.ioctl(vm_fd, abi.KVM_CREATE_VCPU, 0)
        try:
            msrs = abi.msrs_struct(1)
            msrs.entries[0].index = abi.MSR_PVM_SIGNATURE
            try:
                got = abi.ioctl(vcpu_fd, abi.KVM_GET_MSRS, msrs)
            except OSError:
                got = 0
            flavour = "pvm" if got == 1 and msrs.entries[0].data == abi.PVM_SIGNATURE else "hardware"
        finally:
            os.close(vcpu_fd)
    finally:
        os.close(vm_fd)
    log.debug("KVM flavour: %s", flavour)
    return flavour


def native_execution_msrs(flavour: str, vif_gpa: int) -> dict[int, int]:
    """The MSR writes that make a vCPU run natively: on PVM, registering the VIF page;
    elsewhere none.

    ``vif_gpa`` must be a page in a writable memory slot that the guest never
    touches: the hypervisor writes 16 bytes there.
    """
    if flavour != "pvm":
        return {}
    return {abi.MSR_PVM_VIF: vif_gpa | abi.PVM_VIF_EXPLICIT}
