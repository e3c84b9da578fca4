"""Which worker gets a call: the one expected to finish it first (:class:`Router`; in a pool
of more than FULL_SCAN_WORKERS workers, the cheapest of a few candidates).

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

from typing import Iterable, Sequence

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


FULL_SCAN_WORKERS = 8  # up to this many workers every one is costed for every call; beyond, a few (see Router)


class Router:
    """Chooses the worker for each call of a pool and keeps what each worker holds (``WorkerLink.warm``).

    Up to :data:`FULL_SCAN_WORKERS` workers, every worker is costed for every call (the
    exact choice). Beyond, costing all of them would make routing the supervisor's
    largest per-call cost and grow with the host: ~1.2 us of Python per worker and call
    (with 64 workers, 50 us per call against ~30 us for all the rest of a call's
    supervisor work). There the candidates are the home worker, two of the workers that
    hold the snapshot's VM (by family when switching) and two other workers, picked
    pseudo-randomly for each call ("the power of two choices": the most loaded worker
    stays within a few calls of the average), and the cheapest of them gets the call.
    If that one is dead, every worker is costed after all. The router keeps, per key,
    which workers hold it, so finding them costs nothing per call. The pool's lock is
    held for every method.
    """

    def __init__(self, workers: Sequence[WorkerLink], full_scan_up_to: int = FULL_SCAN_WORKERS) -> None:
        self.workers = workers
        self._sample = len(workers) > full_scan_up_to
        self._holders: dict[str, list[int]] = {}  # key -> indexes of the workers whose ``warm`` has it
        self._seed = 0x2545F491

    def choose(self, handle: SnapshotHandle, per_call: float, switching: bool, max_warm: int) -> WorkerLink:
        """The worker for a call of ``handle``; records that it will hold the snapshot."""
        workers = self.workers
        key = handle.family_key if switching else handle.path
        # Each snapshot has a home worker (a hash of its path): while loads are even, its calls go
        # there, so every worker opens and keeps a share of the tenants, not all of them.
        home = handle.path_hash % len(workers)  # home_index(), inline: this runs for every call
        best = self._cheapest(self._candidates(key, home) if self._sample else range(len(workers)),
                              handle.path, key, home, per_call, switching, max_warm)
        if not best.alive and self._sample:  # a sample of dead or busy workers: look at them all
            best = self._cheapest(range(len(workers)), handle.path, key, home, per_call, switching, max_warm)
        self._hold(best, key, handle.path, max_warm)
        return best

    def forget(self, w: WorkerLink) -> None:
        """``w`` has a new process: it holds no VM."""
        for key in w.warm:
            self._drop(key, w.index)
        w.warm.clear()

    def holders(self, key: str) -> list[int]:
        """The indexes of the workers that hold ``key`` (as recorded for sampling; empty up to
        FULL_SCAN_WORKERS workers, where every worker is looked at anyway)."""
        return list(self._holders.get(key, ()))

    def _candidates(self, key: str, home: int) -> list[int]:
        # One draw of a 31-bit linear congruential generator gives the four picks (no Python RNG call).
        seed = self._seed = (self._seed * 1103515245 + 12345) & 0x7FFFFFFF
        n = len(self.workers)
        picks = [home, seed % n, (seed >> 8) % n]
        holders = self._holders.get(key)
        if holders:
            picks.append(holders[(seed >> 16) % len(holders)])
            picks.append(holders[(seed >> 4) % len(holders)])
        return picks

    def _cheapest(self, indexes: Iterable[int], path: str, key: str, home: int, per_call: float, switching: bool,
                  max_warm: int) -> WorkerLink:
        workers = self.workers
        best, best_cost, best_index = workers[0], None, -1
        for i in indexes:
            w = workers[i]
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
            if best_cost is None or cost < best_cost or (cost == best_cost and i < best_index):
                best, best_cost, best_index = w, cost, i
        return best

    def _hold(self, w: WorkerLink, key: str, path: str, max_warm: int) -> None:
        warm = w.warm
        if self._sample and key not in warm:
            self._holders.setdefault(key, []).append(w.index)
        warm[key] = path
        warm.move_to_end(key)
        while len(warm) > max_warm:  # beyond the worker's VM bound its least recently used VM is gone
            gone, _ = warm.popitem(last=False)
            if self._sample:
                self._drop(gone, w.index)

    def _drop(self, key: str, index: int) -> None:
        holders = self._holders.get(key)
        if holders is not None and index in holders:
            holders.remove(index)
            if not holders:
                del self._holders[key]
