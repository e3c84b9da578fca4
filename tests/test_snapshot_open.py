"""Opening snapshot files (issue 11, cold tenants): the fast reader keeps every check.

The reader reads a small file whole into a per-thread buffer and decodes its metadata against a
schema; bigger files are read in chunks. These tests run both paths over real files (a C child
layered on a base, as a tenant is) and check that hostile files are refused by both, with the
same error classes and words, and that processes forked after an open do not share the buffer.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import time
import zlib

import msgspec
import pytest

from hlpool import (
    Sandbox,
    Snapshot,
    SnapshotCompatibilityError,
    SnapshotError,
    SnapshotFormatError,
    SnapshotIntegrityError,
    SnapshotParentError,
)
from hlpool.guest.layout import PAGE
from hlpool.snapshot import snapfile

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module")
def family(tmp_path_factory, snapshots):
    """(base path, child path): a child of the touch guest (bump ran once), persisted with its base."""
    directory = tmp_path_factory.mktemp("family")
    with Sandbox(snapshots("touch")) as sb:
        sb.call("bump", restore=False)
        child = sb.snapshot().persist(directory / "child.hlsnap")
    return child.layers[0].path, child.path


@pytest.fixture(params=["whole", "chunks"])
def read_path(request, monkeypatch):
    """Which reader opens the files: one read into the thread's buffer, or chunks (as for big files)."""
    monkeypatch.setattr(snapfile, "READ_WHOLE_LIMIT", 1 << 30 if request.param == "whole" else 0)
    return request.param


def _copy(src: str, dst) -> str:
    shutil.copyfile(src, dst)
    return str(dst)


def _reseal(raw: bytearray) -> bytes:
    """Fix the content hash and header CRC after a change, as a careful forger would."""
    h = snapfile.HEADER.unpack_from(raw, 0)
    fields = list(h)
    fields[9] = hashlib.sha256(bytes(raw[h[6]:])).digest()
    snapfile.HEADER.pack_into(raw, 0, *fields)
    struct.pack_into("<I", raw, snapfile.HEADER_CRC_OFFSET, zlib.crc32(bytes(raw[:snapfile.HEADER_CRC_OFFSET])))
    return bytes(raw)


def _with_meta(raw: bytes, change) -> bytes:
    h = snapfile.HEADER.unpack_from(raw, 0)
    meta = msgspec.msgpack.decode(raw[h[4]:])
    change(meta)
    out = bytearray(raw[:h[4]]) + msgspec.msgpack.encode(meta)
    fields = list(h)
    fields[5], fields[8] = len(out) - h[4], len(out)
    snapfile.HEADER.pack_into(out, 0, *fields)
    return _reseal(out)


def test_both_readers_open_the_same_snapshot(family, tmp_path, read_path):
    base, child = family
    reference = Snapshot.open(child)
    _copy(base, tmp_path / os.path.basename(base))  # children find their parent by a relative path
    parents: dict = {}
    snap = Snapshot.open(_copy(child, tmp_path / "child.hlsnap"), parents={})
    again = Snapshot.open(_copy(child, tmp_path / "again.hlsnap"), parents=parents)
    for s in (snap, again):
        assert s.runs == reference.runs and s.vcpu == reference.vcpu and s.exports == reference.exports
        assert s.layout is reference.layout  # layouts are shared values
        assert [lay.sha256 for lay in s.layers] == [lay.sha256 for lay in reference.layers]
    assert list(parents) == [reference.layers[0].sha256]  # the base, opened once and kept
    with Sandbox(again) as sb:
        assert sb.call("bump") == 2


@pytest.mark.parametrize("where", ["data", "meta"])
def test_both_readers_refuse_tampered_bytes(family, tmp_path, read_path, where):
    _base, child = family
    raw = bytearray(open(child, "rb").read())
    h = snapfile.HEADER.unpack_from(raw, 0)
    raw[PAGE + 5 if where == "data" else h[4] + 5] ^= 0x40
    path = tmp_path / "tampered.hlsnap"
    path.write_bytes(bytes(raw))
    with pytest.raises(SnapshotIntegrityError, match="content hash mismatch"):
        Snapshot.open(path)


def test_both_readers_refuse_truncated_and_extended_files(family, tmp_path, read_path):
    _base, child = family
    raw = open(child, "rb").read()
    for n, data in enumerate([raw[:10], raw[:PAGE], raw[:-1], raw + b"\0"]):
        path = tmp_path / f"cut{n}.hlsnap"
        path.write_bytes(data)
        with pytest.raises(SnapshotFormatError, match="too short|truncated|trailing data"):
            Snapshot.open(path)


def test_a_parent_that_is_not_the_recorded_one_is_refused(family, tmp_path, read_path):
    base, child = family
    _copy(child, tmp_path / "child.hlsnap")
    # the parent's path recorded in the child is relative: put a different (valid) snapshot there
    other = _with_meta(open(base, "rb").read(), lambda m: m["info"].update(forged=1))
    (tmp_path / os.path.basename(base)).write_bytes(other)
    with pytest.raises(SnapshotParentError, match="not the parent"):
        Snapshot.open(tmp_path / "child.hlsnap")


@pytest.mark.parametrize("change, message", [
    (lambda m: m["vcpu"].pop("msrs"), "vCPU MSR list is malformed"),
    (lambda m: m["vcpu"].__setitem__("sregs", "text"), "vCPU field 'sregs' is malformed"),
    (lambda m: m["vcpu"].__setitem__("xsave", b"\0" * 512), "XSAVE area has an unexpected size"),
    (lambda m: m.__setitem__("vcpu", 7), "vCPU state is malformed"),
    (lambda m: m["runs"].pop("system"), "runs of slot system are malformed"),
    (lambda m: m["runs"].__setitem__("main", 5), "runs of slot main are malformed"),
    (lambda m: m["runs"]["main"][0].__setitem__(1, True), "a run of slot main is malformed"),
    (lambda m: m["runs"]["main"][0].__setitem__(0, 1.0), "a run of slot main is malformed"),
    (lambda m: m["runs"]["main"].append([0, 1, 0, 0, 0]), "a run of slot main is malformed"),
    (lambda m: m["runs"]["main"].pop(), "main slot: runs cover"),
    (lambda m: m["runs"]["system"][0].__setitem__(3, PAGE + 1), "system slot: run at page 0 points outside"),
    (lambda m: m.__setitem__("image_size", True), "'image_size' is missing or has the wrong type"),
    (lambda m: m.pop("exports"), "'exports' is missing or has the wrong type"),
    (lambda m: m.__setitem__("exports", [1]), "export list is malformed"),
    (lambda m: m.__setitem__("exports", ["x" * 64]), "export list is malformed"),
    (lambda m: m.__setitem__("image_segments", [[0, 1]]), "image segment list is malformed"),
    (lambda m: m["requires"].__setitem__("xsave", [[2, 576]]), "'requires.xsave' is malformed"),
    (lambda m: m.__setitem__("parents", {}), "'parents' is missing or has the wrong type"),
    (lambda m: m.__setitem__("mapped_files", [7]), "mapped file entry is malformed"),
    (lambda m: m.__setitem__("config", []), "'config' is missing or has the wrong type"),
    (lambda m: m["requires"].__setitem__("abi", "2"), "'requires.abi' is missing or has the wrong type"),
    (lambda m: m["requires"].pop("kvm"), "'requires.kvm' is missing or has the wrong type"),
    (lambda m: m["vcpu"].__setitem__("debugregs", b"\xff" * 128), "debug registers are malformed"),
])
def test_forged_metadata_is_refused_in_the_format_s_words(family, tmp_path, read_path, change, message):
    base, child = family
    _copy(base, tmp_path / os.path.basename(base))  # so that a file whose metadata parses finds its parent
    path = tmp_path / "forged.hlsnap"
    path.write_bytes(_with_meta(open(child, "rb").read(), change))
    with pytest.raises(SnapshotFormatError, match=message) as info:
        Snapshot.open(path)
    assert str(info.value).startswith(f"{path}: ")


def test_a_file_of_another_hlpool_says_so_even_if_its_metadata_differs(family, tmp_path, read_path):
    """What a file needs is checked before the rest of its metadata: a file written by a later hlpool,
    whose metadata this one would not understand, is refused as incompatible, not as malformed."""
    _base, child = family

    def later(m):
        m["requires"]["hlpool"] = "99.0.0"
        m["runs"] = {"encoding": "v2", "data": b"..."}

    path = tmp_path / "later.hlsnap"
    path.write_bytes(_with_meta(open(child, "rb").read(), later))
    with pytest.raises(SnapshotCompatibilityError, match="written by hlpool 99.0.0"):
        Snapshot.open(path)
    path.write_bytes(_with_meta(open(child, "rb").read(), lambda m: m["runs"].update(main={"v": 2})))
    with pytest.raises(SnapshotFormatError, match="runs of slot main are malformed"):
        Snapshot.open(path)


def test_metadata_that_is_not_a_map_is_refused(family, tmp_path, read_path):
    _base, child = family
    raw = open(child, "rb").read()
    h = snapfile.HEADER.unpack_from(raw, 0)
    out = bytearray(raw[:h[4]]) + msgspec.msgpack.encode([msgspec.msgpack.decode(raw[h[4]:])])
    fields = list(h)
    fields[5], fields[8] = len(out) - h[4], len(out)
    snapfile.HEADER.pack_into(out, 0, *fields)
    path = tmp_path / "list.hlsnap"
    path.write_bytes(_reseal(out))
    with pytest.raises(SnapshotFormatError, match=r"malformed metadata \(not a map\)"):
        Snapshot.open(path)


def test_unknown_metadata_keys_are_ignored(family, tmp_path, read_path):
    """A newer writer may add keys; what this reader needs is all there."""
    base, child = family
    _copy(base, tmp_path / os.path.basename(base))
    path = tmp_path / "extra.hlsnap"
    path.write_bytes(_with_meta(open(child, "rb").read(), lambda m: m.update(later={"x": [1]})))
    with Sandbox(Snapshot.open(path)) as sb:
        assert sb.call("bump") == 2


def test_processes_forked_after_an_open_read_with_their_own_buffer(family, tmp_path):
    """The read buffer is kept per thread; a process forked after it exists must get its own copy
    (a shared mapping would let a sibling's read overwrite the bytes being hashed)."""
    base, child = family
    Snapshot.open(child)  # this thread's buffer exists before the fork
    copies = []
    for n in range(3):
        directory = tmp_path / f"p{n}"
        directory.mkdir()
        _copy(base, directory / os.path.basename(base))
        copies.append([_copy(child, directory / f"c{i}.hlsnap") for i in range(150)])
    pids = []
    for n in (1, 2):
        pid = os.fork()
        if pid == 0:  # the child: open its own copies (each a first open: read and hashed), report by status
            status = 0
            try:
                for path in copies[n]:
                    Snapshot.open(path, parents={}).layers[-1].close()
            except BaseException:
                status = 1
            os._exit(status)
        pids.append(pid)
    failures = []
    for path in copies[0]:
        try:
            Snapshot.open(path, parents={}).layers[-1].close()
        except SnapshotError as exc:
            failures.append(str(exc))
    deadline = time.monotonic() + 60
    statuses = []
    for pid in pids:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                statuses.append(os.waitstatus_to_exitcode(status))
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                statuses.append("timeout")
                break
            time.sleep(0.01)
    assert failures == [] and statuses == [0, 0]


def test_a_snapshots_runs_are_kept_compactly_and_read_as_runs():
    from hlpool.memory.layers import Run, RunList

    runs = [Run(0, 3, 0, 0), Run(3, 1, -1, 0), Run(4, 60, 1, 8192), Run(64, 2**20, 0, 2**40)]
    kept = RunList(runs)
    assert len(kept) == 4 and list(kept) == runs and kept == runs and kept == RunList(runs)
    assert kept[2] == Run(4, 60, 1, 8192) and kept[-1].end_page == 64 + 2**20
    assert kept[1:3] == runs[1:3]
    assert kept != runs[:3] and kept != RunList(runs[:3])
    with pytest.raises(IndexError):
        kept[4]
    assert len(kept.flat) == 16  # four int64 a run, no per-run objects
