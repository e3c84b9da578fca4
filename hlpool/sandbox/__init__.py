"""The sandbox: the public object that answers calls, one guest in one micro-VM.

:class:`~.sandbox.Sandbox` is a :class:`~hlpool.machine.machine.Machine` made from a
:class:`~hlpool.Snapshot`, with the call API, restore, snapshots of itself and mapped files.

May import: :mod:`hlpool.snapshot` and everything below it.
"""

from hlpool.sandbox.sandbox import HostFunction, Sandbox, SandboxStatus

__all__ = ["HostFunction", "Sandbox", "SandboxStatus"]
