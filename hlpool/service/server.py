"""``hlpool serve``: the sandbox pool as a JSON HTTP service.

One process: an aiohttp server on an asyncio event loop in the main thread,
and a :class:`~hlpool.Pool` (its spawner and worker processes) created before
the loop starts. A call is ``pool.submit`` (never blocking: the pool is
created with ``block=False``, a full queue is HTTP 429) awaited through
``asyncio.wrap_future``; building a snapshot boots a VM, so it runs in a
thread.

Routes (JSON everywhere; the OpenAPI 3.1 description is ``GET /openapi.json``):

    GET  /healthz                                   the process is up (never needs a token)
    GET  /readyz                                    every worker alive and not shutting down (else 503)
    GET  /metrics                                   Prometheus text format
    GET  /openapi.json                              this API
    GET  /v1/snapshots                              the snapshots served
    GET  /v1/snapshots/{name}                       one of them
    POST /v1/snapshots                              register: {"name", "path"} or an ELF upload (?name=)
    POST /v1/snapshots/{name}/calls/{function}      {"args": [...], "timeout": s} -> {"result": ...}

Errors are ``{"error": {"code", "message"[, "details"]}}`` with a stable code
(:data:`ERROR_STATUS` gives each code's HTTP status). Values are JSON;
bytes travel as ``{"base64": "..."}`` both ways.

Safe defaults: binds 127.0.0.1; a bearer token (``--token``/``HLPOOL_TOKEN``)
guards everything but /healthz, and binding a non-loopback address without
one is refused unless ``--insecure``; request bodies are limited
(``--max-body``); every call has a deadline (``--call-timeout`` is the default
and the maximum). SIGTERM/SIGINT stop accepting connections, let requests in
flight finish within ``--grace`` seconds, stop the pool and exit 0; a second
signal exits at once (workers die with the supervisor, no shared-memory
names outlive it).
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from aiohttp import web

from hlpool.errors import (
    CallError,
    GuestError,
    GuestFault,
    GuestImageError,
    GuestTimeout,
    HlpoolError,
    HostFunctionError,
    KvmError,
    PayloadTooLargeError,
    PoolClosedError,
    PoolOverloadedError,
    SnapshotError,
    WorkerCrashed,
)
from hlpool.service.metrics import Metrics
from hlpool.version import __version__

log = logging.getLogger("hlpool.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8470
DEFAULT_MAX_BODY = 8 << 20
DEFAULT_CALL_TIMEOUT = 10.0
DEFAULT_GRACE = 10.0
DEFAULT_MAX_PENDING = 1024
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
UPLOAD_TYPES = ("application/octet-stream", "application/x-elf", "application/x-executable")

# The stable error codes and their HTTP statuses.
ERROR_STATUS: dict[str, int] = {
    "bad_json": 400,
    "bad_request": 400,
    "unauthorized": 401,
    "unknown_snapshot": 404,
    "unknown_function": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "snapshot_exists": 409,
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


# ---- host functions of the embedded example guests ------------------------------------------


def _prefix() -> str:
    return "Hello"


def _value(i: int) -> int:
    return i * i


HOST_FUNCTIONS = {"prefix": _prefix, "value": _value}


# ---- configuration ------------------------------------------------------------------------------


@dataclass
class ServerConfig:
    workers: int = 2
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    snapshot_dir: str | None = None
    guests: dict[str, str] = field(default_factory=dict)  # empty: the example guests
    token: str | None = None
    insecure: bool = False
    max_body: int = DEFAULT_MAX_BODY
    call_timeout: float = DEFAULT_CALL_TIMEOUT
    grace: float = DEFAULT_GRACE
    max_pending: int = DEFAULT_MAX_PENDING
    access_log: bool = False


def parse_guest_specs(specs: list[str]) -> dict[str, str]:
    """``["echo=/x/echo.elf", ...]`` -> {name: absolute path}; one-line errors."""
    guests: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise HlpoolError(f"--guest {spec!r}: expected NAME=PATH")
        if not NAME_PATTERN.match(name):
            raise HlpoolError(f"--guest {spec!r}: the name must match [A-Za-z0-9_.-]{{1,64}}")
        if name in guests:
            raise HlpoolError(f"--guest {name!r} is given twice")
        if not os.path.isfile(path):
            raise HlpoolError(f"--guest {name}: {path} is not a file")
        guests[name] = os.path.abspath(path)
    return guests


def is_loopback(host: str) -> bool:
    """True if every address ``host`` names is a loopback address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_config(config: ServerConfig) -> None:
    if config.workers < 1:
        raise HlpoolError("--workers must be at least 1")
    if not 0 <= config.port <= 65535:
        raise HlpoolError(f"--port {config.port} is not a port number")
    if not config.call_timeout > 0 or not math.isfinite(config.call_timeout):
        raise HlpoolError("--call-timeout must be a positive number of seconds")
    if config.grace < 0:
        raise HlpoolError("--grace must not be negative")
    if config.max_body < 1024:
        raise HlpoolError("--max-body must be at least 1K")
    if config.max_pending < 1:
        raise HlpoolError("--max-pending must be at least 1")
    if not config.token and not config.insecure and not is_loopback(config.host):
        raise HlpoolError(f"refusing to listen on {config.host}, which is not a loopback address, without a "
                          f"token: pass --token (or set HLPOOL_TOKEN), or --insecure to serve without one")


def _check_port_free(host: str, port: int) -> None:
    """Fail fast (before starting workers) if the address cannot be bound."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise HlpoolError(f"cannot listen on {host}:{port}: {exc}") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(address)
            except OSError as exc:
                hint = " (is another server running?)" if exc.errno == errno.EADDRINUSE else ""
                raise HlpoolError(f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from None


# ---- errors ---------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error response: a stable code, a message, optional details and headers."""

    def __init__(self, code: str, message: str, *, details: dict | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
        self.headers = dict(headers or {})

    @property
    def status(self) -> int:
        return ERROR_STATUS[self.code]

    def body(self) -> dict:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return {"error": error}


def api_error(exc: BaseException) -> ApiError:
    """The API error for an exception from the pool (subclasses before their bases)."""
    message = str(exc)
    if isinstance(exc, PayloadTooLargeError):
        return ApiError("payload_too_large", message)
    if isinstance(exc, CallError):
        return ApiError("bad_request", message)
    if isinstance(exc, GuestFault):
        details = {"vector": exc.vector, "vector_name": exc.vector_name, "error_code": exc.error_code,
                   "rip": exc.rip, "address": exc.address}
        return ApiError("guest_fault", message, details=details)
    if isinstance(exc, GuestTimeout):
        return ApiError("timeout", message)
    if isinstance(exc, GuestError):  # GuestProtocolError included
        return ApiError("guest_error", message)
    if isinstance(exc, HostFunctionError):
        return ApiError("host_function_error", message)
    if isinstance(exc, WorkerCrashed):
        return ApiError("worker_crashed", message)
    if isinstance(exc, PoolOverloadedError):
        return ApiError("overloaded", message, headers={"Retry-After": "1"})
    if isinstance(exc, PoolClosedError):
        return ApiError("shutting_down", "the server is shutting down")
    if isinstance(exc, (SnapshotError, GuestImageError)):
        return ApiError("snapshot_error", message)
    log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return ApiError("internal", f"{type(exc).__name__}: {message}" if isinstance(exc, HlpoolError)
                    else "internal server error")


def registration_error(exc: BaseException) -> ApiError:
    """Errors while building a snapshot: the file is the problem unless KVM itself failed."""
    if isinstance(exc, HlpoolError) and not isinstance(exc, KvmError):
        return ApiError("snapshot_error", str(exc))
    if isinstance(exc, OSError):
        return ApiError("snapshot_error", f"{exc.filename or 'file'}: {exc.strerror}")
    return api_error(exc)


# ---- values ---------------------------------------------------------------------------------------


def parse_call_body(body: Any, max_timeout: float) -> tuple[list, float]:
    """``{"args": [...], "timeout": s}`` -> (arguments with bytes decoded, timeout in seconds)."""
    from hlpool.service.jsonvalues import from_json as _from_json

    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise ApiError("bad_request", 'the body must be a JSON object like {"args": [1, 2]}')
    unknown = sorted(set(body) - {"args", "timeout"})
    if unknown:
        raise ApiError("bad_request", f"unknown field(s) {', '.join(unknown)}; expected args and timeout")
    args = body.get("args", [])
    if not isinstance(args, list):
        raise ApiError("bad_request", f"args must be a JSON array, got {type(args).__name__}")
    timeout = body.get("timeout")
    if timeout is None:
        timeout = max_timeout
    else:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
                or timeout <= 0:
            raise ApiError("bad_request", "timeout must be a positive number of seconds")
        timeout = min(float(timeout), max_timeout)
    try:
        args = _from_json(args)
    except HlpoolError as exc:
        raise ApiError("bad_request", str(exc)) from None
    return args, timeout


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=_dumps)


# ---- the service ------------------------------------------------------------------------------------


@dataclass
class SnapshotEntry:
    name: str
    handle: Any  # SnapshotHandle
    source: str
    info: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.handle.id, "sha256": self.handle.sha256, "source": self.source,
                **self.info}


def describe_path(path: str) -> dict[str, Any]:
    """describe_snapshot() of the file at ``path``; the file's mappings are released right after."""
    from hlpool.cli.main import describe_snapshot
    from hlpool.snapshot.snapshot import Snapshot

    snap = Snapshot.open(path)
    try:
        info = describe_snapshot(snap)
        info["stored_bytes"] = sum(layer["bytes"] for layer in info["layers"])
        return info
    finally:
        for layer in snap.layers:
            try:
                layer.close()
            except Exception:
                pass


class Service:
    """The HTTP handlers around one pool."""

    def __init__(self, pool: Any, config: ServerConfig, metrics: Metrics | None = None) -> None:
        self.pool = pool
        self.config = config
        self.metrics = metrics or Metrics()
        self.entries: dict[str, SnapshotEntry] = {}
        self._pending_names: set[str] = set()
        self.shutting_down = False
        self.in_flight = 0  # calls received and not answered yet
        self._waiting: set[asyncio.Future] = set()  # their pool futures, as awaited by the handlers
        self._expired: set[asyncio.Future] = set()  # those cancelled because the grace period ran out
        self.started = time.time()
        if pool is not None:
            self.metrics.attach_pool(pool.stats, lambda: pool.restarts, lambda: len(self.entries), self.ready)

    # ---- snapshots ---------------------------------------------------------------

    def add(self, name: str, source: str) -> SnapshotEntry:
        """Build or open ``source`` (ELF or .hlsnap) and serve it as ``name`` (blocking: boots a VM)."""
        handle = self.pool.snapshot(source)
        entry = SnapshotEntry(name=name, handle=handle, source=source, info=describe_path(handle.path))
        return entry

    def add_script(self, name: str, language: str, source: str) -> SnapshotEntry:
        """Load a JS/Lua script as a layer on its interpreter's base snapshot (blocking: boots a VM)."""
        handle = self.pool.script(language, source)
        return SnapshotEntry(name=name, handle=handle, source=f"{language} script ({len(source)} characters)",
                             info=describe_path(handle.path))

    def load(self, guests: Mapping[str, str]) -> None:
        for name, path in guests.items():
            entry = self.add(name, path)
            self.entries[name] = entry
            log.info("serving %s: %s (%s)", name, ", ".join(entry.handle.exports), entry.handle.path)

    def _upload(self, name: str, data: bytes) -> SnapshotEntry:
        directory = Path(self.pool.snapshot_dir)
        tmp = directory / f".upload-{secrets.token_hex(8)}.elf"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            entry = self.add(name, str(tmp))
            entry.source = f"upload of {len(data)} bytes"
            return entry
        finally:
            tmp.unlink(missing_ok=True)

    def ready(self) -> bool:
        return not self.shutting_down and all(s["alive"] for s in self.pool.stats())

    def _entry(self, name: str) -> SnapshotEntry:
        entry = self.entries.get(name)
        if entry is None:
            raise ApiError("unknown_snapshot", f"no snapshot named {name!r}; see GET /v1/snapshots")
        return entry

    async def drain(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for the calls in flight; answer the rest 503 shutting_down."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self._waiting:
            log.warning("grace period over: ending %d call(s) still in flight", len(self._waiting))
            for waiting in list(self._waiting):
                self._expired.add(waiting)
                waiting.cancel()  # a queued call is dropped; a running one is ended when the pool stops
            while self.in_flight and loop.time() < deadline + 1.0:
                await asyncio.sleep(0.01)  # let the handlers send their answers

    # ---- reading requests --------------------------------------------------------

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.config.max_body
        if request.content_length is not None and request.content_length > limit:
            raise ApiError("payload_too_large", f"the request body is {request.content_length} bytes; the limit "
                                                f"is {limit}")
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError("payload_too_large", f"the request body is larger than the limit of {limit} bytes") \
                from None

    async def _read_json(self, request: web.Request) -> Any:
        data = await self._read_body(request)
        if not data.strip():
            return None
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ApiError("bad_json", f"the body is not valid JSON: {exc}") from None

    # ---- handlers ------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        return json_response({"service": "hlpool", "version": __version__, "openapi": "/openapi.json",
                              "snapshots": "/v1/snapshots"})

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok", "version": __version__, "uptime": round(time.time() - self.started, 3)})

    async def readyz(self, request: web.Request) -> web.Response:
        stats = self.pool.stats()
        alive = sum(1 for s in stats if s["alive"])
        ready = not self.shutting_down and alive == len(stats)
        body = {"ready": ready, "workers": len(stats), "workers_alive": alive, "snapshots": len(self.entries),
                "shutting_down": self.shutting_down}
        return json_response(body, status=200 if ready else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": self.metrics.content_type})

    async def openapi(self, request: web.Request) -> web.Response:
        return json_response(openapi_document(self.config))

    async def list_snapshots(self, request: web.Request) -> web.Response:
        return json_response({"snapshots": [e.describe() for e in self.entries.values()]})

    async def get_snapshot(self, request: web.Request) -> web.Response:
        return json_response(self._entry(request.match_info["name"]).describe())

    async def register(self, request: web.Request) -> web.Response:
        if self.shutting_down:
            raise ApiError("shutting_down", "the server is shutting down")
        upload = request.content_type in UPLOAD_TYPES
        if upload:
            name = request.query.get("name")
            if name is None:
                raise ApiError("bad_request", "an upload needs the snapshot's name as ?name=")
            self._check_new_name(name)
            data = await self._read_body(request)
            if not data.startswith(b"\x7fELF"):
                raise ApiError("snapshot_error", "the upload is not an ELF file (build guests with "
                                                 "`hlpool guest build`)")
        else:
            body = await self._read_json(request)
            script = isinstance(body, dict) and "language" in body
            wanted = {"name", "language", "source"} if script else {"name", "path"}
            if not isinstance(body, dict) or not all(isinstance(body.get(k), str) for k in wanted):
                raise ApiError("bad_request", 'expected {"name": "...", "path": "/absolute/path.elf or .hlsnap"}, '
                                              '{"name": "...", "language": "js" or "lua", "source": "..."} '
                                              "or an ELF upload with Content-Type: application/octet-stream")
            unknown = sorted(set(body) - wanted)
            if unknown:
                raise ApiError("bad_request", f"unknown field(s) {', '.join(unknown)}; expected "
                                              f"{', '.join(sorted(wanted))}")
            name = body["name"]
            if script:
                language, source = body["language"], body["source"]
                if language not in ("js", "lua"):
                    raise ApiError("bad_request", f"unknown script language {language!r}; use js or lua")
            else:
                source = body["path"]
                if not os.path.isabs(source):
                    raise ApiError("bad_request", f"path must be absolute (a file on the server host), "
                                                  f"got {source!r}")
        self._check_new_name(name)
        self._pending_names.add(name)
        loop = asyncio.get_running_loop()
        try:
            if upload:
                entry = await loop.run_in_executor(None, self._upload, name, data)
            elif script:
                entry = await loop.run_in_executor(None, self.add_script, name, language, source)
            else:
                entry = await loop.run_in_executor(None, self.add, name, source)
        except (HlpoolError, OSError) as exc:
            self.metrics.registrations.labels("error").inc()
            raise registration_error(exc) from None
        finally:
            self._pending_names.discard(name)
        self.entries[name] = entry
        self.metrics.registrations.labels("ok").inc()
        log.info("registered %s: %s (%s)", name, ", ".join(entry.handle.exports), entry.handle.path)
        return json_response(entry.describe(), status=201, headers={"Location": f"/v1/snapshots/{name}"})

    def _check_new_name(self, name: str) -> None:
        if not NAME_PATTERN.match(name):
            raise ApiError("bad_request", f"invalid snapshot name {name!r}: use 1-64 of A-Z a-z 0-9 _ . -")
        if name in self.entries or name in self._pending_names:
            raise ApiError("snapshot_exists", f"a snapshot named {name!r} exists already")

    async def call(self, request: web.Request) -> web.Response:
        if self.shutting_down:
            raise ApiError("shutting_down", "the server is shutting down")
        name, fn = request.match_info["name"], request.match_info["function"]
        entry = self._entry(name)
        script = getattr(entry.handle, "language", None) is not None
        if fn not in entry.handle.exports and not script:  # a script's functions are its own to check
            raise ApiError("unknown_function", f"snapshot {name!r} has no function {fn!r}; it exports "
                                               f"{', '.join(entry.handle.exports)}")
        args, timeout = parse_call_body(await self._read_json(request), self.config.call_timeout)
        outcome = "ok"
        start = time.perf_counter()
        self.metrics.calls_in_flight.inc()
        self.in_flight += 1
        waiting = None
        try:
            try:
                waiting = asyncio.wrap_future(self.pool.submit(entry.handle, fn, args, timeout=timeout))
                self._waiting.add(waiting)
                result = await waiting
            except HlpoolError as exc:
                error = api_error(exc)
                outcome = error.code
                raise error from None
            except asyncio.CancelledError:
                if waiting not in self._expired:
                    outcome = "cancelled"  # the client went away, or the server cancels its handlers
                    raise
                outcome = "shutting_down"
                raise ApiError("shutting_down", f"the server stopped before the call finished (grace period "
                                                f"{self.config.grace:g} s)") from None
        finally:
            self._waiting.discard(waiting)
            self._expired.discard(waiting)
            self.in_flight -= 1
            self.metrics.calls_in_flight.dec()
            # A script's function names come from requests: label only those that answered, so a
            # client cannot grow the metrics without bound with made-up names.
            label = fn if not script or outcome == "ok" else "<other>"
            self.metrics.observe_call(name, label, outcome, time.perf_counter() - start)
        from hlpool.service.jsonvalues import to_json as _to_json

        return json_response({"result": _to_json(result)})


# ---- the application ------------------------------------------------------------------------------


def make_app(service: Service) -> web.Application:
    token = service.config.token

    @web.middleware
    async def errors(request: web.Request, handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except ApiError as exc:
            response = _error_response(service, exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status)
            if code is None:
                code = "bad_request" if exc.status < 500 else "internal"
            response = _error_response(service, ApiError(code, exc.reason if code != "payload_too_large" else
                                                         f"the request body is larger than the limit of "
                                                         f"{service.config.max_body} bytes"))
        except Exception as exc:  # a bug: log it, answer with a JSON 500
            log.exception("unhandled error in %s %s", request.method, request.path)
            response = _error_response(service, ApiError("internal", f"internal server error "
                                                                     f"({type(exc).__name__})"))
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        service.metrics.http_requests.labels(request.method, route, str(response.status)).inc()
        return response

    @web.middleware
    async def auth(request: web.Request, handler) -> web.StreamResponse:
        if token and request.path != "/healthz":
            scheme, _, value = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
                raise ApiError("unauthorized", "missing or wrong bearer token (send Authorization: Bearer TOKEN)",
                               headers={"WWW-Authenticate": 'Bearer realm="hlpool"'})
        return await handler(request)

    app = web.Application(middlewares=[errors, auth], client_max_size=service.config.max_body)
    for method, path, handler in routes(service):
        app.router.add_route(method, path, handler)
    return app


def routes(service: Service) -> list[tuple[str, str, Any]]:
    return [
        ("GET", "/", service.index),
        ("GET", "/healthz", service.healthz),
        ("GET", "/readyz", service.readyz),
        ("GET", "/metrics", service.prometheus),
        ("GET", "/openapi.json", service.openapi),
        ("GET", "/v1/snapshots", service.list_snapshots),
        ("POST", "/v1/snapshots", service.register),
        ("GET", "/v1/snapshots/{name}", service.get_snapshot),
        ("POST", "/v1/snapshots/{name}/calls/{function}", service.call),
    ]


def _error_response(service: Service, error: ApiError) -> web.Response:
    service.metrics.errors.labels(error.code).inc()
    return json_response(error.body(), status=error.status, headers=error.headers)


# ---- OpenAPI --------------------------------------------------------------------------------------


def openapi_document(config: ServerConfig | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the routes above (hand-written; a test checks it matches)."""
    config = config or ServerConfig()

    def ref(name: str) -> dict:
        return {"$ref": f"#/components/schemas/{name}"}

    def error_responses(*codes: str) -> dict:
        by_status: dict[str, list[str]] = {}
        for code in codes:
            by_status.setdefault(str(ERROR_STATUS[code]), []).append(code)
        return {status: {"description": "error: " + ", ".join(names),
                         "content": {"application/json": {"schema": ref("Error")}}}
                for status, names in sorted(by_status.items())}

    def ok(description: str, schema: dict, status: str = "200") -> dict:
        return {status: {"description": description, "content": {"application/json": {"schema": schema}}}}

    name_param = {"name": "name", "in": "path", "required": True,
                  "schema": {"type": "string", "pattern": NAME_PATTERN.pattern}}
    auth_errors = ("unauthorized",)
    value_doc = ("A JSON value. Bytes are {\"base64\": \"...\"}; integers are 64-bit; objects have string keys.")
    return {
        "openapi": "3.1.0",
        "info": {"title": "hlpool", "version": __version__,
                 "description": "Call functions of guests running in KVM micro-VM sandboxes. Every call starts "
                                "from the guest's snapshot. " + value_doc},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": {
            "/": {"get": {"summary": "Service index", "operationId": "index",
                          "responses": {**ok("links", {"type": "object"}), **error_responses(*auth_errors)}}},
            "/healthz": {"get": {"summary": "Liveness: the process is up (needs no token)",
                                 "operationId": "healthz", "security": [],
                                 "responses": ok("up", {"type": "object", "properties": {
                                     "status": {"const": "ok"}, "version": {"type": "string"},
                                     "uptime": {"type": "number"}}})}},
            "/readyz": {"get": {"summary": "Readiness: every worker alive and not shutting down",
                                "operationId": "readyz",
                                "responses": {**ok("ready", ref("Readiness")),
                                              "503": {"description": "not ready",
                                                      "content": {"application/json": {"schema": ref("Readiness")}}},
                                              **error_responses(*auth_errors)}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "operationId": "metrics",
                                 "responses": {"200": {"description": "Prometheus text exposition format",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}},
                                               **error_responses(*auth_errors)}}},
            "/openapi.json": {"get": {"summary": "This document", "operationId": "openapi",
                                      "responses": {**ok("OpenAPI 3.1", {"type": "object"}),
                                                    **error_responses(*auth_errors)}}},
            "/v1/snapshots": {
                "get": {"summary": "List the snapshots served", "operationId": "listSnapshots",
                        "responses": {**ok("snapshots", {"type": "object", "required": ["snapshots"],
                                                         "properties": {"snapshots": {"type": "array",
                                                                                      "items": ref("Snapshot")}}}),
                                      **error_responses(*auth_errors)}},
                "post": {"summary": "Register a guest (a path on the server host, or an uploaded ELF) or a "
                                    "JavaScript/Lua script",
                         "operationId": "registerSnapshot",
                         "parameters": [{"name": "name", "in": "query", "required": False,
                                         "description": "the snapshot's name (uploads only)",
                                         "schema": {"type": "string", "pattern": NAME_PATTERN.pattern}}],
                         "requestBody": {"required": True, "content": {
                             "application/json": {"schema": ref("RegisterRequest")},
                             "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                                          "description": "a guest ELF (hlpool guest build)"}}},
                         "responses": {**ok("registered", ref("Snapshot"), "201"),
                                       **error_responses("bad_json", "bad_request", "snapshot_exists",
                                                         "payload_too_large", "snapshot_error", "shutting_down",
                                                         *auth_errors)}},
            },
            "/v1/snapshots/{name}": {
                "get": {"summary": "Describe a snapshot", "operationId": "getSnapshot", "parameters": [name_param],
                        "responses": {**ok("the snapshot", ref("Snapshot")),
                                      **error_responses("unknown_snapshot", *auth_errors)}}},
            "/v1/snapshots/{name}/calls/{function}": {
                "post": {"summary": "Call a function in a fresh sandbox of the snapshot",
                         "operationId": "call",
                         "parameters": [name_param, {"name": "function", "in": "path", "required": True,
                                                     "schema": {"type": "string"}}],
                         "requestBody": {"required": False,
                                         "content": {"application/json": {"schema": ref("CallRequest")}}},
                         "responses": {**ok("the function's result", ref("CallResult")),
                                       **error_responses("bad_json", "bad_request", "unknown_snapshot",
                                                         "unknown_function", "payload_too_large", "guest_error",
                                                         "overloaded", "guest_fault", "worker_crashed",
                                                         "host_function_error", "shutting_down", "timeout",
                                                         "internal", *auth_errors)}}},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "needed only when the server runs with --token"}},
            "schemas": {
                "Value": {"description": value_doc},
                "CallRequest": {"type": "object", "additionalProperties": False, "properties": {
                    "args": {"type": "array", "items": ref("Value"), "default": []},
                    "timeout": {"type": "number", "exclusiveMinimum": 0,
                                "description": f"seconds; the server's maximum ({config.call_timeout:g} s) is the "
                                               f"default and caps it"}}},
                "CallResult": {"type": "object", "required": ["result"], "properties": {"result": ref("Value")}},
                "RegisterRequest": {"oneOf": [
                    {"type": "object", "required": ["name", "path"], "additionalProperties": False,
                     "properties": {"name": {"type": "string", "pattern": NAME_PATTERN.pattern},
                                    "path": {"type": "string",
                                             "description": "absolute path of a guest ELF or .hlsnap file on "
                                                            "the server host"}}},
                    {"type": "object", "required": ["name", "language", "source"], "additionalProperties": False,
                     "description": "a script, loaded once as a layer on its interpreter's base snapshot; call "
                                    "its functions by name",
                     "properties": {"name": {"type": "string", "pattern": NAME_PATTERN.pattern},
                                    "language": {"type": "string", "enum": ["js", "lua"]},
                                    "source": {"type": "string"}}}]},
                "Snapshot": {"type": "object", "required": ["name", "id", "path", "exports"], "properties": {
                    "name": {"type": "string"}, "id": {"type": "string"}, "sha256": {"type": "string"},
                    "source": {"type": "string"}, "path": {"type": "string"},
                    "exports": {"type": "array", "items": {"type": "string"}},
                    "layers": {"type": "array", "items": {"type": "object"}},
                    "parent_chain": {"type": "array", "items": {"type": "string"}},
                    "memory": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "stored_bytes": {"type": "integer"},
                    "regions": {"type": "array", "items": {"type": "object"}},
                    "mapped_files": {"type": "array", "items": {"type": "object"}}}},
                "Readiness": {"type": "object", "properties": {
                    "ready": {"type": "boolean"}, "workers": {"type": "integer"},
                    "workers_alive": {"type": "integer"}, "snapshots": {"type": "integer"},
                    "shutting_down": {"type": "boolean"}}},
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["code", "message"], "properties": {
                        "code": {"type": "string", "enum": sorted(ERROR_STATUS)},
                        "message": {"type": "string"},
                        "details": {"type": "object", "description": "guest faults: vector, vector_name, "
                                                                     "error_code, rip, address"}}}}},
            },
        },
    }


# ---- running ----------------------------------------------------------------------------------------


class _Stop(BaseException):
    """A signal arrived while the server was starting."""


def serve(config: ServerConfig) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit status."""
    from hlpool.pool.supervisor import Pool

    check_config(config)
    _check_port_free(config.host, config.port)
    try:  # this process is the server: no *_created series next to every counter
        from prometheus_client import disable_created_metrics

        disable_created_metrics()
    except ImportError:
        pass
    if config.guests:
        guests = dict(config.guests)
    else:
        from hlpool.guest.examples import EXAMPLES, example_path

        guests = {name: str(example_path(name)) for name in EXAMPLES}
    # The pool forks its spawner now, before the event loop, its signal handling and any thread exist.
    pool = Pool(config.workers, snapshot_dir=config.snapshot_dir, host_functions=HOST_FUNCTIONS,
                max_pending=config.max_pending, call_timeout=config.call_timeout, block=False)
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        service = Service(pool, config)
        service.load(guests)
        asyncio.run(_run(service))
    except _Stop:
        log.info("stopped while starting")
    finally:
        for sig in previous:
            signal.signal(sig, _force_exit)
        _stop_pool(pool, deadline=time.monotonic() + 1.0)  # calls still running now have no client
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped")
    return 0


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop()


async def _run(service: Service) -> None:
    config = service.config
    app = make_app(service)
    # Calls are drained by Service.drain(); the runner's own timeout bounds the other requests (registrations).
    access_log = None
    if config.access_log:
        access_log = logging.getLogger("aiohttp.access")
        access_log.setLevel(logging.INFO)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=min(config.grace, 2.0), access_log=access_log)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            _force_exit(signum, None)
        log.info("%s: shutting down (grace %g s)", signal.Signals(signum).name, config.grace)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        site = web.TCPSite(runner, config.host, config.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise HlpoolError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
        host, port = runner.addresses[0][:2]
        url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        log.info("hlpool %s listening on %s with %d workers%s; serving %s", __version__, url, config.workers,
                 "" if config.token else " (no token)", ", ".join(service.entries))
        await stop.wait()
        service.shutting_down = True
        for s in list(runner.sites):
            await s.stop()  # no new connections
        log.info("stopped accepting; waiting for %d call(s) in flight", service.in_flight)
        await service.drain(config.grace)
    finally:
        service.shutting_down = True
        # Stop listening (if not yet), close idle connections, wait briefly for other requests, cancel the rest.
        await runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _force_exit)  # from here on, a (second) signal means: exit now


def _force_exit(signum: int, frame: Any) -> None:
    log.warning("%s: exiting now", signal.Signals(signum).name)
    logging.shutdown()
    os._exit(1)  # the workers die with this process (PDEATHSIG) and no IPC names exist to leak


def _stop_pool(pool: Any, deadline: float) -> None:
    """Shut the pool down; calls still running past ``deadline`` are ended by killing their workers."""
    done = threading.Event()

    def shutdown() -> None:
        try:
            pool.shutdown(wait=True, cancel_futures=True)
        finally:
            done.set()

    threading.Thread(target=shutdown, name="hlpool-server-shutdown", daemon=True).start()
    if not done.wait(max(0.0, deadline - time.monotonic())):
        busy = [s for s in pool.stats() if s["alive"] and s["in_flight"]]
        log.warning("%d worker(s) still running calls; stopping them", len(busy))
        for s in busy:
            try:
                os.kill(s["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not done.wait(15.0):
            log.error("the pool did not stop")


__all__ = ["ERROR_STATUS", "ApiError", "ServerConfig", "Service", "api_error", "make_app", "openapi_document",
           "parse_guest_specs", "serve"]
