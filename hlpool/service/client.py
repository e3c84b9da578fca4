"""A small client of ``hlpool serve`` (standard library only: urllib).

    >>> from hlpool.service.client import Client
    >>> c = Client()  # $HLPOOL_URL, else hlpool.defaults.URL
    >>> c.call("add", "add", 2, 40)
    42

Values go as JSON, bytes as ``{"base64": ...}`` both ways (the client converts).
Error responses raise a :class:`RemoteError`; for the error codes that have
a matching hlpool exception the class derives from it too, so
``except hlpool.GuestFault`` works across the network (``RemoteGuestFault``
carries ``vector``, ``rip``... from the response's details: the error is
rebuilt with :func:`hlpool.errors.from_wire`).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, cast

from hlpool import defaults, errors
from hlpool.errors import HlpoolError
from hlpool.service import jsonvalues

DEFAULT_URL = defaults.URL


class RemoteError(HlpoolError):
    """The server answered with an error: ``code`` (stable), ``status`` (HTTP), ``message``, ``details``."""

    def __init__(self, message: str, *, code: str = "internal", status: int = 500,
                 details: dict | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message
        self.details = details or {}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"type": type(self).__name__, "code": self.code, "message": self.message}
        if self.details:
            wire["details"] = self.details
        return wire


class ServerUnreachable(HlpoolError):
    """No HTTP answer from the server (connection refused, DNS, timeout)."""


def _remote(base: type[HlpoolError]) -> type[RemoteError]:
    return type(f"Remote{base.__name__}", (RemoteError, base), {"__module__": __name__})


RemoteCallError = _remote(errors.CallError)
RemotePayloadTooLargeError = _remote(errors.PayloadTooLargeError)
RemoteGuestError = _remote(errors.GuestError)
RemoteGuestFault = _remote(errors.GuestFault)
RemoteGuestTimeout = _remote(errors.GuestTimeout)
RemoteHostFunctionError = _remote(errors.HostFunctionError)
RemoteWorkerCrashed = _remote(errors.WorkerCrashed)
RemotePoolOverloadedError = _remote(errors.PoolOverloadedError)
RemotePoolClosedError = _remote(errors.PoolClosedError)
RemoteSnapshotError = _remote(errors.SnapshotError)

ERROR_CLASSES: dict[str, type[RemoteError]] = {
    "bad_request": RemoteCallError,
    "unknown_function": RemoteCallError,
    "payload_too_large": RemotePayloadTooLargeError,
    "guest_error": RemoteGuestError,
    "guest_fault": RemoteGuestFault,
    "timeout": RemoteGuestTimeout,
    "host_function_error": RemoteHostFunctionError,
    "worker_crashed": RemoteWorkerCrashed,
    "overloaded": RemotePoolOverloadedError,
    "shutting_down": RemotePoolClosedError,
    "snapshot_error": RemoteSnapshotError,
    "snapshot_in_use": RemoteSnapshotError,
    "unknown_snapshot": RemoteSnapshotError,
}


def error_from_response(status: int, body: bytes) -> RemoteError:
    """The exception for an error response: ``{"error": {"code", "message"[, "details"]}}``."""
    try:
        error = json.loads(body)["error"]
        code, message = str(error["code"]), str(error["message"])
        details = error.get("details") if isinstance(error.get("details"), dict) else None
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace").strip().splitlines()
        return RemoteError(text[0][:200] if text else f"HTTP {status}", code=f"http_{status}", status=status)
    wire = {"code": code, "message": message, "details": details}
    # from_wire gives a RemoteGuestFault its vector, rip... from the details (GuestFault.FIELDS)
    exc = cast(RemoteError, errors.from_wire(wire, base=ERROR_CLASSES.get(code, RemoteError)))
    exc.code, exc.status, exc.message, exc.details = code, status, message, details or {}
    return exc


def to_json(value: Any) -> Any:
    """Python value -> JSON value (bytes become {"base64": ...})."""
    return jsonvalues.to_json(value)


def from_json(value: Any) -> Any:
    """JSON value -> Python value ({"base64": ...} becomes bytes)."""
    return jsonvalues.from_json(value)


class Client:
    """Talks to one server. ``token``: the bearer token if the server needs one (default ``$HLPOOL_TOKEN``).
    ``http_timeout``: seconds to wait for an answer (a call waits its own timeout plus this)."""

    def __init__(self, url: str | None = None, token: str | None = None, *, http_timeout: float = 30.0) -> None:
        self.url = (url or os.environ.get("HLPOOL_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("HLPOOL_TOKEN") or None
        self.http_timeout = http_timeout

    # ---- the API ----------------------------------------------------------------

    def call(self, snapshot: str, fn: str, *args: Any, timeout: float | None = None) -> Any:
        """``fn(*args)`` in a sandbox of ``snapshot`` on the server; returns the result."""
        body: dict[str, Any] = {"args": [to_json(a) for a in args]}
        if timeout is not None:
            body["timeout"] = timeout
        path = f"/v1/snapshots/{_quote(snapshot)}/calls/{_quote(fn)}"
        answer = self.request("POST", path, body, timeout=self.http_timeout + (timeout or 0))
        return from_json(answer["result"])

    def snapshots(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/snapshots")["snapshots"]

    def snapshot(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/snapshots/{_quote(name)}")

    def register(self, name: str, path: str | os.PathLike) -> dict[str, Any]:
        """Serve the guest ELF or .hlsnap at ``path`` (a file on the server's host, in a directory the server
        allows with ``--allow-dir``) as ``name``."""
        return self.request("POST", "/v1/snapshots", {"name": name, "path": os.fspath(path)})

    def derive(self, name: str, base: str, calls: list[tuple[str, list]] = (), *, map_files: list[str] = (),
               retain: list[str] = ()) -> dict[str, Any]:
        """Serve as ``name`` a child of the served ``base``: ``map_files`` (on the server host, under an
        ``--allow-dir``) mapped, ``calls`` ((fn, args) pairs) run keeping their state, ``retain``: areas whose
        bytes the child keeps from ``base``."""
        body = {"name": name, "base": base, "calls": [{"fn": fn, "args": [to_json(a) for a in args]}
                                                      for fn, args in calls],
                "map_files": [os.fspath(p) for p in map_files], "retain": list(retain)}
        return self.request("POST", "/v1/snapshots", body)

    def remove(self, name: str) -> dict[str, Any]:
        """Stop serving ``name`` and delete its store file (refused while children or calls need it)."""
        return self.request("DELETE", f"/v1/snapshots/{_quote(name)}")

    def collect_garbage(self) -> dict[str, Any]:
        """Delete the store files nothing needs: ``{"removed": [paths], "store": {...}}``."""
        return self.request("POST", "/v1/store/gc")

    def upload(self, name: str, elf: bytes | str | os.PathLike) -> dict[str, Any]:
        """Upload a guest ELF (bytes, or a local file) and serve it as ``name``."""
        if isinstance(elf, bytes):
            data = elf
        else:
            with open(elf, "rb") as f:
                data = f.read()
        return self.request("PUT", f"/v1/snapshots/{_quote(name)}", data=data, content_type="application/octet-stream")

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/healthz")

    def ready(self) -> bool:
        try:
            return bool(self.request("GET", "/readyz").get("ready"))
        except RemoteError:
            return False

    def metrics(self) -> str:
        return self.request("GET", "/metrics", raw=True).decode()

    # ---- HTTP ---------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *, data: bytes | None = None,
                content_type: str = "application/json", timeout: float | None = None, raw: bool = False) -> Any:
        if body is not None:
            data = json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.http_timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                raise error_from_response(exc.code, exc.read()) from None
        except urllib.error.URLError as exc:
            reason = getattr(exc.reason, "strerror", None) or str(exc.reason)
            raise ServerUnreachable(f"cannot reach the hlpool server at {self.url}: {reason} "
                                    f"(is `hlpool serve` running? set --url or HLPOOL_URL)") from None
        except (OSError, ValueError) as exc:  # timeouts, resets, malformed URLs
            raise ServerUnreachable(f"no answer from the hlpool server at {self.url}: {exc}") from None
        if raw:
            return payload
        try:
            return json.loads(payload)
        except ValueError:
            raise RemoteError(f"the server sent something that is not JSON ({len(payload)} bytes)",
                              code="bad_response", status=200) from None


def _quote(part: str) -> str:
    return urllib.parse.quote(part, safe="")
