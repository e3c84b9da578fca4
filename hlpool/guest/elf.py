"""Load and relocate a guest ELF (a static PIE built with the hlpool SDK).

The file is untrusted input: every size, offset and address in it is
checked before use, and anything hlpool does not support is rejected with a
:class:`GuestImageError` that names the problem. Supported: ELF64,
little-endian, x86-64, ET_DYN (static PIE), PT_LOAD segments, and dynamic
relocations of type R_X86_64_RELATIVE (and R_X86_64_NONE).
"""

from __future__ import annotations

import io
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from hlpool.errors import GuestImageError
from hlpool.guest.layout import PAGE, page_up

PT_LOAD, PT_DYNAMIC, PT_INTERP, PT_PHDR, PT_TLS = 1, 2, 3, 6, 7
PF_X, PF_W, PF_R = 1, 2, 4
R_X86_64_NONE, R_X86_64_RELATIVE = 0, 8
DT_NULL, DT_NEEDED, DT_PLTRELSZ, DT_RELA, DT_RELASZ, DT_RELAENT = 0, 1, 2, 7, 8, 9
DT_REL, DT_RELSZ, DT_JMPREL, DT_RELR = 17, 18, 23, 36
RELOCATION_NAMES = {1: "R_X86_64_64", 2: "R_X86_64_PC32", 4: "R_X86_64_PLT32", 5: "R_X86_64_COPY",
                    6: "R_X86_64_GLOB_DAT", 7: "R_X86_64_JUMP_SLOT", 16: "R_X86_64_DTPMOD64",
                    17: "R_X86_64_DTPOFF64", 18: "R_X86_64_TPOFF64", 37: "R_X86_64_IRELATIVE"}
RELA_ENTRY = struct.Struct("<QQq")
MAX_FILE_SIZE = 1 << 32


@dataclass(frozen=True)
class Segment:
    """A loadable segment, relocated, as it must appear in guest memory."""

    offset: int  # from the image base (page-aligned)
    data: bytes  # page-padded contents (file bytes, then zeros up to memsz)
    readable: bool
    writable: bool
    executable: bool

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class GuestImage:
    """A relocated guest image ready to be copied to ``base``."""

    path: str
    base: int
    size: int  # bytes from base to the end of the last segment (page-aligned)
    entry: int  # absolute guest address
    phdr: int  # absolute guest address of the program headers
    phnum: int
    phent: int
    segments: tuple[Segment, ...]
    relocations: int

    def memory(self) -> bytearray:
        """The whole image as one buffer of ``size`` bytes (gaps are zero)."""
        out = bytearray(self.size)
        for seg in self.segments:
            out[seg.offset:seg.offset + seg.size] = seg.data
        return out


def load_guest_image(path: str | Path, base: int, max_size: int) -> GuestImage:
    """Parse, validate and relocate the ELF at ``path`` for loading at ``base``."""
    path = str(path)
    try:
        # Non-blocking open: a FIFO must not stall the caller; then only regular files are read.
        with open(os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise GuestImageError(f"{path}: not a regular file")
            raw = f.read(min(st.st_size, MAX_FILE_SIZE) + 1)  # what is there: read(n) would reserve n bytes
    except FileNotFoundError:
        raise GuestImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise GuestImageError(f"{path}: is a directory") from None
    except OSError as exc:
        raise GuestImageError(f"{path}: cannot read: {exc.strerror}") from None
    if len(raw) > MAX_FILE_SIZE:
        raise GuestImageError(f"{path}: file larger than {MAX_FILE_SIZE} bytes")
    return parse_guest_image(raw, base, max_size, name=path)


def parse_guest_image(raw: bytes, base: int, max_size: int, name: str = "<bytes>") -> GuestImage:
    """Like :func:`load_guest_image` for an ELF already in memory."""
    if base % PAGE:
        raise ValueError("base must be page aligned")

    def fail(msg: str) -> GuestImageError:
        return GuestImageError(f"{name}: {msg}")

    if len(raw) < 64 or raw[:4] != b"\x7fELF":
        raise fail("not an ELF file (bad magic)")
    if raw[4] != 2:
        raise fail("not a 64-bit ELF (EI_CLASS is %d)" % raw[4])
    if raw[5] != 1:
        raise fail("not a little-endian ELF")
    try:
        elf = ELFFile(io.BytesIO(raw))
        header = elf.header
        machine = header["e_machine"]
        etype = header["e_type"]
        phnum = header["e_phnum"]
        phoff = header["e_phoff"]
        phent = header["e_phentsize"]
        entry = header["e_entry"]
        shoff = header["e_shoff"]
        shnum = header["e_shnum"]
        shent = header["e_shentsize"]
    except (ELFError, struct.error, ValueError, KeyError) as exc:
        raise fail(f"malformed ELF header: {exc}") from None
    if machine != "EM_X86_64":
        raise fail(f"built for {machine}, not x86-64")
    if etype == "ET_EXEC":
        raise fail("not position-independent (ET_EXEC); build it with `hlpool guest build` (static PIE)")
    if etype != "ET_DYN":
        raise fail(f"unsupported ELF type {etype}; expected a static PIE (ET_DYN)")
    if phent != 56:
        raise fail(f"unexpected program header size {phent}")
    if phnum == 0 or phnum > 64:
        raise fail(f"unreasonable number of program headers ({phnum})")
    if phoff + phnum * phent > len(raw):
        raise fail("program header table extends past the end of the file")
    # pyelftools reads section headers lazily; a file cut short after its loaded
    # data would otherwise pass. e_shnum == 0 with e_shoff set means the count is
    # in section 0, so at least one entry must be there.
    if shoff and shoff + max(shnum, 1) * shent > len(raw):
        raise fail("section header table extends past the end of the file (truncated?)")

    phdrs = []
    for i in range(phnum):
        (p_type, p_flags, p_offset, p_vaddr, _p_paddr, p_filesz, p_memsz, p_align) = struct.unpack_from(
            "<IIQQQQQQ", raw, phoff + i * phent)
        phdrs.append((p_type, p_flags, p_offset, p_vaddr, p_filesz, p_memsz, p_align))

    if any(p[0] == PT_INTERP for p in phdrs):
        raise fail("dynamically linked (has PT_INTERP); guests must be static PIEs")
    loads = [p for p in phdrs if p[0] == PT_LOAD]
    if not loads:
        raise fail("no PT_LOAD segments")

    # Validate segments and compute the image extent.
    end = 0
    previous_end = 0
    for p_type, p_flags, p_offset, p_vaddr, p_filesz, p_memsz, p_align in loads:
        what = f"PT_LOAD at vaddr {p_vaddr:#x}"
        if p_filesz > p_memsz:
            raise fail(f"{what}: file size {p_filesz} exceeds memory size {p_memsz}")
        if p_offset + p_filesz > len(raw) or p_offset + p_filesz < p_offset:
            raise fail(f"{what}: file range {p_offset:#x}+{p_filesz:#x} extends past the end of the file "
                       f"({len(raw)} bytes; truncated?)")
        if p_align and (p_align & (p_align - 1)):
            raise fail(f"{what}: alignment {p_align} is not a power of two")
        if p_vaddr % PAGE != p_offset % PAGE:
            raise fail(f"{what}: offset {p_offset:#x} and address are not congruent modulo the page size")
        if p_memsz > max_size or p_vaddr > max_size or p_vaddr + p_memsz > max_size:
            raise fail(f"{what}: {p_memsz} bytes at {p_vaddr:#x} do not fit the {max_size}-byte image budget")
        if p_vaddr < previous_end:
            raise fail(f"{what}: overlaps the previous segment or is out of order")
        previous_end = p_vaddr + p_memsz
        end = max(end, page_up(p_vaddr + p_memsz))
    if end > max_size:
        raise fail(f"image needs {end} bytes, more than the {max_size}-byte budget")

    # Build memory: page permissions are the union of the segments sharing a page.
    memory = bytearray(end)
    page_flags = [0] * (end // PAGE)
    for _t, p_flags, p_offset, p_vaddr, p_filesz, p_memsz, _a in loads:
        memory[p_vaddr:p_vaddr + p_filesz] = raw[p_offset:p_offset + p_filesz]
        for page in range(p_vaddr // PAGE, page_up(p_vaddr + p_memsz) // PAGE):
            page_flags[page] |= p_flags | PF_R

    if not any(lo <= entry < lo + sz and (fl & PF_X) for _t, fl, _o, lo, _f, sz, _a in loads):
        raise fail(f"entry point {entry:#x} is not inside an executable segment")

    phdr_vaddr = next((p[3] for p in phdrs if p[0] == PT_PHDR), None)
    if phdr_vaddr is None:
        # Without PT_PHDR, the headers are visible if a segment maps the file's start.
        first = loads[0]
        if first[2] == 0 and first[4] >= phoff + phnum * phent:
            phdr_vaddr = first[3] + phoff
        else:
            raise fail("program headers are not loaded (no PT_PHDR); libc needs them for TLS")
    if phdr_vaddr + phnum * phent > end:
        raise fail("PT_PHDR lies outside the loaded image")

    relocations = _apply_relocations(raw, memory, phdrs, loads, base, fail)

    segments = []
    page = 0
    while page < len(page_flags):
        flags = page_flags[page]
        start = page
        while page < len(page_flags) and page_flags[page] == flags:
            page += 1
        if flags:
            segments.append(Segment(
                offset=start * PAGE,
                data=bytes(memory[start * PAGE:page * PAGE]),
                readable=True,
                writable=bool(flags & PF_W),
                executable=bool(flags & PF_X),
            ))
    return GuestImage(path=name, base=base, size=end, entry=base + entry, phdr=base + phdr_vaddr,
                      phnum=phnum, phent=phent, segments=tuple(segments), relocations=relocations)


def _vaddr_to_offset(loads: list, vaddr: int, size: int) -> int | None:
    for _t, _f, p_offset, p_vaddr, p_filesz, _m, _a in loads:
        if p_vaddr <= vaddr and vaddr + size <= p_vaddr + p_filesz:
            return p_offset + (vaddr - p_vaddr)
    return None


def _apply_relocations(raw: bytes, memory: bytearray, phdrs: list, loads: list, base: int, fail) -> int:
    dynamic = [p for p in phdrs if p[0] == PT_DYNAMIC]
    if not dynamic:
        return 0
    _t, _f, d_offset, _v, d_filesz, _m, _a = dynamic[0]
    if d_offset + d_filesz > len(raw):
        raise fail("PT_DYNAMIC extends past the end of the file")
    tags: dict[int, int] = {}
    for pos in range(d_offset, d_offset + d_filesz - 15, 16):
        tag, value = struct.unpack_from("<qQ", raw, pos)
        if tag == DT_NULL:
            break
        if tag == DT_NEEDED:
            raise fail("needs shared libraries (DT_NEEDED); guests must be static")
        tags.setdefault(tag, value)
    if tags.get(DT_RELSZ):
        raise fail("uses REL relocations (DT_REL); only RELA is supported")
    if tags.get(DT_PLTRELSZ):
        raise fail("has PLT relocations (DT_JMPREL); link with -static-pie")
    if DT_RELR in tags:
        raise fail("uses packed RELR relocations; link without -z pack-relative-relocs")
    size = tags.get(DT_RELASZ, 0)
    if not size:
        return 0
    if tags.get(DT_RELAENT, RELA_ENTRY.size) != RELA_ENTRY.size:
        raise fail(f"unexpected RELA entry size {tags.get(DT_RELAENT)}")
    if size % RELA_ENTRY.size:
        raise fail("DT_RELASZ is not a multiple of the entry size")
    table = _vaddr_to_offset(loads, tags.get(DT_RELA, 0), size)
    if table is None:
        raise fail("relocation table (DT_RELA) lies outside the file's loaded data")
    count = 0
    for pos in range(table, table + size, RELA_ENTRY.size):
        r_offset, r_info, r_addend = RELA_ENTRY.unpack_from(raw, pos)
        rtype = r_info & 0xFFFFFFFF
        if rtype == R_X86_64_NONE:
            continue
        if rtype != R_X86_64_RELATIVE:
            name = RELOCATION_NAMES.get(rtype, f"type {rtype}")
            raise fail(f"unsupported relocation {name} at {r_offset:#x}; only R_X86_64_RELATIVE is allowed "
                       "(was it linked with -static-pie?)")
        if r_offset + 8 > len(memory) or r_offset + 8 < r_offset:
            raise fail(f"relocation at {r_offset:#x} points outside the image")
        value = base + r_addend
        if not 0 <= value < 1 << 64:
            raise fail(f"relocation at {r_offset:#x} has an out-of-range addend {r_addend}")
        struct.pack_into("<Q", memory, r_offset, value)
        count += 1
    return count
