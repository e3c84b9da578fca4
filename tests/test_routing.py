"""Which worker gets a call (hlpool.pool.routing.Router), on WorkerLinks whose loads are set by hand.

Pure Python: the router only reads the links' queues, in-flight lists, warm VMs and liveness.
"""

from __future__ import annotations

import collections
import random

import pytest

from hlpool.pool.calls import WorkerLink
from hlpool.pool.registry import SnapshotHandle
from hlpool.pool.routing import COLD_START_COST, FULL_SCAN_WORKERS, OPEN_COST, Router

PER_CALL = 0.0001  # 100 us per call: a cold start costs as much as 30 queued calls


def _links(n: int) -> list[WorkerLink]:
    return [WorkerLink(index=i, alive=True) for i in range(n)]


def _handle(name: str, family: str = "") -> SnapshotHandle:
    return SnapshotHandle(path=f"/store/{name}.snap", exports=("f",), sha256="0" * 64, input_capacity=4096,
                          family=family)


def _busy(w: WorkerLink, calls: int) -> None:
    w.inflight.extend([None] * calls)


def _submit(router: Router, handle: SnapshotHandle, switching: bool = False, max_warm: int = 32) -> WorkerLink:
    w = router.choose(handle, PER_CALL, switching, max_warm)
    _busy(w, 1)  # the call stays outstanding
    return w


@pytest.mark.parametrize("n", [2, FULL_SCAN_WORKERS + 1, 64])
def test_a_snapshot_goes_home_at_even_load_and_stays_on_its_warm_worker(n):
    router = Router(_links(n))
    handle = _handle("tenant")
    home = router.workers[handle.path_hash % n]
    assert router.choose(handle, PER_CALL, False, 32) is home  # not held anywhere: home (no open cost)
    other = router.workers[(home.index + 1) % n]
    other.warm[handle.path] = handle.path  # (as if it had served it before)
    assert router.choose(handle, PER_CALL, False, 32) is home  # warm at home now, and loads are even


@pytest.mark.parametrize("n", [2, 16, 64])
def test_a_busy_home_spills_to_a_less_loaded_worker_only_when_that_pays(n):
    router = Router(_links(n))
    handle = _handle("hot")
    home = router.workers[handle.path_hash % n]
    router.choose(handle, PER_CALL, False, 32)
    spill_at = (COLD_START_COST + OPEN_COST) / PER_CALL  # queued calls that outweigh a cold start elsewhere
    _busy(home, int(spill_at) - 1)
    assert router.choose(handle, PER_CALL, False, 32) is home
    _busy(home, 2)
    assert router.choose(handle, PER_CALL, False, 32) is not home


@pytest.mark.parametrize("n", [4, 64])
def test_one_hot_snapshot_spreads_over_every_worker_evenly(n):
    router = Router(_links(n))
    handle = _handle("echo")
    for _ in range(n * 40):
        _submit(router, handle)
    loads = [w.load for w in router.workers]
    assert sum(loads) == n * 40
    # every worker serves it; the most loaded one is within a few calls of the average (40) and
    # within the cold-start threshold (34 calls) of the least loaded
    assert min(loads) > 0
    assert max(loads) - min(loads) <= (COLD_START_COST + OPEN_COST) / PER_CALL
    assert max(loads) <= 40 + (4 if n <= FULL_SCAN_WORKERS else 8)


def test_many_tenants_stay_on_their_home_workers_at_light_load():
    router = Router(_links(64))
    tenants = [_handle(f"t{i}") for i in range(2000)]
    for handle in tenants:
        w = router.choose(handle, PER_CALL, False, 32)
        assert w.index == handle.path_hash % 64  # calls come one at a time: nothing is loaded


def test_a_dead_worker_is_never_chosen_while_one_is_alive():
    for n in (2, 64):
        router = Router(_links(n))
        for w in router.workers:
            w.alive = False
        survivor = router.workers[n // 2]
        survivor.alive = True
        for i in range(200):
            assert router.choose(_handle(f"s{i}"), PER_CALL, False, 32) is survivor


def test_the_holders_the_router_keeps_match_what_the_workers_hold():
    """Random calls, switches between snapshots of families, evictions at the VM bound and replaced
    workers: after each step, the workers recorded as holding a key are exactly those whose warm has it."""
    rng = random.Random(7)
    router = Router(_links(24))
    handles = [_handle(f"f{f}-s{s}", family=f"family-{f}") for f in range(6) for s in range(5)] + \
              [_handle(f"plain{i}") for i in range(20)]
    keys = {h.family_key for h in handles} | {h.path for h in handles}
    for step in range(4000):
        action = rng.random()
        if action < 0.02:
            router.forget(rng.choice(router.workers))
        elif action < 0.3:
            w = rng.choice(router.workers)
            w.inflight.clear()
        else:
            _submit(router, rng.choice(handles), switching=rng.random() < 0.5, max_warm=3)
        if step % 50 == 0 or step == 3999:
            for key in keys:
                assert sorted(router.holders(key)) == [w.index for w in router.workers if key in w.warm], key
    assert all(len(w.warm) <= 3 for w in router.workers)


class _CountingWarm(collections.OrderedDict):
    """A worker's ``warm`` that counts the router's looks at it (one per worker costed)."""

    looks = 0

    def get(self, key, default=None):
        _CountingWarm.looks += 1
        return super().get(key, default)


@pytest.mark.parametrize("n", [2, FULL_SCAN_WORKERS, FULL_SCAN_WORKERS + 1, 64, 256])
def test_a_call_costs_every_worker_only_up_to_the_full_scan_size(n):
    links = _links(n)
    for w in links:
        w.warm = _CountingWarm()
    router = Router(links)
    handles = [_handle(f"t{i}") for i in range(50)]
    for handle in handles * 4:
        _submit(router, handle)
    _CountingWarm.looks = 0
    for handle in handles:
        _submit(router, handle)
    per_call = _CountingWarm.looks / len(handles)
    if n <= FULL_SCAN_WORKERS:
        assert per_call == n
    else:  # home, two others and two holders: at most 5, whatever the number of workers
        assert per_call <= 5
