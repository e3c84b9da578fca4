"""The request handlers around one pool (:class:`Service`), and the calls in flight they track.

A call is ``pool.submit`` (never blocking: the pool is created with
``block=False``, a full queue is 429 ``overloaded``) awaited through
:func:`asyncio.wrap_future`; building a snapshot boots a VM, so it runs in a
daemon thread (one that never holds up the process's exit), at most
``max_registrations`` at once, with the name reserved meanwhile. Bodies are
read within ``--max-body`` and ``--body-timeout`` and decoded with :mod:`.schema`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from functools import partial
from typing import Any, Callable, Mapping

import msgspec
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from hlpool.errors import HlpoolError, SnapshotError
from hlpool.service.api_errors import ApiError, ClientGone, api_error, derive_error, registration_error
from hlpool.service.config import ServerConfig
from hlpool.service.jsonvalues import from_json, to_json
from hlpool.service.metrics import InFlightSlots, Metrics, SharedPoolStats
from hlpool.service.names import NameTable
from hlpool.service.openapi import openapi_document
from hlpool.service.schema import (
    CallResult,
    GarbageCollected,
    Health,
    Index,
    Readiness,
    RegisterDerived,
    RegisterScript,
    Removed,
    SnapshotList,
    StoreInfo,
    decode_register,
    encode,
    parse_call,
    parse_json,
)
from hlpool.service.snapshots import SnapshotEntry, Snapshots
from hlpool.version import __version__

log = logging.getLogger("hlpool.server")


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON response from a body struct (or plain JSON values)."""
    return web.Response(body=encode(body), status=status, headers=headers, content_type="application/json",
                        charset="utf-8")


class Service:
    """The HTTP handlers around one pool (``pool`` may be None for a service that only describes itself)."""

    def __init__(self, pool: Any, config: ServerConfig, metrics: Metrics | None = None,
                 names: NameTable | None = None, shared: SharedPoolStats | None = None) -> None:
        self.pool = pool
        self.config = config
        self.metrics = metrics or Metrics()
        self.snapshots = Snapshots(pool, allow_dirs=config.allow_dirs, max_file_size=config.max_body, table=names)
        self.registering = 0  # registrations being built
        self.shutting_down = False
        self.in_flight = 0  # calls received and not answered yet
        self._waiting: set[asyncio.Future] = set()  # their pool futures, as awaited by the handlers
        self._expired: set[asyncio.Future] = set()  # those cancelled because the grace period ran out
        self._openapi: bytes | None = None
        self.started = time.time()
        # with several front ends: this one's pid, sent as X-Hlpool-Frontend on every response, and the
        # calls in flight of every front end
        self.frontend: str | None = None
        self.in_flight_slots: InFlightSlots | None = None
        self.metrics.attach_in_flight(self._in_flight_total)
        if shared is not None:  # the pools of every front end
            self.metrics.attach_pool(shared.stats, shared.restarts, lambda: len(self.snapshots), self.ready)
        elif pool is not None:
            self.metrics.attach_pool(pool.stats, lambda: pool.restarts, lambda: len(self.snapshots), self.ready)

    @property
    def entries(self) -> dict[str, SnapshotEntry]:
        return self.snapshots.entries

    def load(self, guests: Mapping[str, str]) -> None:
        """Serve each guest ELF or .hlsnap file as its name (blocking: before the server starts)."""
        for name, path in guests.items():
            entry = self.snapshots.build_file(name, path)
            self.snapshots.add(entry)
            log.info("serving %s: %s (%s)", name, ", ".join(entry.handle.exports), entry.handle.path)

    def _in_flight_total(self) -> int:
        return self.in_flight if self.in_flight_slots is None else self.in_flight_slots.total()

    def ready(self) -> bool:
        return not self.shutting_down and all(s["alive"] for s in self.pool.stats())

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
            if request.content.is_eof():  # all of it arrived (a small body comes with the headers): no timer
                return await request.read()
            return await asyncio.wait_for(request.read(), self.config.body_timeout)
        except web.HTTPRequestEntityTooLarge:
            raise ApiError("payload_too_large", f"the request body is larger than the limit of {limit} bytes") \
                from None
        except asyncio.TimeoutError:  # a slow (or stalled) client: answer, and close the connection
            raise ApiError("request_timeout", f"the request body did not arrive within "
                                              f"{self.config.body_timeout:g} s", headers={"Connection": "close"}) \
                from None
        except ConnectionError as exc:  # the client went away mid-body
            raise ClientGone() from exc
        except RequestPayloadError as exc:  # broken chunked framing or compression: the rest is unreadable
            reason = " ".join(str(exc.__cause__ or exc).split())
            raise ApiError("bad_request", f"the request body is malformed: {reason}",
                           headers={"Connection": "close"}) from None

    async def _read_json(self, request: web.Request) -> Any:
        return parse_json(await self._read_body(request))

    def _check_running(self) -> None:
        if self.shutting_down:
            raise ApiError("shutting_down", "the server is shutting down")

    # ---- handlers (see routes.ROUTES) ------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        return json_response(Index(service="hlpool", version=__version__, openapi="/openapi.json",
                                   snapshots="/v1/snapshots"))

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response(Health(status="ok", version=__version__, uptime=round(time.time() - self.started, 3)))

    async def readyz(self, request: web.Request) -> web.Response:
        stats = self.pool.stats()
        alive = sum(1 for s in stats if s["alive"])
        ready = not self.shutting_down and alive == len(stats)
        body = Readiness(ready=ready, workers=len(stats), workers_alive=alive, snapshots=len(self.snapshots.sync()),
                         shutting_down=self.shutting_down)
        return json_response(body, status=200 if ready else 503)

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": self.metrics.content_type})

    async def openapi(self, request: web.Request) -> web.Response:
        if self._openapi is None:
            self._openapi = encode(openapi_document(self.config))
        return web.Response(body=self._openapi, content_type="application/json", charset="utf-8")

    async def list_snapshots(self, request: web.Request) -> web.Response:
        return json_response(SnapshotList([e.describe() for e in self.snapshots.sync().values()]))

    async def get_snapshot(self, request: web.Request) -> web.Response:
        return json_response(self.snapshots.get(request.match_info["name"]).describe())

    async def register(self, request: web.Request) -> web.Response:
        self._check_running()
        data = await self._read_body(request)
        if data.startswith(b"\x7fELF"):
            raise ApiError("bad_request", "upload a guest ELF with PUT /v1/snapshots/NAME")
        body = decode_register(parse_json(data))
        build: Callable[[], SnapshotEntry]
        if isinstance(body, RegisterScript):
            build = partial(self.snapshots.build_script, body.name, body.language, body.source)
        elif isinstance(body, RegisterDerived):
            base = self.snapshots.get(body.base)
            unknown = [c.fn for c in body.calls if c.fn not in base.handle.exports]
            if unknown and base.handle.language is None:
                raise ApiError("unknown_function", f"snapshot {body.base!r} has no function {unknown[0]!r}; it "
                                                   f"exports {', '.join(base.handle.exports)}")
            if body.map_files:
                self.snapshots.check_path_registration()
            try:
                calls = [(c.fn, from_json(c.args)) for c in body.calls]
            except HlpoolError as exc:  # a malformed {"base64": ...} or {"float": ...}
                raise ApiError("bad_request", f"calls: {exc}") from None
            build = partial(self.snapshots.build_derived, body.name, base, calls, body.map_files, body.retain,
                            self.config.call_timeout)
            return await self._register(body.name, build, derive_error)
        else:
            self.snapshots.check_path_registration()  # off without --allow-dir: say so before anything else
            build = partial(self.snapshots.build_path, body.name, body.path)
        return await self._register(body.name, build)

    async def upload(self, request: web.Request) -> web.Response:
        self._check_running()
        name = request.match_info["name"]
        self.snapshots.check_new_name(name)
        data = await self._read_body(request)
        if not data.startswith(b"\x7fELF"):
            raise ApiError("snapshot_error", "the upload is not an ELF file (build guests with "
                                             "`hlpool guest build`)")
        return await self._register(name, partial(self.snapshots.build_upload, name, data))

    async def remove(self, request: web.Request) -> web.Response:
        """Stop serving a name; delete its store file unless another name serves it (see routes.ROUTES)."""
        self._check_running()
        name = request.match_info["name"]
        entry = self.snapshots.get(name)
        path = entry.handle.path
        deleted = False
        if not any(e.handle.path == path for n, e in self.snapshots.entries.items() if n != name):
            try:  # quick (a directory scan, non-blocking locks) and atomic with the call handlers
                deleted = self.pool.remove_snapshot(entry.handle)
            except SnapshotError as exc:
                raise ApiError("snapshot_in_use", str(exc)) from None
        self.snapshots.remove(name)
        log.info("removed %s (%s%s)", name, path, "" if deleted else ", file kept")
        return json_response(Removed(name=name, path=path, deleted=deleted))

    async def collect_garbage(self, request: web.Request) -> web.Response:
        self._check_running()
        removed = await in_daemon_thread(self.pool.collect_garbage, "hlpool-gc")
        return json_response(GarbageCollected(removed=removed, store=msgspec.convert(self.pool.store.describe(),
                                                                                     StoreInfo)))

    async def _register(self, name: str, build: Callable[[], SnapshotEntry],
                        errors: Callable[[BaseException], ApiError] = registration_error) -> web.Response:
        """Reserve ``name``, build its snapshot in a daemon thread (holding no lock), then publish it."""
        if self.registering >= self.config.max_registrations:
            raise ApiError("overloaded", f"{self.registering} registrations are being built; try again later")
        with self.snapshots.reserve(name):  # a failed (or abandoned) build gives the name back
            self.registering += 1
            try:
                entry = await in_daemon_thread(build, f"hlpool-register-{name}")
            except ApiError:
                self.metrics.registrations.labels("error").inc()
                raise
            except (HlpoolError, OSError) as exc:
                self.metrics.registrations.labels("error").inc()
                raise errors(exc) from None
            finally:
                self.registering -= 1
            self.snapshots.add(entry)
        self.metrics.registrations.labels("ok").inc()
        log.info("registered %s: %s (%s)", name, ", ".join(entry.handle.exports), entry.handle.path)
        return json_response(entry.describe(), status=201, headers={"Location": f"/v1/snapshots/{name}"})

    async def call(self, request: web.Request) -> web.Response:
        name, fn = request.match_info["name"], request.match_info["function"]
        target = self.call_target(name, fn)
        call = self.submit_call(target, fn, await self._read_body(request))
        try:
            await call.waiting
        except asyncio.CancelledError:  # the call was ended by the grace period, or this handler cancelled
            self.end_call(call, cancelled=True)  # raises (shutting_down, or the cancellation)
        except Exception:  # noqa: BLE001 - end_call turns the call's error into its answer
            pass
        return web.Response(body=self.end_call(call), content_type="application/json", charset="utf-8")

    # ---- the call route in parts (shared with the fast lane, :mod:`.fastlane`) -----------------

    def call_target(self, name: str, fn: str) -> SnapshotEntry:
        """The snapshot a call names, checked before its body is read: ``shutting_down``,
        ``unknown_snapshot``, ``unknown_function`` (a script's functions are its own to check)."""
        self._check_running()
        entry = self.snapshots.get(name)
        if fn not in entry.handle.exports and entry.handle.language is None:
            raise ApiError("unknown_function", f"snapshot {name!r} has no function {fn!r}; it exports "
                                               f"{', '.join(entry.handle.exports)}")
        return entry

    def submit_call(self, entry: SnapshotEntry, fn: str, body: bytes) -> CallInFlight:
        """Decode a call's body and hand the call to the pool (``bad_json``, ``bad_request``, the pool's
        errors such as ``overloaded``); the returned call must be ended with :meth:`end_call` once its
        ``waiting`` future is done."""
        args, timeout = parse_call(body, self.config.call_timeout)
        call = CallInFlight(entry, fn, time.perf_counter())
        self._call_started(1)
        try:
            call.waiting = self.pool.call_future(entry.handle, fn, args, timeout=timeout)
        except BaseException as exc:
            self._call_started(-1)
            error = api_error(exc) if isinstance(exc, HlpoolError) else None
            self._observe(call, error.code if error is not None else "internal")
            if error is not None:
                raise error from None
            raise
        self._waiting.add(call.waiting)
        return call

    def end_call(self, call: CallInFlight, cancelled: bool = False) -> bytes:
        """The JSON answer of a call whose future is done; its error as an :class:`ApiError` (a call the
        grace period ended: ``shutting_down``); ``asyncio.CancelledError`` if it was cancelled otherwise
        (``cancelled``: the handler waiting for it was, e.g. the server cancels its handlers)."""
        waiting = call.waiting
        expired = waiting in self._expired
        self._waiting.discard(waiting)
        self._expired.discard(waiting)
        self._call_started(-1)
        if cancelled or waiting.cancelled():
            self._observe(call, "shutting_down" if expired else "cancelled")
            if not expired:
                raise asyncio.CancelledError()
            raise ApiError("shutting_down", f"the server stopped before the call finished (grace period "
                                            f"{self.config.grace:g} s)")
        exc = waiting.exception()
        if exc is not None:
            error = api_error(exc)  # an unexpected exception is logged and answered as ``internal``
            self._observe(call, error.code)
            raise error from None
        self._observe(call, "ok")
        return encode(CallResult(result=to_json(waiting.result())))

    def _call_started(self, delta: int) -> None:
        self.in_flight += delta
        if self.in_flight_slots is not None:
            self.in_flight_slots.set(self.in_flight)

    def _observe(self, call: CallInFlight, outcome: str) -> None:
        # A script's function names come from requests: label only those that answered, so a
        # client cannot grow the metrics without bound with made-up names.
        script = call.entry.handle.language is not None
        label = call.fn if not script or outcome == "ok" else "<other>"
        self.metrics.observe_call(call.entry.name, label, outcome, time.perf_counter() - call.start)


class CallInFlight:
    """One call submitted by :meth:`Service.submit_call`: its snapshot, function, start time and the
    asyncio future its answer settles."""

    __slots__ = ("entry", "fn", "start", "waiting")

    def __init__(self, entry: SnapshotEntry, fn: str, start: float) -> None:
        self.entry = entry
        self.fn = fn
        self.start = start
        self.waiting: asyncio.Future = None  # type: ignore[assignment]  # set by submit_call


async def in_daemon_thread(fn: Callable[[], Any], name: str) -> Any:
    """``fn()`` in a new daemon thread, awaited. Unlike the loop's default executor, whose threads
    ``asyncio.run`` and the interpreter wait for, an abandoned call (the server stops while it runs)
    does not hold up the process's exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not future.done():  # cancelled meanwhile: nobody waits
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    def run() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (fn(), None)
        except BaseException as exc:  # handed to the awaiting handler
            outcome = (None, exc)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the loop is closed: the server stopped
            pass

    threading.Thread(target=run, name=name[:64], daemon=True).start()
    return await future
