"""Turning what stopped a guest into a clear :class:`GuestFault`."""

from __future__ import annotations

from typing import Callable

from hlpool.errors import GuestFault
from hlpool.guest.layout import PAGE, Layout

VECTOR_NAMES = {
    0: "#DE divide error",
    1: "#DB debug",
    2: "NMI",
    3: "#BP breakpoint",
    4: "#OF overflow",
    5: "#BR bound range exceeded",
    6: "#UD invalid opcode",
    7: "#NM device not available",
    8: "#DF double fault",
    10: "#TS invalid TSS",
    11: "#NP segment not present",
    12: "#SS stack-segment fault",
    13: "#GP general protection fault",
    14: "#PF page fault",
    16: "#MF x87 floating-point error",
    17: "#AC alignment check",
    18: "#MC machine check",
    19: "#XM SIMD floating-point exception",
    20: "#VE virtualization exception",
    21: "#CP control protection",
}


def vector_name(vector: int) -> str:
    return VECTOR_NAMES.get(vector, f"vector {vector}")


def _where(address: int, layout: Layout, describe: Callable[[int], str | None] | None) -> str:
    """What lies at a guest address, for fault messages."""
    described = describe(address) if describe else None
    if described:
        return described
    if address < PAGE:
        return "NULL pointer dereference"
    stack_guard = layout.stack.start - PAGE
    if stack_guard <= address < layout.stack.start:
        return "stack overflow (hit the guard page below the stack)"
    for area in (layout.image, layout.heap, layout.stack, layout.call, layout.out, layout.log, layout.control,
                 layout.input, layout.reply, layout.files):
        if area.start <= address < area.end:
            return f"in {area.name}"
        if area.end <= address < area.end + PAGE:
            return f"guard page after {area.name}"
    return "unmapped address"


def exception_fault(vector: int, error_code: int, rip: int, cr2: int, layout: Layout,
                    describe: Callable[[int], str | None] | None = None) -> GuestFault:
    """A fault the guest runtime reported from its IDT handler.

    ``describe(address)`` may name what lies at an address (e.g. a mapped file).
    """
    name = vector_name(vector)
    message = f"guest fault: {name} at rip={rip:#x}"
    address = None
    if vector == 14:
        address = cr2
        access = "write" if error_code & 2 else ("instruction fetch" if error_code & 16 else "read")
        kind = "protection violation" if error_code & 1 else "not mapped"
        message += f", {access} of {cr2:#x} ({kind}; {_where(cr2, layout, describe)})"
    elif vector in (8, 10, 11, 12, 13, 17, 21) and error_code:
        message += f", error code {error_code:#x}"
    return GuestFault(message, vector=vector, vector_name=name, error_code=error_code, rip=rip, address=address)


def memory_fault(address: int, is_write: bool, rip: int | None, description: str) -> GuestFault:
    """A guest access KVM could not back with memory (read-only slot, no slot)."""
    access = "write to" if is_write else "read of"
    where = f" at rip={rip:#x}" if rip is not None else ""
    return GuestFault(f"guest fault: {access} {address:#x} ({description}){where}", vector=None,
                      vector_name="memory access violation", rip=rip, address=address)
