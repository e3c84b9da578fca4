"""hlpool values <-> JSON, for the CLI, the HTTP server and its client.

JSON lacks two things hlpool values have; both travel as one-key objects:
bytes as ``{"base64": "..."}`` and non-finite floats as
``{"float": "nan" | "inf" | "-inf"}``. Everything else maps directly.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

from hlpool.errors import CallError

_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def to_json(value: Any) -> Any:
    """A JSON-serialisable form of an hlpool value (valid JSON: no NaN tokens)."""
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"base64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


def from_json(value: Any) -> Any:
    """The hlpool value a JSON document describes; raises CallError for a malformed tagged object."""
    if isinstance(value, dict):
        if len(value) == 1 and "base64" in value and isinstance(value["base64"], str):
            try:
                return base64.b64decode(value["base64"], validate=True)
            except (ValueError, binascii.Error) as exc:
                raise CallError(f"invalid base64 value: {exc}") from None
        if len(value) == 1 and "float" in value and isinstance(value["float"], str):
            try:
                return _FLOATS[value["float"]]
            except KeyError:
                raise CallError(f"invalid float value {value['float']!r} (use nan, inf or -inf)") from None
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value
