"""hlpool on a Ray cluster: :class:`RayPool`, one hlpool :class:`~hlpool.pool.supervisor.Pool` per Ray node.

Layer: above :mod:`hlpool.pool`, below :mod:`hlpool.service`. Importing ``hlpool`` does not
import this package (nor Ray); ``import hlpool.ray`` needs the ``ray`` extra
(``pip install 'hlpool[ray]'``).

Modules, one job each:

- :mod:`hlpool.ray.shipping`: snapshot files by content hash (chains of layers, installing a
  fetched file into a node's store).
- :mod:`hlpool.ray.node`: the actor pinned to one node that owns that node's Pool.
- :mod:`hlpool.ray.routing`: which node a call goes to (rendezvous hashing, spill-over on load).
- :mod:`hlpool.ray.members`: the nodes of the cluster and their actors (joins, losses).
- :mod:`hlpool.ray.raypool`: :class:`RayPool`, the ``concurrent.futures``-style front.
"""

from __future__ import annotations

try:
    import ray as _ray  # noqa: F401  (the package's one hard requirement)
except ImportError as exc:  # a clear message rather than "No module named 'ray'" deep in a traceback
    from hlpool.errors import HlpoolError

    raise HlpoolError("hlpool.ray needs Ray: pip install 'hlpool[ray]'") from exc

from hlpool.ray.raypool import RayPool  # noqa: E402

__all__ = ["RayPool"]
