"""Workers keep VMs per snapshot family and switch them between tenants: real workers, real VMs,
real JS tenants; each tenant sees only its own state, reset on every call."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

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


def test_routing_prefers_a_vm_at_the_tenant_then_one_of_its_family(kvm, tmp_path):
    with Pool(workers=2, snapshot_dir=tmp_path) as pool:
        a, b = pool.script("js", tenant_source(1)), pool.script("js", tenant_source(2))
        assert pool.submit(a, "who", (0,)).result(timeout=30)[0] == "tenant-1"
        _, created, switches = vm_figures(pool)
        assert (created, switches) == (1, 0)
        for _ in range(20):  # one at a time: the VM at ``a`` serves it, nothing is switched or made
            assert pool.submit(a, "who", (0,)).result(timeout=30)[0] == "tenant-1"
        assert vm_figures(pool)[1:] == (1, 0)
        # ``b`` is of the same family: the idle JS VM switches to it rather than a new VM being made
        assert pool.submit(b, "who", (0,)).result(timeout=30)[0] == "tenant-2"
        assert vm_figures(pool)[1:] == (1, 1)
        assert pool.submit(a, "who", (0,)).result(timeout=30)[0] == "tenant-1"
        assert vm_figures(pool)[1:] == (1, 2)


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
