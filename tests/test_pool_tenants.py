"""Workers keep VMs per snapshot family and switch them between tenants: real workers, real VMs,
real JS tenants; each tenant sees only its own state, reset on every call."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import zlib

import pytest

from hlpool import Pool, WorkerCrashed

pytestmark = pytest.mark.kvm


def tenant_source(i: int) -> str:
    # Each call bumps module state and returns it: 1 on every call if the state is reset per call.
    return (f"let calls = 0; const secret = 'tenant-{i}';\n"
            f"function who(x) {{ calls++; return [secret, calls, x]; }}\n")


def vm_figures(pool: Pool) -> tuple[int, int, int]:
    stats = pool.stats()
    return sum(s["vms"] for s in stats), sum(s["vms_created"] for s in stats), sum(s["switches"] for s in stats)


@pytest.mark.parametrize("switching", [True, False])
def test_tenants_get_their_own_state_from_a_few_vms(kvm, tmp_path, switching):
    tenants = 24
    with Pool(workers=2, snapshot_dir=tmp_path, max_sandboxes_per_worker=8, switch_tenants=switching) as pool:
        handles = [pool.script("js", tenant_source(i)) for i in range(tenants)]
        rng = random.Random(7)
        order = [rng.randrange(tenants) for _ in range(300)]
        futures = [(i, pool.submit(handles[i], "who", (n,))) for n, i in enumerate(order)]
        for n, (i, f) in enumerate(futures):
            assert f.result(timeout=60) == [f"tenant-{i}", 1, n]
        held, created, switches = vm_figures(pool)
        if switching:  # one VM of the JS family per worker, switched between the tenants
            assert held <= 2 and created <= 2
            assert switches > 100
        else:  # a VM per tenant, bounded by max_sandboxes_per_worker: VMs are closed and made again
            assert switches == 0
            assert created > tenants
            assert held <= 16


def _home(handle) -> int:
    return zlib.crc32(handle.path.encode()) % 2


def test_routing_prefers_a_vm_at_the_tenant_then_one_of_its_family(kvm, tmp_path):
    with Pool(workers=2, snapshot_dir=tmp_path) as pool:
        first: dict[int, tuple[int, object]] = {}
        for n in range(1, 60):  # two tenants of one home worker
            h = pool.script("js", tenant_source(n))
            if _home(h) in first:
                (i, a), (k, b) = first[_home(h)], (n, h)
                break
            first[_home(h)] = (n, h)
        assert pool.submit(a, "who", (0,)).result(timeout=30)[0] == f"tenant-{i}"
        _, created, switches = vm_figures(pool)
        assert (created, switches) == (1, 0)
        for _ in range(20):  # one at a time: the VM at ``a`` serves it, nothing is switched or made
            assert pool.submit(a, "who", (0,)).result(timeout=30)[0] == f"tenant-{i}"
        assert vm_figures(pool)[1:] == (1, 0)
        # ``b`` is of the same family: the idle JS VM switches to it rather than a new VM being made
        assert pool.submit(b, "who", (0,)).result(timeout=30)[0] == f"tenant-{k}"
        assert vm_figures(pool)[1:] == (1, 1)
        assert pool.submit(a, "who", (0,)).result(timeout=30)[0] == f"tenant-{i}"
        assert vm_figures(pool)[1:] == (1, 2)


def test_each_worker_serves_its_own_share_of_a_familys_tenants(kvm, tmp_path):
    """Calls one at a time to tenants of both home workers: the first call to a tenant of the
    worker without a VM of the family makes one there (once), instead of the other worker
    serving (and opening) that worker's share too for good; from then on every call runs on
    its tenant's home worker, and both workers hold one VM."""
    with Pool(workers=2, snapshot_dir=tmp_path) as pool:
        handles: list = []
        n = 0
        while n < 80 and (len(handles) < 8 or {_home(h) for h in handles} != {0, 1}):
            handles.append(pool.script("js", tenant_source(n)))
            n += 1
        assert {_home(h) for h in handles} == {0, 1}
        for round_ in range(3):
            for i, h in enumerate(handles):
                before = [s["calls"] for s in pool.stats()]
                assert pool.submit(h, "who", (round_,)).result(timeout=30) == [f"tenant-{i}", 1, round_]
                after = [s["calls"] for s in pool.stats()]
                assert after[_home(h)] == before[_home(h)] + 1, (i, round_)
        held, created, _switches = vm_figures(pool)
        assert (held, created) == (2, 2)


def test_worker_killed_while_switching_resolves_every_future(kvm, tmp_path):
    tenants = 12
    with Pool(workers=2, snapshot_dir=tmp_path, call_timeout=30) as pool:
        handles = [pool.script("js", tenant_source(i)) for i in range(tenants)]
        stop = threading.Event()

        def killer() -> None:
            rng = random.Random(3)
            while not stop.wait(rng.uniform(0.05, 0.2)):
                pid = pool.stats()[rng.randrange(2)]["pid"]
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

        thread = threading.Thread(target=killer)
        thread.start()
        try:
            futures = []
            deadline = time.monotonic() + 3
            n = 0
            while time.monotonic() < deadline:
                i = n % tenants
                futures.append((i, n, pool.submit(handles[i], "who", (n,))))
                n += 1
                if len(futures) % 32 == 0:
                    futures[-1][2].exception(timeout=60)
        finally:
            stop.set()
            thread.join()
        crashed = ok = 0
        for i, n, f in futures:
            exc = f.exception(timeout=60)
            if exc is None:
                assert f.result() == [f"tenant-{i}", 1, n]
                ok += 1
            else:
                assert isinstance(exc, WorkerCrashed), exc
                crashed += 1
        assert ok > 0 and crashed > 0
        assert sum(s["crashes"] for s in pool.stats()) > 0
        for i in range(tenants):  # the replacements serve every tenant
            assert pool.submit(handles[i], "who", ("after",)).result(timeout=60) == [f"tenant-{i}", 1, "after"]


def _worker_holding(pool: Pool, path: str) -> list[int]:
    """Indexes of the workers that have ``path`` open (their fds, read from /proc)."""
    real = os.path.realpath(path)
    holders = []
    for s in pool.stats():
        fd_dir = f"/proc/{s['pid']}/fd"
        try:
            targets = [os.readlink(os.path.join(fd_dir, fd)) for fd in os.listdir(fd_dir)]
        except OSError:
            continue
        if real in targets:
            holders.append(s["index"])
    return holders


@pytest.mark.parametrize("ahead", [True, False])
def test_a_registered_tenant_is_opened_by_its_home_worker_before_its_first_call(kvm, tmp_path, ahead):
    with Pool(workers=2, snapshot_dir=tmp_path, open_on_register=ahead) as pool:
        handles = [pool.script("js", tenant_source(i)) for i in range(6)]
        deadline = time.monotonic() + 10
        holders = {}
        while time.monotonic() < deadline:
            holders = {h.path: _worker_holding(pool, h.path) for h in handles}
            if not ahead or all(holders.values()):
                break
            time.sleep(0.05)
        if ahead:
            time.sleep(0.2)  # nothing else opens them later: each is open in exactly one worker
            for h in handles:
                assert _worker_holding(pool, h.path) == [zlib.crc32(h.path.encode()) % 2], h.path
        else:
            time.sleep(0.5)
            assert not any(holders.values())
        assert sum(s["calls"] for s in pool.stats()) == 0  # opening is not a call
        for i, h in enumerate(handles):
            assert pool.submit(h, "who", (i,)).result(timeout=30) == [f"tenant-{i}", 1, i]
        assert sum(s["calls"] for s in pool.stats()) == len(handles)
        assert sum(s["errors"] for s in pool.stats()) == 0


def test_opening_ahead_neither_blocks_removal_nor_fails_when_the_file_is_gone(kvm, tmp_path):
    with Pool(workers=1, snapshot_dir=tmp_path, max_pending=1, block=False) as pool:
        for i in range(5):  # removed at once: the worker's open may find no file; nothing is reported
            h = pool.script("js", tenant_source(100 + i))
            pool.remove_snapshot(h)
        kept = pool.script("js", tenant_source(7))  # hints take no pending slot: max_pending=1 is the user's
        assert pool.submit(kept, "who", (1,)).result(timeout=30) == ["tenant-7", 1, 1]
        stats = pool.stats()[0]
        assert (stats["calls"], stats["errors"], stats["crashes"]) == (1, 0, 0)


def test_an_open_hint_in_a_channel_is_not_load_for_routing(kvm, tmp_path):
    """A hint's answer may wait a moment for its reader; routing must not take it for a call
    (it once sent two long calls to one worker while the other held only an answered hint)."""
    with Pool(workers=2, snapshot_dir=tmp_path) as pool:
        first = pool.script("js", tenant_source(0))
        assert pool.submit(first, "who", (1,)).result(timeout=30) == ["tenant-0", 1, 1]
        probe = pool.script("js", tenant_source(99))  # to learn its home worker
        home = pool._workers[zlib.crc32(probe.path.encode()) % 2]
        with home.reader:  # nobody reads the home worker's answers while the test holds this
            handle = pool.script("js", tenant_source(1))
            if zlib.crc32(handle.path.encode()) % 2 != home.index:
                handle = next(h for h in (pool.script("js", tenant_source(i)) for i in range(2, 40))
                              if zlib.crc32(h.path.encode()) % 2 == home.index)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (home.channel.responses.value and not home.hints):
                time.sleep(0.01)
            assert home.channel.responses.value >= 1  # answered hints wait in the channel
            with pool._lock:
                assert home.opens_in_flight == len(home.inflight) >= 1
                assert home.load == len(home.queue) == 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and home.inflight:
            time.sleep(0.01)
        assert home.opens_in_flight == 0 and home.load == 0
        assert pool.submit(handle, "who", (2,)).result(timeout=30)[1:] == [1, 2]
