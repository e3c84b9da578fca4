"""Why a host has no ``/dev/kvm``: the reason its error gives, read from ``/sys`` and ``/proc``.

"This host has no KVM" leaves the user to find out which of several causes it is;
each of them has a different remedy:

- ``kvm_pvm`` (the paravirtual nested hypervisor, see ../shared/platform/PVM.md) is
  in the kernel but did not register ``/dev/kvm``: it refuses to run guests on a
  kernel that uses page-table isolation (PTI, the Meltdown mitigation of affected
  Intel CPUs) and says so once in the kernel log at boot;
- the CPU has VMX or SVM but neither ``kvm_intel`` nor ``kvm_amd`` is loaded;
- the machine is a VM whose hypervisor does not offer nested virtualisation;
- the CPU has no virtualisation extensions.

Only files are read (no kernel log, which needs privileges), so the check is
cheap and safe to make wherever ``/dev/kvm`` is found missing.
"""

from __future__ import annotations

import os

from hlpool.errors import KvmUnavailableError


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _cpu_flags(proc_root: str) -> set[str]:
    """The first CPU's flags in ``/proc/cpuinfo`` (every CPU of a host has the same)."""
    for line in _read(os.path.join(proc_root, "cpuinfo")).splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return set(value.split())
    return set()


def missing_kvm_reason(sys_root: str = "/sys", proc_root: str = "/proc") -> str:
    """Why ``/dev/kvm`` is missing on this host, and what to do about it (one sentence or two)."""
    modules = os.path.join(sys_root, "module")
    if os.path.isdir(os.path.join(modules, "kvm_pvm")):
        meltdown = _read(os.path.join(sys_root, "devices/system/cpu/vulnerabilities/meltdown")).strip()
        if "PTI" in meltdown:
            return ("kvm_pvm is in this kernel but did not register /dev/kvm: it needs page-table isolation off, "
                    f"and this kernel uses it (meltdown: {meltdown!r}); use a machine whose CPU is not affected "
                    "by Meltdown (or boot with pti=off, giving that mitigation up), or one with VMX/SVM "
                    "(`dmesg | grep kvm-pvm` has kvm_pvm's own reason)")
        return "kvm_pvm is in this kernel but did not register /dev/kvm (`dmesg | grep kvm-pvm` has its reason)"
    flags = _cpu_flags(proc_root)
    for flag, module in (("vmx", "kvm_intel"), ("svm", "kvm_amd")):
        if flag in flags:
            if os.path.isdir(os.path.join(modules, module)):
                return f"{module} is loaded but did not register /dev/kvm (is virtualisation disabled in the firmware?)"
            return f"the CPU has {flag.upper()} but {module} is not loaded: `modprobe {module}`"
    if "hypervisor" in flags:
        return ("this machine is a VM whose hypervisor offers no nested virtualisation (no VMX/SVM, no kvm_pvm): "
                "enable nested virtualisation, or use a kernel with kvm_pvm")
    return "the CPU has no virtualisation extensions (VMX/SVM)"


def missing_device_error(path: str = "/dev/kvm") -> KvmUnavailableError:
    """The error for a ``path`` that does not exist, with the cause."""
    return KvmUnavailableError(f"{path} does not exist: {missing_kvm_reason()}")


def require_kvm_device(path: str = "/dev/kvm") -> None:
    """Raise :func:`missing_device_error` if ``path`` does not exist: a check for whoever is about
    to start processes that would each find it missing."""
    if not os.path.exists(path):
        raise missing_device_error(path)
