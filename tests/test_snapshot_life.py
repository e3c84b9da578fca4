"""Snapshots through their whole life: flatten, persisting in-memory parents, what a file
needs on open, consistent captures after restored calls, retained page ranges, and page
sharing across processes."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
import zlib

import msgspec
import pytest

from hlpool import (
    Sandbox,
    Snapshot,
    SnapshotCompatibilityError,
    SnapshotError,
    SnapshotFormatError,
)
from hlpool.guest import abi as guest_abi
from hlpool.guest.layout import PAGE
from hlpool.kvm.system import system
from hlpool.snapshot import snapfile

pytestmark = pytest.mark.kvm


def main_memory(sb: Sandbox) -> bytes:
    main = sb.layout.main
    return sb.memory.read(main.start, main.size)


def _rewrite_meta(raw: bytes, change) -> bytes:
    """Change the metadata and reseal the file (checksums and hash), as a careful forger would."""
    raw = bytearray(raw)
    names = ["magic", "version", "header_size", "flags", "meta_offset", "meta_size", "data_offset", "data_size",
             "file_size", "content_sha256", "crc"]
    header = dict(zip(names, snapfile.HEADER.unpack_from(raw, 0)))
    meta = msgspec.msgpack.decode(bytes(raw[header["meta_offset"]:]))
    change(meta)
    meta_bytes = msgspec.msgpack.encode(meta)
    out = bytearray(raw[:header["meta_offset"]]) + meta_bytes
    header.update(meta_size=len(meta_bytes), file_size=len(out),
                  content_sha256=hashlib.sha256(bytes(out[header["data_offset"]:])).digest())
    snapfile.HEADER.pack_into(out, 0, *(header[n] for n in names))
    struct.pack_into("<I", out, snapfile.HEADER_CRC_OFFSET, zlib.crc32(bytes(out[:snapfile.HEADER_CRC_OFFSET])))
    return bytes(out)


def _meta(path) -> dict:
    raw = open(path, "rb").read()
    h = snapfile.HEADER.unpack_from(raw, 0)
    return msgspec.msgpack.decode(raw[h[4]:])


@pytest.fixture(scope="module")
def touch_file(tmp_path_factory, snapshots):
    path = tmp_path_factory.mktemp("life") / "touch.hlsnap"
    return snapshots("touch").persist(path).path


# ---- flatten ---------------------------------------------------------------------------------


def test_flatten_makes_one_standalone_file_from_a_chain(touch_file, tmp_path):
    chain_dir = tmp_path / "chain"
    chain_dir.mkdir()
    base = Snapshot.open(touch_file)
    snap = base
    for level in range(3):
        with Sandbox(snap) as sb:
            sb.call("write", [level * PAGE * 50, 8 + level * PAGE * 9], [level + 10, level + 20], restore=False)
            sb.call("bump", restore=False)
            snap = sb.snapshot().persist(chain_dir / f"layer{level}.hlsnap")
    assert snap.depth == 4
    with Sandbox(snap) as sb:
        chain_memory = main_memory(sb)
        chain_system = sb.memory.read(sb.layout.system.start, sb.layout.system.size)

    flat = snap.flatten()
    assert flat.depth == 1 and flat.parent is None and not flat.persisted
    assert flat.exports == snap.exports and flat.vcpu == snap.vcpu
    flat_path = tmp_path / "flat.hlsnap"
    flat.persist(flat_path)
    assert _meta(flat_path)["parents"] == []
    for name in os.listdir(chain_dir):  # the chain is gone: the flat file stands alone
        os.unlink(chain_dir / name)

    reopened = Snapshot.open(flat_path)
    assert reopened.depth == 1 and [layer.path for layer in reopened.layers] == [str(flat_path)]
    with Sandbox(reopened) as sb:
        assert main_memory(sb) == chain_memory  # every page of main memory
        assert sb.memory.read(sb.layout.system.start, sb.layout.system.size) == chain_system
        assert sb.call("bump") == 4  # three bumps in the chain, one now
        assert sb.call("read", 100 * PAGE, 8) == (12).to_bytes(8, "little")
        assert sb.call("bump") == 4  # every call starts from the flattened state
    # Zero pages stay zero runs: the flat layer holds far less than the guest's memory.
    assert reopened.stored_bytes() < reopened.layout.main.size // 4


# ---- persisting in-memory parents ---------------------------------------------------------------


def _bumped_child(snapshot: Snapshot) -> Snapshot:
    with Sandbox(snapshot) as sb:
        sb.call("bump", restore=False)
        return sb.snapshot()


def test_persist_writes_parents_that_are_still_in_memory(snapshots, tmp_path):
    base = snapshots("touch")  # in memory
    first = _bumped_child(base)
    second = _bumped_child(first)
    assert not any(layer.persisted for layer in second.layers)
    saved = second.persist(tmp_path / "child.hlsnap")
    assert sorted(os.listdir(tmp_path)) == ["child.hlsnap", "child.parent-0.hlsnap", "child.parent-1.hlsnap"]
    assert [layer.path for layer in saved.layers] == [
        str(tmp_path / "child.parent-0.hlsnap"), str(tmp_path / "child.parent-1.hlsnap"), str(tmp_path / "child.hlsnap")]
    assert saved.parent.path == str(tmp_path / "child.parent-1.hlsnap")
    assert saved.parent.parent.path == str(tmp_path / "child.parent-0.hlsnap")
    reopened = Snapshot.open(tmp_path / "child.hlsnap")
    assert [layer.path for layer in reopened.layers] == [layer.path for layer in saved.layers]
    with Sandbox(reopened) as sb:
        assert sb.call("bump") == 3
    with Sandbox(Snapshot.open(tmp_path / "child.parent-1.hlsnap")) as sb:
        assert sb.call("bump") == 2


def test_persist_keeps_parents_already_in_files(touch_file, tmp_path):
    base = Snapshot.open(touch_file)
    middle = _bumped_child(base)  # in memory, on a file
    top = _bumped_child(middle)
    saved = top.persist(tmp_path / "top.hlsnap")
    assert sorted(os.listdir(tmp_path)) == ["top.hlsnap", "top.parent-1.hlsnap"]
    assert saved.layers[0].path == touch_file
    with Sandbox(Snapshot.open(tmp_path / "top.hlsnap")) as sb:
        assert sb.call("bump") == 3


# ---- what a file needs, checked on open ------------------------------------------------------------


def _other(value: str, choices: tuple[str, ...]) -> str:
    return next(c for c in choices if c != value)


def _forge_xcr0(meta: dict, bit: int) -> None:
    xcrs = bytearray(meta["vcpu"]["xcrs"])
    count = struct.unpack_from("<I", xcrs, 0)[0]
    for i in range(count):
        xcr, _reserved, value = struct.unpack_from("<IIQ", xcrs, 8 + 16 * i)
        if xcr == 0:
            struct.pack_into("<Q", xcrs, 8 + 16 * i + 8, value | 1 << bit)
    meta["vcpu"]["xcrs"] = bytes(xcrs)


def test_persisted_files_record_what_they_need(touch_file):
    requires = _meta(touch_file)["requires"]
    kvm = system()
    assert requires["hlpool"] == snapfile.hlpool_version
    assert requires["abi"] == guest_abi.HL_ABI_VERSION
    assert requires["kvm"] == kvm.info.flavour
    assert requires["cpu_vendor"] in ("GenuineIntel", "AuthenticAMD") or requires["cpu_vendor"]
    assert requires["xcr0"] & 3 == 3 and requires["xcr0"] & ~kvm.supported_xcr0 == 0
    assert all(kvm.xsave_components[n] == (off, size) for n, off, size in requires["xsave"])


def _unsupported_xsave_bit() -> int:
    return next(n for n in range(2, 63) if not system().supported_xcr0 >> n & 1)


def _shift_xsave_layout(meta: dict) -> None:
    layouts = meta["requires"]["xsave"]
    if not layouts:
        pytest.skip("the guest's XCR0 enables no XSAVE component beyond x87/SSE here")
    meta["requires"]["xsave"] = [[n, off + 64, size] for n, off, size in layouts]


@pytest.mark.parametrize("change, message", [
    (lambda m: m["requires"].update(hlpool="9.4.0"), r"written by hlpool 9\.4\.0; this is hlpool"),
    (lambda m: m["requires"].update(hlpool="0.99.1"), r"written by hlpool 0\.99\.1"),
    (lambda m: m["requires"].update(abi=guest_abi.HL_ABI_VERSION + 1),
     f"built for guest ABI version {guest_abi.HL_ABI_VERSION + 1}; this hlpool speaks guest ABI version "
     f"{guest_abi.HL_ABI_VERSION}"),
    (lambda m: m["requires"].update(kvm=_other(system().info.flavour, ("hardware", "pvm"))),
     "written for KVM flavour '(hardware|pvm)', this host is '(pvm|hardware)'"),
    (lambda m: m["requires"].update(cpu_vendor="HygonGenuine"),
     "its vCPU state was saved on a 'HygonGenuine' CPU, this host's is"),
    (lambda m: _forge_xcr0(m, _unsupported_xsave_bit()), r"enables XSAVE components \[\d+\]"),
    (_shift_xsave_layout, r"its XSAVE area holds component \d+ at offset"),
], ids=["hlpool-major", "hlpool-minor", "abi", "kvm", "vendor", "xcr0", "xsave-layout"])
def test_open_refuses_files_that_need_what_this_host_lacks(touch_file, tmp_path, change, message):
    forged = tmp_path / "forged.hlsnap"
    forged.write_bytes(_rewrite_meta(open(touch_file, "rb").read(), change))
    with pytest.raises(SnapshotCompatibilityError, match=message) as info:
        Snapshot.open(forged)
    assert isinstance(info.value, SnapshotError) and info.value.code == "snapshot_error"
    assert str(forged) in str(info.value)


def test_every_file_of_a_chain_is_checked(touch_file, tmp_path):
    parent = tmp_path / "parent.hlsnap"
    parent.write_bytes(open(touch_file, "rb").read())
    with Sandbox(Snapshot.open(parent)) as sb:
        sb.call("bump", restore=False)
        child = sb.snapshot().persist(tmp_path / "child.hlsnap")
    # Forge the parent, and the child's reference to it, so only the parent's needs are wrong.
    os.chmod(parent, 0o644)
    parent.write_bytes(_rewrite_meta(parent.read_bytes(), lambda m: m["requires"].update(abi=0)))
    forged_hash = snapfile.HEADER.unpack_from(parent.read_bytes(), 0)[9]
    os.chmod(child.path, 0o644)
    with open(child.path, "rb") as f:
        raw = f.read()
    with open(child.path, "wb") as f:
        f.write(_rewrite_meta(raw, lambda m: m["parents"][-1].update(sha256=forged_hash)))
    with pytest.raises(SnapshotCompatibilityError, match=f"{parent}: built for guest ABI version 0"):
        Snapshot.open(child.path)


def test_compatible_versions_and_older_files_open(touch_file, tmp_path):
    patch = tmp_path / "patch.hlsnap"  # same major.minor, another patch release
    major, minor = snapfile.hlpool_version.split(".")[:2]
    patch.write_bytes(_rewrite_meta(open(touch_file, "rb").read(),
                                    lambda m: m["requires"].update(hlpool=f"{major}.{minor}.99")))
    Snapshot.open(patch)
    old = tmp_path / "old.hlsnap"  # written before files recorded what they need
    old.write_bytes(_rewrite_meta(open(touch_file, "rb").read(), lambda m: m.pop("requires")))
    with Sandbox(Snapshot.open(old)) as sb:
        assert sb.call("bump") == 1
    bad = tmp_path / "bad.hlsnap"
    bad.write_bytes(_rewrite_meta(open(touch_file, "rb").read(), lambda m: m["requires"].update(hlpool=3)))
    with pytest.raises(SnapshotFormatError, match="requires.hlpool"):
        Snapshot.open(bad)
    bad.write_bytes(_rewrite_meta(open(touch_file, "rb").read(), lambda m: m["requires"].update(xsave=[[-1, 0, 0]])))
    with pytest.raises(SnapshotFormatError, match="requires.xsave"):
        Snapshot.open(bad)
    bad.write_bytes(_rewrite_meta(open(touch_file, "rb").read(), lambda m: m.update(requires=[1])))
    with pytest.raises(SnapshotFormatError, match="'requires' is malformed"):
        Snapshot.open(bad)


# ---- a snapshot right after a restored call ------------------------------------------------------


def test_snapshot_after_a_restored_call_is_of_the_restored_state(snapshots):
    base = snapshots("touch")
    with Sandbox(base) as fresh:
        base_memory = main_memory(fresh)
    with Sandbox(base) as sb:
        assert sb.call("touch", 20) > 0 and sb.call("bump") == 1  # both restored afterwards
        # The vCPU still holds what the call left (registers are reloaded lazily at the next call).
        assert sb.vcpu.save_state().regs != base.vcpu.regs
        child = sb.snapshot()
        assert (child.vcpu.regs, child.vcpu.sregs, child.vcpu.xsave) == \
            (base.vcpu.regs, base.vcpu.sregs, base.vcpu.xsave)
        assert sb.call("bump") == 1  # the sandbox itself is unaffected
        sb.call("bump", restore=False)
        sb.restore()  # an explicit restore is the same
        assert sb.snapshot().vcpu.regs == base.vcpu.regs
    with Sandbox(child) as sb:
        assert main_memory(sb) == base_memory
        assert sb.call("bump") == 1 and sb.call("bump") == 1
        assert sb.call("touch", 3) == 6  # nothing of the earlier calls survived


def test_a_capture_takes_the_registers_kvm_stored_as_it_completed_the_last_out(snapshots):
    # save_vcpu_state reads regs, sregs and events from the run structure, stored by the KVM_RUN that
    # completes the guest's last `out`: the same bytes the three ioctls return, and calls after it
    # do not pay for storing them.
    with Sandbox(snapshots("touch")) as sb:
        for calls in range(1, 4):
            sb.call("bump", restore=False)
            captured = sb.save_vcpu_state()
            by_ioctl = sb.vcpu.save_state()  # (nothing pending now: every part read by an ioctl)
            assert captured == by_ioctl
            assert sb.vcpu.run_struct.kvm_valid_regs == 0
            child = sb.snapshot()
            assert child.vcpu == captured
        with Sandbox(child) as again:
            assert again.call("bump") == 4  # resumes after the three bumps, from the captured registers


# ---- retained page ranges ----------------------------------------------------------------------


def test_retain_page_ranges_keep_the_parents_bytes(touch_file):
    base = Snapshot.open(touch_file)
    first, fifth = 0x1122334455667788, 0x0102030405060708
    with Sandbox(base) as sb:
        sb.call("write", [0, 4 * PAGE], [first, fifth], restore=False)
        memory = main_memory(sb)
        where = memory.find(first.to_bytes(8, "little"))
        assert where >= 0
        page = (sb.layout.main.start + where) // PAGE * PAGE
        kept = sb.snapshot(retain=[(page, PAGE)])
        everything = sb.snapshot(retain=[(sb.layout.main.start, sb.layout.main.size)])
        with pytest.raises(ValueError, match="page-aligned"):
            sb.snapshot(retain=[(page + 8, PAGE)])
        with pytest.raises(ValueError, match="not inside"):
            sb.snapshot(retain=[(sb.layout.main.end, PAGE)])
        with pytest.raises(TypeError):
            sb.snapshot(retain=[(page, "4096")])
        with pytest.raises(TypeError):
            sb.snapshot(retain=5)
    with Sandbox(kept) as sb:
        assert sb.call("read", 0, 8) == bytes(8)  # the retained page: the parent's bytes
        assert sb.call("read", 4 * PAGE, 8) == fifth.to_bytes(8, "little")  # outside it: the write
    assert everything.stored_bytes() <= 16 * PAGE  # the main slot is all references (system: files table)
    with Sandbox(everything) as sb:
        assert sb.call("read", 4 * PAGE, 8) == bytes(8)


# ---- sharing across processes ---------------------------------------------------------------------


_CHILD = r"""
import sys
import hlpool
sb = hlpool.Sandbox(hlpool.Snapshot.open(sys.argv[1]))
for i in range(int(sys.argv[2])):
    assert sb.call("read", i * 4096, 8) == (1000 + i).to_bytes(8, "little")
print("ready", flush=True)
sys.stdin.readline()
"""


def _smaps(pid: int, path: str) -> dict[str, int]:
    """Totals (KiB) over the mappings of ``path`` in process ``pid``."""
    totals = {"Rss": 0, "Pss": 0, "Shared_Clean": 0, "Private_Clean": 0, "Private_Dirty": 0, "mappings": 0}
    current = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and "-" in parts[0] and not parts[0].endswith(":"):
                current = line.rstrip().endswith(path)
                totals["mappings"] += current
            elif current and parts[0].rstrip(":") in totals:
                totals[parts[0].rstrip(":")] += int(parts[1])
    return totals


def _start(path: str, pages: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, path, str(pages)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        _out, err = proc.communicate(timeout=30)
        pytest.fail(f"child process failed: {err}")
    return proc


def test_snapshot_file_pages_are_shared_across_processes(touch_file, tmp_path):
    pages = 64
    with Sandbox(Snapshot.open(touch_file)) as sb:  # a layer whose pages hold data (not zero runs)
        sb.call("write", [i * PAGE for i in range(pages)], [1000 + i for i in range(pages)], restore=False)
        path = sb.snapshot().persist(tmp_path / "data.hlsnap").path
    procs = []
    try:
        procs.append(_start(path, pages))
        alone = _smaps(procs[0].pid, path)
        procs.append(_start(path, pages))
        first, second = _smaps(procs[0].pid, path), _smaps(procs[1].pid, path)
        for totals in (first, second):
            assert totals["mappings"] >= 1, totals
            assert totals["Shared_Clean"] > 0 and totals["Pss"] < totals["Rss"], totals
        # The data pages both processes read are one copy in the page cache: once the second
        # process maps them, they count as shared in the first and its proportional share falls.
        assert first["Shared_Clean"] > alone["Shared_Clean"], (alone, first)
        assert first["Pss"] <= alone["Pss"] * 3 // 4, (alone, first)
    finally:
        for proc in procs:
            proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_a_forked_childs_copy_of_a_layer_never_closes_the_childs_own_files():
    """The pool's spawner closes the memfd descriptors it inherits, and its children (workers,
    builders) reuse the numbers for files of their own (a vCPU's): a layer object inherited from
    the parent must not close such a number when the child collects or closes it. (It did: a
    builder's vCPU descriptor was closed under it, "Bad file descriptor", in 3 of 6 runs of some
    test orders.)"""
    from hlpool.memory.layers import Layer

    layer = Layer.from_pages([b"\x01" * PAGE])
    layer.view()
    number = layer.fd
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(number)  # as the spawner does with an inherited memfd
            own = os.open("/dev/null", os.O_RDONLY)
            os.dup2(own, number)  # the number is the child's own file now
            layer.close()
            del layer
            os.fstat(number)  # still open
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert os.fstat(layer.fd)  # the parent's own layer is untouched
    layer.close()
    try:  # and its owner still releases it (the number may be another file's by now, not the layer's)
        target = os.readlink(f"/proc/self/fd/{number}")
    except OSError:
        target = ""
    assert not target.startswith("/memfd:hlpool")
