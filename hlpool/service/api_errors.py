"""API errors: the stable codes and their HTTP statuses, :class:`ApiError`, and exception -> API error.

The code of an hlpool exception is its own ``code`` (see :mod:`hlpool.errors`)
and its details are those of :meth:`~hlpool.errors.HlpoolError.to_wire`; this
module only adds the HTTP side (status, headers) and hides what is not for
clients (the text of unexpected exceptions).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from hlpool.errors import CallError, GuestError, GuestFault, GuestTimeout, HlpoolError, HostFunctionError, KvmError

log = logging.getLogger("hlpool.server")

#: The stable error codes and their HTTP statuses.
ERROR_STATUS: dict[str, int] = {
    "bad_json": 400,
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "unknown_snapshot": 404,
    "unknown_function": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "snapshot_exists": 409,
    "snapshot_in_use": 409,
    "payload_too_large": 413,
    "guest_error": 422,
    "snapshot_error": 422,
    "overloaded": 429,
    "internal": 500,
    "guest_fault": 502,
    "worker_crashed": 502,
    "host_function_error": 502,
    "shutting_down": 503,
    "timeout": 504,
}

#: Headers every response with this code carries.
ERROR_HEADERS: dict[str, dict[str, str]] = {"overloaded": {"Retry-After": "1"}}

# Codes whose message the server words itself (the exception's text is about the pool, not the request).
_OWN_MESSAGES = {"shutting_down": "the server is shutting down"}

# aiohttp's own errors (unknown route, wrong method, body over client_max_size) by HTTP status.
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
# Headers of aiohttp's own errors that the API error keeps (405 names the allowed methods).
_HTTP_HEADERS = ("Allow",)


class ClientGone(Exception):
    """The client closed the connection before it sent its whole request (nothing to answer, nothing to log)."""


class ApiError(Exception):
    """An error response: a stable code, a message, optional details and headers."""

    def __init__(self, code: str, message: str, *, details: dict | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
        self.headers = {**ERROR_HEADERS.get(code, {}), **(headers or {})}

    @property
    def status(self) -> int:
        return ERROR_STATUS[self.code]

    def body(self) -> dict[str, Any]:
        """``{"error": {"code", "message"[, "details"]}}`` (:class:`hlpool.service.schema.Error`)."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return {"error": error}


def api_error(exc: BaseException) -> ApiError:
    """The API error for an exception from the pool: its ``code`` and wire details; else ``internal``."""
    if isinstance(exc, HlpoolError) and exc.code != "internal" and exc.code in ERROR_STATUS:
        wire = exc.to_wire()
        return ApiError(wire["code"], _OWN_MESSAGES.get(wire["code"], wire["message"]), details=wire.get("details"))
    log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return ApiError("internal", f"{type(exc).__name__}: {exc}" if isinstance(exc, HlpoolError)
                    else "internal server error")


def registration_error(exc: BaseException) -> ApiError:
    """Errors while building a snapshot: the file is the problem unless KVM itself failed."""
    if isinstance(exc, HlpoolError) and not isinstance(exc, KvmError):
        return ApiError("snapshot_error", str(exc))
    if isinstance(exc, OSError):
        return ApiError("snapshot_error", f"{exc.filename or 'file'}: {exc.strerror}")
    return api_error(exc)


def derive_error(exc: BaseException) -> ApiError:
    """Errors while deriving a snapshot: the calls' own errors as a call's (guest_error, timeout...), arguments the
    guest refused as ``snapshot_error``, the others as :func:`registration_error`."""
    if isinstance(exc, CallError):  # the request was well-formed; a call the guest refused failed the derivation
        return ApiError("snapshot_error", f"a call failed: {exc}")
    if isinstance(exc, (GuestError, GuestFault, GuestTimeout, HostFunctionError)):
        return api_error(exc)
    return registration_error(exc)


def http_error(status: int, reason: str, max_body: int, headers: Mapping[str, str] | None = None) -> ApiError:
    """The API error for one of the HTTP framework's own error statuses (4xx/5xx); ``headers``: the
    framework's response headers (``Allow`` of a 405 is kept)."""
    code = _HTTP_CODES.get(status) or ("bad_request" if status < 500 else "internal")
    kept = {name: headers[name] for name in _HTTP_HEADERS if headers and name in headers}
    if code == "payload_too_large":
        return ApiError(code, f"the request body is larger than the limit of {max_body} bytes", headers=kept)
    if code == "method_not_allowed" and "Allow" in kept:
        reason = f"{reason}: this route answers {kept['Allow']}"
    return ApiError(code, reason, headers=kept)
