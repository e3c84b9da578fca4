"""One source per contract: the Python tables equal what the C headers say.

The Cython extensions are compiled against the kernel's ``<linux/kvm.h>``
(through hlpool/kvm/kvm.pxd) and the SDK's ``hlpool_abi.h`` (through
hlpool/guest_abi.pxd), and report the numbers, sizes and offsets the C compiler
saw. The Python side keeps its own tables (hlpool/kvm/abi.py: ctypes structs
and ioctl numbers; hlpool/guest/abi.py: parsed from the header text); these
tests make any drift between them a test failure. No KVM needed.
"""

from __future__ import annotations

import ctypes

import pytest

from hlpool import _mapping
from hlpool.guest import abi as guest_abi
from hlpool.kvm import _vcpu_run
from hlpool.kvm import abi as kvm_abi

KVM = _vcpu_run.kvm_header_values()
GUEST = _mapping.guest_header_values()

# ---- KVM: hlpool/kvm/abi.py against <linux/kvm.h> --------------------------------------

# Every KVM_* number hlpool/kvm/abi.py defines (the Python table), with its header value.
PY_KVM_CONSTANTS = sorted(
    name for name in dir(kvm_abi) if name.startswith("KVM_") and isinstance(getattr(kvm_abi, name), int)
)


def test_every_python_kvm_constant_is_checked():
    missing = [name for name in PY_KVM_CONSTANTS if name not in KVM["constants"]]
    assert not missing, f"add these to kvm_header_values() in hlpool/kvm/_vcpu_run.pyx: {missing}"


@pytest.mark.parametrize("name", PY_KVM_CONSTANTS)
def test_kvm_constant_matches_header(name):
    assert getattr(kvm_abi, name) == KVM["constants"][name], name


def test_kvm_exit_io_direction():
    # _vcpu_run.run_io reports an I/O exit whose direction is not OUT with a negative port.
    assert KVM["constants"]["KVM_EXIT_IO_IN"] == 0 and KVM["constants"]["KVM_EXIT_IO_OUT"] == 1


# ctypes struct in hlpool/kvm/abi.py -> struct in the header
STRUCTS = {
    "KvmRegs": "kvm_regs",
    "KvmSegment": "kvm_segment",
    "KvmDtable": "kvm_dtable",
    "KvmSregs": "kvm_sregs",
    "KvmVcpuEvents": "kvm_vcpu_events",
    "KvmFpu": "kvm_fpu",
    "KvmXsave": "kvm_xsave",
    "KvmXcr": "kvm_xcr",
    "KvmXcrs": "kvm_xcrs",
    "KvmDebugregs": "kvm_debugregs",
    "KvmMsrEntry": "kvm_msr_entry",
    "KvmMsrsHeader": "kvm_msrs",
    "KvmMsrListHeader": "kvm_msr_list",
    "KvmMsrFilterRange": "kvm_msr_filter_range",
    "KvmMsrFilter": "kvm_msr_filter",
    "KvmCpuidEntry2": "kvm_cpuid_entry2",
    "KvmCpuid2Header": "kvm_cpuid2",
    "KvmUserspaceMemoryRegion": "kvm_userspace_memory_region",
    "KvmEnableCap": "kvm_enable_cap",
    "KvmSyncRegs": "kvm_sync_regs",
    "KvmRunIo": "kvm_run.io",
}


@pytest.mark.parametrize("py_name,c_name", sorted(STRUCTS.items()))
def test_kvm_struct_size_matches_header(py_name, c_name):
    assert ctypes.sizeof(getattr(kvm_abi, py_name)) == KVM["sizes"][c_name]


def test_kvm_run_offsets_match_header():
    run, io, sync = kvm_abi.KvmRun, kvm_abi.KvmRunIo, kvm_abi.KvmSyncRegs
    offsets = KVM["offsets"]
    assert run.immediate_exit.offset == offsets["kvm_run.immediate_exit"]
    assert run.exit_reason.offset == offsets["kvm_run.exit_reason"]
    assert run.exit.offset == kvm_abi.RUN_OFFSET_EXIT == offsets["kvm_run.io"]
    assert run.kvm_valid_regs.offset == offsets["kvm_run.kvm_valid_regs"]
    assert run.kvm_dirty_regs.offset == offsets["kvm_run.kvm_dirty_regs"]
    assert run.s.offset == kvm_abi.RUN_OFFSET_SYNC_REGS == offsets["kvm_run.s"] == offsets["kvm_run.s.regs.regs"]
    assert run.s.offset + sync.sregs.offset == offsets["kvm_run.s.regs.sregs"]
    assert run.s.offset + sync.events.offset == offsets["kvm_run.s.regs.events"]
    for field in ("direction", "size", "port", "count", "data_offset"):
        assert getattr(io, field).offset == offsets[f"kvm_run.io.{field}"], field


def test_dirty_ring_entry_size():
    # hlpool/kvm/vcpu.py sizes the mapped dirty ring at 16 bytes per entry.
    assert KVM["sizes"]["kvm_dirty_gfn"] == 16
    assert KVM["sizes"]["kvm_dirty_log"] == 16


# ---- guest ABI: hlpool/guest/abi.py against hlpool_abi.h ----------------------------------


@pytest.mark.parametrize("name", sorted(GUEST["constants"]))
def test_guest_constant_matches_header(name):
    assert getattr(guest_abi, name) == GUEST["constants"][name], name


def test_guest_struct_sizes_match_header():
    sizes = GUEST["sizes"]
    assert sizes["hl_msg_header"] == guest_abi.MSG_HEADER.size == guest_abi.HL_MSG_HEADER_SIZE
    assert sizes["hl_log_header"] == guest_abi.LOG_HEADER.size == guest_abi.HL_LOG_HEADER_SIZE
    assert sizes["hl_boot_info"] == guest_abi.BOOT_INFO.size
    assert sizes["hl_file_entry"] == guest_abi.FILE_ENTRY.size
    assert sizes["hl_files_table"] == guest_abi.FILES_TABLE_SIZE


def test_guest_field_order_matches_header():
    offsets = GUEST["offsets"]
    msg_fields = ["magic", "kind", "length", "aux0", "aux1", "aux2", "aux3", "aux4"]
    for i, field in enumerate(msg_fields):
        assert offsets[f"hl_msg_header.{field}"] == 8 * i, field
    # hlpool/guest/abi.py packs hl_boot_info by field order (BOOT_INFO_FIELDS).
    checked = 0
    for i, field in enumerate(guest_abi.BOOT_INFO_FIELDS):
        key = f"hl_boot_info.{field}"
        if key in offsets:
            assert offsets[key] == 8 * i, field
            checked += 1
    assert checked == sum(1 for key in offsets if key.startswith("hl_boot_info."))
    assert offsets["hl_file_entry.guest_address"] == 0
    assert offsets["hl_file_entry.size"] == 8


def test_write_record_uses_the_header_layout():
    """_mapping.write_record lays a record out as hlpool/guest/abi.py reads it."""
    payload = b"hello, guest"
    buf = ctypes.create_string_buffer(guest_abi.HL_MSG_HEADER_SIZE + len(payload))
    _mapping.write_record(ctypes.addressof(buf), len(buf), guest_abi.HL_MSG_MAGIC, guest_abi.HL_MSG_CALL,
                          payload, 7, 9)
    header = guest_abi.MSG_HEADER.unpack_from(buf.raw)
    assert header == (guest_abi.HL_MSG_MAGIC, guest_abi.HL_MSG_CALL, len(payload), 7, 9, 0, 0, 0)
    assert buf.raw[guest_abi.HL_MSG_HEADER_SIZE:] == payload
    with pytest.raises(ValueError):
        _mapping.write_record(ctypes.addressof(buf), len(buf) - 1, guest_abi.HL_MSG_MAGIC, guest_abi.HL_MSG_CALL,
                              payload, 0, 0)
    with pytest.raises(ValueError):  # smaller than a header: no wrap-around
        _mapping.write_record(ctypes.addressof(buf), 8, guest_abi.HL_MSG_MAGIC, guest_abi.HL_MSG_CALL, b"", 0, 0)


def test_mapping_page_size_is_the_contract_page():
    assert _mapping.PAGE_SIZE == guest_abi.HL_PAGE_SIZE
