"""Values crossing the host/guest boundary, as MessagePack (via msgspec).

Allowed values: None, bool, int (signed 64-bit), float, str, bytes (also
bytearray/memoryview on the way in), list/tuple, dict with str keys, nested
up to ``HL_MAX_DEPTH`` levels. Anything else is rejected before it reaches a
guest, with an error that says where the bad value is.

Decoding guest output never trusts it: msgspec rejects malformed input, and
the result is checked to hold only hlpool value types.
"""

from __future__ import annotations

from typing import Any

import msgspec

from hlpool.errors import GuestProtocolError
from hlpool.guest import _msgcheck
from hlpool.guest.abi import HL_MAX_DEPTH

INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1
# What one decoded guest value may take in Python objects (an estimate; see _msgcheck).
# A 1 MiB result of empty lists would otherwise become ~73 MiB in the supervisor.
MAX_DECODED_BYTES = 64 << 20
# Values this small skip the bounds check (it costs a buffer acquisition per call): they cannot
# expand past ~100x their size, and decoding them cannot exhaust the recursion limit
# (RecursionError is caught anyway) before _check_decoded refuses the nesting.
SMALL_VALUE = 512

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()

_SCALARS = (type(None), bool, float, str, bytes)


class ValueTypeError(TypeError):
    """A value hlpool cannot pass to or from a guest."""


def check_value(value: Any, where: str = "value", depth: int = 0) -> None:
    """Raise :class:`ValueTypeError` unless ``value`` is a valid hlpool value."""
    t = type(value)
    if t in _SCALARS:
        return
    if t is int:
        if not INT_MIN <= value <= INT_MAX:
            raise ValueTypeError(f"{where}: int {value} does not fit in 64 bits")
        return
    if depth >= HL_MAX_DEPTH:
        raise ValueTypeError(f"{where}: nested deeper than {HL_MAX_DEPTH} levels")
    if t is list or t is tuple:
        for i, item in enumerate(value):
            check_value(item, f"{where}[{i}]", depth + 1)
        return
    if t is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise ValueTypeError(f"{where}: dict key {key!r} is not a str")
            check_value(item, f"{where}[{key!r}]", depth + 1)
        return
    if t is bytearray or t is memoryview:
        return
    if isinstance(value, bool):  # bool subclasses are rare; treat like their base
        return
    if isinstance(value, int):
        check_value(int(value), where, depth)
        return
    raise ValueTypeError(f"{where}: {t.__name__} is not a supported value type "
                         "(None, bool, int, float, str, bytes, list, dict)")


def encode_args(args: tuple | list) -> bytes:
    """Encode call arguments as one msgpack array (:class:`ValueTypeError` for anything invalid)."""
    for arg in args:  # the common case, scalars only, without a call per argument
        t = type(arg)
        if t not in _SCALARS and not (t is int and INT_MIN <= arg <= INT_MAX):
            break
    else:
        try:
            return _encoder.encode(args)  # a tuple is a msgpack array, as a list is
        except UnicodeEncodeError:
            return _encode(args, "arguments")  # says which string
    for i, arg in enumerate(args):
        check_value(arg, f"argument {i}")
    return _encode(list(args), "arguments")


def encode_value(value: Any, where: str = "value") -> bytes:
    check_value(value, where)
    return _encode(value, where)


def _encode(value: Any, where: str) -> bytes:
    try:
        return _encoder.encode(value)
    except UnicodeEncodeError as exc:  # a str with a lone surrogate cannot be UTF-8
        raise ValueTypeError(f"{where}: a str holds a lone surrogate ({exc.object[exc.start:exc.end]!r}), "
                             "which is not valid Unicode text") from None


def decode_value(data: bytes | memoryview) -> Any:
    """Decode one value written by a guest (untrusted bytes).

    Raises :class:`GuestProtocolError` for anything that is not a valid hlpool
    value, whatever the decoder's own exception (malformed bytes, nesting that
    would exhaust the recursion limit, extension types): no other exception type
    escapes, so no caller's thread can be ended by what a guest writes.
    """
    if len(data) > SMALL_VALUE:
        problem = _msgcheck.check(data, HL_MAX_DEPTH + 1, MAX_DECODED_BYTES)
        if problem is not None:
            raise GuestProtocolError(f"malformed msgpack: {problem}")
    try:
        value = _decoder.decode(data)
        t = type(value)
        if t not in _SCALARS and not (t is int and INT_MIN <= value <= INT_MAX):  # else: checked here
            _check_decoded(value, 0)
    except GuestProtocolError:
        raise
    except msgspec.DecodeError as exc:
        raise GuestProtocolError(f"malformed msgpack: {exc}") from None
    except RecursionError:
        raise GuestProtocolError(f"malformed msgpack: nested deeper than {HL_MAX_DEPTH} levels") from None
    except Exception as exc:  # any other decoder failure is still the guest's doing
        raise GuestProtocolError(f"malformed msgpack: {type(exc).__name__}: {exc}") from None
    return value


def _check_decoded(value: Any, depth: int) -> None:
    t = type(value)
    if t in _SCALARS:
        return
    if t is int:
        if not INT_MIN <= value <= INT_MAX:
            raise GuestProtocolError(f"malformed msgpack: int {value} does not fit in signed 64 bits")
        return
    if depth >= HL_MAX_DEPTH + 1:
        raise GuestProtocolError(f"malformed msgpack: nested deeper than {HL_MAX_DEPTH} levels")
    if t is list:
        for item in value:
            _check_decoded(item, depth + 1)
        return
    if t is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise GuestProtocolError(f"malformed msgpack: dict key of type {type(key).__name__}")
            _check_decoded(item, depth + 1)
        return
    raise GuestProtocolError(f"malformed msgpack: value of type {t.__name__} is not an hlpool value")
