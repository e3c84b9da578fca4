"""The HTTP API's request and response bodies as msgspec Structs, and request decoding with them.

The structs are the one description of the bodies: a request is validated
against its struct (:func:`decode`: a 400 ``bad_request`` naming the field),
responses are encoded from them (:func:`encode`), and :mod:`.openapi` derives
the document's schemas from them.

JSON text is parsed with :func:`json.loads` (as the API always has: it reads
UTF-16/32 bodies and NaN/Infinity tokens), then converted to the struct.
Values (call arguments and results) are any JSON value; bytes travel as
``{"base64": ...}`` (see :mod:`.jsonvalues`).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from hlpool.defaults import SCRIPT_LANGUAGES, SNAPSHOT_AREAS
from hlpool.errors import GuestFault, HlpoolError
from hlpool.service.api_errors import ERROR_STATUS, ApiError
from hlpool.service.jsonvalues import from_json

#: The names snapshots are served under.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
NAME_RULE = "1-64 of A-Z a-z 0-9 _ . -"

VALUE_DOC = 'A JSON value. Bytes are {"base64": "..."}; integers are 64-bit; objects have string keys.'

SnapshotName = Annotated[str, Meta(pattern=NAME_PATTERN.pattern, description=f"a snapshot's name: {NAME_RULE}")]
FunctionName = Annotated[str, Meta(description="a function the snapshot exports (a script: any of its functions)")]
Value = Annotated[Any, Meta(description=VALUE_DOC)]
ErrorCode = Literal[tuple(sorted(ERROR_STATUS))]  # type: ignore[valid-type]

#: How deeply a request body may nest. A call's arguments may nest HL_MAX_DEPTH (32) levels (deeper ones are
#: refused by the codec, also as a 400); this bound keeps every body far from the recursion limit.
MAX_BODY_DEPTH = 64

#: Media types of a guest ELF upload (PUT /v1/snapshots/NAME).
UPLOAD_TYPES = ("application/octet-stream", "application/x-elf", "application/x-executable")


class BodyError(ValueError):
    """A rule of a body that its field types cannot say (raised in ``__post_init__``); the text starts with
    the field's name."""


# ---- requests ------------------------------------------------------------------------------------


class CallRequest(Struct, forbid_unknown_fields=True):
    """A call's arguments and deadline (an empty body means no arguments)."""

    args: Annotated[list[Value], Meta(description="the function's arguments")] = []
    timeout: Annotated[float, Meta(gt=0, description="seconds; the server's maximum (--call-timeout) is the "
                                                     "default and caps it")] | None = None

    def __post_init__(self) -> None:
        if self.timeout is not None and not math.isfinite(self.timeout):
            raise BodyError("timeout must be a finite number of seconds")


AbsolutePath = Annotated[str, Meta(description="an absolute path on the server host",
                                   extra_json_schema={"pattern": "^/[^\\u0000]*$"})]  # checked in __post_init__


class RegisterPath(Struct, forbid_unknown_fields=True):
    """Serve a guest ELF or .hlsnap file that is on the server host."""

    name: SnapshotName
    path: Annotated[str, Meta(description="absolute path of a guest ELF or .hlsnap file on the server host, in a "
                                          "directory the server allows (--allow-dir)",
                              extra_json_schema={"pattern": "^/[^\\u0000]*$"})]  # checked in __post_init__

    def __post_init__(self) -> None:
        if not os.path.isabs(self.path):
            raise BodyError(f"path must be absolute (a file on the server host), got {self.path!r}")
        if "\x00" in self.path:
            raise BodyError("path must not contain a NUL character")


class RegisterScript(Struct, forbid_unknown_fields=True):
    """A script, loaded once as a layer on its interpreter's base snapshot; call its functions by name."""

    name: SnapshotName
    language: Annotated[str, Meta(extra_json_schema={"enum": list(SCRIPT_LANGUAGES)})]
    source: Annotated[str, Meta(description="the script's text")]

    def __post_init__(self) -> None:
        if self.language not in SCRIPT_LANGUAGES:
            raise BodyError(f"language: unknown script language {self.language!r}; use "
                            f"{' or '.join(SCRIPT_LANGUAGES)}")


class DeriveCall(Struct, forbid_unknown_fields=True):
    """One call run while a snapshot is derived; its state is kept."""

    fn: FunctionName
    args: Annotated[list[Value], Meta(description="the function's arguments")] = []


class RegisterDerived(Struct, forbid_unknown_fields=True):
    """A child of a served snapshot: files mapped, calls run keeping their state, captured as a layer."""

    name: SnapshotName
    base: Annotated[SnapshotName, Meta(description="the served snapshot to derive from")]
    calls: Annotated[list[DeriveCall], Meta(description="run in order; every later call into the child starts "
                                                        "from their result")] = []
    map_files: Annotated[list[AbsolutePath], Meta(description="files on the server host, in a directory the "
                                                              "server allows (--allow-dir), mapped read-only")] = []
    retain: Annotated[list[Literal[SNAPSHOT_AREAS]],  # type: ignore[valid-type]
                      Meta(description="layout areas (e.g. heap, image) whose bytes the child keeps from the base, "
                                       "whatever the calls wrote there")] = []

    def __post_init__(self) -> None:
        for path in self.map_files:
            if not os.path.isabs(path) or "\x00" in path:
                raise BodyError(f"map_files: {path!r} is not an absolute path")


#: What POST /v1/snapshots accepts as JSON (a body with "language" is a script, one with "base" a derived one).
REGISTER_BODIES = (RegisterPath, RegisterScript, RegisterDerived)
REGISTER_HINT = ('expected {"name": "...", "path": "/absolute/path.elf or .hlsnap"} or {"name": "...", '
                 f'"language": {" or ".join(map(json.dumps, SCRIPT_LANGUAGES))}, "source": "..."}} or {{"name": '
                 f'"...", "base": "...", "calls": [{{"fn": "...", "args": [...]}}]}} (upload an ELF with PUT '
                 f"/v1/snapshots/NAME)")


# ---- responses ------------------------------------------------------------------------------------


class CallResult(Struct):
    """What the function returned."""

    result: Value


class Index(Struct):
    service: Literal["hlpool"]
    version: str
    openapi: str
    snapshots: str


class Health(Struct):
    status: Literal["ok"]
    version: str
    uptime: Annotated[float, Meta(description="seconds since the server started")]


class Readiness(Struct):
    ready: bool
    workers: int
    workers_alive: int
    snapshots: int
    shutting_down: bool


class SnapshotLayer(Struct):
    index: int
    sha256: str
    bytes: int
    file: str | None


class MemorySizes(Struct):
    guest_bytes: int
    heap: int
    stack: int
    image: int
    input: int
    output: int


class MemoryRegion(Struct):
    address: Annotated[str, Meta(description="guest address, hexadecimal")]
    size: int
    area: str
    perms: str
    backing: str
    layer: int | None
    file: str | None


class MappedFileInfo(Struct):
    path: str
    address: str
    size: int
    sha256: str


class SnapshotInfo(Struct):
    """A served snapshot (``hlpool snapshot inspect --json`` plus how the server got it)."""

    name: str
    id: str
    sha256: str
    source: Annotated[str, Meta(description="the file it was made from, an upload or a script")]
    path: str | None
    exports: list[str]
    layers: list[SnapshotLayer]
    parent_chain: list[str]
    memory: MemorySizes
    regions: list[MemoryRegion]
    mapped_files: list[MappedFileInfo]
    stored_bytes: int


class SnapshotList(Struct):
    snapshots: list[SnapshotInfo]


class Removed(Struct):
    """A snapshot no longer served."""

    name: str
    path: str
    deleted: Annotated[bool, Meta(description="its store file was deleted (false: the file is still used by "
                                              "another name or process, or is not in the store)")]


class StoreInfo(Struct):
    directory: str
    files: int
    bytes: int
    quota: int | None
    pinned: Annotated[int, Meta(description="files this server holds")]


class GarbageCollected(Struct):
    """What garbage collection removed from the snapshot store, and the store afterwards."""

    removed: list[str]
    store: StoreInfo


class ErrorInfo(Struct, omit_defaults=True):
    code: ErrorCode
    message: str
    details: Annotated[dict[str, Any], Meta(description="guest faults: " + ", ".join(GuestFault.FIELDS))] | \
        UnsetType = UNSET


class Error(Struct):
    """Every error response (see ERROR_STATUS for each code's HTTP status)."""

    error: ErrorInfo


# ---- decoding and encoding ----------------------------------------------------------------------------

T = TypeVar("T", bound=Struct)


def parse_json(data: bytes) -> Any:
    """The JSON value of a request body (None when it is empty); ``bad_json`` if it is not JSON,
    ``bad_request`` if it nests deeper than :data:`MAX_BODY_DEPTH` or has a string that is not Unicode text."""
    if not data.strip():
        return None
    try:  # msgspec first (several times faster); whatever it refuses, json.loads decides, as before
        value = _fast_decode(data)
    except (msgspec.DecodeError, RecursionError):
        value = _NOTHING
    try:
        if value is _NOTHING:
            value = json.loads(data)
    except RecursionError:
        raise _too_deep("the body") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError("bad_json", f"the body is not valid JSON: {exc}") from None
    # Only a body with more brackets than the limit can be too deep; only one with a \u escape or
    # non-ASCII bytes (UTF-16/32 bodies have NUL bytes) can hold a lone surrogate: others skip the walk.
    if data.count(b"[") + data.count(b"{") > MAX_BODY_DEPTH or b"\\u" in data or not data.isascii() \
            or b"\x00" in data:
        check_json(value)
    return value


_fast_decode = msgspec.json.Decoder().decode
_NOTHING = object()


def check_json(value: Any) -> None:
    """``bad_request`` unless ``value`` nests at most :data:`MAX_BODY_DEPTH` levels and every string (keys
    included) is Unicode text: ``json.loads`` accepts lone surrogates (``"\\ud800"``), nothing can encode them.
    The message names the body's top-level field. One pass, no recursion, a few hundred ns per value."""
    if type(value) is dict:
        for key, item in value.items():
            _check_text(key, "the body")
            _walk(item, 1, key)
    else:
        _walk(value, 0, "the body")


def _walk(value: Any, depth: int, field: str) -> None:
    if type(value) is str:
        _check_text(value, field)
        return
    if type(value) is not list and type(value) is not dict:
        return
    todo = [(value, depth)]
    while todo:
        item, depth = todo.pop()
        if type(item) is dict:
            for key in item:
                if not key.isascii():
                    _check_text(key, field)
            item = item.values()
        for v in item:
            t = type(v)
            if t is str:
                if not v.isascii():
                    _check_text(v, field)
            elif t is list or t is dict:
                if depth + 1 >= MAX_BODY_DEPTH:
                    raise _too_deep(field)
                if v:
                    todo.append((v, depth + 1))


def _check_text(text: str, where: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ApiError("bad_request", f"{where}: a string with a lone surrogate (U+{ord(text[exc.start]):04X}) "
                                          f"is not Unicode text") from None


def _too_deep(where: str) -> ApiError:
    return ApiError("bad_request", f"{where}: nested deeper than {MAX_BODY_DEPTH} levels")


def decode(value: Any, cls: type[T], hint: str | None = None) -> T:
    """``value`` (parsed JSON) as a ``cls``; a ``bad_request`` naming the field if it does not fit."""
    try:
        return msgspec.convert(value, cls)
    except msgspec.ValidationError as exc:
        raise ApiError("bad_request", explain(exc, cls, hint)) from None


def explain(exc: msgspec.ValidationError, cls: type[Struct], hint: str | None = None) -> str:
    """A validation error as ``"FIELD: what is wrong"`` (or the body-level problem and what is expected)."""
    if isinstance(exc.__cause__, BodyError):
        return str(exc)
    text = str(exc)
    what, sep, where = text.rpartition(" - at `$")
    if sep:
        return f"{where.rstrip('`').lstrip('.')}: {what[:1].lower()}{what[1:]}"
    expected = hint or f"the fields are {', '.join(cls.__struct_fields__)}"
    return f"the body: {text[:1].lower()}{text[1:]}; {expected}"


def decode_call(value: Any, max_timeout: float) -> tuple[list, float]:
    """A call body -> (arguments with bytes decoded, timeout in seconds: at most ``max_timeout``)."""
    call = decode({} if value is None else value, CallRequest)
    try:
        args = from_json(call.args)
    except HlpoolError as exc:  # a malformed {"base64": ...} or {"float": ...}
        raise ApiError("bad_request", f"args: {exc}") from None
    return args, _timeout(call, max_timeout)


def _timeout(call: CallRequest, max_timeout: float) -> float:
    """A call's timeout in seconds: its own, at most ``max_timeout`` (the default)."""
    return max_timeout if call.timeout is None else min(call.timeout, max_timeout)


def parse_call(body: bytes, max_timeout: float) -> tuple[list, float]:
    """``decode_call(parse_json(body), max_timeout)``, in one typed msgspec pass for the plain form
    of a call: ASCII, no escapes or NUL, one object and at most one array (its arguments are then
    JSON scalars: nothing to walk, nothing tagged). Any other body, and anything the pass refuses,
    takes the general path, whose answer (value or error) is the same as before."""
    if body.isascii() and body.count(b"{") == 1 and body.count(b"[") <= 1 and b"\\" not in body \
            and b"\x00" not in body:
        try:
            call = _call_decoder(body)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            pass
        else:
            return call.args, _timeout(call, max_timeout)
    return decode_call(parse_json(body), max_timeout)


_call_decoder = msgspec.json.Decoder(CallRequest).decode


def decode_register(value: Any) -> RegisterPath | RegisterScript | RegisterDerived:
    """A registration body: a script if it has a ``language``, derived if it has a ``base``, else a path."""
    cls: type[Struct] = RegisterPath
    if isinstance(value, dict):
        cls = RegisterScript if "language" in value else RegisterDerived if "base" in value else RegisterPath
    return decode(value, cls, REGISTER_HINT)  # type: ignore[return-value]


_encoder = msgspec.json.Encoder()


def encode(body: Any) -> bytes:
    """A response body (a struct, or plain JSON values) as JSON."""
    return _encoder.encode(body)
