"""Which node runs a call: the snapshot's home node while it has room, else the least loaded one.

Each snapshot has an order of preference over the nodes by rendezvous (highest random
weight) hashing of (snapshot hash, node id): every driver computes the same order, a node
joining or leaving moves only the snapshots whose first choice it is, and the snapshots
spread over the nodes, so each node's page cache and warm VMs hold a share of them.
A call goes to the first node of that order whose outstanding calls are under
``spill_at``; past it, to the node with the fewest outstanding calls (ties: in the
snapshot's order) that is under ``limit``; with every node at ``limit`` the call waits in
the driver's queue (and so can still go to any node, including one that joins later).
"""

from __future__ import annotations

import hashlib
from typing import Protocol, Sequence, TypeVar


class Routable(Protocol):
    node_id: str

    @property
    def load(self) -> int: ...


N = TypeVar("N", bound=Routable)


def weight(key: str, node_id: str) -> int:
    """The rendezvous weight of ``node_id`` for ``key``."""
    return int.from_bytes(hashlib.blake2b(f"{key}\0{node_id}".encode(), digest_size=8).digest(), "big")


def preference(key: str, nodes: Sequence[N]) -> list[N]:
    """``nodes`` in ``key``'s order of preference (the same on every driver)."""
    return sorted(nodes, key=lambda n: weight(key, n.node_id), reverse=True)


def choose(key: str, nodes: Sequence[N], spill_at: int, limit: int) -> N | None:
    """The node for a call of snapshot ``key``, or None if every node has ``limit`` calls outstanding."""
    order = preference(key, nodes)
    if not order:
        return None
    if order[0].load < spill_at:
        return order[0]
    best = min(order, key=lambda n: n.load)  # min keeps the first of equals: the preferred one
    return best if best.load < limit else None
