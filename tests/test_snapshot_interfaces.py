"""The life of a snapshot on every interface: derive a stateful child (calls kept, files mapped, ``retain``),
list, delete (refused while a child or a call needs it), collect garbage, quota; over ``Pool``, the HTTP API
and the CLI. Real VMs, real builder and worker processes, a real server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_builds import builders, snapshot_files, temp_files
from test_server import CLEAN_ENV, assert_stopped_cleanly, descendants, start_server

import hlpool
from hlpool import CallError, GuestError, Pool, SnapshotError
from hlpool.service.client import Client, RemoteError

pytestmark = pytest.mark.kvm

HLPOOL = [sys.executable, "-m", "hlpool.cli"]

STATE = r"""
#include <hlpool.h>
#include <string.h>
#include <time.h>
static long counter;
static char note[64];
static hl_value set(const hl_args *a) { counter = hl_arg_int(a, 0); return hl_none(); }
static hl_value bump(const hl_args *a) { (void)a; counter += 1; return hl_int(counter); }
static hl_value fail(const hl_args *a) { (void)a; return hl_error("refused on purpose"); }
static hl_value load(const hl_args *a) {
    size_t size = 0;
    const char *data = hl_mapped_file(hl_arg_str(a, 0, NULL), &size);
    if (!data) return hl_error("not mapped");
    memcpy(note, data, size < 63 ? size : 63);
    return hl_int((long)size);
}
static hl_value info(const hl_args *a) { (void)a; return hl_str(note); }
static hl_value spin(const hl_args *a) {
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    double seconds = hl_arg_float(a, 0);
    do clock_gettime(CLOCK_MONOTONIC, &t);
    while ((t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 < seconds);
    return hl_int(counter);
}
int hl_main(void) {
    hl_export("set", set); hl_export("bump", bump); hl_export("fail", fail);
    hl_export("load", load); hl_export("info", info); hl_export("spin", spin);
    return 0;
}
"""


@pytest.fixture(scope="module")
def state_elf(tmp_path_factory) -> str:
    from hlpool.guest.build import build_guest

    d = tmp_path_factory.mktemp("state-guest")
    (d / "state.c").write_text(STATE)
    return str(build_guest([d / "state.c"], d / "state.elf"))


@pytest.fixture
def store(tmp_path) -> Path:
    d = tmp_path / "store"
    d.mkdir()
    return d


@pytest.fixture
def table(tmp_path) -> Path:
    path = tmp_path / "data" / "table.txt"
    path.parent.mkdir()
    path.write_text("hello table")
    return path


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*HLPOOL, *args], capture_output=True, text=True, timeout=timeout, env=CLEAN_ENV)


# ---- Pool -------------------------------------------------------------------------------------------------


def test_derive_over_pool(state_elf, store, table):
    with Pool(workers=1, snapshot_dir=store, call_timeout=10) as pool:
        base = pool.snapshot(state_elf)
        child = pool.derive(base, [("set", (41,)), ("load", ("table.txt",))], map_files=[table])
        assert hlpool.Snapshot.open(child.path).parent.path == base.path  # a layer on a store file
        assert os.path.dirname(child.path) == str(store)
        # every call into the child sees the kept state and starts from it again
        assert [pool.submit(child, "bump").result(timeout=10) for _ in range(3)] == [42, 42, 42]
        assert pool.submit(child, "info").result(timeout=10) == "hello table"
        assert pool.submit(base, "bump").result(timeout=10) == 1  # the base is untouched
        # retain: the callable form, and area names, keep the parent's bytes of those regions
        by_name = pool.derive(base, [("set", (41,))], retain=["image", "heap"])
        by_callable = pool.derive(base, [("set", (41,))], retain=lambda r: True if r.area == "image" else None)
        assert pool.submit(by_name, "bump").result(timeout=10) == 1
        assert pool.submit(by_callable, "bump").result(timeout=10) == 1
        # a child of a child
        grandchild = pool.derive(child, [("bump", ())])
        assert pool.submit(grandchild, "bump").result(timeout=10) == 43
        # errors of the calls raise clearly and leave nothing behind
        before = snapshot_files(store)
        with pytest.raises(GuestError, match="refused on purpose"):
            pool.derive(base, [("set", (1,)), ("fail", ())])
        with pytest.raises(CallError, match="unknown function"):
            pool.derive(base, [("nope", ())])
        with pytest.raises(CallError, match="unknown area"):
            pool.derive(base, [("set", (1,))], retain=["nowhere"])
        with pytest.raises(GuestError, match="not mapped"):
            pool.derive(base, [("load", ("missing.txt",))])
        assert snapshot_files(store) == before
        assert temp_files(store) == [] and builders() == []


def test_derive_a_script_over_pool(store):
    with Pool(workers=1, snapshot_dir=store) as pool:
        js = pool.script("js", "var n = 0; function set(v) { n = v; } function inc() { n += 1; return n; }")
        child = pool.derive(js, [("set", (41,))])
        assert [pool.submit(child, "inc").result(timeout=10) for _ in range(2)] == [42, 42]


def test_remove_gc_and_quota_over_pool(state_elf, store, table):
    with Pool(workers=1, snapshot_dir=store, call_timeout=10) as pool:
        base = pool.snapshot(state_elf)
        child = pool.derive(base, [("set", (41,))], map_files=[table])
        with pytest.raises(SnapshotError, match="1 layered snapshot"):
            pool.remove_snapshot(base)  # the child needs it
        running = [pool.submit(child, "spin", (0.6,)) for _ in range(2)]
        with pytest.raises(SnapshotError, match=r"queued or running call"):
            pool.remove_snapshot(child)
        assert [f.result(timeout=10) for f in running] == [41, 41]
        assert pool.remove_snapshot(child) is True
        assert pool.remove_snapshot(base) is True
        assert snapshot_files(store) == set()
        # gc: only files no handle, no child and no other process needs
        base = pool.snapshot(state_elf)
        child = pool.derive(base, [("set", (7,))])
        orphan_base = hlpool.Snapshot.from_elf(state_elf).persist(store / ("1" * 32 + ".hlsnap"))
        with hlpool.Sandbox(orphan_base) as sb:
            sb.call("set", 3, restore=False)
            orphan_child = sb.snapshot().persist(store / ("2" * 32 + ".hlsnap"))
        assert sorted(pool.collect_garbage()) == sorted([orphan_base.path, orphan_child.path])
        assert snapshot_files(store) == {os.path.basename(base.path), os.path.basename(child.path)}
        assert pool.submit(child, "bump").result(timeout=10) == 8
    # quota: a derived layer that does not fit is refused and leaves nothing
    with Pool(workers=1, snapshot_dir=store) as pool:
        base = pool.snapshot(state_elf)
        pool.collect_garbage()
    quota = os.path.getsize(base.path) + 1024
    with Pool(workers=1, snapshot_dir=store, store_quota=quota) as pool:
        base = pool.snapshot(state_elf)
        before = snapshot_files(store)
        with pytest.raises(SnapshotError, match="snapshot store is full|whole quota"):
            pool.derive(base, [("set", (1,))])
        assert snapshot_files(store) == before and temp_files(store) == []
        assert pool.store.usage() <= quota


# ---- HTTP ---------------------------------------------------------------------------------------------------


@pytest.fixture
def server(kvm, tmp_path, state_elf, table):
    srv = start_server(tmp_path / "server", "--guest", f"state={state_elf}", "--allow-dir", str(table.parent),
                       "--call-timeout", "10")
    helpers = descendants(srv.pid)
    yield srv
    helpers.update(descendants(srv.pid))
    assert_stopped_cleanly(srv, helpers)


def test_derive_remove_and_gc_over_http(server, state_elf, table):
    client = Client(server.url)
    store = server.log_path.parent / "store"
    info = client.derive("counted", "state", [("set", [41]), ("load", ["table.txt"])], map_files=[str(table)])
    assert info["name"] == "counted" and len(info["layers"]) == 2
    assert [client.call("counted", "bump") for _ in range(3)] == [42, 42, 42]
    assert client.call("counted", "info") == "hello table"
    kept = client.derive("kept", "state", [("set", [41])], retain=["image", "heap"])
    assert kept["parent_chain"] and client.call("kept", "bump") == 1
    assert {"state", "counted", "kept"} <= {s["name"] for s in client.snapshots()}
    # errors: a call's error answers as the call would, and nothing is registered
    with pytest.raises(RemoteError) as failed:
        client.derive("bad", "state", [("fail", [])])
    assert (failed.value.code, failed.value.status) == ("guest_error", 422)
    for body, code, status in (
            ({"name": "x", "base": "nothing"}, "unknown_snapshot", 404),
            ({"name": "x", "base": "state", "calls": [{"fn": "nope"}]}, "unknown_function", 404),
            ({"name": "x", "base": "state", "calls": [{"fn": "set", "args": ["x"]}]}, "snapshot_error", 422),
            ({"name": "x", "base": "state", "retain": ["nowhere"]}, "bad_request", 400),
            ({"name": "x", "base": "state", "map_files": ["/etc/passwd"]}, "forbidden", 403),
            ({"name": "x", "base": "state", "map_files": ["relative.txt"]}, "bad_request", 400),
            ({"name": "state", "base": "state"}, "snapshot_exists", 409)):
        got, answer, _ = server.post("/v1/snapshots", body)
        assert (got, answer["error"]["code"]) == (status, code), answer
    assert "bad" not in {s["name"] for s in client.snapshots()}
    # gc: only the store files nothing needs
    served = snapshot_files(store)
    orphan = hlpool.Snapshot.from_elf(state_elf).persist(store / ("3" * 32 + ".hlsnap"))
    collected = client.collect_garbage()
    assert collected["removed"] == [orphan.path] and collected["store"]["directory"] == str(store)
    assert snapshot_files(store) == served
    # delete: refused while a child exists or a call is in flight; then allowed
    with pytest.raises(RemoteError) as refused:
        client.remove("state")
    assert (refused.value.code, refused.value.status) == ("snapshot_in_use", 409)
    result: dict = {}
    slow = threading.Thread(target=lambda: result.setdefault("v", client.call("counted", "spin", 1.5)))
    slow.start()
    deadline = time.monotonic() + 5
    while "hlpool_calls_in_flight 1.0" not in server.metrics() and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(RemoteError) as busy:
        client.remove("counted")
    assert busy.value.code == "snapshot_in_use" and "call" in busy.value.message
    slow.join(timeout=20)
    assert result["v"] == 41
    removed = client.remove("counted")
    assert removed["deleted"] is True and not os.path.exists(removed["path"])
    assert client.remove("kept")["deleted"] is True
    with pytest.raises(RemoteError) as gone:
        client.call("counted", "bump")
    assert gone.value.code == "unknown_snapshot"
    assert client.remove("state")["deleted"] is True
    assert snapshot_files(store) == set()
    assert client.collect_garbage()["removed"] == []


# ---- CLI ------------------------------------------------------------------------------------------------------


def test_derive_ls_rm_and_gc_over_the_cli(state_elf, table, tmp_path):
    base = tmp_path / "store" / ("4" * 32 + ".hlsnap")
    base.parent.mkdir()
    assert run_cli("snapshot", "build", state_elf, "-o", str(base)).returncode == 0
    child = tmp_path / "store" / ("5" * 32 + ".hlsnap")
    done = run_cli("snapshot", "derive", str(base), "--call", "set", "[41]", "--call", "load", '["table.txt"]',
                   "--map-file", str(table), "-o", str(child))
    assert done.returncode == 0, done.stderr
    assert hlpool.Snapshot.open(child).parent.path == str(base)
    for _ in range(2):
        assert run_cli("run", str(child), "bump").stdout.strip() == "42"
    assert run_cli("run", str(child), "info").stdout.strip() == '"hello table"'
    kept = tmp_path / "kept.hlsnap"
    assert run_cli("snapshot", "derive", str(base), "--call", "set", "[41]", "--retain", "image", "-o",
                   str(kept)).returncode == 0
    assert run_cli("run", str(kept), "bump").stdout.strip() == "1"
    failed = run_cli("snapshot", "derive", str(base), "--call", "fail", "-o", str(tmp_path / "bad.hlsnap"))
    assert failed.returncode == 1 and "refused on purpose" in failed.stderr
    assert not (tmp_path / "bad.hlsnap").exists()
    store = str(base.parent)
    listed = json.loads(run_cli("snapshot", "ls", "--store", store, "--json").stdout)
    by_name = {row["name"]: row for row in listed["snapshots"]}
    assert by_name["4" * 32]["children"] == [child.name] and by_name["5" * 32]["parents"] == [base.name]
    refused = run_cli("snapshot", "rm", "4" * 32, "--store", store)
    assert refused.returncode == 1 and "layered snapshot" in refused.stderr and base.exists()
    # a file another process pins is neither removed nor collected
    with Pool(workers=1, snapshot_dir=store) as pool:
        pool.snapshot(str(child))
        busy = run_cli("snapshot", "rm", str(child), "--store", store)
        assert busy.returncode == 1 and "in use" in busy.stderr
        orphan = hlpool.Snapshot.from_elf(state_elf).persist(base.parent / ("6" * 32 + ".hlsnap"))
        collected = run_cli("snapshot", "gc", "--store", store)
        assert collected.returncode == 0 and collected.stdout.splitlines()[0] == f"removed {orphan.path}"
        assert snapshot_files(base.parent) == {base.name, child.name}
    assert run_cli("snapshot", "rm", child.name[:-len(".hlsnap")], "--store", store).returncode == 0
    assert run_cli("snapshot", "rm", str(base), "--store", store).returncode == 0
    assert snapshot_files(base.parent) == set()
