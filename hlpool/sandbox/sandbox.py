"""The public sandbox: a :class:`~hlpool.machine.machine.Machine` made from a :class:`~hlpool.Snapshot`.

The machine below does the work (VM, vCPU, memory, calls, restore); this class
adds what needs the snapshot layer: construction from a checked snapshot or an
ELF, and snapshots of the live sandbox. It is a subclass, not a wrapper, so the
call path has no extra hop.
"""

from __future__ import annotations

from typing import Any, Mapping

from hlpool.machine import switching
from hlpool.machine.machine import HostFunction, Machine, SandboxStatus
from hlpool.memory.switch import SwitchStats
from hlpool.snapshot.capture import Retain, capture
from hlpool.snapshot.snapshot import Snapshot

__all__ = ["HostFunction", "Sandbox", "SandboxStatus", "SwitchStats"]


class Sandbox(Machine):
    """A micro-VM running one guest, created from a :class:`~hlpool.Snapshot`.

    >>> with Sandbox.from_elf("add.elf") as sb:
    ...     sb.call("add", 2, 3)
    5

    Every call starts from the snapshot (README, "Isolation between calls"). The
    keyword arguments (``host_functions``, ``timeout``, ``restore_policy``,
    ``log_handler``, ``strict_cpu_reset``, ``private_memory``, ...) are those of
    :class:`~hlpool.machine.machine.Machine`, which does the work; this class adds
    what needs the snapshot layer: :meth:`from_elf` and :meth:`snapshot`.
    """

    def __init__(self, snapshot: Snapshot, **options: Any) -> None:
        if not isinstance(snapshot, Snapshot):
            raise TypeError(f"Sandbox needs a Snapshot, not {type(snapshot).__name__}")
        super().__init__(snapshot, **options)

    @classmethod
    def from_elf(cls, path: str, *, heap_size: int | None = None, stack_size: int | None = None,
                 host_functions: Mapping[str, HostFunction] | None = None, **kwargs: Any) -> "Sandbox":
        """Load, relocate and initialise a guest ELF, then return a sandbox at its initialised state.

        Extra keyword arguments go to :class:`Sandbox` (timeout, restore_policy, ...).
        """
        snapshot = Snapshot.from_elf(path, heap_size=heap_size, stack_size=stack_size,
                                     host_functions=host_functions)
        return cls(snapshot, host_functions=host_functions, **kwargs)

    def switch(self, target: Snapshot) -> SwitchStats:
        """Move this sandbox to ``target``, a snapshot of the same family (:attr:`Snapshot.family`):
        afterwards it behaves exactly like ``Sandbox(target)`` with this sandbox's options, at a cost
        that follows the pages the two differ in (:meth:`Machine.switch <hlpool.machine.machine.Machine.switch>`).

        >>> a, b = load_script(base, "function f() { return 1 }"), load_script(base, "function f() { return 2 }")
        >>> sb = Sandbox(a); sb.switch(b); sb.call("call", "f", [])
        2
        """
        if not isinstance(target, Snapshot):
            raise TypeError(f"Sandbox.switch needs a Snapshot, not {type(target).__name__}")
        return super().switch(target)

    def prepare_switch(self, target: Snapshot) -> bool:
        """Do now the part of a later :meth:`switch` to ``target`` that depends on ``target`` alone
        (its entry pages and run arrays, kept with the snapshot object); changes nothing in the
        sandbox. False if ``target`` is not of this sandbox's family (a switch would refuse it).
        A pool's worker does this when it opens a tenant ahead of its first call."""
        with self._lock:
            return switching.prepare(self, target)

    @property
    def snapshot_in_use(self) -> Snapshot:
        """The snapshot the sandbox is at (what :meth:`restore` returns to; changed by :meth:`switch`)."""
        return self.base_snapshot  # type: ignore[return-value]

    def snapshot(self, retain: Retain | None = None) -> Snapshot:
        """Take a new snapshot of the live sandbox, layered on this sandbox's snapshot.

        Pages that differ from the parent go into a new layer; the others stay
        references to the parent's files. ``retain`` is either a callable, asked
        once per :class:`~hlpool.Region` (a layout area with one backing):
        ``retain(region)`` returns True (keep the parent's bytes for that region),
        False (copy the region into the new layer) or None (default); or a list of
        page ranges ``[(guest_address, size), ...]`` (page-aligned, inside the
        snapshot's memory) whose pages keep the parent's bytes, whatever the guest
        wrote there (ValueError/TypeError for a malformed range).

        Right after a call that restored the sandbox, the snapshot is of the restored
        state: the parent's registers with the parent's memory.
        """
        with self._lock:
            self._refuse_reentry("snapshot")
            self._check_usable()
            return capture(self, retain=retain)
