"""hlpool: a multi-process, shared-memory micro-VM sandbox pool on KVM.

The public API:

- :class:`Sandbox` - one KVM VM running a guest, created from a :class:`Snapshot`.
- :class:`Snapshot` - the immutable, shareable initialised state of a guest.
- :class:`Pool` - worker processes serving `submit(snapshot, fn, args)` (concurrent.futures style).
- :class:`MemoryConfig`, :class:`RestorePolicy` - sizes and restore behaviour.
- the exceptions in :mod:`hlpool.errors` (all derive from :class:`HlpoolError`).

The packages, lowest first (each imports only from those before it):
``kvm`` -> ``guest`` -> ``memory`` -> ``machine`` -> ``snapshot`` -> ``sandbox`` ->
``pool`` -> ``service`` -> ``cli``; ``errors``, ``defaults`` and ``version`` are leaves
every layer may use. docs/design.md draws the map.
"""

from hlpool.errors import *  # noqa: F401,F403
from hlpool.errors import HlpoolError  # noqa: F401
from hlpool.guest.layout import MemoryConfig  # noqa: F401
from hlpool.memory.guest_memory import RestorePolicy  # noqa: F401
from hlpool.pool.supervisor import Pool, SnapshotHandle  # noqa: F401
from hlpool.sandbox import Sandbox  # noqa: F401
from hlpool.snapshot import Region, Snapshot  # noqa: F401
from hlpool.version import __version__  # noqa: F401
