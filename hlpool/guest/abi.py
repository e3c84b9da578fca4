"""The host side of the guest/host contract, read from the SDK's ``hlpool_abi.h``.

The header is the single source of truth: every ``#define HL_NAME value``
in it becomes a module attribute here, so the runtime and the host cannot
disagree on a port, an event code or a layout constant. Struct layouts are
mirrored by field order (all fields are 64-bit).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

SDK_DIR = Path(__file__).resolve().parent / "sdk"
HEADER = SDK_DIR / "include" / "hlpool_abi.h"

_DEFINE = re.compile(r"^#define\s+(HL_[A-Z0-9_]+)\s+(0x[0-9a-fA-F]+|\d+)\b", re.M)
_STRUCT = re.compile(r"struct\s+(hl_\w+)\s*\{(.*?)\};", re.S)
_FIELD = re.compile(r"unsigned long long\s+(\w+)(?:\[(\w+)\])?;")


def _parse(text: str) -> tuple[dict[str, int], dict[str, list[str]]]:
    defines = {name: int(value, 0) for name, value in _DEFINE.findall(text)}
    structs: dict[str, list[str]] = {}
    for name, body in _STRUCT.findall(text):
        fields: list[str] = []
        for field, count in _FIELD.findall(body):
            n = int(defines.get(count, count), 0) if count else 1
            fields.extend([field] if n == 1 else [f"{field}{i}" for i in range(n)])
        structs[name] = fields
    return defines, structs


_defines, _structs = _parse(HEADER.read_text())
globals().update(_defines)

# Names used by the host, declared for readers and type checkers; the values come from the header.
HL_ABI_VERSION: int
HL_PAGE_SIZE: int
HL_PORT: int
HL_EV_INIT_DONE: int
HL_EV_RESULT: int
HL_EV_HOSTCALL: int
HL_EV_LOG_FULL: int
HL_EV_FAULT: int
HL_EV_RANDOM: int
HL_MSG_CALL: int
HL_MSG_OK: int
HL_MSG_GUEST_ERROR: int
HL_MSG_CALL_ERROR: int
HL_MSG_EXIT: int
HL_MSG_SIGNAL: int
HL_MSG_INIT: int
HL_MSG_HOSTCALL: int
HL_MSG_REPLY_OK: int
HL_MSG_FAULT: int
HL_MSG_RANDOM: int
HL_MSG_MAGIC: int
HL_MSG_HEADER_SIZE: int
HL_LOG_HEADER_SIZE: int
HL_BOOT_MAGIC: int
HL_FILES_MAX: int
HL_NAME_MAX: int
HL_EXPORTS_MAX: int
HL_MAX_DEPTH: int
HL_CALL_PAGE_INLINE: int
HL_INLINE_MAX: int

MSG_HEADER = struct.Struct("<8Q")
assert MSG_HEADER.size == HL_MSG_HEADER_SIZE
assert _structs["hl_msg_header"] == ["magic", "kind", "length", "aux0", "aux1", "aux2", "aux3", "aux4"]

LOG_HEADER = struct.Struct("<2Q")
assert LOG_HEADER.size == HL_LOG_HEADER_SIZE

BOOT_INFO_FIELDS: list[str] = _structs["hl_boot_info"]
BOOT_INFO = struct.Struct(f"<{len(BOOT_INFO_FIELDS)}Q")

FILE_ENTRY = struct.Struct("<QQ48s")
FILES_TABLE_HEADER = struct.Struct("<QQ")
FILES_TABLE_SIZE = FILES_TABLE_HEADER.size + HL_FILES_MAX * FILE_ENTRY.size


def pack_boot_info(**fields: int) -> bytes:
    """Encode ``struct hl_boot_info``; fields not given are zero."""
    unknown = set(fields) - set(BOOT_INFO_FIELDS)
    if unknown:
        raise ValueError(f"unknown boot info fields: {sorted(unknown)}")
    return BOOT_INFO.pack(*(fields.get(name, 0) for name in BOOT_INFO_FIELDS))
