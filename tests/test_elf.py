"""The guest ELF loader: a real SDK-built guest, then hostile and corrupted files.

No KVM needed. Hostile inputs are made by patching fields of the real guest
by offset; every one must be rejected with a GuestImageError that names the
problem, never with another exception.
"""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hlpool.errors import GuestImageError
from hlpool.guest.elf import GuestImage, load_guest_image, parse_guest_image
from hlpool.guest.layout import IMAGE_BASE, MIB, PAGE, page_up

MAX_SIZE = 512 * MIB
FUZZ_MAX_SIZE = 16 * MIB  # keeps accepted mutants small

PT_NULL, PT_LOAD, PT_DYNAMIC, PT_INTERP, PT_PHDR, PT_GNU_STACK = 0, 1, 2, 3, 6, 0x6474E551
PF_X, PF_W, PF_R = 1, 2, 4
R_X86_64_64, R_X86_64_GLOB_DAT, R_X86_64_RELATIVE, R_X86_64_IRELATIVE = 1, 6, 8, 37
DT_NULL, DT_NEEDED, DT_PLTRELSZ, DT_RELA, DT_RELASZ, DT_RELAENT = 0, 1, 2, 7, 8, 9
DT_RELSZ, DT_RELR = 18, 36

# ELF64 header fields: (offset, struct format).
HEADER_FIELDS = {
    "e_type": (16, "<H"), "e_machine": (18, "<H"), "e_entry": (24, "<Q"), "e_phoff": (32, "<Q"),
    "e_shoff": (40, "<Q"), "e_phentsize": (54, "<H"), "e_phnum": (56, "<H"), "e_shnum": (60, "<H"),
}
# Program header fields (56 bytes each).
PHDR_SIZE = 56
PHDR_FIELDS = {
    "p_type": (0, "<I"), "p_flags": (4, "<I"), "p_offset": (8, "<Q"), "p_vaddr": (16, "<Q"),
    "p_paddr": (24, "<Q"), "p_filesz": (32, "<Q"), "p_memsz": (40, "<Q"), "p_align": (48, "<Q"),
}
RELA = struct.Struct("<QQq")


# ---- helpers: read and patch the real ELF ------------------------------------------------


def header(raw: bytes, name: str) -> int:
    offset, fmt = HEADER_FIELDS[name]
    return struct.unpack_from(fmt, raw, offset)[0]


def patch_header(raw: bytes, **fields: int) -> bytes:
    out = bytearray(raw)
    for name, value in fields.items():
        offset, fmt = HEADER_FIELDS[name]
        struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def phdrs(raw: bytes) -> list[dict[str, int]]:
    """Every program header as a dict of its fields (plus 'index')."""
    phoff = header(raw, "e_phoff")
    out = []
    for i in range(header(raw, "e_phnum")):
        entry = {name: struct.unpack_from(fmt, raw, phoff + i * PHDR_SIZE + off)[0]
                 for name, (off, fmt) in PHDR_FIELDS.items()}
        entry["index"] = i
        out.append(entry)
    return out


def phdr_of_type(raw: bytes, p_type: int, which: int = 0) -> dict[str, int]:
    return [p for p in phdrs(raw) if p["p_type"] == p_type][which]


def patch_phdr(raw: bytes, index: int, **fields: int) -> bytes:
    out = bytearray(raw)
    base = header(raw, "e_phoff") + index * PHDR_SIZE
    for name, value in fields.items():
        offset, fmt = PHDR_FIELDS[name]
        struct.pack_into(fmt, out, base + offset, value)
    return bytes(out)


def vaddr_to_offset(raw: bytes, vaddr: int) -> int:
    for p in phdrs(raw):
        if p["p_type"] == PT_LOAD and p["p_vaddr"] <= vaddr < p["p_vaddr"] + p["p_filesz"]:
            return p["p_offset"] + vaddr - p["p_vaddr"]
    raise AssertionError(f"{vaddr:#x} is not in the file")


def dynamic_entries(raw: bytes) -> list[tuple[int, int, int]]:
    """(file position, tag, value) of each dynamic entry up to DT_NULL."""
    dyn = phdr_of_type(raw, PT_DYNAMIC)
    out = []
    for pos in range(dyn["p_offset"], dyn["p_offset"] + dyn["p_filesz"], 16):
        tag, value = struct.unpack_from("<qQ", raw, pos)
        if tag == DT_NULL:
            break
        out.append((pos, tag, value))
    return out


def dynamic_tag(raw: bytes, tag: int) -> int:
    return next(value for _pos, t, value in dynamic_entries(raw) if t == tag)


def patch_dynamic_spare(raw: bytes, tag: int, value: int) -> bytes:
    """Overwrite the first dynamic entry that relocation does not need with (tag, value)."""
    pos = next(pos for pos, t, _v in dynamic_entries(raw) if t not in (DT_RELA, DT_RELASZ, DT_RELAENT))
    out = bytearray(raw)
    struct.pack_into("<qQ", out, pos, tag, value)
    return bytes(out)


def patch_dynamic_tag(raw: bytes, tag: int, value: int) -> bytes:
    pos = next(pos for pos, t, _v in dynamic_entries(raw) if t == tag)
    out = bytearray(raw)
    struct.pack_into("<Q", out, pos + 8, value)
    return bytes(out)


def rela_entries(raw: bytes) -> list[tuple[int, int, int, int]]:
    """(file position, r_offset, r_info, r_addend) of each entry of the DT_RELA table, read by hand."""
    table = vaddr_to_offset(raw, dynamic_tag(raw, DT_RELA))
    size = dynamic_tag(raw, DT_RELASZ)
    assert dynamic_tag(raw, DT_RELAENT) == RELA.size and size % RELA.size == 0
    return [(pos, *RELA.unpack_from(raw, pos)) for pos in range(table, table + size, RELA.size)]


def patch_rela(raw: bytes, which: int, r_offset: int | None = None, r_type: int | None = None,
               r_addend: int | None = None) -> bytes:
    pos, offset, info, addend = rela_entries(raw)[which]
    if r_offset is not None:
        offset = r_offset
    if r_type is not None:
        info = (info & ~0xFFFFFFFF) | r_type
    if r_addend is not None:
        addend = r_addend
    out = bytearray(raw)
    RELA.pack_into(out, pos, offset, info, addend)
    return bytes(out)


def rejected(raw: bytes, match: str, max_size: int = MAX_SIZE) -> GuestImageError:
    """Assert that ``raw`` is rejected with a GuestImageError whose message contains ``match``."""
    with pytest.raises(GuestImageError) as info:
        parse_guest_image(raw, IMAGE_BASE, max_size, name="hostile.elf")
    message = str(info.value)
    assert message.startswith("hostile.elf: "), message
    assert match.lower() in message.lower(), f"{match!r} not in {message!r}"
    return info.value


def load_or_reject(raw: bytes, max_size: int = FUZZ_MAX_SIZE) -> GuestImage | None:
    """Load ``raw``; a GuestImageError is fine, any other exception fails the test."""
    try:
        image = parse_guest_image(raw, IMAGE_BASE, max_size, name="mutant.elf")
    except GuestImageError as exc:
        assert str(exc).startswith("mutant.elf: ")
        return None
    check_image_invariants(image, max_size)
    return image


def check_image_invariants(image: GuestImage, max_size: int) -> None:
    assert image.size % PAGE == 0 and 0 < image.size <= max_size
    end = 0
    for seg in image.segments:
        assert seg.offset % PAGE == 0 and seg.size % PAGE == 0 and seg.size > 0
        assert seg.offset >= end, "segments overlap or are out of order"
        end = seg.offset + seg.size
        assert seg.readable
    assert end <= image.size
    assert any(s.executable and image.base + s.offset <= image.entry < image.base + s.offset + s.size
               for s in image.segments), "entry point not executable"


# ---- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def elf_path() -> Path:
    from hlpool.guest.examples import example_path

    return Path(example_path("echo"))


@pytest.fixture(scope="module")
def raw(elf_path) -> bytes:
    data = elf_path.read_bytes()
    assert data[:4] == b"\x7fELF"
    return data


@pytest.fixture(scope="module")
def image(elf_path) -> GuestImage:
    return load_guest_image(elf_path, IMAGE_BASE, MAX_SIZE)


# ---- the real guest ---------------------------------------------------------------------


def test_loads(elf_path, raw, image):
    assert image.path == str(elf_path)
    assert image.base == IMAGE_BASE
    loads = [p for p in phdrs(raw) if p["p_type"] == PT_LOAD]
    assert image.size == page_up(max(p["p_vaddr"] + p["p_memsz"] for p in loads))
    check_image_invariants(image, MAX_SIZE)
    again = parse_guest_image(raw, IMAGE_BASE, MAX_SIZE, name=str(elf_path))
    assert again == image


def test_entry_and_program_headers(raw, image):
    assert image.entry == IMAGE_BASE + header(raw, "e_entry")
    text = [s for s in image.segments if s.executable]
    assert len(text) == 1 and text[0].offset <= image.entry - IMAGE_BASE < text[0].offset + text[0].size
    assert image.phdr == IMAGE_BASE + phdr_of_type(raw, PT_PHDR)["p_vaddr"]
    assert (image.phnum, image.phent) == (header(raw, "e_phnum"), PHDR_SIZE)
    # The program headers are in the image, byte for byte.
    memory = image.memory()
    at = image.phdr - IMAGE_BASE
    assert memory[at:at + image.phnum * image.phent] == raw[header(raw, "e_phoff"):][:image.phnum * PHDR_SIZE]


def test_segments(raw, image):
    perms = [("r" if s.readable else "-") + ("w" if s.writable else "-") + ("x" if s.executable else "-")
             for s in image.segments]
    assert perms == ["r-x", "r--", "rw-"]
    end = 0
    for seg in image.segments:
        assert seg.offset % PAGE == 0 and seg.size % PAGE == 0
        assert seg.offset >= end
        end = seg.offset + seg.size
    assert end == image.size
    # Each segment's permissions are those of the PT_LOAD covering it.
    for p in (p for p in phdrs(raw) if p["p_type"] == PT_LOAD):
        for seg in image.segments:
            if seg.offset <= p["p_vaddr"] < seg.offset + seg.size:
                assert seg.writable == bool(p["p_flags"] & PF_W)
                assert seg.executable == bool(p["p_flags"] & PF_X)


def test_contents_match_the_file_except_relocations(raw, image):
    memory = image.memory()
    sites = {r_offset for _pos, r_offset, info, _a in rela_entries(raw) if info & 0xFFFFFFFF == R_X86_64_RELATIVE}
    expected = bytearray(image.size)
    for p in (p for p in phdrs(raw) if p["p_type"] == PT_LOAD):
        expected[p["p_vaddr"]:p["p_vaddr"] + p["p_filesz"]] = raw[p["p_offset"]:p["p_offset"] + p["p_filesz"]]
    for site in sites:
        expected[site:site + 8] = memory[site:site + 8]
    assert memory == expected  # file bytes, zero bss and padding


def test_relocations_applied(raw, image):
    entries = rela_entries(raw)
    relative = [(off, addend) for _pos, off, info, addend in entries if info & 0xFFFFFFFF == R_X86_64_RELATIVE]
    assert image.relocations == len(relative) > 0
    memory = image.memory()
    for offset, addend in relative:
        assert struct.unpack_from("<Q", memory, offset)[0] == IMAGE_BASE + addend
    # At least one relocated pointer points into the image itself (e.g. a string in rodata).
    assert any(IMAGE_BASE <= IMAGE_BASE + a < IMAGE_BASE + image.size for _o, a in relative)


def test_two_bases_differ_exactly_at_relocation_sites(raw, image):
    other_base = 0x40000000 + 7 * PAGE
    other = parse_guest_image(raw, other_base, MAX_SIZE)
    delta = other_base - IMAGE_BASE
    assert other.entry - image.entry == delta and other.phdr - image.phdr == delta
    assert [(s.offset, s.size, s.writable, s.executable) for s in other.segments] == \
           [(s.offset, s.size, s.writable, s.executable) for s in image.segments]
    a, b = image.memory(), other.memory()
    sites = sorted(off for _pos, off, info, _a in rela_entries(raw) if info & 0xFFFFFFFF == R_X86_64_RELATIVE)
    for site in sites:
        assert struct.unpack_from("<Q", b, site)[0] - struct.unpack_from("<Q", a, site)[0] == delta
    differing = {i for i in range(len(a)) if a[i] != b[i]}
    assert differing and differing <= {site + k for site in sites for k in range(8)}


def test_unaligned_base_is_a_programming_error(raw):
    with pytest.raises(ValueError, match="aligned"):
        parse_guest_image(raw, IMAGE_BASE + 8, MAX_SIZE)


def test_budget_exactly_the_image_size(raw, image):
    assert parse_guest_image(raw, IMAGE_BASE, image.size).size == image.size
    rejected(raw, "budget", max_size=image.size - PAGE)


# ---- not an ELF / wrong kind of ELF -----------------------------------------------------


def test_empty_file(tmp_path):
    path = tmp_path / "empty.elf"
    path.write_bytes(b"")
    with pytest.raises(GuestImageError, match="not an ELF") as info:
        load_guest_image(path, IMAGE_BASE, MAX_SIZE)
    assert str(path) in str(info.value)


def test_random_bytes(tmp_path):
    path = tmp_path / "random.bin"
    path.write_bytes(random.Random(1234).randbytes(8192))
    with pytest.raises(GuestImageError, match="not an ELF"):
        load_guest_image(path, IMAGE_BASE, MAX_SIZE)


def test_text_file(tmp_path):
    path = tmp_path / "guest.c"
    path.write_text("int main(void) { return 0; }\n" * 10)
    with pytest.raises(GuestImageError, match="not an ELF"):
        load_guest_image(path, IMAGE_BASE, MAX_SIZE)


def test_magic_only():
    rejected(b"\x7fELF", "not an ELF")
    rejected(b"\x7fELF" + bytes(60), "64-bit")


def test_32_bit(raw):
    rejected(raw[:4] + b"\x01" + raw[5:], "64-bit")


def test_big_endian(raw):
    rejected(raw[:5] + b"\x02" + raw[6:], "little-endian")


@pytest.mark.parametrize("machine", [3, 40, 183, 0, 0xBEEF])  # i386, ARM, AArch64, none, unknown
def test_wrong_machine(raw, machine):
    rejected(patch_header(raw, e_machine=machine), "not x86-64")


def test_et_exec(raw):
    rejected(patch_header(raw, e_type=2), "ET_EXEC")


def test_et_rel(raw):
    rejected(patch_header(raw, e_type=1), "ET_REL")


@pytest.mark.parametrize("e_type", [0, 4, 0xFE00, 0xFFFF])
def test_other_types(raw, e_type):
    rejected(patch_header(raw, e_type=e_type), "unsupported ELF type")


def test_bad_program_header_table(raw):
    rejected(patch_header(raw, e_phentsize=32), "program header size")
    rejected(patch_header(raw, e_phnum=0), "number of program headers")
    rejected(patch_header(raw, e_phnum=65), "number of program headers")
    rejected(patch_header(raw, e_phoff=len(raw) - 10), "program header table extends past the end")
    rejected(patch_header(raw, e_phoff=1 << 63), "program header table extends past the end")


def test_section_header_table_past_the_end(raw):
    rejected(patch_header(raw, e_shoff=len(raw)), "section header table")
    rejected(patch_header(raw, e_shnum=header(raw, "e_shnum") + 1), "section header table")


def test_truncated_everywhere(raw):
    cuts = {0, 1, 3, 4, 5, 16, 63, 64, 65, 100, len(raw) - 64, len(raw) - 1}
    cuts |= {len(raw) * i // 30 for i in range(30)}
    # Right before and inside the end of every loaded segment's file bytes.
    for p in phdrs(raw):
        end = p["p_offset"] + p["p_filesz"]
        cuts |= {end - 1, end - 8} if p["p_filesz"] else set()
    cuts = sorted(c for c in cuts if 0 <= c < len(raw))
    assert len(cuts) >= 30
    for cut in cuts:
        with pytest.raises(GuestImageError) as info:
            parse_guest_image(raw[:cut], IMAGE_BASE, MAX_SIZE, name=f"cut-{cut}")
        assert str(info.value).startswith(f"cut-{cut}: ")


# ---- segments -----------------------------------------------------------------------------


def test_filesz_greater_than_memsz(raw):
    text = phdr_of_type(raw, PT_LOAD, 0)
    rejected(patch_phdr(raw, text["index"], p_memsz=text["p_filesz"] - 1), "exceeds memory size")


def test_load_offset_beyond_eof(raw):
    data = phdr_of_type(raw, PT_LOAD, 2)
    beyond = page_up(len(raw)) + data["p_offset"] % PAGE  # keep offset and address congruent
    rejected(patch_phdr(raw, data["index"], p_offset=beyond), "past the end of the file")
    rejected(patch_phdr(raw, data["index"], p_filesz=len(raw)), "past the end of the file")
    rejected(patch_phdr(raw, data["index"], p_offset=(1 << 64) - PAGE), "past the end of the file")


def test_offset_and_vaddr_not_congruent(raw):
    data = phdr_of_type(raw, PT_LOAD, 2)
    rejected(patch_phdr(raw, data["index"], p_offset=data["p_offset"] + 8), "congruent")
    rejected(patch_phdr(raw, data["index"], p_vaddr=data["p_vaddr"] + 0x10), "congruent")


def test_alignment_not_a_power_of_two(raw):
    data = phdr_of_type(raw, PT_LOAD, 2)
    rejected(patch_phdr(raw, data["index"], p_align=0x1800), "power of two")


def test_overlapping_segments(raw):
    text, rodata = phdr_of_type(raw, PT_LOAD, 0), phdr_of_type(raw, PT_LOAD, 1)
    # rodata moved down into text (still congruent with its offset).
    rejected(patch_phdr(raw, rodata["index"], p_vaddr=text["p_vaddr"] + PAGE), "overlaps")
    # text grown into rodata.
    rejected(patch_phdr(raw, text["index"], p_memsz=rodata["p_vaddr"] + 1), "overlaps")


def test_out_of_order_segments(raw):
    rodata, data = phdr_of_type(raw, PT_LOAD, 1), phdr_of_type(raw, PT_LOAD, 2)
    out = bytearray(raw)
    phoff = header(raw, "e_phoff")
    a, b = phoff + rodata["index"] * PHDR_SIZE, phoff + data["index"] * PHDR_SIZE
    out[a:a + PHDR_SIZE], out[b:b + PHDR_SIZE] = raw[b:b + PHDR_SIZE], raw[a:a + PHDR_SIZE]
    rejected(bytes(out), "out of order")


def test_segment_beyond_max_size(raw):
    rejected(raw, "budget", max_size=0x10000)
    rejected(raw, "budget", max_size=PAGE)
    data = phdr_of_type(raw, PT_LOAD, 2)
    rejected(patch_phdr(raw, data["index"], p_vaddr=1 << 40), "budget")
    rejected(patch_phdr(raw, data["index"], p_memsz=(1 << 64) - 1), "budget")


def test_no_load_segments(raw):
    out = raw
    for p in phdrs(raw):
        if p["p_type"] == PT_LOAD:
            out = patch_phdr(out, p["index"], p_type=PT_NULL)
    rejected(out, "no PT_LOAD")


@pytest.mark.parametrize("where", ["rodata", "data", "bss", "beyond", "huge"])
def test_entry_outside_executable_segments(raw, where):
    rodata, data = phdr_of_type(raw, PT_LOAD, 1), phdr_of_type(raw, PT_LOAD, 2)
    entry = {"rodata": rodata["p_vaddr"], "data": data["p_vaddr"] + 8,
             "bss": data["p_vaddr"] + data["p_memsz"] - 8, "beyond": data["p_vaddr"] + data["p_memsz"] + PAGE,
             "huge": (1 << 64) - 1}[where]
    rejected(patch_header(raw, e_entry=entry), "entry point")


def test_entry_in_a_non_executable_text(raw):
    text = phdr_of_type(raw, PT_LOAD, 0)
    rejected(patch_phdr(raw, text["index"], p_flags=PF_R), "entry point")


def test_interp_segment(raw):
    stack = phdr_of_type(raw, PT_GNU_STACK)
    rejected(patch_phdr(raw, stack["index"], p_type=PT_INTERP), "PT_INTERP")


def test_phdr_outside_the_image(raw):
    phdr = phdr_of_type(raw, PT_PHDR)
    rejected(patch_phdr(raw, phdr["index"], p_vaddr=1 << 30), "PT_PHDR")


def test_dynamic_beyond_eof(raw):
    dyn = phdr_of_type(raw, PT_DYNAMIC)
    rejected(patch_phdr(raw, dyn["index"], p_offset=len(raw)), "PT_DYNAMIC")
    rejected(patch_phdr(raw, dyn["index"], p_filesz=len(raw)), "PT_DYNAMIC")


# ---- dynamic section and relocations ----------------------------------------------------


@pytest.mark.parametrize("r_type,name", [(R_X86_64_64, "R_X86_64_64"), (R_X86_64_GLOB_DAT, "R_X86_64_GLOB_DAT"),
                                         (7, "R_X86_64_JUMP_SLOT"), (R_X86_64_IRELATIVE, "R_X86_64_IRELATIVE"),
                                         (99, "type 99")])
@pytest.mark.parametrize("which", [0, -1])
def test_unsupported_relocation(raw, r_type, name, which):
    err = rejected(patch_rela(raw, which, r_type=r_type), name)
    assert "only R_X86_64_RELATIVE" in str(err)


def test_relocation_type_none_is_skipped(raw, image):
    loaded = parse_guest_image(patch_rela(raw, 0, r_type=0), IMAGE_BASE, MAX_SIZE)
    assert loaded.relocations == image.relocations - 1


@pytest.mark.parametrize("where", ["at the end", "straddling the end", "far", "wrapping"])
def test_relocation_outside_the_image(raw, image, where):
    r_offset = {"at the end": image.size, "straddling the end": image.size - 4, "far": 1 << 40,
                "wrapping": (1 << 64) - 4}[where]
    rejected(patch_rela(raw, 0, r_offset=r_offset), "points outside the image")


def test_relocation_addend_out_of_range(raw):
    rejected(patch_rela(raw, 0, r_addend=-(1 << 62)), "addend")


def test_needed_library(raw):
    rejected(patch_dynamic_spare(raw, DT_NEEDED, 1), "DT_NEEDED")


def test_plt_relocations(raw):
    rejected(patch_dynamic_spare(raw, DT_PLTRELSZ, 24), "DT_JMPREL")


def test_rel_relocations(raw):
    rejected(patch_dynamic_spare(raw, DT_RELSZ, 16), "DT_REL")


def test_relr_relocations(raw):
    rejected(patch_dynamic_spare(raw, DT_RELR, 0x1000), "RELR")


def test_bad_rela_table(raw):
    rejected(patch_dynamic_tag(raw, DT_RELAENT, 16), "RELA entry size")
    rejected(patch_dynamic_tag(raw, DT_RELASZ, dynamic_tag(raw, DT_RELASZ) + 1), "multiple of the entry size")
    rejected(patch_dynamic_tag(raw, DT_RELA, 1 << 40), "DT_RELA")
    rejected(patch_dynamic_tag(raw, DT_RELASZ, len(raw) // 24 * 24), "DT_RELA")


# ---- paths --------------------------------------------------------------------------------


def test_nonexistent_path(tmp_path):
    path = tmp_path / "missing.elf"
    with pytest.raises(GuestImageError, match="no such file") as info:
        load_guest_image(path, IMAGE_BASE, MAX_SIZE)
    assert str(path) in str(info.value)


def test_directory_path(tmp_path):
    with pytest.raises(GuestImageError, match="is a directory"):
        load_guest_image(tmp_path, IMAGE_BASE, MAX_SIZE)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path, raw):
    path = tmp_path / "secret.elf"
    path.write_bytes(raw)
    path.chmod(0)
    with pytest.raises(GuestImageError, match="cannot read"):
        load_guest_image(path, IMAGE_BASE, MAX_SIZE)


# ---- fuzzing ----------------------------------------------------------------------------

MUTATION = st.tuples(st.integers(0, 10**6), st.sampled_from(["xor", "set"]), st.integers(1, 255))


def mutate(raw: bytes, lo: int, hi: int, mutations: list[tuple[int, str, int]]) -> bytes:
    out = bytearray(raw)
    for where, how, value in mutations:
        pos = lo + where % (hi - lo)
        out[pos] = out[pos] ^ value if how == "xor" else value
    return bytes(out)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_fuzz_headers(raw, mutations):
    """Byte flips in the ELF header and program headers: loaded, or GuestImageError, nothing else."""
    end = header(raw, "e_phoff") + header(raw, "e_phnum") * PHDR_SIZE
    load_or_reject(mutate(raw, 0, end, mutations))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_fuzz_dynamic_and_relocations(raw, mutations):
    """Byte flips in the dynamic section and the RELA table."""
    dyn = phdr_of_type(raw, PT_DYNAMIC)
    entries = rela_entries(raw)
    targets = [(dyn["p_offset"], dyn["p_offset"] + dyn["p_filesz"]),
               (entries[0][0], entries[-1][0] + RELA.size)]
    out = raw
    for i, mutation in enumerate(mutations):
        lo, hi = targets[i % 2]
        out = mutate(out, lo, hi, [mutation])
    load_or_reject(out)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(0, 10**6), mutations=st.lists(MUTATION, max_size=2))
def test_fuzz_truncated_and_flipped(raw, cut, mutations):
    """Truncated files, some with header flips too (a flip may move the section headers into the file)."""
    end = header(raw, "e_phoff") + header(raw, "e_phnum") * PHDR_SIZE
    short = mutate(raw, 0, end, mutations)[:cut % len(raw)]
    loaded = load_or_reject(short)
    if not mutations:
        assert loaded is None  # an intact but truncated file is always rejected
