"""hlpool: a multi-process, shared-memory micro-VM sandbox pool on KVM.

The public API:

- :class:`Sandbox` - one KVM VM running a guest, created from a :class:`Snapshot`.
- :class:`Snapshot` - the immutable, shareable initialised state of a guest.
- :class:`Pool` - worker processes serving `submit(snapshot, fn, args)` (concurrent.futures style).
- :class:`MemoryConfig`, :class:`RestorePolicy` - sizes and restore behaviour.
- the exceptions in :mod:`hlpool.errors` (all derive from :class:`HlpoolError`).
"""

__version__ = "0.1.0"

from .errors import *  # noqa: E402,F401,F403
from .errors import HlpoolError  # noqa: E402,F401
from .layout import MemoryConfig  # noqa: E402,F401
from .memory import RestorePolicy  # noqa: E402,F401
from .sandbox import Sandbox  # noqa: E402,F401
from .snapshot import Region, Snapshot  # noqa: E402,F401
from .supervisor import Pool, SnapshotHandle  # noqa: E402,F401
