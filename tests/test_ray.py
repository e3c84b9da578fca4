"""hlpool on Ray: RayPool on a real local Ray cluster of several nodes (all on 127.0.0.1), real node
actors owning real hlpool pools (workers, KVM VMs), and `hlpool serve --ray` as a real process.

The cluster (a head and two more nodes, 1 CPU and a 100 MB object store each) and one RayPool
(1 worker per node) are shared by the module; the tests that change the cluster (a node joins,
a node is removed under load) run last, in file order. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import wait

import pytest

# Read by Ray when it is imported (ray_constants.ENABLE_RAY_CLUSTER): with clusters "disabled", every Ray
# process (raylets, GCS, workers, drivers) takes 127.0.0.1 as its node address and listens there only.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")

from hlpool.errors import CallError, GuestError, NodeLostError, WorkerCrashed  # noqa: E402

pytestmark = pytest.mark.kvm

LOOPBACK = "127.0.0.1"
NODE_ARGS = {"num_cpus": 1, "object_store_memory": 100 * 2**20, "node_ip_address": LOOPBACK}
RESULT_TIMEOUT = 60.0
SLOW = 100_000_000  # fib's compute(n): about 0.3 s on this machine


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def _non_loopback_listeners(pids: set[int]) -> list[str]:
    """Listening TCP sockets of ``pids`` on an address other than loopback (from `ss -ltnp`)."""
    out = subprocess.run(["ss", "-H", "-ltnp"], capture_output=True, text=True, timeout=10).stdout
    bad = []
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if not owners & pids:
            continue
        local = line.split()[3]
        host = local.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")  # IPv4-mapped form
        if host != "::1" and not host.startswith("127."):
            bad.append(line)
    return bad


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of three nodes on 127.0.0.1; shut down (every process gone) afterwards."""
    import faulthandler

    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    if ray_constants.ENABLE_RAY_CLUSTER:
        pytest.fail("ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set: its cluster would not be "
                    "bound to 127.0.0.1")
    faulthandler.dump_traceback_later(480, exit=True)  # a hung cluster ends the run (with tracebacks)
    cluster = Cluster(initialize_head=True, head_node_args={**NODE_ARGS, "include_dashboard": False})
    try:
        assert cluster.address.startswith(f"{LOOPBACK}:"), cluster.address
        for _ in range(2):
            cluster.add_node(**NODE_ARGS)
        ray.init(address=cluster.address, _node_ip_address=LOOPBACK, log_to_driver=False)
        yield cluster
    finally:
        ray_pids = _descendants(os.getpid())
        ray.shutdown()
        cluster.shutdown()
        faulthandler.cancel_dump_traceback_later()
        _wait_until(lambda: not [p for p in ray_pids if _alive(p)], 30, "every process of the cluster exits")


@pytest.fixture(scope="module")
def pool(cluster, tmp_path_factory):
    from hlpool.ray import RayPool

    base = tmp_path_factory.mktemp("raypool")
    started = set()
    pool = RayPool(workers_per_node=1, snapshot_dir=base / "driver", node_snapshot_dir=str(base / "nodes/{node_id}"),
                   min_nodes=3, poll_interval=0.5, call_timeout=30, start_timeout=90)
    try:
        yield pool
        for s in pool.stats():
            started.update([s["actor_pid"], *s["worker_pids"]])
    finally:
        pool.shutdown()
    # the node actors and their hlpool workers are gone (the spawners and workers die with their actor)
    _wait_until(lambda: not [p for p in started if p and _alive(p)], 30, "node actors and workers exit")


def test_routing_prefers_a_home_node_and_spills_over():
    """Rendezvous order: stable, a lost node moves only its own snapshots; load spills to the least loaded."""
    from dataclasses import dataclass

    from hlpool.ray.routing import choose, preference

    @dataclass
    class Node:
        node_id: str
        load: int = 0

    nodes = [Node(f"node-{i}") for i in range(4)]
    keys = [f"snapshot-{i}" for i in range(400)]
    home = {k: preference(k, nodes)[0].node_id for k in keys}
    assert len(set(home.values())) == 4  # every node is home to a share
    assert all(preference(k, list(reversed(nodes)))[0].node_id == home[k] for k in keys)  # order-independent
    survivors = nodes[1:]
    moved = [k for k in keys if preference(k, survivors)[0].node_id != home[k]]
    assert moved and all(home[k] == "node-0" for k in moved)  # only the lost node's snapshots move
    first, second = preference("x", nodes)[:2]
    assert choose("x", nodes, spill_at=2, limit=4) is first
    first.load = 2
    assert choose("x", nodes, spill_at=2, limit=4) is second  # least loaded; ties in preference order
    for n in nodes:
        n.load = 4
    assert choose("x", nodes, spill_at=2, limit=4) is None  # every node full: the call waits in the queue


def test_import_hlpool_does_not_import_ray():
    code = "import sys, hlpool; assert 'ray' not in sys.modules; import hlpool.ray; assert 'ray' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_install_checks_names_hashes_and_stale_builds(tmp_path):
    """A shipped file lands only under a plain store name, only with the bytes its hash names; a file of
    that name with other bytes is replaced only if ``drop_stale`` removes it (nobody uses it)."""
    import hashlib

    from hlpool.errors import SnapshotError, SnapshotIntegrityError
    from hlpool.ray.shipping import FileHashes, install

    hashes = FileHashes()
    old, new = b"old build" * 100, b"new build" * 100
    sha_new = hashlib.sha256(new).hexdigest()
    for bad in ("../x.hlsnap", ".hidden.hlsnap", "x.elf", "a/b.hlsnap", 7):
        with pytest.raises(SnapshotError, match="refusing"):
            install(str(tmp_path), bad, sha_new, new, hashes)
    with pytest.raises(SnapshotIntegrityError):
        install(str(tmp_path), "s.hlsnap", sha_new, old, hashes)
    assert not (tmp_path / "s.hlsnap").exists()
    (tmp_path / "s.hlsnap").write_bytes(old)
    with pytest.raises(SnapshotError, match="another build"):
        install(str(tmp_path), "s.hlsnap", sha_new, new, hashes, lambda path: False)  # in use: kept
    assert (tmp_path / "s.hlsnap").read_bytes() == old

    def drop(path: str) -> bool:
        os.unlink(path)
        return True

    path, written = install(str(tmp_path), "s.hlsnap", sha_new, new, hashes, drop)
    assert written and open(path, "rb").read() == new and not os.stat(path).st_mode & 0o222  # read-only
    assert install(str(tmp_path), "s.hlsnap", sha_new, new, hashes) == (path, False)  # already there
    assert sorted(os.listdir(tmp_path)) == ["s.hlsnap"]  # no temporary file left


def _by_node(pool) -> dict[str, dict]:
    return {s["node_id"]: s for s in pool.stats()}


def test_stays_on_loopback(cluster, pool):
    """Nothing the cluster, the driver or the node actors run listens beyond 127.0.0.1."""
    pids = _descendants(os.getpid()) | {os.getpid()}
    assert len(pids) > 5  # the cluster's processes are ours
    assert _non_loopback_listeners(pids) == []


def test_calls_land_on_every_node(pool, example):
    add = pool.snapshot(example("add"))
    before = _by_node(pool)
    assert len(before) == 3 and all(s["alive"] and s["workers"] == 1 for s in before.values())
    futures = [pool.submit(add, "add", (i, 1000)) for i in range(90)]
    assert [f.result(timeout=RESULT_TIMEOUT) for f in futures] == [i + 1000 for i in range(90)]
    after = _by_node(pool)
    assert all(after[n]["calls"] > before[n]["calls"] for n in after), after  # load spilled over to every node
    assert sum(s["calls"] for s in after.values()) - sum(s["calls"] for s in before.values()) == 90
    assert all(s["live_vms"] >= 1 for s in after.values())
    # the rest of the Pool interface
    assert list(pool.map(add, "add", [(1, 2), (3, 4)])) == [3, 7]
    import asyncio
    assert asyncio.run(pool.call(add, "add", 20, 22)) == 42
    with pytest.raises(CallError, match="unknown function"):
        pool.submit(add, "nope")
    with pytest.raises(GuestError):  # an error in the guest comes back as the same exception class
        pool.submit(pool.snapshot(example("fib")), "fib", (-1,)).result(timeout=RESULT_TIMEOUT)


def test_snapshot_shipped_once_per_node(pool, example):
    before = _by_node(pool)
    touch = pool.snapshot(example("touch"))  # built on one node, stored by the driver
    size = os.path.getsize(touch.path)

    def spread(handle, fn, expected, rounds=60):
        futures = [pool.submit(handle, fn) for _ in range(rounds)]
        assert [f.result(timeout=RESULT_TIMEOUT) for f in futures] == [expected] * rounds

    spread(touch, "bump", 1)
    first = _by_node(pool)
    got = {n: (first[n]["fetches"] - before[n]["fetches"], first[n]["fetched_bytes"] - before[n]["fetched_bytes"])
           for n in first}
    assert sorted(got.values()) == [(0, 0), (1, size), (1, size)], got  # the builder had it; the others got it once
    spread(touch, "bump", 1)
    assert {n: s["fetches"] for n, s in _by_node(pool).items()} == {n: s["fetches"] for n, s in first.items()}
    # a layered child (calls kept, captured as a layer on the base): only the new layer travels
    child = pool.derive(touch, [("bump", ()), ("bump", ())])
    child_size = os.path.getsize(child.path)
    assert child_size < size
    spread(child, "bump", 3)
    spread(touch, "bump", 1)  # the base is untouched
    second = _by_node(pool)
    got = {n: (second[n]["fetches"] - first[n]["fetches"], second[n]["fetched_bytes"] - first[n]["fetched_bytes"])
           for n in second}
    assert sorted(got.values()) == [(0, 0), (1, child_size), (1, child_size)], got
    assert all(second[n]["calls"] > first[n]["calls"] for n in second)


def _http(method: str, url: str, body=None, timeout: float = 60.0):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def test_serve_ray_drains_on_sigterm(cluster, pool, example, tmp_path):
    """`hlpool serve --ray ADDRESS`: a real server on 127.0.0.1 in front of the cluster; SIGTERM lets the call
    in flight finish, then the server exits 0 and its node actors are gone."""
    log_path = tmp_path / "server.log"
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "HLPOOL_RAY_NODE_SNAPSHOT_DIR": str(tmp_path / "nodes" / "{node_id}")}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "hlpool.cli", "serve", "--ray", cluster.address, "--workers", "1",
               "--host", LOOPBACK, "--port", "0", "--snapshot-dir", str(tmp_path / "store"), "--grace", "30",
               "--guest", f"add={example('add')}", "--guest", f"fib={example('fib')}"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline, match = time.monotonic() + 120, None
        while match is None:
            assert proc.poll() is None, f"the server exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"the server did not start:\n{log_path.read_text()}"
            match = re.search(r"listening on (http://\S+)", log_path.read_text(errors="replace"))
            time.sleep(0.1)
        url = match.group(1)
        assert url.startswith(f"http://{LOOPBACK}:")
        # ready once one node serves; the others join within moments (one worker each)
        _wait_until(lambda: _http("GET", url + "/readyz") == (200, {**_http("GET", url + "/readyz")[1], "ready": True,
                                                                     "workers": 3}), 60, "every node serves")
        assert [_http("POST", f"{url}/v1/snapshots/add/calls/add", {"args": [i, 1]})
                for i in range(6)] == [(200, {"result": i + 1}) for i in range(6)]
        assert _http("POST", f"{url}/v1/snapshots/fib/calls/fib", {"args": [-1]})[0] == 422
        server_pids = _descendants(proc.pid) | {proc.pid}
        assert _non_loopback_listeners(server_pids) == []
        slow: dict = {}

        def slow_call() -> None:
            slow["answer"] = _http("POST", f"{url}/v1/snapshots/fib/calls/compute", {"args": [4 * SLOW]})

        thread = threading.Thread(target=slow_call)
        thread.start()
        _wait_until(lambda: _in_flight(url) >= 1, 20, "the slow call is in flight", interval=0.02)
        proc.send_signal(signal.SIGTERM)
        thread.join(timeout=60)
        assert slow["answer"][0] == 200 and isinstance(slow["answer"][1]["result"], int), slow
        assert proc.wait(timeout=60) == 0, log_path.read_text()
        assert len(os.listdir(tmp_path / "nodes")) == 3  # each node's pool used its own store
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in log_path.read_text(), log_path.read_text()


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return r.read().decode()


def _in_flight(url: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in _metrics(url).splitlines()
               if line.startswith("hlpool_worker_in_flight{"))


def test_node_added_later_takes_work(cluster, pool, example):
    add = pool.snapshot(example("add"))
    known = set(_by_node(pool))
    cluster.add_node(**NODE_ARGS)
    joined = _wait_until(lambda: set(_by_node(pool)) - known, 90, "the new node joins the pool")
    (new,) = joined
    futures = [pool.submit(add, "add", (i, 1)) for i in range(120)]
    assert [f.result(timeout=RESULT_TIMEOUT) for f in futures] == [i + 1 for i in range(120)]
    stats = _by_node(pool)[new]
    assert stats["calls"] > 0 and stats["fetches"] == 1, stats  # it got the snapshot file once, and work


def test_removing_a_node_under_load(cluster, pool, example):
    fib = pool.snapshot(example("fib"))
    nodes = _by_node(pool)
    victim = next(n for n in cluster.list_all_nodes() if n is not cluster.head_node)
    victim_id = victim.node_id
    assert victim_id in nodes
    futures = [pool.submit(fib, "compute", (SLOW,)) for _ in range(40)]
    _wait_until(lambda: _by_node(pool)[victim_id]["in_flight"] > 0, 20, "the victim runs calls", interval=0.02)
    cluster.remove_node(victim, allow_graceful=False)
    done, pending = wait(futures, timeout=120)
    assert not pending, "every future resolves"
    outcomes = []
    for f in futures:
        exc = f.exception()
        assert exc is None or isinstance(exc, WorkerCrashed), repr(exc)
        outcomes.append(type(exc).__name__ if exc else "ok")
    assert outcomes.count("ok") >= 40 - pool.max_in_flight_per_node, outcomes  # at most the victim's in-flight calls
    assert all(isinstance(f.exception(), NodeLostError) for f in futures if f.exception() is not None)
    _wait_until(lambda: victim_id not in _by_node(pool), 30, "the lost node leaves the pool")
    # the pool goes on with the nodes left
    again = [pool.submit(fib, "fib", (i,)) for i in range(30)]
    assert [f.result(timeout=RESULT_TIMEOUT) for f in again][:8] == [0, 1, 1, 2, 3, 5, 8, 13]
    assert len(_by_node(pool)) == len(nodes) - 1
