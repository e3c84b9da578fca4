"""Where everything lives in a guest's physical (= virtual, identity-mapped) memory.

One module owns the layout, so page tables, memory slots, boot info and
snapshots all agree. From low to high addresses::

    0x0000  null page              no slot, unmapped: a NULL dereference faults
    0x1000  VIF page               own RW slot; PVM's hypervisor writes here, never mapped
    0x2000  boot info          R   \\
    0x3000  GDT + TSS          R    } "system" slot: read-only to the guest at
    0x4000  mapped-files table R    } stage 2 (KVM_MEM_READONLY)
    0x5000  page tables        -   /  (not mapped in the guest's own tables)
    2 MiB   image (ELF segments with their own permissions)       \\
            guard, heap (RW), guard, OUT (RW), LOG (RW), guard,     } "main" slot:
            exception stack (RW), guard, stack (RW)                 } dirty-logged, restored
            top of the stack, CALL page (RW)                        "hot" slot: not logged,
                                                                    restored wholesale
            CONTROL (RX), IN (R), REPLY (R)                         "io" slot, read-only
    1 GiB-aligned: the files window (R, NX)                         one RO slot per mapped file

Guard pages are backed by the slot but unmapped in the page tables, so
touching one is a page fault the runtime reports.

The hot slot holds what every call writes (the call page with the OUT
record header and the runtime's per-call state, and the top of the stack).
Dirty logging would cost each of those pages a write-protect fault per call
(~4-5 us each here); copying the few pages back unconditionally costs far
less (see README, "Restore").

The io slot is per-sandbox anonymous memory that only the host writes: the
call input, host-call replies, and the control page, which holds the entry
stub every restored call starts in (it reloads the snapshot's x87/SSE/AVX state
with xrstor before any guest code runs; see hlpool/guest/entry_stub.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from hlpool.errors import HlpoolError

PAGE = 4096
LARGE_PAGE = 2 << 20
GIB = 1 << 30
MIB = 1 << 20
KIB = 1 << 10

# Fixed low pages.
VIF_PAGE = 0x1000
BOOT_INFO = 0x2000
GDT_PAGE = 0x3000
TSS_OFFSET = 0x800  # the TSS lives in the GDT's page
FILES_TABLE = 0x4000
PAGE_TABLES = 0x5000
SYSTEM_BASE = BOOT_INFO
IMAGE_BASE = LARGE_PAGE

EXCEPTION_STACK_SIZE = 16 * KIB
HOT_STACK_PAGES = 2  # stack pages (from the top) kept in the hot slot

# Memory slot numbers.
SLOT_VIF = 0
SLOT_SYSTEM = 1
SLOT_MAIN = 2
SLOT_IO = 3
SLOT_HOT = 4
SLOT_FIRST_FILE = 5


def page_up(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) & ~(alignment - 1)


@dataclass(frozen=True)
class MemoryConfig:
    """Sizes of a sandbox's memory areas (bytes; rounded up to whole pages).

    ``in_size`` bounds the encoded arguments of one call, ``out_size`` the
    encoded result (and one host-call request), ``reply_size`` one host-call
    answer, ``log_size`` how much log the guest buffers before an exit.
    """

    heap_size: int = 16 * MIB
    stack_size: int = 1 * MIB
    in_size: int = 1 * MIB
    out_size: int = 1 * MIB
    reply_size: int = 1 * MIB
    log_size: int = 64 * KIB
    files_window: int = 4 * GIB
    max_image_size: int = 512 * MIB

    def __post_init__(self) -> None:
        limits = {
            "heap_size": (64 * KIB, 64 * GIB),
            "stack_size": (16 * KIB, 1 * GIB),
            "in_size": (4 * KIB, 1 * GIB),
            "out_size": (4 * KIB, 1 * GIB),
            "reply_size": (4 * KIB, 1 * GIB),
            "log_size": (4 * KIB, 64 * MIB),
            "files_window": (0, 1024 * GIB),
            "max_image_size": (4 * KIB, 4 * GIB),
        }
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise HlpoolError(f"{name} must be an int, not {type(value).__name__}")
            if not low <= value <= high:
                raise HlpoolError(f"{name}={value} is outside [{low}, {high}]")
        for name in limits:
            object.__setattr__(self, name, align_up(getattr(self, name), LARGE_PAGE if name == "files_window" else PAGE))

    def to_dict(self) -> dict[str, int]:
        # The fields are ints: a flat dict without asdict's recursive deep copy (this runs for every
        # snapshot written, e.g. each script registered).
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Area:
    """A named range of guest memory."""

    name: str
    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class Layout:
    """Addresses for one guest image size and one :class:`MemoryConfig`."""

    config: MemoryConfig
    image_size: int
    image: Area = field(init=False)
    heap: Area = field(init=False)
    stack: Area = field(init=False)
    exception_stack: Area = field(init=False)
    call: Area = field(init=False)
    out: Area = field(init=False)
    log: Area = field(init=False)
    control: Area = field(init=False)
    input: Area = field(init=False)
    reply: Area = field(init=False)
    files: Area = field(init=False)
    system: Area = field(init=False)
    main: Area = field(init=False)
    logged: Area = field(init=False)
    hot: Area = field(init=False)
    io: Area = field(init=False)

    def __post_init__(self) -> None:
        c = self.config
        if self.image_size > c.max_image_size:
            raise HlpoolError(f"image of {self.image_size} bytes exceeds max_image_size={c.max_image_size}")
        areas: dict[str, Area] = {}
        cursor = IMAGE_BASE

        def take(name: str, size: int, guard_after: bool) -> None:
            nonlocal cursor
            areas[name] = Area(name, cursor, page_up(size))
            cursor += page_up(size) + (PAGE if guard_after else 0)

        take("image", max(self.image_size, PAGE), True)
        take("heap", c.heap_size, True)
        take("out", c.out_size, False)
        take("log", c.log_size, True)
        take("exception_stack", EXCEPTION_STACK_SIZE, True)
        take("stack", c.stack_size, False)
        take("call", PAGE, False)
        main_end = cursor
        hot_start = areas["stack"].end - HOT_STACK_PAGES * PAGE
        take("control", PAGE, False)
        take("input", c.in_size, False)
        take("reply", c.reply_size, False)
        io_end = cursor
        files_base = align_up(io_end, GIB)
        areas["files"] = Area("files", files_base, c.files_window)
        areas["system"] = Area("system", SYSTEM_BASE, IMAGE_BASE - SYSTEM_BASE)
        areas["main"] = Area("main", IMAGE_BASE, main_end - IMAGE_BASE)
        areas["logged"] = Area("logged", IMAGE_BASE, hot_start - IMAGE_BASE)
        areas["hot"] = Area("hot", hot_start, main_end - hot_start)
        areas["io"] = Area("io", main_end, io_end - main_end)
        for name, area in areas.items():
            object.__setattr__(self, name, area)
        if areas["files"].end > 1 << 46:
            raise HlpoolError("guest memory exceeds the 64 TiB this layout supports")

    @property
    def guest_memory_size(self) -> int:
        """Bytes of guest memory a sandbox can touch (system + main + io slots)."""
        return self.system.size + self.main.size + self.io.size

    def describe(self) -> list[Area]:
        return [self.system, self.image, self.heap, self.out, self.log, self.exception_stack, self.stack,
                self.call, self.control, self.input, self.reply, self.files]
