"""Initialise a guest: ELF -> boot snapshot -> ``hl_main`` in a machine -> snapshot.

The boot snapshot holds the system pages (page tables, GDT, boot info) and the
relocated image in one sealed in-memory layer, with the entry registers. A
:class:`~hlpool.machine.machine.Machine` runs it until ``hl_main`` reports its
exports; the result is captured flattened (one layer, zero pages elided).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Mapping

from hlpool.defaults import INIT_TIMEOUT
from hlpool.errors import GuestImageError, HlpoolError
from hlpool.guest.boot import initial_regs, initial_sregs, initial_xcrs, system_memory
from hlpool.guest.elf import load_guest_image
from hlpool.guest.layout import IMAGE_BASE, PAGE, Layout, MemoryConfig
from hlpool.kvm import abi as kvm_abi
from hlpool.kvm.system import system
from hlpool.kvm.vcpu import VcpuState
from hlpool.machine.machine import HostFunction, Machine
from hlpool.memory.image import S
from hlpool.memory.layers import Layer, Run
from hlpool.snapshot.capture import capture

log = logging.getLogger(__name__)

APIC_BASE_DEFAULT = 0xFEE00900  # enabled, BSP, at the architectural address


def snapshot_from_elf(
    make: Callable[..., S],
    path: str | os.PathLike,
    *,
    heap_size: int | None = None,
    stack_size: int | None = None,
    host_functions: Mapping[str, HostFunction] | None = None,
    config: MemoryConfig | None = None,
    timeout: float | None = INIT_TIMEOUT,
) -> S:
    """Load and relocate a guest ELF, run its ``hl_main`` in a VM and capture the result.

    ``make`` builds the boot snapshot (the :class:`Snapshot` class or a subclass).

    ``heap_size``/``stack_size`` override ``config`` (a :class:`MemoryConfig`).
    ``host_functions`` are available to ``hl_main``. Raises
    :class:`GuestImageError` if the file is not a usable guest or its
    initialisation fails (the cause is chained).
    """
    path = os.fspath(path)
    config = config or MemoryConfig()
    overrides = {k: v for k, v in (("heap_size", heap_size), ("stack_size", stack_size)) if v is not None}
    if overrides:
        config = MemoryConfig(**{**config.to_dict(), **overrides})
    image = load_guest_image(path, IMAGE_BASE, config.max_image_size)
    try:
        layout = Layout(config, image.size)
    except HlpoolError as exc:
        raise GuestImageError(f"{path}: {exc}") from None
    kvm = system()
    system_bytes = system_memory(layout, image, kvm.tsc_khz)
    image_bytes = image.memory()
    layer = Layer.from_pages([system_bytes, image_bytes], name="hlpool-boot")
    image_pages = len(image_bytes) // PAGE
    main_pages = layout.main.size // PAGE
    runs = {
        "system": [Run(0, len(system_bytes) // PAGE, 0, 0)],
        "main": [Run(0, image_pages, 0, len(system_bytes)), Run(image_pages, main_pages - image_pages, -1, 0)],
    }
    sregs = initial_sregs(kvm_abi.KvmSregs(apic_base=APIC_BASE_DEFAULT))
    boot_state = VcpuState(regs=bytes(initial_regs(layout, image)), sregs=bytes(sregs), xsave=b"",
                           xcrs=bytes(initial_xcrs(kvm.supported_xcr0)), msrs={}, debugregs=b"", events=b"")
    segments = tuple((s.offset, s.size, "r" + ("w" if s.writable else "") + ("x" if s.executable else ""))
                     for s in image.segments)
    boot = make(layout=layout, vcpu=boot_state, exports=None, layers=(layer,), runs=runs,
                image_segments=segments, info={"image": os.path.abspath(path)})
    machine = Machine(boot, host_functions=host_functions, timeout=None, name=f"init:{os.path.basename(path)}")
    try:
        try:
            exports, rc = machine.run_init(timeout)
        except HlpoolError as exc:
            raise GuestImageError(f"{path}: initialisation failed: {exc}") from exc
        if rc != 0:
            raise GuestImageError(f"{path}: hl_main returned {rc}")
        snapshot = capture(machine, flatten=True, exports=tuple(exports))
    finally:
        machine.close()
        layer.close()
    log.info("snapshot of %s: %d exports, %d layer bytes", path, len(snapshot.exports or ()),
             snapshot.layers[-1].size)
    return snapshot

