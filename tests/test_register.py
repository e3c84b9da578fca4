"""Script registration's write path: a captured layer written straight from memory into its file,
atomic publication (nothing partial ever named in the store), and the store's usage scans.

Real parts only: real KVM sandboxes of the QuickJS and Lua interpreter bases, real snapshot files
on the real file system, a real child process whose writes hit a real RLIMIT_FSIZE.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hlpool import Sandbox, Snapshot
from hlpool.pool.store import SnapshotStore
from hlpool.sandbox import scripts
from hlpool.snapshot import snapwrite
from hlpool.snapshot.snapfile import HEADER, write_snapshot, write_snapshot_file
from hlpool.snapshot.snapwrite import PendingLayer

pytestmark = pytest.mark.kvm

SOURCES = {
    "js": "let calls = 0; let big = 'x'.repeat(20000);\n"
          "function who(x) { calls += 1; return [7, calls, x, big.length]; }",
    "lua": "local calls = 0\nlocal big = string.rep('x', 20000)\n"
           "function who(x) calls = calls + 1; return {7, calls, x, #big} end",
}


def _data(path: Path) -> bytes:
    raw = path.read_bytes()
    fields = HEADER.unpack_from(raw, 0)
    data_offset, data_size = fields[6], fields[7]
    return raw[data_offset:data_offset + data_size]


@pytest.mark.parametrize("language", ["js", "lua"])
def test_a_layer_written_from_memory_is_what_the_memfd_path_gives(tmp_path, language):
    base = scripts.persisted_base_snapshot(language, tmp_path)
    with Sandbox(base) as sb:
        sb.call("load", SOURCES[language], restore=False)
        child = sb.snapshot()
    top = child.layers[-1]
    assert isinstance(top, PendingLayer) and top.pending_chunks() is not None  # no memfd made yet
    direct = write_snapshot(child, str(tmp_path / "direct.hlsnap"), sync=False)
    assert top.pending_chunks() is not None, "writing the file must not need a memfd"
    assert top.fd >= 0 and top.pending_chunks() is None  # now a sealed memfd, as a sandbox needs
    streamed = write_snapshot(child, str(tmp_path / "streamed.hlsnap"), sync=False)  # read back from the memfd
    assert _data(tmp_path / "direct.hlsnap") == _data(tmp_path / "streamed.hlsnap")
    assert direct.runs == streamed.runs
    assert os.pread(top.fd, top.size, 0) == _data(tmp_path / "direct.hlsnap")

    reopened = Snapshot.open(str(tmp_path / "direct.hlsnap"))
    answers = []
    for snap in (reopened, child):  # the stored file and the in-memory (memfd) snapshot
        with Sandbox(snap) as sb:
            answers.append([list(sb.call("call", "who", [k])) for k in (1, 2)])
    with Sandbox(base) as fresh:  # the script loaded again, from scratch
        fresh.call("load", SOURCES[language], restore=False)
        first = list(fresh.call("call", "who", [1], restore=False))
    assert answers[0] == answers[1] == [[7, 1, 1, 20000], [7, 1, 2, 20000]]
    assert first == answers[0][0]


def test_both_publication_paths_write_the_same_valid_file(tmp_path):
    base = scripts.persisted_base_snapshot("js", tmp_path)
    with Sandbox(base) as sb:
        sb.call("load", SOURCES["js"], restore=False)
        child = sb.snapshot()
    linked = tmp_path / "linked.hlsnap"
    write_snapshot_file(child, str(linked), sync=True)
    renamed_dir = tmp_path / "renamed"
    renamed_dir.mkdir()
    snapwrite._tmpfile_works[str(renamed_dir)] = False  # as on a file system without O_TMPFILE
    renamed = renamed_dir / "renamed.hlsnap"
    write_snapshot_file(child, str(renamed), sync=True)
    assert _data(linked) == _data(renamed)
    for path in (linked, renamed):
        assert path.stat().st_mode & 0o777 == 0o444
    os.symlink(base.path, renamed_dir / os.path.basename(base.path))  # its parent, where the file names it
    for path in (linked, renamed):
        with Sandbox(Snapshot.open(str(path))) as sb:
            assert list(sb.call("call", "who", [3])) == [7, 1, 3, 20000]
    write_snapshot_file(child, str(linked), sync=False)  # an existing name is replaced, as before
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name) == []
    ahead = [tmp_path / f"ahead{i}.hlsnap" for i in range(3)]  # into files made in the background
    for path in ahead:
        write_snapshot_file(child, str(path), sync=False, ahead=True)
        time.sleep(0.2)  # (the next spare file is made meanwhile)
    for path in ahead:
        assert _data(path) == _data(linked) and path.stat().st_mode & 0o777 == 0o444
        with Sandbox(Snapshot.open(str(path))) as sb:
            assert list(sb.call("call", "who", [4])) == [7, 1, 4, 20000]
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


WRITER = textwrap.dedent("""
    import os, resource, signal, sys
    from hlpool import Sandbox
    from hlpool.sandbox import scripts
    from hlpool.snapshot import snapwrite
    from hlpool.snapshot.snapfile import write_snapshot_file
    directory, mode = sys.argv[1], sys.argv[2]
    base = scripts.persisted_base_snapshot("js", directory)
    with Sandbox(base) as sb:
        sb.call("load", sys.argv[3], restore=False)
        child = sb.snapshot()
    if mode == "rename":
        snapwrite._tmpfile_works[directory] = False
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (24 << 10, resource.RLIM_INFINITY))  # the layer is > 24 KiB
    try:
        write_snapshot_file(child, os.path.join(directory, "torn.hlsnap"), sync=False)
    except OSError as exc:
        print("failed", exc.errno)
    else:
        print("written")
""")


@pytest.mark.parametrize("mode", ["tmpfile", "rename"])
def test_a_write_that_fails_half_way_leaves_nothing_in_the_store(tmp_path, mode):
    scripts.persisted_base_snapshot("js", tmp_path)  # (written here, before the limit)
    before = sorted(os.listdir(tmp_path))
    out = subprocess.run([sys.executable, "-c", WRITER, str(tmp_path), mode, SOURCES["js"]], capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["failed", "27"]  # EFBIG, half-way through the layer
    assert sorted(os.listdir(tmp_path)) == before  # no torn file, no temporary file


def test_files_are_made_ahead_only_while_creating_them_is_slow(tmp_path):
    # The writer hands files over between two threads only where a create costs more than the
    # hand-off (snapwrite._Spares); the policy follows the creates it timed (set here).
    spares, directory = snapwrite._spares, str(tmp_path)

    def publish(name: str, data: bytes) -> None:
        snapwrite.publish(os.path.join(directory, name), lambda fd: snapwrite.write_all_at(fd, [data], 0),
                          sync=False, ahead=True)

    publish("quick", b"q")  # nothing timed here yet: made in place, none ahead
    assert directory not in spares._ready and directory not in spares._wanted
    for _ in range(30):
        spares.note(directory, 10_000)  # creates here are quick
    assert not spares.worth_it(directory)
    publish("quick2", b"q2")
    assert directory not in spares._ready
    for _ in range(4):
        spares.note(directory, 5_000_000)  # as on an ext4 minutes after thousands of deletions
    assert spares.worth_it(directory)
    publish("slow", b"s")  # none ready yet: made in place, and the next one is made ahead
    deadline = time.monotonic() + 10
    while directory not in spares._ready and time.monotonic() < deadline:
        time.sleep(0.01)
    spare = spares._ready[directory]
    publish("slow2", b"s2")  # takes the spare
    assert spares._ready.get(directory) != spare
    for _ in range(30):
        spares.note(directory, 10_000)  # quick again: no more made ahead
    while spares._wanted and time.monotonic() < deadline:
        time.sleep(0.01)
    if directory in spares._ready:
        publish("last", b"l")  # a spare made meanwhile is used up, and not replaced
    assert not spares.worth_it(directory)
    contents = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert {k: v for k, v in contents.items() if k != "last"} == {"quick": b"q", "quick2": b"q2", "slow": b"s",
                                                                   "slow2": b"s2"}


def test_usage_scans_see_files_added_and_removed_by_others(tmp_path):
    store = SnapshotStore(tmp_path, quota=1 << 30)
    for i in range(5):
        (tmp_path / f"f{i}.hlsnap").write_bytes(b"x" * (100 + i))
    assert store.usage() == sum(100 + i for i in range(5))
    (tmp_path / "f0.hlsnap").unlink()
    (tmp_path / "g.hlsnap").write_bytes(b"y" * 1000)  # another process's writes
    store.note_added(7)
    assert store.usage(fresh=False) == sum(100 + i for i in range(5)) + 7  # within the scan's lifetime
    store._usage_at = float("-inf")  # the scan expired: a periodic scan lists the directory again
    assert store.usage(fresh=False) == sum(100 + i for i in range(1, 5)) + 1000
    (tmp_path / "g.hlsnap").unlink()
    (tmp_path / "g.hlsnap").write_bytes(b"z" * 10)  # replaced (a new inode, or the same number reused)
    assert store.usage() == sum(100 + i for i in range(1, 5)) + 10  # a fresh scan stats every file


def test_a_pending_layer_is_a_layer_whose_memfd_is_made_on_demand():
    import hashlib

    from hlpool.errors import SnapshotError

    chunks = [bytes([1]) * 4096, bytes(range(256)) * 32]
    layer = PendingLayer(chunks)
    assert layer.size == 3 * 4096 and layer.sha256 == hashlib.sha256(b"".join(chunks)).digest()
    assert layer.pending_chunks() is not None
    fd = layer.fd  # a sealed memfd of the bytes, made now
    assert os.pread(fd, layer.size, 0) == b"".join(chunks) and layer.pending_chunks() is None
    with pytest.raises(PermissionError):
        os.pwrite(fd, b"x", 0)  # sealed: as immutable as the bytes were
    layer.close()
    closed = PendingLayer(chunks)
    closed.close()
    with pytest.raises(SnapshotError, match="closed"):
        closed.fd  # noqa: B018 -- no memfd that nothing would ever release
    with pytest.raises(ValueError, match="whole pages"):
        PendingLayer([b"x" * 100])
