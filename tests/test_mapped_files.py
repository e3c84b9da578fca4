"""Mapped files through their whole life: naming, unmapping, restore, change detection, stage-2 protection."""

from __future__ import annotations

import os

import pytest

from hlpool import GuestError, GuestFault, HlpoolError, Sandbox, Snapshot
from hlpool.errors import SnapshotParentError
from hlpool.memory.mapped_files import MappedFile


@pytest.fixture
def faults_base(snapshots, tmp_path):
    """The `faults` example (read_file(name, n) / write_file(name) use hl_mapped_file), persisted."""
    return snapshots("faults").persist(tmp_path / "faults.hlsnap")


def _file(path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def _mapped(sb, name: str) -> bool:
    try:
        sb.call("read_file", name, 1)
    except GuestError as exc:
        assert "no mapped file named" in str(exc)
        return False
    return True


# ---- the rule: a restore puts the mappings back to the snapshot's ---------------------------------------------


def test_a_mapping_lasts_until_the_next_restore(faults_base, tmp_path):
    data = _file(tmp_path / "data.bin", b"hello world")
    with Sandbox(faults_base) as sb:
        sb.map_file(data)
        assert sb.call("read_file", "data.bin", 5) == b"hello"  # the call sees it...
        assert not _mapped(sb, "data.bin")  # ...and the restore after it unmapped it
        assert sb.mapped_files == ()
        sb.map_file(data)
        sb.restore()  # an explicit restore drops it too
        assert not _mapped(sb, "data.bin")
        sb.map_file(data)  # same name again: the earlier mapping is gone
        with pytest.raises(GuestFault):  # the restore after a failed call drops it as well
            sb.call("null_deref")
        assert not _mapped(sb, "data.bin")


def test_restore_drops_mappings_made_since_the_snapshot_and_a_child_keeps_its_own(faults_base, tmp_path):
    a = _file(tmp_path / "a.txt", b"AAAA")
    b = _file(tmp_path / "b.txt", b"BBBB")
    with Sandbox(faults_base) as sb:
        sb.map_file(a)
        child = sb.snapshot()  # records a.txt
    assert [f.name for f in child.mapped_files] == ["a.txt"]
    with Sandbox(child) as sb:
        for _ in range(3):  # the snapshot's mapping survives every restore
            assert sb.call("read_file", "a.txt", 4) == b"AAAA"
        sb.map_file(b)
        assert [f.name for f in sb.mapped_files] == ["a.txt", "b.txt"]
        sb.restore()
        assert [f.name for f in sb.mapped_files] == ["a.txt"]
        assert not _mapped(sb, "b.txt")
        assert sb.call("read_file", "a.txt", 4) == b"AAAA"
        with pytest.raises(HlpoolError, match="belongs to the snapshot"):
            sb.unmap_file("a.txt")
        with pytest.raises(HlpoolError, match="belongs to the snapshot"):
            sb.unmap_file(a)
        assert sb.call("read_file", "a.txt", 4) == b"AAAA"


def test_unmap_file_by_name_or_path(faults_base, tmp_path):
    a = _file(tmp_path / "a.txt", b"first")
    b = _file(tmp_path / "b.txt", b"second")
    with Sandbox(faults_base) as sb:
        start = sb.layout.files.start
        assert sb.map_file(a)[0] == start
        address_b, _ = sb.map_file(b)
        sb.unmap_file("a.txt")
        assert [f.path for f in sb.mapped_files] == [b]
        sb.unmap_file(b)  # by path
        assert sb.mapped_files == ()
        with pytest.raises(HlpoolError, match="no mapped file"):
            sb.unmap_file("a.txt")
        # slots and addresses are reused; the guest sees only what is mapped now
        assert sb.map_file(b, name="again")[0] == start
        assert sb.map_file(a)[0] == address_b
        sb.unmap_file("again")
        assert sb.call("read_file", "a.txt", 5) == b"first"
        assert not _mapped(sb, "again")


def test_unmap_file_from_a_host_function_is_refused(kvm, tmp_path, example):
    data = _file(tmp_path / "data.bin", b"x")
    seen = []

    def reenter(*args):
        try:
            sb.unmap_file("data.bin")
        except HlpoolError as exc:
            seen.append(str(exc))
        return 0

    with Sandbox.from_elf(example("hostcall"), host_functions={"reenter": reenter}) as sb:
        sb.map_file(data)
        sb.call("ask", "reenter")
        assert seen and "from inside a call" in seen[0]


# ---- names ------------------------------------------------------------------------------------------------------


def test_duplicate_names_are_refused_and_a_mapping_can_be_named(faults_base, tmp_path):
    first = _file(tmp_path / "one" / "data.bin", b"one")
    second = _file(tmp_path / "two" / "data.bin", b"two")
    with Sandbox(faults_base) as sb:
        sb.map_file(first)
        with pytest.raises(HlpoolError, match="already mapped"):
            sb.map_file(second)
        with pytest.raises(HlpoolError, match="already mapped"):
            sb.map_file(second, name="data.bin")
        sb.map_file(second, name="data-two.bin")
        assert [f.name for f in sb.mapped_files] == ["data.bin", "data-two.bin"]
        assert sb.call("read_file", "data.bin", 3) == b"one"


def test_named_mapping_is_found_by_its_name_and_kept_by_snapshots(faults_base, tmp_path):
    data = _file(tmp_path / "data.bin", b"named contents")
    with Sandbox(faults_base) as sb:
        sb.map_file(data, name="model weights v1")
        assert sb.call("read_file", "model weights v1", 5) == b"named"
        sb.map_file(data, name="model weights v1")
        assert not _mapped(sb, "data.bin")  # not under its basename (and this call's restore unmaps it)
        sb.map_file(data, name="model weights v1")
        child = sb.snapshot().persist(tmp_path / "named.hlsnap")
    assert [f.name for f in child.mapped_files] == ["model weights v1"]
    reopened = Snapshot.open(tmp_path / "named.hlsnap")
    assert [(f.name, f.path) for f in reopened.mapped_files] == [("model weights v1", data)]
    with Sandbox(reopened) as sb:
        assert sb.call("read_file", "model weights v1", 5) == b"named"
        with pytest.raises(HlpoolError, match="already mapped"):
            sb.map_file(data, name="model weights v1")


@pytest.mark.parametrize("name", ["", "a/b", "x" * 48, "é" * 24, "tab\there", "nul\0"])
def test_invalid_names_are_refused(faults_base, tmp_path, name):
    data = _file(tmp_path / "data.bin", b"x")
    with Sandbox(faults_base) as sb:
        with pytest.raises(HlpoolError, match="invalid name"):
            sb.map_file(data, name=name)
        assert sb.mapped_files == ()


def test_a_basename_that_cannot_be_a_name_asks_for_one(faults_base, tmp_path):
    data = _file(tmp_path / ("long" * 12 + ".bin"), b"x")  # 52 bytes
    with Sandbox(faults_base) as sb:
        with pytest.raises(HlpoolError, match="pass name="):
            sb.map_file(data)
        sb.map_file(data, name="short.bin")
        assert sb.call("read_file", "short.bin", 1) == b"x"


def test_a_file_recorded_without_a_name_is_named_by_its_basename():
    f = MappedFile(path="/data/" + "n" * 60, guest_address=0, size=1, sha256=b"")
    assert f.name == "n" * 47
    assert MappedFile(path="/data/x.bin", guest_address=0, size=1, sha256=b"", name="y").name == "y"


# ---- a file that changes under a live sandbox --------------------------------------------------------------------


def test_a_file_changed_after_map_file_fails_the_next_call(faults_base, tmp_path):
    data = _file(tmp_path / "data.bin", b"original")
    with Sandbox(faults_base) as sb:
        sb.map_file(data)
        with open(data, "r+b") as f:
            f.write(b"CHANGED!")  # same size, new mtime
        os.utime(data, ns=(os.stat(data).st_atime_ns, os.stat(data).st_mtime_ns + 10**9))
        with pytest.raises(SnapshotParentError, match="changed since map_file.*call was not run"):
            sb.call("read_file", "data.bin", 8)
        with pytest.raises(SnapshotParentError, match="changed"):  # still mapped: every call is refused
            sb.call("read_file", "data.bin", 8)
        sb.unmap_file("data.bin")  # a mapping made since the snapshot can go
        assert not _mapped(sb, "data.bin")
        sb.map_file(data)  # hashed again
        assert sb.call("read_file", "data.bin", 8) == b"CHANGED!"
        sb.map_file(data)
        with open(data, "ab") as f:
            f.write(b"more")  # size differs
        with pytest.raises(SnapshotParentError, match="changed"):
            sb.call("read_file", "data.bin", 8)
        sb.restore()  # drops it as well
        assert not _mapped(sb, "data.bin")


def test_a_snapshot_file_changed_under_a_live_sandbox_fails_calls_until_it_is_back(faults_base, tmp_path):
    original = b"snapshot's file"
    data = _file(tmp_path / "data.bin", original)
    with Sandbox(faults_base) as sb:
        sb.map_file(data)
        child = sb.snapshot()
    st = os.stat(data)
    with Sandbox(child) as sb:
        assert sb.call("read_file", "data.bin", 8) == original[:8]
        with open(data, "r+b") as f:
            f.write(b"X")
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        for _ in range(2):
            with pytest.raises(SnapshotParentError, match="changed since the snapshot"):
                sb.call("read_file", "data.bin", 8)
            sb.restore()  # does not help: the file is the snapshot's
        with pytest.raises(HlpoolError, match="belongs to the snapshot"):
            sb.unmap_file("data.bin")
        with open(data, "r+b") as f:  # put the file back as it was (contents and mtime)
            f.write(original[:1])
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert sb.call("read_file", "data.bin", 8) == original[:8]


# ---- stage 2: the files window is read-only whatever the guest's own page tables say ----------------------------


@pytest.fixture
def leaks_elf(kvm, test_guest):
    return test_guest("leaks")


def test_the_files_window_is_read_only_at_stage_2(leaks_elf, tmp_path):
    """``phys_write`` loads the guest's own identity page tables (every page present and writable) and
    writes: the write must still fault, on the mapped file and on the unmapped rest of the window."""
    data = os.urandom(3 * 4096)
    path = _file(tmp_path / "data.bin", data)
    with Sandbox.from_elf(leaks_elf, timeout=5) as sb:
        window = sb.layout.files
        address, _ = sb.map_file(path)
        assert address == window.start and address + 65 * 4096 < 4 << 30  # phys_write reaches the first 4 GiB
        with pytest.raises(GuestFault, match=f"write to {address + 4096 + 8:#x} .*read-only mapped file {path}") as e:
            sb.call("phys_write", address + 4096 + 8)
        assert e.value.vector is None  # KVM refused the write (stage 2), not the guest's page tables (#PF)
        assert open(path, "rb").read() == data
        sb.map_file(path)
        with pytest.raises(GuestFault, match="unmapped part of the files window"):
            sb.call("phys_write", address + 64 * 4096)
        # after the restore the file's slot is gone: the same address is now the unmapped window
        with pytest.raises(GuestFault, match="unmapped part of the files window"):
            sb.call("phys_write", address + 8)
        assert sb.call("cpu_features") in (0, 1, 2, 3)
    assert open(path, "rb").read() == data


# ---- a snapshot moves with its data; a search path; always verified by hash ---------------------------------


def _snapshot_with_file(faults_base, directory, content: bytes):
    """A child of faults_base that maps directory/data.bin, persisted in directory (parents beside it)."""
    data = _file(directory / "data.bin", content)
    with Sandbox(faults_base) as sb:
        sb.map_file(data)
        sb.call("read_file", "data.bin", 1, restore=False)
        child = sb.snapshot()
    return child.persist(directory / "child.hlsnap").path


def test_a_directory_holding_a_snapshot_and_its_files_can_move(faults_base, tmp_path):
    import shutil

    snap_dir = tmp_path / "bundle"
    _snapshot_with_file(faults_base, snap_dir, b"moving data")
    moved = tmp_path / "elsewhere"
    shutil.move(str(snap_dir), moved)  # the parent (tmp_path/faults.hlsnap) is named relative: "../faults.hlsnap"
    assert not os.path.exists(snap_dir / "data.bin")  # the recorded absolute path is gone
    snap = Snapshot.open(moved / "child.hlsnap")
    assert snap.mapped_files[0].path == str(moved / "data.bin")
    with Sandbox(snap) as sb:
        assert sb.call("read_file", "data.bin", 6) == b"moving"


def test_a_search_path_finds_a_moved_file_by_name_and_checks_its_hash(faults_base, tmp_path):
    path = _snapshot_with_file(faults_base, tmp_path / "snap", b"searched data")
    store = tmp_path / "files"
    store.mkdir()
    os.rename(tmp_path / "snap" / "data.bin", store / "data.bin")
    with pytest.raises(SnapshotParentError, match="is not available"):
        Snapshot.open(path)
    snap = Snapshot.open(path, files_path=[tmp_path / "nothing-here", store])
    assert snap.mapped_files[0].path == str(store / "data.bin")
    with Sandbox(snap) as sb:
        assert sb.call("read_file", "data.bin", 8) == b"searched"
    (store / "data.bin").write_bytes(b"other content")  # a file of that name but not the one recorded
    with pytest.raises(SnapshotParentError, match="changed since the snapshot was taken"):
        Snapshot.open(path, files_path=[store])
