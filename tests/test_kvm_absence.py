"""The reason a missing /dev/kvm is reported with, read from /sys and /proc laid out in a folder."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hlpool.kvm.absence import missing_kvm_reason


def _host(root: Path, *, modules: tuple[str, ...] = (), meltdown: str | None = None, flags: str = "fpu sse2") -> tuple[str, str]:
    """A /sys and a /proc under ``root`` with what missing_kvm_reason reads; returns their paths."""
    sys_root, proc_root = root / "sys", root / "proc"
    for module in modules:
        (sys_root / "module" / module).mkdir(parents=True)
    (sys_root / "module").mkdir(parents=True, exist_ok=True)
    if meltdown is not None:
        vulns = sys_root / "devices/system/cpu/vulnerabilities"
        vulns.mkdir(parents=True)
        (vulns / "meltdown").write_text(meltdown + "\n")
    proc_root.mkdir()
    (proc_root / "cpuinfo").write_text(f"processor\t: 0\nmodel name\t: a CPU\nflags\t\t: {flags}\n\n"
                                       f"processor\t: 1\nflags\t\t: {flags}\n")
    return str(sys_root), str(proc_root)


def test_a_pvm_kernel_with_page_table_isolation_is_named_with_its_remedy(tmp_path):
    reason = missing_kvm_reason(*_host(tmp_path, modules=("kvm", "kvm_pvm"), meltdown="Mitigation: PTI",
                                       flags="fpu hypervisor"))
    assert "kvm_pvm" in reason and "page-table isolation" in reason and "Mitigation: PTI" in reason
    assert "pti=off" in reason


def test_a_pvm_kernel_without_pti_points_at_its_own_log(tmp_path):
    reason = missing_kvm_reason(*_host(tmp_path, modules=("kvm_pvm",), meltdown="Not affected"))
    assert "kvm_pvm" in reason and "dmesg" in reason and "page-table" not in reason


@pytest.mark.parametrize("flag,module", [("vmx", "kvm_intel"), ("svm", "kvm_amd")])
def test_a_cpu_with_virtualisation_and_no_module_asks_for_the_module(tmp_path, flag, module):
    reason = missing_kvm_reason(*_host(tmp_path, flags=f"fpu {flag} sse2"))
    assert f"modprobe {module}" in reason


def test_a_loaded_module_that_registered_nothing_points_at_the_firmware(tmp_path):
    reason = missing_kvm_reason(*_host(tmp_path, modules=("kvm", "kvm_intel"), flags="vmx"))
    assert "kvm_intel is loaded" in reason and "firmware" in reason


def test_a_vm_without_nested_virtualisation_and_a_bare_cpu_are_told_apart(tmp_path):
    vm = missing_kvm_reason(*_host(tmp_path / "vm", flags="fpu hypervisor"))
    bare = missing_kvm_reason(*_host(tmp_path / "bare", flags="fpu"))
    assert "nested virtualisation" in vm
    assert "no virtualisation extensions" in bare


def test_unreadable_files_still_give_a_reason(tmp_path):
    assert "no virtualisation extensions" in missing_kvm_reason(str(tmp_path / "none"), str(tmp_path / "none"))


def test_the_kvm_error_carries_the_reason_when_the_device_is_missing(tmp_path):
    from hlpool.errors import KvmUnavailableError
    from hlpool.kvm.system import Kvm

    missing = tmp_path / "kvm"
    with pytest.raises(KvmUnavailableError) as raised:
        Kvm(str(missing))
    assert str(raised.value) == f"{missing} does not exist: {missing_kvm_reason()}"
    assert not os.path.exists(missing)


_POOL_WITHOUT_KVM = """
import os, sys
from hlpool import Pool
from hlpool.errors import KvmUnavailableError
try:
    Pool(workers=2, snapshot_dir=sys.argv[1])
except KvmUnavailableError as exc:
    print("error:", exc)
children = [c for t in os.listdir("/proc/self/task")
            for c in open(f"/proc/self/task/{t}/children").read().split()]
print("children:", len(children))
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="hiding /dev/kvm takes a mount namespace: root and unshare(1)")
def test_a_pool_on_a_host_without_kvm_says_why_before_starting_any_process(tmp_path):
    # A real host without /dev/kvm: a private mount namespace with an empty /dev.
    script = f'mount -t tmpfs none /dev && exec "$0" -c {shlex.quote(_POOL_WITHOUT_KVM)} "$1"'
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, sys.executable,
                           str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"error: /dev/kvm does not exist: {missing_kvm_reason()}"
    assert lines[1] == "children: 0"  # no worker, builder or spawner was started
    assert done.stderr == ""  # and none of them logged a warning of its own


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="hiding /dev/kvm takes a mount namespace: root and unshare(1)")
def test_a_benchmark_on_a_host_without_kvm_ends_with_the_cause_in_one_line(tmp_path):
    bench = Path(__file__).resolve().parent.parent / "bench" / "floor.py"
    script = 'mount -t tmpfs none /dev && exec "$0" "$1" --quick'
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, sys.executable,
                           str(bench)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HLPOOL_BENCH_RESULTS": str(tmp_path)})
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == f"floor.py: error: /dev/kvm does not exist: {missing_kvm_reason()}"
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # no results file written
