"""Snapshots: persistence, validation of hostile files, sharing, exact restore, layers, mapped files."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import zlib

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hlpool import (
    GuestFault,
    RestorePolicy,
    Sandbox,
    Snapshot,
    SnapshotError,
    SnapshotFormatError,
    SnapshotIntegrityError,
    SnapshotParentError,
    SnapshotTooLargeError,
    SnapshotVersionError,
)
from hlpool.guest.layout import PAGE
from hlpool.snapshot import snapfile

pytestmark = pytest.mark.kvm


def file_hash(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def main_memory(sb: Sandbox) -> bytes:
    main = sb.layout.main
    return sb.memory.read(main.start, main.size)


@pytest.fixture(scope="module")
def touch_file(tmp_path_factory, snapshots):
    path = tmp_path_factory.mktemp("snap") / "touch.hlsnap"
    return snapshots("touch").persist(path).path


# ---- persist and open ------------------------------------------------------------------


def test_persist_is_atomic_and_read_only(snapshots, tmp_path):
    path = tmp_path / "echo.hlsnap"
    snap = snapshots("echo").persist(path)
    assert snap.path == str(path) and snap.persisted
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o444
    assert os.listdir(tmp_path) == ["echo.hlsnap"]  # no temporary file left behind
    with Sandbox(snap) as sb:
        assert sb.call("echo", "from file") == "from file"
    reopened = Snapshot.open(path)
    assert reopened.exports == ("echo", "noop")
    assert reopened.regions == snap.regions
    with Sandbox(reopened) as sb:
        assert sb.call("echo", [1, b"2"]) == [1, b"2"]


def test_persisting_a_child_persists_its_in_memory_parents_first(snapshots, tmp_path):
    """(Issue 15: this used to be refused with "persist the parent snapshot first".)"""
    with Sandbox(snapshots("touch")) as sb:
        sb.call("bump", restore=False)
        child = sb.snapshot()
    saved = child.persist(tmp_path / "child.hlsnap")
    assert saved.layers[0].path == str(tmp_path / "child.parent-0.hlsnap")
    with Sandbox(Snapshot.open(tmp_path / "child.hlsnap")) as sb:
        assert sb.call("bump") == 2  # the child's state: bump ran once before the snapshot


def test_opened_snapshot_runs_in_another_process(touch_file):
    import subprocess
    import sys

    code = ("import hlpool; sb = hlpool.Sandbox(hlpool.Snapshot.open(%r)); "
            "print(sb.call('touch', 3), sb.call('bump'))" % touch_file)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["6", "1"]


# ---- hostile snapshot files ------------------------------------------------------------------


def _rewrite_header(raw: bytearray, **fields) -> bytearray:
    names = ["magic", "version", "header_size", "flags", "meta_offset", "meta_size", "data_offset", "data_size",
             "file_size", "content_sha256", "crc"]
    values = dict(zip(names, snapfile.HEADER.unpack_from(raw, 0)))
    values.update(fields)
    snapfile.HEADER.pack_into(raw, 0, *(values[n] for n in names))
    struct.pack_into("<I", raw, snapfile.HEADER_CRC_OFFSET, zlib.crc32(bytes(raw[:snapfile.HEADER_CRC_OFFSET])))
    return raw


def _rewrite_meta(raw: bytearray, change) -> bytearray:
    """Change the metadata and fix every checksum, as a careful forger would."""
    h = snapfile.HEADER.unpack_from(raw, 0)
    meta_offset, data_offset = h[4], h[6]
    meta = msgspec.msgpack.decode(bytes(raw[meta_offset:]))
    change(meta)
    meta_bytes = msgspec.msgpack.encode(meta)
    out = bytearray(raw[:meta_offset]) + meta_bytes
    content = hashlib.sha256(bytes(out[data_offset:])).digest()
    return _rewrite_header(out, meta_size=len(meta_bytes), file_size=len(out), content_sha256=content)


def _write(path, data) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def test_truncated_files_are_rejected(touch_file, tmp_path):
    raw = open(touch_file, "rb").read()
    for cut in [0, 7, 100, PAGE - 1, PAGE, PAGE + 1, len(raw) // 2, len(raw) - 100, len(raw) - 1]:
        with pytest.raises(SnapshotFormatError, match="truncated|not an hlpool snapshot|too short"):
            Snapshot.open(_write(tmp_path / f"cut{cut}.hlsnap", raw[:cut]))


def test_trailing_garbage_is_rejected(touch_file, tmp_path):
    raw = open(touch_file, "rb").read()
    with pytest.raises(SnapshotFormatError, match="trailing data"):
        Snapshot.open(_write(tmp_path / "long.hlsnap", raw + b"x"))


@pytest.mark.parametrize("where", ["data", "meta", "header"])
def test_tampered_bytes_are_detected(touch_file, tmp_path, where):
    raw = bytearray(open(touch_file, "rb").read())
    offset = {"data": PAGE + 123, "meta": len(raw) - 10, "header": 40}[where]
    raw[offset] ^= 0x40
    with pytest.raises(SnapshotIntegrityError):
        Snapshot.open(_write(tmp_path / "bad.hlsnap", raw))


def test_wrong_magic_and_version(touch_file, tmp_path):
    raw = bytearray(open(touch_file, "rb").read())
    with pytest.raises(SnapshotFormatError, match="bad magic"):
        Snapshot.open(_write(tmp_path / "m.hlsnap", _rewrite_header(bytearray(raw), magic=b"NOTSNAP!")))
    with pytest.raises(SnapshotVersionError, match="format version 2"):
        Snapshot.open(_write(tmp_path / "v.hlsnap", _rewrite_header(bytearray(raw), version=2)))


def test_over_large_files_are_rejected(touch_file, tmp_path):
    raw = bytearray(open(touch_file, "rb").read())
    with pytest.raises(SnapshotTooLargeError):
        Snapshot.open(_write(tmp_path / "big.hlsnap", _rewrite_header(bytearray(raw), file_size=1 << 50)))
    with pytest.raises(SnapshotTooLargeError, match="guest memory"):
        Snapshot.open(touch_file, max_memory=1 << 20)
    huge = _rewrite_meta(bytearray(raw), lambda m: m["config"].update(heap_size=60 << 30))
    with pytest.raises((SnapshotTooLargeError, SnapshotFormatError)):
        Snapshot.open(_write(tmp_path / "heap.hlsnap", huge))


@pytest.mark.parametrize("change, message", [
    (lambda m: m["runs"]["main"].pop(), "runs cover"),
    (lambda m: m["runs"]["main"][0].__setitem__(2, 7), "missing layer"),
    (lambda m: m["runs"]["main"][0].__setitem__(3, 1 << 40), "outside layer"),
    (lambda m: m["runs"]["system"].insert(0, [0, 1, -1, 0]), "do not tile"),
    (lambda m: m.__setitem__("exports", [1, 2]), "export list"),
    (lambda m: m["vcpu"].__setitem__("regs", b"short"), "vCPU field 'regs'"),
    (lambda m: m["vcpu"].__setitem__("msrs", [[1]]), "MSR list"),
    (lambda m: m.__setitem__("config", {"heap_size": "big"}), "memory configuration"),
    (lambda m: m.__setitem__("parents", [{"path": "x"}]), "parent reference"),
    (lambda m: m.pop("runs"), "'runs'"),
])
def test_forged_metadata_is_rejected(touch_file, tmp_path, change, message):
    raw = _rewrite_meta(bytearray(open(touch_file, "rb").read()), change)
    with pytest.raises(SnapshotError, match=message):
        Snapshot.open(_write(tmp_path / "forged.hlsnap", raw))


def test_not_a_file(tmp_path):
    with pytest.raises(SnapshotError, match="no such file"):
        Snapshot.open(tmp_path / "missing.hlsnap")


# ---- files that change ------------------------------------------------------------------


def test_snapshot_files_are_never_modified_by_sandboxes(touch_file):
    before = file_hash(touch_file)
    snap = Snapshot.open(touch_file)
    boxes = [Sandbox(snap) for _ in range(3)]
    for sb in boxes:
        for n in (1, 50, 500):
            sb.call("touch", n)
        sb.call("write", [0, 8, 4096 * 100], [1, 2, 3], restore=False)
        sb.restore()
    for sb in boxes:
        sb.close()
    assert file_hash(touch_file) == before


def test_snapshot_file_changed_after_open_is_noticed(snapshots, tmp_path):
    path = tmp_path / "victim.hlsnap"
    snap = snapshots("echo").persist(path)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(PAGE + 10)
        f.write(b"\xff")
    with pytest.raises(SnapshotIntegrityError, match="modified after it was verified"):
        Sandbox(snap)
    with pytest.raises(SnapshotIntegrityError):
        Snapshot.open(path)


# ---- sharing ---------------------------------------------------------------------------


def _smaps_for(path: str) -> dict[str, int]:
    totals = {"Rss": 0, "Shared_Clean": 0, "Private_Clean": 0, "Private_Dirty": 0, "mappings": 0}
    current = False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and "-" in parts[0] and not parts[0].endswith(":"):
                current = line.rstrip().endswith(path)
                if current:
                    totals["mappings"] += 1
            elif current and parts[0].rstrip(":") in totals:
                totals[parts[0].rstrip(":")] += int(parts[1])
    return totals


def test_sandboxes_share_snapshot_pages_through_the_page_cache(kvm, example, tmp_path):
    path = str(tmp_path / "sha.hlsnap")
    snap = Snapshot.from_elf(example("sha256")).persist(path)
    boxes = [Sandbox(snap) for _ in range(6)]
    try:
        for sb in boxes:
            assert sb.call("sha256", b"abc") == hashlib.sha256(b"abc").hexdigest()
        totals = _smaps_for(path)
        # The image and data pages every sandbox read are one copy, mapped by all six.
        assert totals["Shared_Clean"] >= 6 * 8, totals
        # Each sandbox owns only the few file pages it wrote (copy-on-write), far
        # fewer than it maps; a private copy of the snapshot would be all of them.
        per_sandbox_private = (totals["Private_Dirty"] + totals["Private_Clean"]) / len(boxes)
        assert per_sandbox_private <= 16 * 4, totals  # KiB
        assert totals["Rss"] > per_sandbox_private * 3
    finally:
        for sb in boxes:
            sb.close()


# ---- exact restore -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def touch_reference(snapshots):
    with Sandbox(snapshots("touch")) as fresh:
        yield main_memory(fresh)


writes = st.lists(st.tuples(st.integers(0, 3000 * PAGE // 8 - 1), st.integers(-(2**63), 2**63 - 1)),
                  min_size=1, max_size=60)


@pytest.mark.parametrize("keep, ring", [(0, 4096), (8, 256), (100_000, 0)],
                         ids=["drop-all", "mixed-small-ring", "copy-all-bitmaps"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pattern=writes)
def test_restore_is_exact(snapshots, touch_reference, keep, ring, pattern):
    policy = RestorePolicy(keep_resident_pages=keep, dirty_ring_entries=ring, dirty_log="ring" if ring else "bitmap")
    with Sandbox(snapshots("touch"), restore_policy=policy) as sb:
        offsets = [w * 8 for w, _ in pattern]
        values = [v for _, v in pattern]
        sb.call("write", offsets, values)  # restored automatically
        assert main_memory(sb) == touch_reference
        sb.call("write", offsets, values, restore=False)
        assert main_memory(sb) != touch_reference
        stats = sb.restore()
        assert stats.dirty >= len({o // PAGE for o in offsets})
        assert stats.copied + stats.dropped == stats.dirty
        assert main_memory(sb) == touch_reference
        assert sb.call("touch", 3) == 6  # pages read 0 (nothing survived), then 1, 2, 3 written


def test_restore_is_exact_across_dirty_ring_full_exits(snapshots, touch_reference):
    with Sandbox(snapshots("touch"), restore_policy=RestorePolicy(dirty_ring_entries=512,
                                                                          dirty_log="ring")) as sb:
        assert sb.vm.dirty_ring_entries == 512
        assert sb.call("touch", 2000, 7) == sum(7 + i for i in range(2000))  # several ring-full exits
        assert sb.last_restore.dirty >= 2000
        assert main_memory(sb) == touch_reference
        assert sb.call("touch", 2000, 7) == sum(7 + i for i in range(2000))  # nothing survived


def test_restore_cost_follows_dirty_pages_not_memory(snapshots):
    with Sandbox(snapshots("touch"), restore_policy=RestorePolicy(keep_resident_pages=64)) as sb:
        sb.call("touch", 1)
        small = sb.last_restore.dirty
        sb.call("touch", 300)
        big = sb.last_restore
        assert big.dirty - small >= 299
        assert big.resident == 64 and big.dropped == big.dirty - big.copied


# ---- layered snapshots ----------------------------------------------------------------------


def test_three_layers_behave_like_the_live_sandbox(touch_file, tmp_path):
    base = Snapshot.open(touch_file)
    snap = base
    expected_memory = None
    for level in range(3):
        with Sandbox(snap) as sb:
            sb.call("write", [level * PAGE * 100, 8 + level * PAGE * 7], [level + 10, level + 20], restore=False)
            sb.call("bump", restore=False)
            child = sb.snapshot()
            expected_memory = main_memory(sb)
        snap = child.persist(tmp_path / f"layer{level}.hlsnap")
        assert snap.depth == level + 2
        assert snap.stored_bytes() < 64 * PAGE  # only what changed
    reopened = Snapshot.open(tmp_path / "layer2.hlsnap")
    assert [layer.path for layer in reopened.layers] == [touch_file] + [
        str(tmp_path / f"layer{i}.hlsnap") for i in range(3)]
    with Sandbox(reopened) as sb:
        assert main_memory(sb) == expected_memory
        assert sb.call("bump") == 4  # three bumps survived, one more now
        assert sb.call("read", 200 * PAGE, 8) == (12).to_bytes(8, "little")
        assert sb.call("bump") == 4  # and every call starts from the layer


def test_layers_keep_clean_pages_as_references(touch_file):
    base = Snapshot.open(touch_file)
    with Sandbox(base) as sb:
        sb.call("write", [0], [1], restore=False)
        child = sb.snapshot()
    base_pages = sum(r.count for r in base.runs["main"] if r.layer == 0)
    referenced = sum(r.count for r in child.runs["main"] if r.layer == 0)
    copied = sum(r.count for r in child.runs["main"] if r.layer == 1)
    assert copied <= 16 and referenced >= base_pages - copied
    assert child.stored_bytes() == copied * PAGE


def test_many_scattered_writes_keep_mappings_bounded(touch_file):
    with Sandbox(Snapshot.open(touch_file)) as sb:
        offsets = [i * 2 * PAGE for i in range(1200)]
        sb.call("write", offsets, list(range(1200)), restore=False)
        child = sb.snapshot()
        expected = main_memory(sb)
    assert len(child.runs["main"]) <= 64
    with Sandbox(child) as sb:
        assert main_memory(sb) == expected


def test_retain_is_honoured(touch_file):
    base = Snapshot.open(touch_file)
    heap = base.layout.heap
    with Sandbox(base) as sb:
        sb.call("write", [0, 4 * PAGE], [7, 8], restore=False)
        seen = []

        def keep_heap(region):
            seen.append(region.area)
            return True if region.area == "heap" else None

        kept = sb.snapshot(retain=keep_heap)
        copied = sb.snapshot(retain=lambda r: False if r.area == "image" else None)
    assert "heap" in seen and "image" in seen
    with Sandbox(kept) as sb:  # the heap writes were discarded: the parent's bytes stayed
        assert sb.call("read", 0, 8) == bytes(8)
    with Sandbox(copied) as sb:
        assert sb.call("read", 0, 8) == (7).to_bytes(8, "little")
    image_layer = [r for r in copied.regions if r.area == "image" and r.backing != "anonymous"]
    assert all(r.layer == 1 for r in image_layer)
    assert heap.size > 0
    with pytest.raises(TypeError):
        with Sandbox(base) as sb:
            sb.snapshot(retain=lambda r: "yes")


def test_missing_or_changed_parent_is_rejected(snapshots, tmp_path):
    parent_path = tmp_path / "parent.hlsnap"
    parent = snapshots("touch").persist(parent_path)
    with Sandbox(parent) as sb:
        sb.call("bump", restore=False)
        sb.snapshot().persist(tmp_path / "child.hlsnap")
    Snapshot.open(tmp_path / "child.hlsnap")
    os.rename(parent_path, tmp_path / "moved.hlsnap")
    with pytest.raises(SnapshotParentError, match="no such snapshot file"):
        Snapshot.open(tmp_path / "child.hlsnap")
    snapshots("echo").persist(parent_path)  # a different snapshot where the parent was
    with pytest.raises(SnapshotParentError, match="not the parent"):
        Snapshot.open(tmp_path / "child.hlsnap")


# ---- mapped files -----------------------------------------------------------------------------


def test_mapped_files_are_read_only_shared_and_referenced(snapshots, tmp_path):
    data_path = tmp_path / "data.bin"
    data = os.urandom(3 * 1024 * 1024 + 123)
    data_path.write_bytes(data)
    base = snapshots("faults").persist(tmp_path / "faults.hlsnap")
    with Sandbox(base) as sb:
        address, size = sb.map_file(str(data_path))
        assert size == len(data) and address == sb.layout.files.start
        assert sb.call("read_file", "data.bin", 100) == data[:100]  # the restore after it unmaps the file
        sb.map_file(str(data_path))
        with pytest.raises(GuestFault, match=f"read-only mapped file {data_path}"):
            sb.call("write_file", "data.bin")
        address, _ = sb.map_file(str(data_path))
        second = tmp_path / "second.txt"
        second.write_text("second file")
        address2, _ = sb.map_file(str(second))
        assert address2 > address
        with pytest.raises(Exception, match="not a regular, non-empty file"):
            sb.map_file(str(tmp_path))
        child = sb.snapshot().persist(tmp_path / "with-files.hlsnap")
    assert child.stored_bytes() < 64 * PAGE  # referenced, never copied
    assert [f.path for f in child.mapped_files] == [str(data_path), str(second)]
    with Sandbox(Snapshot.open(tmp_path / "with-files.hlsnap")) as sb:
        assert sb.call("read_file", "data.bin", 50) == data[:50]
        assert sb.call("read_file", "data.bin", 10) == data[:10]  # the snapshot's mappings survive restores
        assert sb.call("read_file", "second.txt", 6) == b"second"
    data_path.write_bytes(data[:-1] + b"!")
    with pytest.raises(SnapshotParentError, match="changed"):
        Snapshot.open(tmp_path / "with-files.hlsnap")
    with pytest.raises(SnapshotParentError, match="changed"):
        Sandbox(child)


def test_hot_pages_are_always_copied_back_outside_the_budget(snapshots):
    for keep in (0, 10):
        with Sandbox(snapshots("touch"), restore_policy=RestorePolicy(keep_resident_pages=keep)) as sb:
            sb.call("touch", 100)  # fills (or exceeds) the residency budget
            sb.call("touch", 0)    # writes only the call page and the top of the stack
            stats = sb.last_restore
            assert stats.copied >= 3, stats  # the call page and two stack pages, never dropped
