"""Tenants at scale: thousands of scripts registered, kept and called, with bounded descriptors.

Real parts only: a real Pool (spawner, workers, the long-lived script builder, KVM VMs
running QuickJS and Lua), a real `hlpool serve` over HTTP, real store files and pins,
and a real second process holding pins.
"""

from __future__ import annotations

import inspect
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hlpool import Pool
from hlpool.errors import GuestError, GuestTimeout, SnapshotError
from hlpool.pool.store import PIN_DIR, SnapshotStore

pytestmark = pytest.mark.kvm


def open_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def js_tenant(i: int) -> str:
    # its own id, and state that must not survive a call (every call starts from the loaded script)
    return f"let calls = 0; function who(x) {{ calls += 1; return [{i}, calls, x]; }}"


def worker_pids(pool: Pool) -> list[int]:
    return [w["pid"] for w in pool.stats() if w["alive"]]


def test_two_thousand_scripts_each_answer_as_themselves_with_bounded_descriptors(tmp_path):
    rng = random.Random(11)
    # a worker keeps at most this many tenants' snapshots open (and a bounded set of warm VMs)
    bounded = {"max_open_snapshots": 64} if "max_open_snapshots" in inspect.signature(Pool).parameters else {}
    with Pool(workers=2, snapshot_dir=tmp_path / "store", call_timeout=10, **bounded) as pool:
        handles = [pool.script("js", js_tenant(i)) for i in range(200)]
        fds_at_200 = open_fds()
        handles += [pool.script("js", js_tenant(i)) for i in range(200, 2000)]
        fds_at_2000 = open_fds()
        assert fds_at_2000 <= fds_at_200 + 2, f"supervisor descriptors grew with tenants: {fds_at_200} -> {fds_at_2000}"
        assert len({h.path for h in handles}) == 2000
        # one pin file for the pool (and none left by the builder between builds), not one descriptor per file
        pin_files = [p for p in os.listdir(tmp_path / "store" / PIN_DIR) if p.endswith(".pins")]
        assert 1 <= len(pin_files) <= 2, pin_files
        assert pool.store.describe()["pinned"] >= 2000

        picks = [rng.randrange(2000) for _ in range(300)]
        futures = [(i, x, pool.submit(handles[i], "who", (x,))) for x, i in enumerate(picks)]
        wrong = [(i, f.result(timeout=30)) for i, x, f in futures if f.result(timeout=30) != [i, 1, x]]
        assert wrong == []
        worker_fds = {pid: open_fds(pid) for pid in worker_pids(pool)}
        futures = [(i, pool.submit(handles[i], "who", (0,))) for i in (rng.randrange(2000) for _ in range(200))]
        assert [i for i, f in futures if f.result(timeout=30) != [i, 1, 0]] == []
        for pid, before in worker_fds.items():  # more tenants served: open snapshots and VMs stay bounded
            assert open_fds(pid) <= 64 + 4 * 32 + 48, (pid, before, open_fds(pid))
        # the same source again is the same handle, without a build
        builds = pool._snapshots.scripts.builds
        assert pool.script("js", js_tenant(7)) == handles[7] and pool._snapshots.scripts.builds == builds
        assert pool._snapshots.scripts.started == 1  # one long-lived builder for all of them


def test_one_builder_loads_every_language_in_turn(tmp_path):
    # One builder process holds a loader per language: JS and Lua registrations in turn run in it
    # (no process per language taking turns on cold caches), each answering as itself; a builder
    # killed while idle is replaced and takes both languages again.
    with Pool(workers=1, snapshot_dir=tmp_path / "store") as pool:
        scripts = pool._snapshots.scripts
        handles = []
        for i in range(6):
            handles.append(pool.script("js", js_tenant(i)))
            handles.append(pool.script("lua", f"function who(x) return {{{i}, 1, x}} end"))
        assert scripts.started == 1 and sorted(scripts._info) == ["js", "lua"]
        assert [pool.submit(h, "who", (9,)).result(timeout=10) for h in handles] == \
            [[i, 1, 9] for i in range(6) for _ in range(2)]
        own = SnapshotStore(str(tmp_path / "store"))  # the JS answer's pins went with the Lua request
        pool._snapshots.store.unpin(handles[-2].path)
        deadline = time.monotonic() + 10
        while handles[-2].path in own.pinned_by_anyone() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert handles[-2].path not in own.pinned_by_anyone()
        pool._snapshots.store.pin(handles[-2].path)
        builder = scripts._builder
        os.kill(builder.pid, signal.SIGKILL)
        assert select.select([builder.pidfd], [], [], 5)[0]  # gone
        assert pool.submit(pool.script("lua", "function who(x) return {7, 1, x} end"), "who", (1,)).result(
            timeout=10) == [7, 1, 1]
        assert pool.submit(pool.script("js", js_tenant(8)), "who", (2,)).result(timeout=10) == [8, 1, 2]
        assert scripts.started == 2 and scripts.stopped == 1


def test_lua_tenants_and_a_stored_layer_reused_by_a_new_pool(tmp_path):
    store = tmp_path / "store"
    sources = [f"local calls = 0\nfunction who() calls = calls + 1 return {{{i}, calls}} end" for i in range(100)]
    with Pool(workers=1, snapshot_dir=store) as pool:
        handles = [pool.script("lua", s) for s in sources]
        assert [pool.submit(h, "who").result(timeout=10) for h in handles[::7]] == [[i, 1] for i in range(0, 100, 7)]
    files = {p.name for p in store.glob("*.hlsnap")}
    with Pool(workers=1, snapshot_dir=store) as pool:  # found in the store (checked), not written again
        again = [pool.script("lua", s) for s in sources[:10]]
        assert [h.path for h in again] == [h.path for h in handles[:10]]
        assert pool.submit(again[3], "who").result(timeout=10) == [3, 1]
    assert {p.name for p in store.glob("*.hlsnap")} == files


def test_two_hundred_scripts_over_http(tmp_path):
    from test_server import assert_stopped_cleanly, descendants, start_server

    srv = start_server(tmp_path / "server")
    helpers = descendants(srv.pid)
    try:
        for i in range(200):
            status, body, _ = srv.post("/v1/snapshots", {"name": f"tenant-{i}", "language": "js",
                                                         "source": js_tenant(i)})
            assert status == 201, body
        rng = random.Random(5)
        for i in (rng.randrange(200) for _ in range(60)):
            assert srv.call(f"tenant-{i}", "who", i * 10) == (200, {"result": [i, 1, i * 10]})
        helpers.update(descendants(srv.pid))
        assert sum(comm == "hlpool-builder" for comm in helpers.values()) == 1  # one script builder
    finally:
        assert_stopped_cleanly(srv, helpers)


def test_hostile_scripts_fail_their_registration_and_the_next_one_works(tmp_path):
    with Pool(workers=1, snapshot_dir=tmp_path / "store", build_timeout=3.0) as pool:
        first = pool.script("js", js_tenant(1))
        # an endless loop at load: the script's own load deadline
        with pytest.raises(GuestTimeout):
            pool.script("js", "for (;;) {}", timeout=0.5)
        assert pool.submit(pool.script("js", js_tenant(2)), "who", (0,)).result(timeout=10) == [2, 1, 0]
        # a huge allocation: the interpreter's own memory limit, a clear error, the builder lives on
        with pytest.raises(GuestError, match="out of memory|InternalError"):
            pool.script("js", "let a = []; for (;;) a.push(new Array(1 << 16).fill(a.length));")
        assert pool._snapshots.scripts.started == 1
        assert pool.submit(pool.script("js", js_tenant(3)), "who", (0,)).result(timeout=10) == [3, 1, 0]
        # an endless loop past the build timeout: the builder is killed and a new one takes the next script
        with pytest.raises(SnapshotError, match="build timeout"):
            pool.script("js", "for (;;) {}", timeout=60)
        assert pool._snapshots.scripts.stopped == 1
        assert pool.submit(pool.script("js", js_tenant(4)), "who", (0,)).result(timeout=10) == [4, 1, 0]
        assert pool._snapshots.scripts.started == 2
        # a builder that dies while idle is replaced at the next registration
        builder = pool._snapshots.scripts._builder
        os.kill(builder.pid, signal.SIGKILL)
        assert select.select([builder.pidfd], [], [], 5)[0]  # gone
        assert pool.submit(pool.script("js", js_tenant(6)), "who", (0,)).result(timeout=10) == [6, 1, 0]
        assert pool._snapshots.scripts.started == 3
        assert pool.submit(first, "who", (5,)).result(timeout=10) == [1, 1, 5]


def test_a_builder_growing_past_build_memory_is_stopped(tmp_path):
    with Pool(workers=1, snapshot_dir=tmp_path / "store", build_memory=8 << 20) as pool:
        with pytest.raises(SnapshotError, match="memory limit"):
            pool.script("js", "let s = []; for (let i = 0; ; i++) s.push('x'.repeat(4096) + i); ", timeout=30)
        assert pool.submit(pool.script("js", js_tenant(9)), "who", (1,)).result(timeout=10) == [9, 1, 1]


PINNER = textwrap.dedent("""
    import sys, time
    from hlpool.pool.store import SnapshotStore
    store = SnapshotStore(sys.argv[1])
    assert store.pin(sys.argv[2])
    print("pinned", flush=True)
    time.sleep(60)
""")


def test_pins_take_one_descriptor_and_die_with_their_process(tmp_path):
    directory = tmp_path / "store"
    store = SnapshotStore(directory)
    names = [store.path_for(f"{i:032x}") for i in range(3000)]
    for path in names:
        Path(path).write_bytes(b"x")
    before = open_fds()
    assert all(store.pin(p) for p in names[:2500])
    assert open_fds() <= before + 2  # the pin file and the gc lock, whatever the count
    for p in names[:1000]:
        store.unpin(p)  # (compacts the pin file once mostly stale)
    other = subprocess.Popen([sys.executable, "-c", PINNER, str(directory), names[2999]],
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert other.stdout.readline().strip() == "pinned"
        removed = set(store.collect())
        assert removed == set(names[:1000]) | set(names[2500:2999])  # ours and the other process's pins stay
        assert store.remove(names[2999]) is False  # pinned by the other process
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()
        other.stdout.close()
    assert store.collect() == [names[2999]]  # its pin went with it (its pin file too)
    assert len(os.listdir(directory / PIN_DIR)) == 2  # ours and the lock
    assert store.pin(names[1000]) and store.remove(names[1000]) is True
    assert not store.pin(names[0])  # gone: a pin of a removed file fails
    store.release()
    assert open_fds() <= before
    assert sorted(os.listdir(directory / PIN_DIR)) == ["gc.lock"]
