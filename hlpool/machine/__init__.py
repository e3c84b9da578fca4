"""A running guest: one VM, one vCPU and its memory, driven through the guest/host protocol.

:class:`~.machine.Machine` is the mechanism under every :class:`~hlpool.Sandbox`: it
maps a snapshot's memory into a VM, runs the vCPU until the guest signals (serving host
calls, log flushes and randomness on the way), reads and checks the guest's records,
restores memory and registers, and exposes what the snapshot layer needs to boot a guest
and capture its state (``run_init``, ``save_vcpu_state``, ``dirty_pages``, ``mapped_files``).

May import: :mod:`hlpool.errors`, :mod:`hlpool.defaults`, :mod:`hlpool._mapping`,
:mod:`hlpool.kvm`, :mod:`hlpool.guest`, :mod:`hlpool.memory`. It reads a snapshot's fields
but never imports :mod:`hlpool.snapshot` (which sits above it).
"""
