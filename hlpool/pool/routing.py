"""Which worker gets a call: the one expected to finish it first.

The cost of a worker is its queued and running calls times the snapshot's
measured call time, plus what it takes to get a VM there: nothing where a VM is
at the snapshot, a switch where the worker has a VM of the snapshot's family
(:meth:`hlpool.Sandbox.switch`), a new VM elsewhere. The router keeps, per
worker, what that worker will hold (``WorkerLink.warm``: family -> snapshot
path), mirroring the worker's own cache (:class:`hlpool.pool.worker.SandboxCache`).
Each snapshot also has a home worker (a hash of its path) that costs a snapshot
open less than the others: at even load a tenant's calls stay on one worker, so
each worker opens and keeps only its share of many tenants.

A home worker with no VM of the tenant's family (and room for one) is charged a
switch, not a cold start: it makes that VM once, at the first call to one of its
tenants, and from then on serves its share of the family. Charged a cold start, it
never got one while another worker had a VM of the family and calls came one at a
time: that worker served every tenant, opening the other's share as well (with
10,000 JS tenants on 2 workers, ~60% of its calls opened a snapshot: p50 0.66-0.83
ms against 0.35-0.39 ms with 1,000).
"""

from __future__ import annotations

from typing import Sequence

from hlpool.pool.calls import WorkerLink
from hlpool.pool.registry import SnapshotHandle

COLD_START_COST = 0.003  # seconds to make a VM in a worker that has none of the family (measured ~2.5 ms)
SWITCH_COST = 0.0001  # seconds to switch a worker's VM to another snapshot of its family (bench/switch.py)
OPEN_COST = 0.0004  # seconds for a worker to open a snapshot it has not open (Snapshot.open of a child: ~0.4 ms)
DEFAULT_CALL_COST = 0.001  # assumed duration of a call until one of its snapshot was measured
DEAD_WORKER_COST = 1000.0


def home_index(handle: SnapshotHandle, workers: int) -> int:
    """The index of ``handle``'s home worker among ``workers``: a hash of its path."""
    return handle.path_hash % workers  # zlib.crc32 of the path, computed once per handle


def choose_worker(workers: Sequence[WorkerLink], handle: SnapshotHandle, per_call: float, switching: bool,
                  max_warm: int) -> WorkerLink:
    """The worker for a call of ``handle`` (the pool's lock is held); records what it will hold."""
    path = handle.path
    key = handle.family_key if switching else path
    # Each snapshot has a home worker (a hash of its path): while loads are even, its calls go
    # there, so every worker opens and keeps a share of the tenants, not all of them.
    home = handle.path_hash % len(workers)  # home_index(), inline: this runs for every call
    best, best_cost = workers[0], None
    for i, w in enumerate(workers):
        at = w.warm.get(key)
        cost = w.load * per_call
        if at == path:
            pass
        elif at is not None:
            cost += SWITCH_COST + (0.0 if i == home else OPEN_COST)
        elif switching and i == home and len(w.warm) < max_warm:  # see the module docstring
            cost += SWITCH_COST
        else:
            cost += COLD_START_COST + (0.0 if i == home else OPEN_COST)
        if not w.alive:
            cost += DEAD_WORKER_COST
        if best_cost is None or cost < best_cost:
            best, best_cost = w, cost
    best.warm[key] = handle.path
    best.warm.move_to_end(key)
    while len(best.warm) > max_warm:  # beyond the worker's VM bound its least recently used VM is gone
        best.warm.popitem(last=False)
    return best
